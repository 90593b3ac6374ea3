"""Issue 7's measurements of vae-serve itself, one function per `benchmarks.run` step.

Start-to-SERVING and idle PSS; the do-nothing server (the load generator's ceiling); the gRPC floor
(benchmarks/grpc_floor.py); the serving grid in interleaved rounds, batching on against
`--max-batch-size 1`; Encode C = 1 in alternating pairs; the `--max-queue-delay-us` sweep; py-spy on the
server at C = 64. Each returns the results entry of its name (benchmarks/results/serving.json).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.grpc_floor import h2load_encode
from benchmarks.harness import (
    PY,
    REPO,
    WORK,
    Server,
    bench,
    last_json,
    loadgen_cmd,
    log,
    pinned,
    serving_cmd,
    sh,
)

# (rpc, concurrency, rows per request): issue 7's grid
SCENARIOS: list[tuple[str, int, int]] = [(rpc, c, b) for rpc in ("encode", "sample")
                                         for c, b in ((1, 1), (8, 1), (64, 1), (8, 64))]
MODES: dict[str, list[str]] = {"batching": [], "mbs1": ["--max-batch-size", "1"]}


def startup(model_dir: Path, n: int = 5) -> dict[str, Any]:
    """Start-to-SERVING (process start to ready file) and idle PSS one second after SERVING."""
    from loadgen.procstat import proc_memory_mb

    times, pss = [], []
    for i in range(n):
        s = Server(serving_cmd(model_dir, []), f"startup{i}")
        time.sleep(1.0)
        pss.append(proc_memory_mb(s.pid)["pss_mb"])
        times.append(s.start_s)
        s.stop()
    return {"start_to_serving_s": times, "idle_pss_mb": pss,
            "median_start_s": statistics.median(times), "median_pss_mb": statistics.median(pss),
            "command": " ".join(pinned(0, serving_cmd(model_dir, ["--ready-file", "F"])))}


def null_ceiling(duration_s: float) -> dict[str, Any]:
    """The do-nothing server (the generator's ceiling), and one that only does Encode's protobuf work."""
    s = Server([PY, "-m", "loadgen.null_server", "--kind", "aio-uvloop", "--stop-after-s", "600"], "null")
    try:
        runs = [bench(s.ready_path, "encode", c, 1, duration_s) for c in (1, 8, 64)]
        h2 = h2load_ceiling(s.grpc_port, s.pid)
    finally:
        s.stop()
    s = Server([PY, "-m", "loadgen.null_server", "--kind", "aio-uvloop", "--proto", "--stop-after-s", "600"], "null-proto")
    try:
        proto = [bench(s.ready_path, "encode", c, b, duration_s) for c, b in ((64, 1), (8, 64))]
    finally:
        s.stop()
    return {"runs": runs, "h2load": h2, "proto_runs": proto}


def h2load_ceiling(port: int, pid: int, n: int = 20000) -> dict[str, Any] | None:
    """The same do-nothing server driven by h2load (C, nghttp2), if installed: the server's own ceiling."""
    if shutil.which("h2load") is None:
        return None
    r = h2load_encode(port, pid, n, 64, WORK / "encode1.grpc")
    return {k: r[k] for k in ("requests_per_s", "server_cpu_us_per_request", "command")}


def grpc_floor() -> dict[str, Any] | None:
    """Do-nothing servers of every grpcio kind (aio on asyncio/uvloop, thread-pool), driven by h2load."""
    if shutil.which("h2load") is None:
        log("h2load not installed (scripts/ensure_system_tools.sh h2load): skipping the gRPC floor")
        return None
    res = last_json(sh([PY, "-m", "benchmarks.grpc_floor"], 1200))
    res["command"] = "python -m benchmarks.grpc_floor"
    return res


def c1_alternating(model_dir: Path, pairs: int = 6, duration_s: float = 2.0) -> dict[str, Any]:
    """Encode C = 1 p50, batching vs --max-batch-size 1, both servers up, runs alternating A, B, A, B, ...

    The 10% target is finer than this machine's drift over a minute (about 20% seen between rounds),
    so the two modes are compared in back-to-back pairs rather than in separate rounds.
    """
    servers = {mode: Server(serving_cmd(model_dir, flags), f"c1-{mode}") for mode, flags in MODES.items()}
    p50: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for _ in range(pairs):
            for mode, s in servers.items():
                r = bench(s.ready_path, "encode", 1, 1, duration_s, ["--warmup-s", "0.5"])
                p50[mode].append(r["latency_ms"]["p50"])
    finally:
        for s in servers.values():
            s.stop()
    ratios = [b / m for b, m in zip(p50["batching"], p50["mbs1"], strict=True)]
    return {"p50_ms": p50, "ratios": ratios, "median_p50_ms": {k: statistics.median(v) for k, v in p50.items()},
            "median_ratio": statistics.median(ratios), "pairs": pairs, "duration_s": duration_s}


def delay_sweep(model_dir: Path, duration_s: float) -> list[dict[str, Any]]:
    """Batching Encode at C = 8 and 64 with longer --max-queue-delay-us: how much batches grow."""
    out = []
    for delay in (2000, 10000):
        s = Server(serving_cmd(model_dir, ["--max-queue-delay-us", str(delay)]), f"delay{delay}")
        try:
            for c in (8, 64):
                out.append(bench(s.ready_path, "encode", c, 1, duration_s) | {"max_queue_delay_us": delay})
        finally:
            s.stop()
    return out


def serving_scenarios(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    """Issue 7's grid in `rounds` interleaved rounds of both modes; latencies at C = 64 pooled over rounds."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for mode, flags in MODES.items():
            s = Server(serving_cmd(model_dir, flags), mode)
            try:
                log(f"round {r + 1}/{rounds}, {mode}: {len(SCENARIOS)} scenarios")
                for rpc, c, b in SCENARIOS:
                    extra = ["--latencies-out", str(WORK / f"lat_{mode}_{rpc}_c{c}_r{r}.npy")] if c == 64 else []
                    runs.setdefault(f"{mode}/{rpc}/c{c}/b{b}", []).append(bench(s.ready_path, rpc, c, b, duration_s,
                                                                                 extra))
                if r == 0:  # once per mode: an open loop, and the OIP path
                    runs.setdefault(f"{mode}/encode/open1000/b1", []).append(
                        bench(s.ready_path, "encode", 1, 1, duration_s, ["--rate", "1000"]))
                    runs.setdefault(f"{mode}/infer-encoder/c64/b1", []).append(
                        bench(s.ready_path, "infer-encoder", 64, 1, duration_s))
            finally:
                s.stop()
    return {"rounds": rounds, "duration_s": duration_s, "runs": runs} | pooled_latencies()


def pooled_latencies() -> dict[str, Any]:
    """Percentiles and a histogram of the C = 64 latencies the rounds saved (runs/bench/lat_*.npy)."""
    import numpy as np

    latencies: dict[str, Any] = {}
    edges = np.logspace(-2, 3, 101)  # ms: 10 us .. 1 s, 20 bins a decade
    hist: dict[str, Any] = {"edges_ms": edges.tolist(), "counts": {}}
    for mode in MODES:
        for rpc in ("encode", "sample"):
            files = sorted(WORK.glob(f"lat_{mode}_{rpc}_c64_r*.npy"))
            if files:
                lat = np.concatenate([np.load(f) for f in files])
                latencies[f"{mode}/{rpc}"] = {f"p{q:g}": float(np.percentile(lat, q))
                                              for q in (1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)}
                latencies[f"{mode}/{rpc}"]["max"] = float(lat.max())
                hist["counts"][f"{mode}/{rpc}"] = np.histogram(np.clip(lat, edges[0], edges[-1]), edges)[0].tolist()
    return {"latency_c64_ms": latencies, "latency_c64_hist": hist}


def profile(model_dir: Path, py_spy: str, seconds: int = 10) -> dict[str, Any] | None:
    """py-spy record on the batching server at C = 64 single-row Encode; top frames by own and total time."""
    s = Server(serving_cmd(model_dir, []), "profile")
    raw = WORK / "profile_encode_c64.txt"
    try:
        cmd = pinned(1, loadgen_cmd(s.ready_path, "encode", 64, 1, seconds + 3))
        load = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)
        # --gil: only the thread holding the GIL, i.e. the event loop's work that saturates CPU 0 (ONNX
        # Runtime releases the GIL and shows up only around its calls); time in grpc's Cython core and
        # uvloop shows as the Python frame that called them (Runner.run: the event loop itself).
        spy = [py_spy, "record", "--pid", str(s.pid), "--duration", str(seconds), "--rate", "200",
               "--format", "raw", "--threads", "--gil", "--nonblocking", "--output", str(raw)]
        subprocess.run(pinned(1, spy), check=False, cwd=REPO, capture_output=True, timeout=seconds + 60)
        load.wait(seconds + 60)
    finally:
        s.stop()
    if not raw.is_file():
        return None
    return summarize_profile(raw) | {"command": " ".join(spy)}


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed stacks -> the frames with the most samples, own (leaf) and total (anywhere on the stack)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    threads: dict[str, int] = {}
    n = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        n += k
        frames = stack.split(";")
        threads[frames[0]] = threads.get(frames[0], 0) + k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames[1:]):
            total[f] = total.get(f, 0) + k

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(100 * v / n, 1)) for f, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": n, "threads": pct(threads), "own": pct(own), "total": pct(total)}
