"""Systems taking turns: what the reference benchmarks (bench.py, http_bench.py, streams.py) share.

Each benchmark names its systems (server command lines) and each system's scenarios; `take_turns` starts
every system in turn, pinned to CPU 0, once per round (the order rotating, so drift on the machine hits
them alike), runs its scenarios with the load generator pinned to CPU 1, and `summarize` takes medians
over rounds. `target_table` renders an issue's targets, `cli` is each benchmark's command line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.harness import REPO, WORK, Server, bench, cpu0_us_per_request, log

TRITON_PY = REPO / ".venv-triton" / "bin" / "python"
MLSERVER_PY = REPO / ".venv-mlserver" / "bin" / "python"

Runs = dict[str, dict[str, list[dict[str, Any]]]]  # system -> scenario key -> one load-generator record per round
Target = tuple[str, float | None, float, bool | None]  # (what, measured ratio, required, met or None)


class Scenario(NamedTuple):
    key: str  # the results' name of the scenario, e.g. "encoder/c64/b1"
    rpc: str  # `python -m loadgen --rpc`
    concurrency: int
    rows: int  # per request
    extra: tuple[str, ...] = ()  # further loadgen flags


def launcher_cmd(python: Path, script: str, model_dir: Path, workdir: str, *flags: str) -> list[str]:
    """A reference launcher (benchmarks/references/SCRIPT, run by its own venv's `python`) on `model_dir`."""
    return [str(python), str(REPO / "benchmarks" / "references" / script), "--model-dir", str(model_dir),
            "--workdir", str(WORK / workdir), *flags]


def take_turns(step: str, prefix: str, cmds: dict[str, list[str]], plan: dict[str, list[Scenario]], rounds: int,
               duration_s: float) -> Runs:
    """Every system of `cmds` in turn, `rounds` times, each running its `plan`; the records by system and key.

    Servers are named PREFIX-SYSTEM (their ready and log files under runs/bench); `step` names the log lines.
    """
    names = list(cmds)
    raw: Runs = {n: {} for n in names}
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            s = Server(cmds[name], f"{prefix}-{name}")
            try:
                for sc in plan[name]:
                    r = bench(s.ready_path, sc.rpc, sc.concurrency, sc.rows, duration_s, list(sc.extra))
                    r["cpu0_us_per_request"] = cpu0_us_per_request(r)
                    raw[name].setdefault(sc.key, []).append(r)
                    log(f"{step} round {rnd + 1}/{rounds} {name:14s} {sc.key:18s}: {r['requests_per_s']:,.0f} req/s, "
                        f"{r['rows_per_s']:,.0f} rows/s, {r['cpu0_us_per_request'] or 0:,.0f} us CPU0/req, p50 "
                        f"{r['latency_ms']['p50']:.2f} ms, errors {r['errors'] or 'none'}")
            finally:
                s.stop()
    return raw


def summarize(raw: Runs) -> dict[str, dict[str, dict[str, float | None]]]:
    """system -> scenario -> medians over rounds (of what is measured; None where nothing was)."""
    summary: dict[str, dict[str, dict[str, float | None]]] = {}
    for name, by in raw.items():
        for key, runs in by.items():
            def med(f: Any, runs: list[dict[str, Any]] = runs) -> float | None:
                vals = [v for v in (f(r) for r in runs) if v is not None]
                return statistics.median(vals) if vals else None
            summary.setdefault(name, {})[key] = {
                "requests_per_s": med(lambda r: r["requests_per_s"]), "rows_per_s": med(lambda r: r["rows_per_s"]),
                "p50_ms": med(lambda r: r["latency_ms"]["p50"]), "p99_ms": med(lambda r: r["latency_ms"]["p99"]),
                "cpu0_us_per_request": med(lambda r: r["cpu0_us_per_request"]),
                "generator_cores": med(lambda r: r["generator"]["cpu_cores"]),
                "errors": sum(sum(r["errors"].values()) for r in runs)}
    return summary


def target_table(issue: str, bound: str, rows: list[Target]) -> list[str]:
    """The markdown table of an issue's targets."""
    lines = ["", f"| {issue} target | measured | {bound} | met |", "| --- | --- | --- | --- |"]
    for what, r, need, ok in rows:
        lines.append(f"| {what} | {'-' if r is None else f'{r:.2f}x'} | {need:g}x | "
                     f"{'not measured' if ok is None else ('yes' if ok else '**no**')} |")
    return lines


def cli(prog: str, doc: str, run: Callable[[Path, int, float], dict[str, Any]],
        markdown: Callable[[dict[str, Any]], str], argv: list[str] | None) -> int:
    """The command line of a reference benchmark: run it, the table on stderr, the JSON on stdout."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration-s", type=float, default=4.0)
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    res = run(args.model_dir, args.rounds, args.duration_s)
    sys.stderr.write(markdown(res))
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}))
    return 0
