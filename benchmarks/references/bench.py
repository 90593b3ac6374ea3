"""`make bench` step: vae-serve against Triton and a naive grpcio server, same client, same run (issue 13).

    python -m benchmarks.references.bench --model-dir runs/bench/exported [--rounds 2] [--duration-s 4]

Each system serves the same export pinned to CPU 0 (and two do-nothing servers, the grpc.aio and the
4-thread sync floors, answer the same requests); the same load generator (`python -m loadgen`,
Open Inference Protocol ModelInfer, raw FP32, every output returned) runs pinned to CPU 1. Systems take
turns in each round (the order rotates), so drift on the machine hits them alike; medians of rounds are
reported. Server CPU is the busy time of CPU 0 per request (it counts Triton's python-backend stub
processes, which are not tritonserver's own pid). Triton runs from `.venv-triton`
(scripts/ensure_reference_venvs.sh); where that cannot be made, Triton is reported as missing, never
estimated. Prints one JSON document (the last line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import PY, last_json, log, pinned, serving_cmd, sh
from benchmarks.references.turns import (
    TRITON_PY,
    Scenario,
    Target,
    cli,
    launcher_cmd,
    summarize,
    take_turns,
    target_table,
)

# (model, concurrency, rows per request): issue 13's grid
SCENARIOS: list[tuple[str, int, int]] = [("encoder", 64, 1), ("decoder", 64, 1), ("encoder", 8, 64),
                                         ("decoder", 8, 64), ("encoder", 1, 1), ("decoder", 1, 1)]


# Issue 13's targets against Triton: load (concurrency/rows per request) -> the least ratio to Triton.
TRITON_TARGETS: dict[str, float] = {"c64/b1": 0.85, "c8/b64": 1.2}
# Do-nothing servers (loadgen.null_server: answer every call with an empty message, parse nothing), run like
# the systems: the floor under any server of that grpcio kind, for this client and these requests.
FLOORS: dict[str, str] = {"floor grpc.aio": "aio-uvloop", "floor sync-4": "sync-4"}


def systems(model_dir: Path) -> dict[str, list[str]]:
    cmds = {"vae-serve": serving_cmd(model_dir, []),
            "naive": [PY, "-m", "benchmarks.references.naive_server", "--model-dir", str(model_dir)]}
    if TRITON_PY.is_file():
        cmds["triton"] = launcher_cmd(TRITON_PY, "triton.py", model_dir, "triton")
    for name, kind in FLOORS.items():
        cmds[name] = [PY, "-m", "loadgen.null_server", "--kind", kind]
    return cmds


def ort_us_per_row(model_dir: Path) -> dict[str, dict[str, float]]:
    """ONNX Runtime's own cost on CPU 0 (benchmarks.ort_ceiling, the server's session options): us of CPU
    per row by batch size, per model."""
    res = last_json(sh(pinned(0, [PY, "-m", "benchmarks.ort_ceiling", "--model-dir", str(model_dir),
                                  "--min-time-s", "0.2"]), 600))
    return {m: {b: 1e6 / v for b, v in res[f"{m}_per_cpu_s"].items()} for m in ("encoder", "decoder")}


def run(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    cmds = systems(model_dir)
    plan = [Scenario(f"{m}/c{c}/b{b}", f"infer-{m}", c, b) for m, c, b in SCENARIOS]
    raw = take_turns("references", "ref", cmds, {n: plan for n in cmds}, rounds, duration_s)
    summary = summarize(raw)
    log("references: ONNX Runtime's own cost by batch size on CPU 0")
    return {"systems": list(cmds), "triton_missing": "triton" not in cmds, "rounds": rounds, "duration_s": duration_s,
            "ort_us_per_row": ort_us_per_row(model_dir),
            "scenarios": [sc.key for sc in plan], "summary": summary,
            "commands": {n: " ".join(c) for n, c in cmds.items()}, "runs": raw}


def targets(ref: dict[str, Any]) -> list[Target]:
    """Issue 13's targets: (what, measured ratio, required, met); None where a system is missing."""
    s = ref["summary"]
    ours, naive, triton = s.get("vae-serve", {}), s.get("naive", {}), s.get("triton", {})

    def ratio(a: dict[str, Any], b: dict[str, Any], key: str, metric: str) -> float | None:
        x, y = a.get(key, {}).get(metric), b.get(key, {}).get(metric)
        return x / y if x and y else None

    out: list[Target] = []
    for model in ("encoder", "decoder"):
        for key, metric, unit in ((f"{model}/c64/b1", "requests_per_s", "req/s"), (f"{model}/c8/b64", "rows_per_s", "rows/s")):
            need_triton = TRITON_TARGETS[key.split("/", 1)[1]]
            for who, other, need in (("naive", naive, 1.0), ("Triton", triton, need_triton)):
                r = ratio(ours, other, key, metric)
                out.append((f"{key.replace('/', ' ')} {unit}: vae-serve / {who}", r, need,
                            None if r is None else r >= need))
        r = ratio(ours, naive, f"{model}/c1/b1", "p50_ms")
        out.append((f"{model} c1 b1 p50: vae-serve / naive (at most)", r, 1.1, None if r is None else r <= 1.1))
    return out


