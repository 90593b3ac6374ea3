"""Every benchmark of issue 7 in one command; writes benchmarks/results/*.json, the plots and BENCHMARKS.md.

    python -m benchmarks.run                 # what `make bench` runs (about 10-13 minutes on 2 CPUs)
    python -m benchmarks.run --rounds 1      # one round of the serving scenarios instead of three
    python -m benchmarks.run --render-only   # BENCHMARKS.md and plots again from the results JSON
    python -m benchmarks.run --only stream   # just the streaming rows against Triton (results/streams.json)

Steps: train and export the reference-shaped model (MLP 784-400-20, MNIST test set, 3 epochs: enough
for serving speed); the in-process ONNX Runtime ceiling; start-to-SERVING time and idle PSS (5 starts);
the do-nothing server (the load generator's ceiling); do-nothing servers of each grpcio kind under
h2load (benchmarks/grpc_floor.py, the floor under any Python gRPC server); the serving scenarios, Encode and Sample at
C = 1, 8, 64 with B = 1 and C = 8 with B = 64, with batching on and with `--max-batch-size 1`, in
`--rounds` interleaved rounds (medians reported, so other load on the machine hits both modes alike);
py-spy on the server at C = 64 when py-spy is installed; the training recipes (benchmarks/train_recipes.py:
the pytorch/examples VAE against the defaults at the same wall-clock, MNIST and digits, about 5 minutes) and
the training loop speed (benchmarks/train_loop.py); `make demo` wall time. The server is pinned to CPU 0 and the load generator
to CPU 1 with taskset when two CPUs exist.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen.process import LocalServer
from loadgen.process import serving_cmd as loadgen_serving_cmd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "runs" / "bench"
MNIST = REPO.parent / "shared" / "data" / "mnist"
PY = sys.executable
TRAIN_FLAGS = ["--data", f"mnist:{MNIST}", "--hidden", "400", "--latent-dim", "20", "--epochs", "3",
               "--seed", "0", "--device", "cpu", "--no-progress", "--log-level", "WARNING"]
# (rpc, concurrency, rows per request): issue 7's grid
SCENARIOS: list[tuple[str, int, int]] = [(rpc, c, b) for rpc in ("encode", "sample")
                                         for c, b in ((1, 1), (8, 1), (64, 1), (8, 64))]
MODES: dict[str, list[str]] = {"batching": [], "mbs1": ["--max-batch-size", "1"]}
PIN = (os.cpu_count() or 1) >= 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return (["taskset", "-c", str(cpu)] + cmd) if PIN and shutil.which("taskset") else cmd


def sh(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, check=False, cwd=REPO, text=True, capture_output=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# -- the model -------------------------------------------------------------------------------------

def prepare_model(reuse: bool) -> Path:
    out = WORK / "exported"
    if reuse and (out / "model.json").is_file():
        log(f"reusing {out}")
        return out
    run = WORK / "train"
    shutil.rmtree(run, ignore_errors=True)
    log("training the reference-shaped model (MLP 784-400-20, MNIST test set, 3 epochs)")
    sh([PY, "-m", "training.fit", *TRAIN_FLAGS, "--out", str(run)], 900)
    shutil.rmtree(out, ignore_errors=True)
    sh([PY, "-m", "training.export", "--run", str(run), "--out", str(out)], 600)
    return out


# -- servers -------------------------------------------------------------------------------------------

def Server(cmd: list[str], name: str) -> LocalServer:  # reads as the class it returns
    """`python -m serving` (or a null server) pinned to CPU 0, on port 0, known through its ready file."""
    return LocalServer.start(pinned(0, cmd), WORK, name, cwd=REPO)


def serving_cmd(model_dir: Path, extra: list[str]) -> list[str]:
    return [*loadgen_serving_cmd(model_dir, "--log-level", "WARNING"), *extra]


def bench(ready: Path, rpc: str, c: int, b: int, duration_s: float, extra: list[str] | None = None
          ) -> dict[str, Any]:
    cmd = pinned(1, [PY, "-m", "loadgen", "--ready-file", str(ready), "--rpc", rpc, "--concurrency",
                     str(c), "--rows", str(b), "--duration-s", str(duration_s), "--warmup-s", "1",
                     *(extra or [])])
    out = sh(cmd, duration_s + 120).stdout.strip().splitlines()
    res: dict[str, Any] = json.loads(out[-1])
    res["command"] = " ".join(cmd)
    return res


# -- steps ---------------------------------------------------------------------------------------------

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


def h2load_ceiling(port: int, pid: int, n: int = 20000) -> dict[str, Any] | None:
    """The same do-nothing server driven by h2load (C, nghttp2), if installed: the server's own ceiling."""
    if shutil.which("h2load") is None:
        return None
    from benchmarks.grpc_floor import h2load_encode

    r = h2load_encode(port, pid, n, 64, WORK / "encode1.grpc")
    return {k: r[k] for k in ("requests_per_s", "server_cpu_us_per_request", "command")}


