"""`make bench` step: vae-serve (both gRPC front ends) against Triton and a naive grpcio server, same client,
same run (issues 13 and 24).

    python -m benchmarks.references.bench --model-dir runs/bench/exported [--rounds 2] [--duration-s 4]

Each system serves the same export pinned to CPU 0 (and a do-nothing grpc.aio server, the floor under
any grpc.aio server, answers the same requests); the same load generator (`python -m loadgen`,
Open Inference Protocol ModelInfer, raw FP32, every output returned) runs pinned to CPU 1. vae-serve runs
twice: `vae-serve` is the default server (the native front end), `vae-serve grpcio` the same with
`--grpc-frontend grpcio`; both also serve vae.v1 Encode and Decode at C=64 (issue 24's own-protocol
target). Idle PSS is taken one second after each server is SERVING (Triton: tritonserver's own process). Systems take
turns in each round (the order rotates), so drift on the machine hits them alike; medians of rounds are
reported. Server CPU is the busy time of CPU 0 per request (it counts Triton's python-backend stub
processes, which are not tritonserver's own pid). Triton runs from `.venv-triton`
(scripts/ensure_reference_venvs.sh); where that cannot be made, Triton is reported as missing, never
estimated. Prints one JSON document (the last line).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.harness import PY, Server, last_json, log, pinned, serving_cmd, sh
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


# vae.v1 at C=64, one row: vae-serve only (compared with Triton's ModelInfer of the same model and load).
VAE_V1_SCENARIOS: list[tuple[str, str]] = [("encoder", "encode"), ("decoder", "decode")]
OURS = ("vae-serve", "vae-serve grpcio")
# Issue 13's targets against Triton: load (concurrency/rows per request) -> the least ratio to Triton.
TRITON_TARGETS: dict[str, float] = {"c64/b1": 0.85, "c8/b64": 1.2}
# Issue 24's targets for the default server against Triton (same client, same run).
CPU_PER_REQUEST_MAX = 0.6      # C=64 B=1 (ModelInfer, and vae.v1 against Triton's ModelInfer): at most
REQUESTS_MIN = 1.2             # C=64 B=1 requests/s: at least ...
REQUESTS_MIN_CLIENT_BOUND = 1.1  # ... or this where the load generator used over CLIENT_BOUND_CORES
CLIENT_BOUND_CORES = 0.9
P50_MAX = 0.5                  # C=1 p50: at most
ROWS_MIN = 1.15                # C=8 B=64 rows/s: at least
IDLE_PSS_MAX_MB = 120.0
# Do-nothing servers (loadgen.null_server: answer every call with an empty message, parse nothing), run like
# the systems: the floor under any server of that grpcio kind, for this client and these requests.
FLOORS: dict[str, str] = {"floor grpc.aio": "aio-uvloop"}


def systems(model_dir: Path) -> dict[str, list[str]]:
    cmds = {"vae-serve": serving_cmd(model_dir, []),
            "vae-serve grpcio": serving_cmd(model_dir, ["--grpc-frontend", "grpcio"]),
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


def idle_pss_mb(cmds: dict[str, list[str]]) -> dict[str, float]:
    """Each server's PSS one second after it is SERVING (its main process)."""
    from loadgen.procstat import proc_memory_mb

    out = {}
    for name, cmd in cmds.items():
        if name.startswith("floor"):
            continue
        s = Server(cmd, f"idle-{name}")
        try:
            time.sleep(1.0)
            out[name] = proc_memory_mb(s.pid)["pss_mb"]
        finally:
            s.stop()
    return out


