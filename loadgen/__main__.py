"""Load generator for a local vae-serve server: closed or open loop, pre-serialised requests, asyncio.

    python -m loadgen --ready-file ready.json --rpc encode --concurrency 64 --rows 1 --duration-s 5
    python -m loadgen --target 127.0.0.1:50051 --server-pid 1234 --rpc sample --rate 2000
    python -m loadgen --ready-file ready.json --rpc infer-encoder --streams 8 --stream-inflight 8

Streaming (`--streams N`): N bidirectional streams (EncodeStream, ..., or ModelStreamInfer for infer-*),
each keeping `--stream-inflight M` messages unanswered; server CPU is then reported per message
(loadgen/streams.py).

Closed loop: `--concurrency C` requests always in flight, each worker sending its next request when the
previous one answers. Open loop: `--rate R` requests/s offered on a fixed schedule whatever the server
does; latency is measured from each request's *scheduled* send time, so a stalled server is not hidden
by the generator slowing down (no coordinated omission).

Low overhead by construction: requests are serialised once before the run (`--distinct` different
inputs, used round-robin) and sent through a generic unary-unary method of a `grpc.aio` channel with
identity serialisers; responses stay undecoded bytes. The event loop is asyncio's own by default
(`--loop uvloop` to compare; measured here, the generator's CPU per request was the same on both).
Its own ceiling, measured against `python -m loadgen.null_server` (a grpc.aio server that answers every
method with an empty message), is in BENCHMARKS.md.

Reported (a table, then one JSON line, the last line on stdout): requests/s, rows/s, latency
p50/p90/p99/max, errors by status code; for a local server PID (`--server-pid`, or the ready file's),
its CPU seconds per request and per row over the measured window (from /proc/PID/stat) and its memory
(PSS from /proc/PID/smaps_rollup); the generator's own CPU use, with `generator.bottleneck` true when
its event-loop thread was busy enough (>= 85% of a core) to be the limit, or an open loop fell behind.

Bounded: `--duration-s` <= 600, `--warmup-s` <= 60, at most `--max-requests` sent. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc

from loadgen.report import format_table
from loadgen.requests import model_info
from loadgen.run import run_bench
from loadgen.spec import ALL_RPCS, HTTP_RPCS, MAX_DURATION_S, BenchError, BenchSpec, check_loopback
from serving.loop import loop_factory


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadgen", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", help="HOST:PORT of a loopback server (or use --ready-file)")
    p.add_argument("--ready-file", type=Path,
                   help="server's ready file {grpc_port, http_port, metrics_port, pid}: gives target (the HTTP "
                        "port for http-* RPCs), PID and metrics port")
    p.add_argument("--server-pid", type=int, help="local server PID for CPU and memory (default: ready file's)")
    p.add_argument("--rpc", default="encode", choices=sorted(ALL_RPCS),
                   help="RPC to load; http-*: the Open Inference Protocol over REST (binary or JSON tensors)")
    p.add_argument("--rows", type=int, default=1, help="rows per request B (Sample: count)")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: offered requests/s (instead of --concurrency)")
    p.add_argument("--duration-s", type=float, default=5.0, help=f"measured window (<= {MAX_DURATION_S:g})")
    p.add_argument("--warmup-s", type=float, default=1.0, help="load before the window, not measured")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="stop after sending this many")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each RPC")
    p.add_argument("--distinct", type=int, default=16, help="different pre-serialised requests, round-robin")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (TCP connections) to spread over")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: cap on outstanding requests")
    p.add_argument("--streams", type=int, default=0,
                   help="streaming: this many bidirectional streams instead of unary calls (0 = unary)")
    p.add_argument("--stream-inflight", type=int, default=1, help="streaming: messages unanswered per stream")
    p.add_argument("--example-shape", type=int, nargs="+", default=[784],
                   help="example shape when the server does not report one (a null server)")
    p.add_argument("--latent-dim", type=int, default=20, help="latent dim when the server does not report one")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop of the generator (measured here: the same CPU per request on both)")
    p.add_argument("--latencies-out", type=Path, help="also save the window's latencies (ms) as .npy")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        target, pid, metrics_port, grpc_target = args.target, args.server_pid, None, None
        http = args.rpc in HTTP_RPCS
        if args.ready_file is not None:
            info = json.loads(args.ready_file.read_text())
            grpc_target = f"127.0.0.1:{info['grpc_port']}" if info.get("grpc_port", -1) > 0 else None
            port = info.get("http_port", info.get("metrics_port", -1)) if http else info["grpc_port"]
            target = target or f"127.0.0.1:{port}"
            pid = pid if pid is not None else int(info["pid"])
            metrics_port = int(info.get("metrics_port", -1))
        if target is None:
            raise BenchError("target: give --target HOST:PORT or --ready-file")
        if pid is not None and not Path(f"/proc/{pid}/stat").exists():
            raise BenchError(f"server-pid: no local process {pid}")
        check_loopback(target)
        shape_target = grpc_target if http else target
        model = model_info(shape_target, args.timeout_s) if shape_target else None
        example_shape, latent_dim, input_names = ((model.example_shape, model.latent_dim, model.input_names)
                                                  if model else (tuple(args.example_shape), args.latent_dim, None))
        spec = BenchSpec(target=target, rpc=args.rpc, rows=args.rows, concurrency=args.concurrency,
                         rate=args.rate, duration_s=args.duration_s, warmup_s=args.warmup_s,
                         max_requests=args.max_requests, timeout_s=args.timeout_s, distinct=args.distinct,
                         channels=args.channels, max_inflight=args.max_inflight, streams=args.streams,
                         stream_inflight=args.stream_inflight, server_pid=pid,
                         metrics_port=metrics_port, example_shape=example_shape, latent_dim=latent_dim,
                         input_names=input_names)
        with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
            result = runner.run(run_bench(spec, args.latencies_out))
    except (BenchError, grpc.RpcError, OSError) as e:
        sys.stderr.write(f"python -m loadgen: {e}\n")
        return 2
    print(format_table(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
