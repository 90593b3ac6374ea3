"""The human-readable table of one load-generator result."""

from __future__ import annotations

from typing import Any


def format_table(r: dict[str, Any]) -> str:
    """The human-readable table of one result."""
    lat = r["latency_ms"]
    load = (f"C={r['concurrency']}" if r["loop"] == "closed" else
            f"{r['streams']} streams x {r['stream_inflight']} in flight" if r["loop"] == "stream" else
            f"{r['offered_rps']:g} req/s offered")
    rows = [
        ("run", (f"{r['rpc']} {r['loop']} loop {load}, B={r['rows_per_request']}, {r['duration_s']:.1f} s "
                f"after {r['warmup_s']:g} s warm-up")),
        ("requests", f"{r['requests']} ({r['ok']} OK; errors {r['errors'] or 'none'})"
                     + (f"  ** {r['stuck']} took longer than the whole window or never answered **"
                        if r["stuck"] else "")),
        ("throughput", f"{r['requests_per_s']:,.0f} req/s, {r['rows_per_s']:,.0f} rows/s"),
        ("latency ms", "  ".join(f"{k} {v:.3f}" for k, v in lat.items() if v is not None)),
    ]
    if "server" in r:
        s = r["server"]
        per_req = f"{s['cpu_us_per_request']:.0f}" if s["cpu_us_per_request"] is not None else "-"
        per_row = f"{s['cpu_us_per_row']:.1f}" if s["cpu_us_per_row"] is not None else "-"
        rows.append(("server", (f"pid {s['pid']}: {s['cpu_cores']:.2f} cores, {per_req} us CPU/request, "
                                f"{per_row} us CPU/row, PSS {s.get('pss_mb', 0):.1f} MB; other processes "
                                f"used {s['other_work_cores']:.2f} of its CPUs {s['cpus']}")))
    if "server_batches" in r:
        b = r["server_batches"]
        mean = f"{b['mean_rows_per_run']:.1f}" if b["mean_rows_per_run"] else "-"
        rows.append(("server batches", f"{b['runs']:.0f} {b['model']} runs, {mean} rows/run"))
    g = r["generator"]
    rows.append(("generator", f"{g['cpu_cores']:.2f} cores of {g['cpus_allowed']} allowed ({g['event_loop']}), "
                              f"waited {g['runqueue_wait_s']:.2f} s for a CPU"
                 + ("  ** GENERATOR-BOUND: the result is a lower bound on the server **" if g["bottleneck"] else "")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
