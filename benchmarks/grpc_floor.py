"""The floor under any Python gRPC server here: server CPU per request of do-nothing servers, by kind.

    python -m benchmarks.grpc_floor                       # every kind, 3 interleaved rounds (about 2 min)
    python -m benchmarks.grpc_floor --kinds aio-uvloop sync-4 --rounds 1 --requests 5000

Issue 7 asks for at most 150 us of server CPU per single-row request at C = 64. Whatever a server does
per request comes on top of what its gRPC stack costs for an RPC that does nothing, so this measures that
cost for each way grpcio can serve Python code:

    aio-asyncio   grpc.aio server on asyncio's default event loop
    aio-uvloop    grpc.aio server on uvloop (what `python -m serving` runs)
    sync-N        grpc.server (the thread-pool server) with N worker threads

Each server (`loadgen.null_server`) answers every unary method with an empty message without decoding
the request (no protobuf work at all). It runs in its own process pinned to CPU 0; h2load (nghttp2's C load generator, Debian
`nghttp2-client`) sends `--requests` single-row Encode requests over one connection with `--streams`
(64) in flight, pinned to CPU 1, so the client is never the limit. Server CPU comes from /proc (every
thread of the process). Kinds run interleaved in `--rounds` rounds; the median round is reported.
Prints a table and writes one JSON document (`--out`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import PIN, WORK, Server, pinned
from loadgen.procstat import proc_cpu_s
from loadgen.requests import build_requests

KINDS: tuple[str, ...] = ("aio-asyncio", "aio-uvloop", "sync-1", "sync-4", "sync-16", "sync-64")
ENCODE_PATH = "/vae.v1.VaeService/Encode"


# -- the driver ------------------------------------------------------------------------------------------

def h2load_encode(port: int, pid: int, requests: int, streams: int, body: Path) -> dict[str, Any]:
    """Send `requests` single-row Encode requests with h2load (one connection, `streams` in flight)."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise RuntimeError("h2load not found (Debian package nghttp2-client; scripts/ensure_system_tools.sh h2load)")
    if not body.is_file():
        msg = build_requests("encode", 1, (784,), 20, distinct=1)[0]
        body.write_bytes(b"\0" + struct.pack(">I", len(msg)) + msg)  # gRPC length-prefixed message
    cmd = pinned(1, [h2load, "-n", str(requests), "-c", "1", "-m", str(streams), "-d", str(body),
                     "-H", "content-type: application/grpc", "-H", "te: trailers",
                     f"http://127.0.0.1:{port}{ENCODE_PATH}"])
    c0 = proc_cpu_s(pid)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    cpu = proc_cpu_s(pid) - c0
    finished = next(ln for ln in out.splitlines() if ln.startswith("finished in"))
    status = next(ln for ln in out.splitlines() if ln.startswith("status codes:"))
    ok = int(status.split(":", 1)[1].split()[0])  # "N 2xx": gRPC answers HTTP 200 even for errors
    return {"requests_per_s": float(finished.split(",")[1].split()[0]), "http_2xx": ok,
            "server_cpu_us_per_request": 1e6 * cpu / requests, "command": " ".join(cmd)}


def measure(kind: str, requests: int, streams: int, work: Path) -> dict[str, Any]:
    """Start a `kind` server pinned to CPU 0 (benchmarks.harness.Server), warm it up, drive it once, stop it."""
    WORK.mkdir(parents=True, exist_ok=True)
    server = Server([sys.executable, "-m", "loadgen.null_server", "--kind", kind], f"floor-{kind}")
    try:
        port, pid = server.grpc_port, server.pid
        body = work / "encode1.grpc"
        h2load_encode(port, pid, min(2000, requests), streams, body)  # warm-up
        r = h2load_encode(port, pid, requests, streams, body)
        if r["http_2xx"] != requests:
            raise RuntimeError(f"{kind}: {r['http_2xx']} of {requests} requests answered")
        return r
    finally:
        server.stop()


def run(kinds: list[str], rounds: int, requests: int, streams: int) -> dict[str, Any]:
    """Every kind in every round (interleaved, so drift on the machine hits them alike); medians."""
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="grpc_floor.") as tmp:
        for rnd in range(rounds):
            for kind in kinds:
                r = measure(kind, requests, streams, Path(tmp))
                samples[kind].append(r)
                print(f"[grpc_floor] round {rnd + 1}/{rounds} {kind:12s} {r['server_cpu_us_per_request']:6.0f} us "
                      f"CPU/request, {r['requests_per_s']:8,.0f} req/s", file=sys.stderr, flush=True)
    out: dict[str, Any] = {"requests": requests, "streams": streams, "rounds": rounds, "pinned": PIN,
                           "h2load_command": samples[kinds[0]][0]["command"], "kinds": {}}
    for kind, rs in samples.items():
        cpu = [r["server_cpu_us_per_request"] for r in rs]
        out["kinds"][kind] = {"server_cpu_us_per_request": statistics.median(cpu),
                              "requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
                              "server_cpu_us_per_request_rounds": cpu}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="server CPU per request of do-nothing Python gRPC servers",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="server kinds to measure")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    p.add_argument("--requests", type=int, default=20000, help="requests per measurement")
    p.add_argument("--streams", type=int, default=64, help="requests in flight (h2load -m)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    args = p.parse_args()
    if args.rounds < 1 or args.requests < 1 or args.streams < 1:
        p.error("--rounds, --requests and --streams must be >= 1")
    res = run(args.kinds, args.rounds, args.requests, args.streams)
    for kind, r in res["kinds"].items():
        print(f"{kind:12s} {r['server_cpu_us_per_request']:6.0f} us CPU/request  {r['requests_per_s']:8,.0f} req/s")
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1) + "\n")
        tmp.replace(args.out)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
