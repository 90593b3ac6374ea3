"""A soak of steady mixed load, the server's RSS sampled over time (issue 28: the memory creep).

    python -m benchmarks.soak --minutes 60 [--model-dir runs/bench/exported] [--grpc-frontend native]

One default server (`python -m serving`, the flags given after `--` added) under the issue's mix, from
this process's threads: 12 gRPC clients calling vae.v1 Encode, Sample and Reconstruct and OIP ModelInfer
with 1-64 rows, about 2% of calls malformed (a wrong shape) and 2% with a deadline too short to meet,
each client reconnecting every 20-200 calls; and 4 REST clients posting JSON and binary-extension
ModelInfer, 2% of them malformed JSON. The server's RSS is sampled every `--sample-s` seconds; the
report is RSS at minutes 1, 5, 10, 20, 30, 40, 50, 60 (those within the run), the growth from minute 1
to the end and over the second half, and every answer's status code, which must be the expected one
(OK, INVALID_ARGUMENT for the malformed, DEADLINE_EXCEEDED or OK for the short deadlines); anything else
is counted as unexpected. Ends with SIGTERM: the server must exit 0. Prints one JSON document last.
Every loop is bounded by the run's end; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.harness import REPO, WORK, Server, log, serving_cmd
from loadgen.process import LocalServer
from serving._proto.inference import grpc_service_pb2 as ipb
from serving._proto.inference import grpc_service_pb2_grpc as igrpc
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.tensors import to_tensor

REPORT_MINUTES = (1, 5, 10, 20, 30, 40, 50, 60)
GRPC_CLIENTS, REST_CLIENTS = 12, 4
BAD_P, SHORT_P = 0.02, 0.02


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_parts_mb(pid: int) -> dict[str, float]:
    """Where the RSS lives: glibc's main heap ([heap], brk), other anonymous mappings (thread arenas,
    large mmapped blocks, Rust and ONNX Runtime allocations) and files (code, models)."""
    parts = {"heap": 0.0, "anon": 0.0, "file": 0.0}
    where = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=6)
        if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):
            name = head[5] if len(head) > 5 else ""
            where = "heap" if name == "[heap]" else "file" if name.startswith("/") else "anon"
        elif line.startswith("Rss:"):
            parts[where] += int(head[1]) / 1024
    # Processes the server started (serving.jsoncodec's worker for large JSON bodies): the pod pays for them too.
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    parts["children"] = sum(_rss_mb(int(k)) for k in kids if Path(f"/proc/{k}").exists())
    return parts


class _Mix:
    """What one run shares: the model's shapes, the end time, and every answer's (kind, code) tally."""

    def __init__(self, width: int, latent: int, end: float) -> None:
        self.width, self.latent, self.end = width, latent, end
        self.codes: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def count(self, kind: str, code: str) -> None:
        with self.lock:
            self.codes[(kind, code)] += 1


def _grpc_client(target: str, mix: _Mix, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < mix.end:
        with grpc.insecure_channel(target) as ch:  # a new connection every 20-200 calls
            vae, oip = pb_grpc.VaeServiceStub(ch), igrpc.GRPCInferenceServiceStub(ch)
            for _ in range(rng.randint(20, 200)):
                if time.monotonic() >= mix.end:
                    return
                rows = rng.randint(1, 64)
                bad = rng.random() < BAD_P
                short = not bad and rng.random() < SHORT_P  # one fault at a time: its code is the expected one
                width = mix.width + (1 if bad else 0)
                x = np.random.default_rng(rng.getrandbits(32)).random((rows, width), dtype=np.float32)
                timeout = 1e-4 if short else 10.0
                kind = rng.choice(("encode", "sample", "reconstruct", "infer"))
                try:
                    if kind == "encode":
                        vae.Encode(pb.EncodeRequest(x=to_tensor(x)), timeout=timeout)
                    elif kind == "sample":
                        vae.Sample(pb.SampleRequest(count=0 if bad else rows, seed=rows), timeout=timeout)
                    elif kind == "reconstruct":
                        vae.Reconstruct(pb.ReconstructRequest(x=to_tensor(x)), timeout=timeout)
                    else:
                        t = ipb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)
                        oip.ModelInfer(ipb.ModelInferRequest(model_name="encoder", inputs=[t],
                                                             raw_input_contents=[x.tobytes()]), timeout=timeout)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                mix.count("bad" if bad else "short" if short else "ok", code)


def _rest_client(port: int, mix: _Mix, seed: int) -> None:
    rng = random.Random(seed)
    url = f"http://127.0.0.1:{port}/v2/models/encoder/infer"
    while time.monotonic() < mix.end:
        rows = rng.randint(1, 64)
        x = np.random.default_rng(rng.getrandbits(32)).random((rows, mix.width), dtype=np.float32)
        bad = rng.random() < BAD_P
        binary = rng.random() < 0.5
        headers = {"Content-Type": "application/json"}
        if bad:
            body = b'{"inputs": [{"name": "x", "shape": [' + str(rows).encode()  # cut short: not JSON
        elif binary:
            head = json.dumps({"inputs": [{"name": "x", "shape": [rows, mix.width], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 4 * x.size}}]}).encode()
            body = head + x.tobytes()
            headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
        else:
            body = json.dumps({"inputs": [{"name": "x", "shape": [rows, mix.width], "datatype": "FP32",
                                           "data": x.ravel().tolist()}]}).encode()
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                r.read()
                code = "OK"
        except urllib.error.HTTPError as e:
            e.read()
            code = "INVALID_ARGUMENT" if e.code == 400 else f"HTTP_{e.code}"
        except OSError as e:
            code = type(e).__name__
        mix.count("bad" if bad else "ok", code)


def _unexpected(codes: Counter[tuple[str, str]]) -> int:
    allowed = {"ok": {"OK"}, "bad": {"INVALID_ARGUMENT"}, "short": {"OK", "DEADLINE_EXCEEDED"}}
    return sum(n for (kind, code), n in codes.items() if code not in allowed[kind])


def run(model_dir: Path, minutes: float, sample_s: float, flags: list[str], trace_dir: Path | None = None,
        name: str = "soak", unpinned: bool = False) -> dict[str, Any]:
    manifest = json.loads((model_dir / "model.json").read_text())
    width, latent = int(np.prod(manifest["example_shape"])), int(manifest["latent_dim"])
    cmd = serving_cmd(model_dir, flags)
    if trace_dir is not None:  # tracemalloc snapshots every 5 minutes (benchmarks/soak_trace/sitecustomize.py)
        trace_dir.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).resolve().parent / "soak_trace"
        cmd = ["env", f"PYTHONPATH={here}", f"VAE_SOAK_TRACE_DIR={trace_dir.resolve()}", *cmd]
    server = LocalServer.start(cmd, WORK, name, cwd=REPO) if unpinned else Server(cmd, name)
    t0 = time.monotonic()
    mix = _Mix(width, latent, t0 + 60 * minutes)
    threads = [threading.Thread(target=_grpc_client, args=(server.target, mix, i), daemon=True)
               for i in range(GRPC_CLIENTS)]
    threads += [threading.Thread(target=_rest_client, args=(server.http_port, mix, 100 + i), daemon=True)
                for i in range(REST_CLIENTS)]
    for t in threads:
        t.start()
    samples: list[tuple[float, float]] = []
    parts: list[tuple[float, dict[str, float]]] = []
    try:
        while time.monotonic() < mix.end:
            samples.append(((time.monotonic() - t0) / 60, _rss_mb(server.pid)))
            parts.append((samples[-1][0], _rss_parts_mb(server.pid)))
            m, rss = samples[-1]
            if len(samples) % max(1, int(60 / sample_s)) == 1:
                total = sum(mix.codes.values())
                log(f"soak minute {m:5.1f}: RSS {rss:6.1f} MB, {total:,} answers, "
                    f"{_unexpected(mix.codes)} unexpected; ETA {max(0.0, (mix.end - time.monotonic()) / 60):.1f} min")
            time.sleep(sample_s)
        for t in threads:
            t.join(30)
    finally:
        exit_code = server.stop()

    def at(minute: float) -> float | None:
        near = [rss for m, rss in samples if abs(m - minute) <= sample_s / 60]
        return None if not near else float(np.median(near))

    table = {m: at(m) for m in REPORT_MINUTES if m <= minutes}
    first, last = at(1), samples[-1][1] if samples else None
    half = at(minutes / 2)
    def parts_at(minute: float) -> dict[str, float] | None:
        near = [p for m, p in parts if abs(m - minute) <= sample_s / 60]
        return None if not near else {k: float(np.median([p[k] for p in near])) for k in near[0]}

    return {"minutes": minutes, "flags": flags, "rss_mb_at_minute": table, "samples": samples,
            "rss_parts_mb_at_minute": {m: parts_at(m) for m in table},
            "answers_per_s": sum(mix.codes.values()) / (60 * minutes),
            "growth_mb_1_to_end": None if first is None or last is None else last - first,
            "growth_mb_second_half": None if half is None or last is None else last - half,
            "codes": {f"{k}/{c}": n for (k, c), n in sorted(mix.codes.items())},
            "unexpected": _unexpected(mix.codes), "exit_code": exit_code}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--model-dir", type=Path, default=WORK / "exported")
    p.add_argument("--tracemalloc-dir", type=Path, default=None,
                   help="run the server under tracemalloc and dump a snapshot here every 5 minutes (slower; "
                        "compare them with python -m benchmarks.soak_diff)")
    p.add_argument("--name", default="soak", help="the server's ready and log files under runs/bench")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON document here")
    p.add_argument("--unpinned", action="store_true",
                   help="do not pin the server to CPU 0 (soaks run side by side share both CPUs)")
    p.add_argument("flags", nargs="*", help="server flags after --, e.g. -- --grpc-frontend grpcio")
    args = p.parse_args(argv)
    res = run(args.model_dir, args.minutes, args.sample_s, args.flags, args.tracemalloc_dir, args.name, args.unpinned)
    rows = " | ".join(f"{v:.0f}" if v is not None else "-" for v in res["rss_mb_at_minute"].values())
    print("| minute | " + " | ".join(str(m) for m in res["rss_mb_at_minute"]) + " |")
    print("| RSS MB | " + rows + " |")
    doc = json.dumps({k: v for k, v in res.items() if k != "samples"})
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(res) + "\n")
    print(doc)
    return 0 if res["unexpected"] == 0 and res["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
