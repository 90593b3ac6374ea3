"""Before against after: the server at another git revision against the working tree, taking turns.

    python -m benchmarks.ab --before 60d38db --model-dir runs/bench/exported [--rounds 4] [--duration-s 3]

Checks out `--before` into a temporary git worktree and runs `python -m serving` from each tree in turn
(the order rotates each round), pinned to CPU 0, with the same load generator (`python -m loadgen`,
from the working tree) pinned to CPU 1, for each scenario. Server CPU per request comes from
/proc/PID/stat. Prints each round's figures and the medians; on a shared machine only the
medians of alternating rounds mean anything. Both servers get only flags the older one knows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadgen.process import LocalServer

REPO = Path(__file__).resolve().parents[1]
SCENARIOS: list[tuple[str, int, int]] = [("encode", 64, 1), ("decode", 64, 1), ("encode", 1, 1), ("decode", 8, 64)]


def one(tree: Path, model_dir: Path, work: Path, name: str, duration_s: float) -> dict[str, dict[str, float]]:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--host",
           "127.0.0.1", "--port", "0", "--http-port", "0", "--providers", "cpu", "--log-level", "WARNING"]
    s = LocalServer.start(cmd, work / name, cwd=tree)
    out: dict[str, dict[str, float]] = {}
    try:
        for rpc, c, b in SCENARIOS:
            gen = subprocess.run(["taskset", "-c", "1", sys.executable, "-m", "loadgen", "--target",
                                  f"127.0.0.1:{s.grpc_port}", "--server-pid", str(s.pid), "--rpc", rpc, "-c", str(c),
                                  "--rows", str(b), "--duration-s", str(duration_s), "--warmup-s", "1"],
                                 cwd=REPO, capture_output=True, text=True, check=True, timeout=duration_s + 120)
            r: dict[str, Any] = json.loads(gen.stdout.strip().splitlines()[-1])
            out[f"{rpc} C={c} B={b}"] = {"requests_per_s": r["requests_per_s"],
                                         "cpu_us_per_request": r["server"]["cpu_us_per_request"],
                                         "p50_ms": r["latency_ms"]["p50"], "errors": sum(r["errors"].values())}
    finally:
        s.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="git revision of the 'before' server")
    p.add_argument("--model-dir", type=Path, required=True, help="an export both revisions can serve")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration-s", type=float, default=3.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vae-ab.") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=REPO, check=True,
                       capture_output=True)
        try:
            trees = {"before": before, "after": REPO}
            runs: dict[str, list[dict[str, dict[str, float]]]] = {n: [] for n in trees}
            for rnd in range(args.rounds):
                names = list(trees) if rnd % 2 == 0 else list(reversed(trees))
                for name in names:
                    r = one(trees[name], args.model_dir.resolve(), Path(tmp), name, args.duration_s)
                    runs[name].append(r)
                    print(f"round {rnd + 1} {name}: " + "; ".join(
                        f"{k} {v['cpu_us_per_request']:.0f} us/req" for k, v in r.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=REPO, check=False,
                           capture_output=True)
    print(f"medians of {args.rounds} alternating rounds (before {args.before} -> after: the working tree)")
    for key in runs["after"][0]:
        cells = []
        for name in ("before", "after"):
            rs = [r[key] for r in runs[name]]
            cells.append(f"{name} {statistics.median(x['requests_per_s'] for x in rs):,.0f} req/s "
                         f"{statistics.median(x['cpu_us_per_request'] for x in rs):.0f} us CPU/req "
                         f"p50 {statistics.median(x['p50_ms'] for x in rs):.2f} ms")
        print(f"{key:18s} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
