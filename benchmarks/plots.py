"""The PNG plots of BENCHMARKS.md, drawn from benchmarks/results/serving.json (see benchmarks/report.py).

One function per figure; `available` says which figures a results document has data for, so the report
can list them without drawing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS, med

CONCURRENCY = (1, 8, 64)


def throughput_p99(res: dict[str, Any], path: Path) -> None:
    """Requests/s and p99 latency against concurrency, both modes, Encode and Sample at B = 1."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    runs = res["serving"]["runs"]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for j, rpc in enumerate(("encode", "sample")):
        for mode, style in (("batching", "o-"), ("mbs1", "s--")):
            label = "batching on" if mode == "batching" else "--max-batch-size 1"
            rps = [med(runs, f"{mode}/{rpc}/c{c}/b1", "requests_per_s") for c in CONCURRENCY]
            p99 = [med(runs, f"{mode}/{rpc}/c{c}/b1", "latency_ms.p99") for c in CONCURRENCY]
            ax[0, j].plot(CONCURRENCY, rps, style, label=label)
            ax[1, j].plot(CONCURRENCY, p99, style, label=label)
        null = {r["concurrency"]: r["requests_per_s"] for r in res["null_server"]["runs"]}
        ax[0, j].plot(list(null), list(null.values()), ":", color="gray", label="do-nothing server")
        ax[0, j].set_title(f"{rpc.capitalize()}, B = 1")
        ax[0, j].set_ylabel("requests/s")
        ax[1, j].set_ylabel("p99 latency (ms)")
        ax[1, j].set_yscale("log")
        ax[1, j].yaxis.set_major_formatter(ScalarFormatter())
        ax[1, j].set_xlabel("concurrency C (requests in flight)")
        ax[1, j].set_xscale("log")
        ax[1, j].set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax[0, j].legend(fontsize=8)
        ax[0, j].set_ylim(bottom=0)
    fig.suptitle("Throughput and p99 latency vs concurrency (server on CPU 0, load generator on CPU 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_distribution(res: dict[str, Any], path: Path) -> None:
    """The C = 64 latency histograms pooled over rounds, both modes, Encode and Sample."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    hist = res["serving"]["latency_c64_hist"]
    edges = hist["edges_ms"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    used = [i for c in hist["counts"].values() for i, n in enumerate(c) if n]
    lo, hi = edges[max(min(used) - 2, 0)], edges[min(max(used) + 3, len(edges) - 1)]
    for j, rpc in enumerate(("encode", "sample")):
        for mode in ("batching", "mbs1"):
            counts = hist["counts"].get(f"{mode}/{rpc}")
            if counts:
                total = sum(counts)
                ax[j].stairs([c / total for c in counts], edges,
                             label="batching on" if mode == "batching" else "--max-batch-size 1")
        ax[j].set_xscale("log")
        ax[j].set_xlim(lo, hi)
        ax[j].xaxis.set_major_formatter(ScalarFormatter())
        ax[j].set_xlabel("latency (ms), 20 bins a decade")
        ax[j].set_title(f"{rpc.capitalize()}, C = 64, B = 1")
        ax[j].legend(fontsize=8)
    ax[0].set_ylabel("fraction of requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ort_ceiling(res: dict[str, Any], path: Path) -> None:
    """The in-process ONNX Runtime rows/s by batch size."""
    import matplotlib.pyplot as plt

    ceil = res["ort_ceiling"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in ("encoder", "decoder"):
        bs = [int(b) for b in ceil[name]]
        ax.plot(bs, list(ceil[name].values()), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (rows per ONNX Runtime run)")
    ax.set_ylabel("rows/s")
    ax.set_title("In-process ONNX Runtime, 1 intra-op thread, CPU 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# file name -> (draw it, whether the results have its data), in the order BENCHMARKS.md lists them
FIGURES: dict[str, tuple[Callable[[dict[str, Any], Path], None], Callable[[dict[str, Any]], bool]]] = {
    "throughput_p99_vs_concurrency.png": (throughput_p99, lambda res: True),
    "latency_distribution_c64.png": (latency_distribution, lambda res: bool(res["serving"].get("latency_c64_hist"))),
    "ort_ceiling.png": (ort_ceiling, lambda res: True),
}


def available(res: dict[str, Any]) -> list[str]:
    """The file names of the figures `res` has data for."""
    return [name for name, (_, has) in FIGURES.items() if has(res)]


def plots(res: dict[str, Any], out_dir: Path = RESULTS) -> list[str]:
    """Draw every available figure into `out_dir`; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    names = available(res)
    for name in names:
        FIGURES[name][0](res, out_dir / name)
    return names
