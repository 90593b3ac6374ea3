"""`make bench` step: the Open Inference Protocol over HTTP/REST, vae-serve against Triton's HTTP endpoint and
Seldon MLServer's, same client, same run (issue 16).

    python -m benchmarks.references.http_bench --model-dir runs/bench/exported [--rounds 2] [--duration-s 4]

Each system serves the same export pinned to CPU 0; `python -m loadgen --rpc http-*` (aiohttp client,
keep-alive connections, POST /v2/models/{model}/infer) runs pinned to CPU 1. Binary: the binary tensor
extension both ways (`Inference-Header-Content-Length`, every output binary); JSON: JSON tensors both
ways. MLServer 1.7 does not implement the binary extension (it answers 422), so its binary cells are
"unsupported" and the binary target compares against its JSON, the only HTTP it serves. Systems take
turns each round (the order rotates); medians of rounds. Server CPU is CPU 0's busy time per request.
Triton runs from `.venv-triton`, MLServer from `.venv-mlserver` (scripts/ensure_reference_venvs.sh); a system whose venv could not be made is reported as missing, never estimated. Prints one JSON
document (the last line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import serving_cmd
from benchmarks.references.turns import (
    MLSERVER_PY,
    TRITON_PY,
    Scenario,
    Target,
    cli,
    launcher_cmd,
    summarize,
    take_turns,
    target_table,
)

# (rpc, concurrency, rows per request)
SCENARIOS: list[tuple[str, int, int]] = [
    ("http-encoder", 64, 1), ("http-decoder", 64, 1), ("http-encoder", 8, 64), ("http-decoder", 8, 64),
    ("http-encoder", 1, 1),
    ("http-json-encoder", 64, 1), ("http-json-decoder", 64, 1), ("http-json-decoder", 8, 64),
    ("http-json-encoder", 1, 1)]
NO_BINARY = {"mlserver"}  # systems without the binary tensor extension


def systems(model_dir: Path) -> dict[str, list[str]]:
    cmds = {"vae-serve": serving_cmd(model_dir, [])}
    if TRITON_PY.is_file():
        cmds["triton"] = launcher_cmd(TRITON_PY, "triton.py", model_dir, "triton")
    if MLSERVER_PY.is_file():
        cmds["mlserver"] = launcher_cmd(MLSERVER_PY, "mlserver.py", model_dir, "mlserver")
    return cmds


def key_of(rpc: str, c: int, b: int) -> str:
    return f"{rpc.removeprefix('http-')}/c{c}/b{b}"


def run(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    cmds = systems(model_dir)
    plan = [Scenario(key_of(rpc, c, b), rpc, c, b) for rpc, c, b in SCENARIOS]
    per_system = {n: [sc for sc in plan if n not in NO_BINARY or "json" in sc.rpc] for n in cmds}
    raw = take_turns("http", "http", cmds, per_system, rounds, duration_s)
    summary = summarize(raw)
    return {"systems": list(cmds), "missing": [n for n in ("triton", "mlserver") if n not in cmds], "rounds": rounds,
            "duration_s": duration_s, "scenarios": [sc.key for sc in plan], "summary": summary,
            "commands": {n: " ".join(c) for n, c in cmds.items()}, "runs": raw}


def targets(ref: dict[str, Any]) -> list[Target]:
    """Issue 16's target: binary HTTP requests/s at C=64 >= MLServer's (its JSON) and >= 0.8x Triton's."""
    s = ref["summary"]
    ours, triton, mls = s.get("vae-serve", {}), s.get("triton", {}), s.get("mlserver", {})
    out: list[Target] = []
    for model in ("encoder", "decoder"):
        key = f"{model}/c64/b1"
        mine = ours.get(key, {}).get("requests_per_s")
        for who, theirs, need in (("Triton binary", triton.get(key, {}), 0.8),
                                  ("MLServer JSON (it has no binary)", mls.get(f"json-{key}", {}), 1.0)):
            other = theirs.get("requests_per_s")
            r = mine / other if mine and other else None
            out.append((f"{model} C=64 B=1 binary req/s: vae-serve / {who}", r, need, None if r is None else r >= need))
    return out


def markdown(ref: dict[str, Any]) -> str:
    s, names = ref["summary"], ref["systems"]
    lines = ["## HTTP/REST against Triton and MLServer (same client, same run)", "",
             "Open Inference Protocol `POST /v2/models/{model}/infer` from `python -m loadgen --rpc http-*` (aiohttp, "
             "keep-alive) on CPU 1 to each server on CPU 0; binary = the binary tensor extension both ways, json = "
             f"JSON tensors both ways. {ref['rounds']} rounds of {ref['duration_s']:g} s per scenario, systems taking "
             "turns, medians. Server CPU is CPU 0's busy time per request. MLServer has no binary extension "
             "(it answers 422): its binary cells are empty. Commands: "
             + "; ".join(f"`{n}`: `{c}`" for n, c in ref["commands"].items()) + ".", ""]
    if ref["missing"]:
        lines += [(f"**Not measured in this run:** {', '.join(ref['missing'])} (venv missing: "
                   "`scripts/ensure_reference_venvs.sh`)."), ""]
    head = "| scenario | " + " | ".join(f"{n} req/s | {n} rows/s | {n} p50 ms | {n} us CPU/req" for n in names) + " |"
    lines += [head, "|" + " --- |" * (1 + 4 * len(names))]
    for key in ref["scenarios"]:
        cells = []
        for n in names:
            v = s.get(n, {}).get(key)
            if v is None:
                cells += ["-"] * 4
                continue
            cells += [f"{v.get('requests_per_s') or 0:,.0f}", f"{v.get('rows_per_s') or 0:,.0f}",
                      f"{v.get('p50_ms') or 0:.2f}", f"{v.get('cpu0_us_per_request') or 0:,.0f}"]
        label = key.replace("/", " ") if key.startswith("json") else "binary " + key.replace("/", " ")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += target_table("issue 16", "required", targets(ref))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("python -m benchmarks.references.http_bench", __doc__, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
