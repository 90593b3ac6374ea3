"""What the load generator measures of local processes: CPU time, run-queue wait, memory, counters.

Everything comes from /proc (Linux) or the server's /metrics; nothing here sends load.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far (/proc/PID/stat, clock-tick grained)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, theirs, ...), from /proc/PID/task/*/children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                kids = [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def proc_tree_cpu_s(pid: int) -> float:
    """CPU seconds of `pid` and every live process below it: a server's workers (--workers), helper
    processes (JSON parsing, Triton's python-backend stubs) count as the server's own work. (A child
    that exits between two readings drops out of the later one.)"""
    total = proc_cpu_s(pid)
    for c in descendants(pid):
        try:
            total += proc_cpu_s(c)
        except OSError:
            continue
    return total


def proc_runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of `pid` have spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat).

    Large values mean other work took the CPU this process is pinned to: its wall-clock figures are low.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just exited
            continue
    return total * 1e-9


def allowed_cpus(pid: int) -> list[int]:
    """The CPUs `pid` may run on (its affinity, e.g. [0] under `taskset -c 0`)."""
    return sorted(os.sched_getaffinity(pid))


def cpus_busy_s(cpus: list[int]) -> float:
    """Busy seconds (all but idle and iowait) of the given CPUs so far, all processes (/proc/stat)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in vals]
            total += sum(ticks) - ticks[3] - ticks[4]  # idle, iowait
    return total / CLK_TCK


def proc_memory_mb(pid: int) -> dict[str, float]:
    """{"pss_mb", "rss_mb"} of `pid` from /proc/PID/smaps_rollup (PSS shares shared pages fairly)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024
    return out


def scrape_counters(metrics_port: int, names: tuple[str, ...] = ("vae_batches_total", "vae_rows_total"),
                    ) -> dict[str, float]:
    """{"name{labels}": value} for the named counters on the server's /metrics; {} if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(names):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