def grpc_floor() -> dict[str, Any] | None:
    """Do-nothing servers of every grpcio kind (aio on asyncio/uvloop, thread-pool), driven by h2load."""
    if shutil.which("h2load") is None:
        log("h2load not installed (scripts/ensure_system_tools.sh h2load): skipping the gRPC floor")
        return None
    res: dict[str, Any] = json.loads(sh([PY, "-m", "benchmarks.grpc_floor"], 1200).stdout.strip().splitlines()[-1])
    res["command"] = "python -m benchmarks.grpc_floor"
    return res


def serving_scenarios(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
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
    return {"rounds": rounds, "duration_s": duration_s, "runs": runs, "latency_c64_ms": latencies,
            "latency_c64_hist": hist}


def profile(model_dir: Path, py_spy: str, seconds: int = 10) -> dict[str, Any] | None:
    """py-spy record on the batching server at C = 64 single-row Encode; top frames by own and total time."""
    s = Server(serving_cmd(model_dir, []), "profile")
    raw = WORK / "profile_encode_c64.txt"
    try:
        cmd = pinned(1, [PY, "-m", "loadgen", "--ready-file", str(s.ready_path), "--rpc", "encode", "-c", "64",
                         "--duration-s", str(seconds + 3), "--warmup-s", "1"])
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


def train_and_demo(skip_demo: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    log("training recipes: pytorch/examples vs the defaults, same wall-clock (benchmarks/train_recipes.py)")
    cmd = [PY, "-m", "benchmarks.train_recipes"]  # pins itself (and its children) to CPU 1
    sh(cmd, 1200)
    out["train_recipes_command"] = "python -m benchmarks.train_recipes"
    log("training loop benchmark (benchmarks/train_loop.py)")
    cmd = pinned(1, [PY, "-m", "benchmarks.train_loop"])
    sh(cmd, 900)
    out["train_loop_command"] = " ".join(cmd).replace(PY, "python")
    demo = REPO / "scripts" / "demo.sh"
    if skip_demo or not demo.is_file():
        out["demo"] = {"status": "skipped" if skip_demo else "scripts/demo.sh not present"}
        return out
    log("make demo")
    t0 = time.perf_counter()
    proc = subprocess.run(["make", "demo"], check=False, cwd=REPO, capture_output=True, text=True, timeout=900)
    out["demo"] = {"status": "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})",
                   "wall_s": time.perf_counter() - t0, "command": "make demo",
                   "tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else ""}
    return out


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    def ver(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "-"

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "serving", "training"], check=False, cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "packages": {p: ver(p) for p in ("grpcio", "protobuf", "onnxruntime-gpu", "onnxruntime", "numpy",
                                             "uvloop", "torch", "prometheus-client")},
            "git": commit + (" + uncommitted changes in serving/ or training/" if dirty else ""),
            "loadavg_at_start": os.getloadavg(), "pinned": PIN,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def http_references(model_dir: Path, duration_s: float) -> dict[str, Any]:
    from benchmarks.references.http_bench import run as http_run

    return http_run(model_dir, 2, duration_s)


def references_step(model_dir: Path, duration_s: float) -> dict[str, Any]:
    from benchmarks.references.bench import run as references

    return references(model_dir, 2, duration_s)


def streams_step(model_dir: Path, duration_s: float) -> dict[str, Any]:
    from benchmarks.references.streams import run as streams

    return streams(model_dir, 2, duration_s)


def workers_step(model_dir: Path, duration_s: float) -> dict[str, Any]:
    from benchmarks.workers import run as workers

    return workers(model_dir, 2, duration_s)


# Steps `--only` can re-run alone: name -> (export, duration_s) -> the results entry of that name.
PARTIAL_STEPS: dict[str, Callable[[Path, float], dict[str, Any]]] = {
    "references": references_step, "http": http_references, "streams": streams_step,
    "workers": workers_step}


def main() -> None:
    p = argparse.ArgumentParser(description="run every benchmark; write results, plots and BENCHMARKS.md",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the serving scenarios")
    p.add_argument("--duration-s", type=float, default=4.0, help="measured seconds per serving scenario")
    p.add_argument("--reuse-model", action="store_true", help="reuse runs/bench/exported if present")
    p.add_argument("--skip-demo", action="store_true", help="do not time `make demo`")
    p.add_argument("--skip-train", action="store_true", help="do not run benchmarks/train_loop.py")
    venv_spy = Path(sys.executable).parent / "py-spy"
    p.add_argument("--py-spy", default=shutil.which("py-spy") or (str(venv_spy) if venv_spy.is_file() else ""),
                   help="py-spy binary ('' = no profile)")
    p.add_argument("--render-only", action="store_true", help="only rebuild BENCHMARKS.md and plots")
    p.add_argument("--only", choices=sorted(PARTIAL_STEPS),
                   help="run this one step on the existing export and results (merged into serving.json, "
                        "BENCHMARKS.md re-rendered): a partial re-run, not a substitute for the whole")
    args = p.parse_args()
    from benchmarks.report import render

    if args.render_only:
        render(json.loads((RESULTS / "serving.json").read_text()))
        return
    if args.only:
        res = json.loads((RESULTS / "serving.json").read_text())
        WORK.mkdir(parents=True, exist_ok=True)
        stamp = machine()
        res[args.only] = PARTIAL_STEPS[args.only](prepare_model(True), args.duration_s) | {
            "measured": {k: stamp[k] for k in ("date", "git", "loadavg_at_start")}}
        (RESULTS / "serving.json").write_text(json.dumps(res, indent=1) + "\n")
        render(res)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine()}
    model_dir = prepare_model(args.reuse_model)
    res["model_train_command"] = "python -m training.fit " + " ".join(TRAIN_FLAGS).replace(str(MNIST), "../shared/data/mnist")
    log("in-process ONNX Runtime ceiling")
    cmd = pinned(0, [PY, "-m", "benchmarks.ort_ceiling", "--model-dir", str(model_dir)])
    res["ort_ceiling"] = json.loads(sh(cmd, 600).stdout.strip().splitlines()[-1]) | {"command": " ".join(cmd)}
    log("start-to-SERVING and idle PSS")
    res["startup"] = startup(model_dir)
    log("do-nothing server (load generator ceiling)")
    res["null_server"] = null_ceiling(args.duration_s)
    log("the gRPC floor: do-nothing servers of each grpcio kind under h2load")
    res["grpc_floor"] = grpc_floor()
    res["serving"] = serving_scenarios(model_dir, args.rounds, args.duration_s)
    log("references: vae-serve, Triton and a naive grpcio server, same client, taking turns")
    from benchmarks.references.bench import run as references

    res["references"] = references(model_dir, 2, args.duration_s)
    log("HTTP/REST: vae-serve, Triton and MLServer, binary and JSON, same client, taking turns")
    res["http"] = http_references(model_dir, args.duration_s)
    log("streams: ModelStreamInfer against Triton's unary and streamed requests, taking turns")
    res["streams"] = streams_step(model_dir, args.duration_s)
    log("--workers 2 against --workers 1, unpinned, 4 channels, taking turns")
    res["workers"] = workers_step(model_dir, args.duration_s)
    log("Encode C=1, batching vs --max-batch-size 1, alternating")
    res["c1_alternating"] = c1_alternating(model_dir)
    log("diagnostics: --max-queue-delay-us sweep")
    res["delay_sweep"] = delay_sweep(model_dir, args.duration_s)
    if args.py_spy:
        log("py-spy on the server at C=64")
        res["profile"] = profile(model_dir, args.py_spy)
    if not args.skip_train:
        res["training"] = train_and_demo(args.skip_demo)
    res["total_s"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(res, indent=1) + "\n")
    render(res)
    log(f"done in {res['total_s']:.0f} s: BENCHMARKS.md, {RESULTS.relative_to(REPO)}/")


if __name__ == "__main__":
    main()