def run(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    cmds = systems(model_dir)
    plan = [Scenario(f"{m}/c{c}/b{b}", f"infer-{m}", c, b) for m, c, b in SCENARIOS]
    own = [Scenario(f"vae.v1 {rpc}/c64/b1", rpc, 64, 1) for _, rpc in VAE_V1_SCENARIOS]
    raw = take_turns("references", "ref", cmds, {n: plan + own if n in OURS else plan for n in cmds}, rounds,
                     duration_s)
    summary = summarize(raw)
    log("references: ONNX Runtime's own cost by batch size on CPU 0; idle PSS")
    return {"systems": list(cmds), "triton_missing": "triton" not in cmds, "rounds": rounds, "duration_s": duration_s,
            "ort_us_per_row": ort_us_per_row(model_dir), "idle_pss_mb": idle_pss_mb(cmds),
            "scenarios": [sc.key for sc in plan + own], "summary": summary,
            "commands": {n: " ".join(c) for n, c in cmds.items()}, "runs": raw}


def _ratio(a: dict[str, Any], b: dict[str, Any], key_a: str, metric: str, key_b: str | None = None) -> float | None:
    x, y = a.get(key_a, {}).get(metric), b.get(key_b or key_a, {}).get(metric)
    return x / y if x and y else None


def targets(ref: dict[str, Any], ours: str = "vae-serve") -> list[Target]:
    """Issue 24's targets for `ours` against Triton: (what, measured ratio, bound, met); None where a system
    is missing. Requests/s may be 1.1x instead of 1.2x where the load generator was the bottleneck."""
    s = ref["summary"]
    us, triton = s.get(ours, {}), s.get("triton", {})
    out: list[Target] = []

    def add(what: str, r: float | None, need: float, at_most: bool = False) -> None:
        out.append((what, r, need, None if r is None else (r <= need if at_most else r >= need)))

    for model in ("encoder", "decoder"):
        key = f"{model}/c64/b1"
        add(f"{model} c64 b1 server CPU/request: {ours} / Triton (at most)",
            _ratio(us, triton, key, "cpu0_us_per_request"), CPU_PER_REQUEST_MAX, at_most=True)
        gen = us.get(key, {}).get("generator_cores") or 0.0
        bound = gen > CLIENT_BOUND_CORES
        add(f"{model} c64 b1 req/s: {ours} / Triton" + (" (load generator bound)" if bound else ""),
            _ratio(us, triton, key, "requests_per_s"), REQUESTS_MIN_CLIENT_BOUND if bound else REQUESTS_MIN)
        add(f"{model} c1 b1 p50: {ours} / Triton (at most)", _ratio(us, triton, f"{model}/c1/b1", "p50_ms"),
            P50_MAX, at_most=True)
        add(f"{model} c8 b64 rows/s: {ours} / Triton", _ratio(us, triton, f"{model}/c8/b64", "rows_per_s"), ROWS_MIN)
    for model, rpc in VAE_V1_SCENARIOS:
        add(f"vae.v1 {rpc.capitalize()} c64 b1 server CPU/request: {ours} / Triton ModelInfer (at most)",
            _ratio(us, triton, f"vae.v1 {rpc}/c64/b1", "cpu0_us_per_request", f"{model}/c64/b1"),
            CPU_PER_REQUEST_MAX, at_most=True)
    pss = ref.get("idle_pss_mb", {}).get(ours)
    add(f"idle PSS of {ours} / {IDLE_PSS_MAX_MB:g} MB (at most)", None if pss is None else pss / IDLE_PSS_MAX_MB,
        1.0, at_most=True)
    return out


def naive_ratios(ref: dict[str, Any], ours: str = "vae-serve") -> list[Target]:
    """Against the naive grpcio server (issue 13's floor): requests/s and rows/s at least as many."""
    s = ref["summary"]
    us, naive = s.get(ours, {}), s.get("naive", {})
    out: list[Target] = []
    for model in ("encoder", "decoder"):
        for key, metric in ((f"{model}/c64/b1", "requests_per_s"), (f"{model}/c8/b64", "rows_per_s")):
            r = _ratio(us, naive, key, metric)
            out.append((f"{key.replace('/', ' ')} {metric.split('_')[0]}/s: {ours} / naive", r, 1.0,
                        None if r is None else r >= 1.0))
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
    lines += target_table("issue 24", "bound", targets(ref))
    lines += ["", "The grpcio front end (`--grpc-frontend grpcio`, what TLS runs on), against the same bounds:"]
    lines += target_table("issue 24, grpcio", "bound", targets(ref, "vae-serve grpcio"))
    lines += target_table("against naive", "required", naive_ratios(ref) + naive_ratios(ref, "vae-serve grpcio"))
    pss = ref.get("idle_pss_mb")
    if pss:
        lines += ["", "Idle PSS, MB (one second after SERVING; Triton: tritonserver's own process, without its "
                  "python-backend stubs): " + ", ".join(f"{n} {v:,.0f}" for n, v in pss.items()) + "."]
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
