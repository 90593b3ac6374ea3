"""What every benchmark step shares: paths, CPU pinning, servers on port 0, load-generator runs as records.

The steps (benchmarks/scenarios.py, workers.py, grpc_floor.py, references/*) import this module; it imports
none of them, and benchmarks/run.py (the orchestrator) imports the steps. The server is pinned to CPU 0
and the load generator to CPU 1 with taskset when two CPUs exist.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loadgen.process import LocalServer
from loadgen.process import serving_cmd as loadgen_serving_cmd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "runs" / "bench"
PY = sys.executable
PIN = (os.cpu_count() or 1) >= 2


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    """`cmd` under `taskset -c cpu` where two CPUs and taskset exist, else `cmd` as it is."""
    return (["taskset", "-c", str(cpu)] + cmd) if PIN and shutil.which("taskset") else cmd


def sh(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in the repository; a non-zero exit raises with the tails of its output."""
    proc = subprocess.run(cmd, check=False, cwd=REPO, text=True, capture_output=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON document a benchmark process prints as its last line."""
    res: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return res


def Server(cmd: list[str], name: str) -> LocalServer:  # reads as the class it returns
    """`python -m serving` (or a null server) pinned to CPU 0, on port 0, known through its ready file."""
    return LocalServer.start(pinned(0, cmd), WORK, name, cwd=REPO)


def serving_cmd(model_dir: Path, extra: list[str]) -> list[str]:
    return [*loadgen_serving_cmd(model_dir, "--log-level", "WARNING"), *extra]


def loadgen_cmd(ready: Path, rpc: str, c: int, b: int, duration_s: float, extra: list[str] | None = None
                ) -> list[str]:
    """`python -m loadgen` against the server of ready file `ready` (not pinned)."""
    return [PY, "-m", "loadgen", "--ready-file", str(ready), "--rpc", rpc, "--concurrency", str(c), "--rows", str(b),
            "--duration-s", str(duration_s), "--warmup-s", "1", *(extra or [])]


def run_loadgen(cmd: list[str], duration_s: float) -> dict[str, Any]:
    """One load-generator run: its JSON record, with the command line that made it."""
    res = last_json(sh(cmd, duration_s + 120))
    res["command"] = " ".join(cmd)
    return res


def bench(ready: Path, rpc: str, c: int, b: int, duration_s: float, extra: list[str] | None = None
          ) -> dict[str, Any]:
    """The load generator pinned to CPU 1 for `duration_s` (after 1 s of warm-up): its JSON record."""
    return run_loadgen(pinned(1, loadgen_cmd(ready, rpc, c, b, duration_s, extra)), duration_s)


def cpu0_us_per_request(r: dict[str, Any]) -> float | None:
    """Busy time of the server's CPU per request (counts helper processes such as Triton's backend stubs)."""
    s = r.get("server")
    if not s or not r["requests"]:
        return None
    busy = s["cpu_s"] + s["other_work_cores"] * r["duration_s"]  # everything on the server's CPU
    return 1e6 * busy / r["requests"]


def metric(record: dict[str, Any], path: str) -> float | None:
    """One metric of a load-generator record by dotted path ("latency_ms.p99"); None where it is missing."""
    v: Any = record
    for k in path.split("."):
        if not isinstance(v, dict) or v.get(k) is None:
            return None
        v = v[k]
    return float(v)


def med(runs: dict[str, list[dict[str, Any]]], key: str, path: str) -> float | None:
    """Median over rounds of one metric (dotted path) of scenario `key`."""
    vals = [x for r in runs.get(key, []) if (x := metric(r, path)) is not None]
    return statistics.median(vals) if vals else None
