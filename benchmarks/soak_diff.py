"""Where a soak's Python memory grew: two tracemalloc snapshots of `python -m benchmarks.soak
--tracemalloc-dir DIR` compared, largest growth first.

    python -m benchmarks.soak_diff DIR [--top 20] [--group lineno|traceback]

Compares the second snapshot (warm) with the last; prints the traced total of each snapshot, then the
allocation sites whose live size grew most, with their counts.
"""

from __future__ import annotations

import argparse
import tracemalloc
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak_diff", description=__doc__.split("\n")[0])
    p.add_argument("dir", type=Path)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--group", choices=("lineno", "traceback", "filename"), default="lineno")
    args = p.parse_args(argv)
    by_pid: dict[str, list[Path]] = {}
    for s in sorted(args.dir.glob("*.snap")):  # PID-N-MINUTESmin.snap: the server and any process it started
        by_pid.setdefault(s.name.split("-")[0], []).append(s)
    totals: dict[Path, float] = {}
    for snaps in by_pid.values():
        for s in snaps:
            totals[s] = sum(st.size for st in tracemalloc.Snapshot.load(str(s)).statistics("filename")) / 2**20
            print(f"{s.name}: {totals[s]:.2f} MB traced")
    snaps = max(by_pid.values(), key=lambda ss: totals[ss[-1]])  # the server: the most Python memory
    if len(snaps) < 2:
        raise SystemExit(f"{args.dir}: {len(snaps)} snapshots of the server; need at least 2")
    base = snaps[1] if len(snaps) > 2 else snaps[0]  # the second: past the warm-up
    first, last = tracemalloc.Snapshot.load(str(base)), tracemalloc.Snapshot.load(str(snaps[-1]))
    print(f"\ngrowth from {base.name} to {snaps[-1].name}:")
    for st in last.compare_to(first, args.group)[:args.top]:
        print(f"{st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d} blocks  now {st.size / 1024:9.1f} KiB")
        for line in st.traceback.format()[-(8 if args.group == "traceback" else 2):]:
            print("    " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
