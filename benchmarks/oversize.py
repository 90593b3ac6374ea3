"""`make bench` step: requests far over --max-message-bytes, and the server's peak memory (issue 24, item 4).

    python -m benchmarks.oversize --model-dir runs/bench/exported [--sizes-mib 200 1024]

For each gRPC front end, a fresh default server (`python -m serving`, nothing but the model and ports)
gets, one case per server so each peak is its own: one ModelInfer of 200 MiB, one of 1 GiB, and four of
200 MiB at once. Each is an Open Inference Protocol ModelInferRequest whose raw input is that many bytes
(the server must refuse it: RESOURCE_EXHAUSTED, over --max-message-bytes, 16 MiB by default). Reported:
the status each got, the server's resident set when idle and its peak (VmHWM) after the case, and that
the server still answers a normal request afterwards. Neither library can refuse a message at its gRPC
length prefix (pygrpc-native 0.5.0 has no receive limit; grpc-core checks the size once the message is
whole), so the peak is about the bytes sent: what bounds it in a deployment is the proxy's request-size
cap (deploy/README.md, "Request size"). Prints one JSON document (the last line).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness import WORK, Server, log, serving_cmd
from loadgen.process import LocalServer
from serving.tensors import field_tag, length_delimited, varint

INFER = "/inference.GRPCInferenceService/ModelInfer"
FRONTENDS = ("native", "grpcio")
MIB = 1 << 20


def infer_request(model: str, width: int, nbytes: int) -> bytes:
    """A ModelInferRequest (wire form) for `model` whose one raw input is `nbytes` of zeros, declared as the
    rows it holds; built field by field so that a 1 GiB request is one allocation."""
    rows = max(1, nbytes // (4 * width))
    dims = varint(rows) + varint(width)
    tensor = (length_delimited(field_tag(1), b"x") + length_delimited(field_tag(2), b"FP32")
              + field_tag(3) + varint(len(dims)) + dims)  # InferInputTensor: name, datatype, packed shape
    head = length_delimited(field_tag(1), model.encode()) + length_delimited(field_tag(5), tensor)
    raw_tag = field_tag(7)  # raw_input_contents
    out = bytearray(head)
    out += raw_tag + varint(nbytes)
    out += bytes(nbytes)
    return bytes(out)


def _status(path: str) -> dict[str, int]:
    out = {}
    for line in Path(path).read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _send(target: str, payloads: list[bytes], timeout_s: float) -> list[str]:
    """Send each payload on its own channel, all at once; the status code name each got."""
    codes: list[str] = [""] * len(payloads)

    def one(i: int) -> None:
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(target, options=opts) as ch:
            call = ch.unary_unary(INFER)
            try:
                call(payloads[i], timeout=timeout_s)
                codes[i] = "OK"
            except grpc.RpcError as e:
                codes[i] = e.code().name

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def case(model_dir: Path, frontend: str, sizes: list[int]) -> dict[str, Any]:
    """One fresh default server on `frontend`, the requests of `sizes` bytes at once; codes and memory."""
    width = int(json.loads((model_dir / "model.json").read_text())["example_shape"][0])
    payloads = [infer_request("encoder", width, n) for n in sizes]
    server: LocalServer = Server(serving_cmd(model_dir, ["--grpc-frontend", frontend]),
                                 f"oversize-{frontend}-{len(sizes)}x{sizes[0] // MIB}")
    try:
        small = infer_request("encoder", width, 4 * width)
        assert _send(server.target, [small], 30) == ["OK"], server.log()
        idle = _status(f"/proc/{server.proc.pid}/status")
        t0 = time.perf_counter()
        codes = _send(server.target, payloads, 120)
        seconds = time.perf_counter() - t0
        still = _send(server.target, [small], 30)
        time.sleep(1.0)
        after = _status(f"/proc/{server.proc.pid}/status")
        return {"frontend": frontend, "request_mib": [n / MIB for n in sizes], "codes": codes,
                "seconds": seconds, "idle_rss_mb": idle["VmRSS"] / 1e6, "peak_rss_mb": after["VmHWM"] / 1e6,
                "rss_after_mb": after["VmRSS"] / 1e6, "still_serving": still == ["OK"]}
    finally:
        server.stop()


def run(model_dir: Path, sizes_mib: tuple[int, int] = (200, 1024)) -> dict[str, Any]:
    small, big = (s * MIB for s in sizes_mib)
    plan = [[small], [big], [small] * 4]
    cases = []
    for frontend in FRONTENDS:
        for sizes in plan:
            r = case(model_dir, frontend, sizes)
            log(f"oversize {frontend:7s} {len(sizes)} x {sizes[0] // MIB} MiB: {r['codes']}, peak RSS "
                f"{r['peak_rss_mb']:,.0f} MB (idle {r['idle_rss_mb']:,.0f}), still serving: {r['still_serving']}")
            cases.append(r)
    return {"cases": cases, "max_message_bytes_default": 16 * MIB}


def markdown(res: dict[str, Any]) -> str:
    lines = ["## Requests far over --max-message-bytes: peak memory", "",
             ("One fresh default server per case (`python -m benchmarks.oversize`); every request is an OIP "
             "ModelInfer whose raw input is the size shown, sent at once from separate channels; peak RSS is "
             "the server's VmHWM after the case. Neither gRPC library can refuse a message at its length "
             "prefix, so the peak follows the bytes sent: a deployment caps request size at its proxy "
             "(deploy/README.md, \"Request size\")."), "",
             "| front end | requests | answered | seconds | idle RSS MB | peak RSS MB | still serving |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in res["cases"]:
        sizes = c["request_mib"]
        what = f"{len(sizes)} x {sizes[0]:,.0f} MiB"
        codes = ", ".join(sorted(set(c["codes"])))
        lines.append(f"| {c['frontend']} | {what} | {codes} | {c['seconds']:.1f} | {c['idle_rss_mb']:,.0f} | "
                     f"{c['peak_rss_mb']:,.0f} | {'yes' if c['still_serving'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.oversize", description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=WORK / "exported")
    p.add_argument("--sizes-mib", type=int, nargs=2, default=(200, 1024), metavar=("SMALL", "BIG"))
    args = p.parse_args(argv)
    res = run(args.model_dir, tuple(args.sizes_mib))
    print(markdown(res))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