def bounds(ref: dict[str, Any]) -> list[list[str]]:
    """For each target against Triton: the best a grpc.aio server could do, doing nothing but the do-nothing
    floor and ONNX Runtime at its cheapest batch size. Rows of (target, Triton us/req, floor us/req, ORT
    us/req, bound us/req, best ratio, required, within reach)."""
    s, ort = ref["summary"], ref.get("ort_us_per_row")
    triton, floor = s.get("triton", {}), s.get("floor grpc.aio", {})
    rows: list[list[str]] = []
    if not triton or not floor or not ort:
        return rows
    for model in ("encoder", "decoder"):
        for load, need in TRITON_TARGETS.items():
            key, b = f"{model}/{load}", int(load.rsplit("/b", 1)[1])
            t, f = triton.get(key, {}).get("cpu0_us_per_request"), floor.get(key, {}).get("cpu0_us_per_request")
            if not t or not f:
                continue
            o = b * min(ort[model].values())
            best = t / (f + o)
            rows.append([key.replace("/", " "), f"{t:,.0f}", f"{f:,.0f}", f"{o:,.1f}", f"{f + o:,.0f}",
                         f"{best:.2f}x", f"{need:g}x", "yes" if best >= need else "**no**"])
    return rows


def markdown(ref: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    s = ref["summary"]
    names = ref["systems"]
    lines = ["## Against Triton and a naive grpcio server (same client, same run)", "",
             f"Open Inference Protocol ModelInfer, raw FP32, from `python -m loadgen` on CPU 1 to each server on CPU 0; "
             f"{ref['rounds']} rounds of {ref['duration_s']:g} s per scenario, systems taking turns, medians. Server CPU "
             "is CPU 0's busy time per request (Triton's python-backend stubs included). Commands: "
             + "; ".join(f"`{n}`: `{c}`" for n, c in ref["commands"].items()) + ".", ""]
    if ref["triton_missing"]:
        lines += ["**Triton was not measured in this run** (`.venv-triton` missing: `scripts/ensure_reference_venvs.sh`).", ""]
    head = "| scenario | " + " | ".join(f"{n} req/s | {n} rows/s | {n} p50 ms | {n} us CPU/req" for n in names) + " |"
    lines += [head, "|" + " --- |" * (1 + 4 * len(names))]
    for key in ref["scenarios"]:
        cells = []
        for n in names:
            v = s.get(n, {}).get(key, {})
            cells += [f"{v.get('requests_per_s') or 0:,.0f}", f"{v.get('rows_per_s') or 0:,.0f}",
                      f"{v.get('p50_ms') or 0:.2f}", f"{v.get('cpu0_us_per_request') or 0:,.0f}"]
        lines.append(f"| {key.replace('/', ' ')} | " + " | ".join(cells) + " |")
    lines += target_table("issue 13", "required", targets(ref))
    b = bounds(ref)
    if b:
        lines += ["", ("What a grpc.aio server could reach at best, from this run: the do-nothing grpc.aio server's CPU "
                  "per request (same client, same requests) plus ONNX Runtime's own CPU for the request's rows at "
                  "its cheapest batch size (`benchmarks.ort_ceiling` on CPU 0), against Triton's CPU per request. "
                  "On one saturated core, requests/s go as the inverse of CPU per request."), "",
                  ("| target vs Triton | Triton us/req | do-nothing grpc.aio us/req | ORT us/req | bound us/req "
                  "| best ratio | required | within reach |"), "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(r) + " |" for r in b]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("python -m benchmarks.references.bench", __doc__, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
