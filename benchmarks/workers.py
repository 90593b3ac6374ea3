"""`make bench` step: `--workers 2` against `--workers 1` (issue 15), taking turns in each round.

    python -m benchmarks.run --only workers

Neither the server nor the load generator is pinned here (two workers need both CPUs), so the load
generator shares the machine's 2 cores with the server: requests/s is what the pair reaches together,
and server CPU per request (the supervisor and every worker, from /proc) is the efficiency figure. The
generator spreads its calls over 4 channels (connections), since a connection stays on one worker.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, WORK, loadgen_cmd, log, run_loadgen, serving_cmd
from loadgen.process import LocalServer

COUNTS = (1, 2)
# (rpc, concurrency, rows per request)
SCENARIOS: list[tuple[str, int, int]] = [("infer-encoder", 64, 1), ("infer-decoder", 64, 1),
                                         ("http-encoder", 64, 1), ("infer-encoder", 8, 64)]
CHANNELS = 4


def run(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {n: {} for n in COUNTS}
    for rnd in range(rounds):
        order = COUNTS if rnd % 2 == 0 else COUNTS[::-1]
        for n in order:
            s = LocalServer.start(serving_cmd(model_dir, ["--workers", str(n)]), WORK, f"workers{n}", cwd=REPO)
            try:
                for rpc, c, b in SCENARIOS:
                    # unpinned, unlike harness.bench: two workers need both CPUs
                    r = run_loadgen(loadgen_cmd(s.ready_path, rpc, c, b, duration_s, ["--channels", str(CHANNELS)]),
                                    duration_s)
                    raw[n].setdefault(f"{rpc}/c{c}/b{b}", []).append(r)
                    log(f"workers round {rnd + 1}/{rounds} --workers {n} {rpc} C={c} B={b}: "
                        f"{r['requests_per_s']:,.0f} req/s, p99 {r['latency_ms']['p99']:.1f} ms, server "
                        f"{r['server']['cpu_us_per_request']:.0f} us CPU/req, errors {r['errors'] or 'none'}")
            finally:
                s.stop()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for n, by in raw.items():
        for key, runs in by.items():
            summary.setdefault(str(n), {})[key] = {
                "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
                "rows_per_s": statistics.median(r["rows_per_s"] for r in runs),
                "p99_ms": statistics.median(r["latency_ms"]["p99"] for r in runs),
                "cpu_us_per_request": statistics.median(r["server"]["cpu_us_per_request"] for r in runs),
                "server_cores": statistics.median(r["server"]["cpu_cores"] for r in runs),
                "generator_cores": statistics.median(r["generator"]["cpu_cores"] for r in runs),
                "errors": sum(sum(r["errors"].values()) for r in runs)}
    return {"counts": list(COUNTS), "rounds": rounds, "duration_s": duration_s, "channels": CHANNELS,
            "scenarios": [f"{r}/c{c}/b{b}" for r, c, b in SCENARIOS], "summary": summary,
            "command": " ".join(serving_cmd(model_dir, ["--workers", "N"])), "runs": {str(k): v for k, v in raw.items()}}


def markdown(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = ["## --workers 2 against --workers 1 (unpinned, the load generator on the same 2 cores)", "",
             (f"`{res['command']}`; `python -m loadgen --channels {res['channels']}`, {res['rounds']} rounds of "
             f"{res['duration_s']:g} s, the two taking turns, medians. Server CPU counts the supervisor and every "
             "worker. With 2 cores shared by the server and the generator, a second worker can only add what "
             "the generator leaves free: this shows the cost and the direction, not a many-core node's scaling."), "",
             ("| scenario | 1 worker req/s | 2 workers req/s | ratio | 1 worker p99 ms | 2 workers p99 ms | "
             "1 worker us CPU/req | 2 workers us CPU/req | server cores (1 / 2) | generator cores (1 / 2) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in res["scenarios"]:
        a, b = s["1"][key], s["2"][key]
        lines.append(f"| {key.replace('/', ' ')} | {a['requests_per_s']:,.0f} | {b['requests_per_s']:,.0f} | "
                     f"{b['requests_per_s'] / a['requests_per_s']:.2f}x | {a['p99_ms']:.1f} | {b['p99_ms']:.1f} | "
                     f"{a['cpu_us_per_request']:,.0f} | {b['cpu_us_per_request']:,.0f} | "
                     f"{a['server_cores']:.2f} / {b['server_cores']:.2f} | "
                     f"{a['generator_cores']:.2f} / {b['generator_cores']:.2f} |")
    return "\n".join(lines) + "\n"
