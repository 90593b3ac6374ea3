"""`make bench` step (issue 15): server CPU per single-row streamed message, against Triton in the same run.

    python -m benchmarks.run --only streams        # this step alone (trains the bench model if missing)
    python -m benchmarks.references.streams --model-dir runs/bench/exported [--rounds 2] [--duration-s 4]

Three servers take turns (order rotating per round), each pinned to CPU 0, the same load generator on
CPU 1 (`python -m loadgen`, Open Inference Protocol, raw FP32, single-row requests, every output):

- vae-serve (default flags): ModelStreamInfer with 64 streams x 1 message in flight (and 8 x 8), and
  unary ModelInfer at C = 64 for context;
- Triton with dynamic batching (the references' configuration): unary ModelInfer at C = 64;
- Triton without dynamic batching: ModelStreamInfer, 64 streams x 1 (its python backend crashed with
  streaming + dynamic batching, issue 15);
- the do-nothing grpc.aio stream (`python -m loadgen.null_server --stream`: read, parse the id, answer):
  the floor under any streamed message in a grpc.aio server, 64 streams x 1.

Server CPU is CPU 0's busy time per request or message (`cpu0_us_per_request`: Triton's python-backend
stubs included). Targets: ours streamed <= 0.6 x Triton's unary per-request CPU at C = 64, and <= Triton's
own streamed per-message CPU. Medians over rounds. Prints the markdown section on stderr, the JSON last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import PY, serving_cmd
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

STREAM_64 = ("--streams", "64", "--stream-inflight", "1")
STREAM_8X8 = ("--streams", "8", "--stream-inflight", "8")
# system -> its scenarios (single-row requests)
SCENARIOS: dict[str, list[Scenario]] = {
    "vae-serve": [Scenario(f"{m}/stream64x1", f"infer-{m}", 1, 1, STREAM_64) for m in ("encoder", "decoder")]
                 + [Scenario("encoder/stream8x8", "infer-encoder", 1, 1, STREAM_8X8),
                    Scenario("encoder/unary-c64", "infer-encoder", 64, 1)],
    "triton": [Scenario(f"{m}/unary-c64", f"infer-{m}", 64, 1) for m in ("encoder", "decoder")],
    "triton-nobatch": [Scenario(f"{m}/stream64x1", f"infer-{m}", 1, 1, STREAM_64) for m in ("encoder", "decoder")],
    "null-stream": [Scenario("encoder/stream64x1", "infer-encoder", 1, 1, STREAM_64)],
}


def systems(model_dir: Path) -> dict[str, list[str]]:
    cmds = {"vae-serve": serving_cmd(model_dir, []),
            "null-stream": [PY, "-m", "loadgen.null_server", "--kind", "aio-uvloop", "--stream", "--stop-after-s", "600"]}
    if TRITON_PY.is_file():
        cmds["triton"] = launcher_cmd(TRITON_PY, "triton.py", model_dir, "triton")
        cmds["triton-nobatch"] = launcher_cmd(TRITON_PY, "triton.py", model_dir, "triton-nobatch",
                                              "--no-dynamic-batching")
    return cmds


def run(model_dir: Path, rounds: int, duration_s: float) -> dict[str, Any]:
    cmds = systems(model_dir)
    raw = take_turns("streams", "stream", cmds, SCENARIOS, rounds, duration_s)
    summary = summarize(raw)
    return {"systems": list(cmds), "triton_missing": "triton" not in cmds, "rounds": rounds, "duration_s": duration_s,
            "summary": summary, "commands": {n: " ".join(c) for n, c in cmds.items()}, "runs": raw}


def targets(res: dict[str, Any]) -> list[Target]:
    """Issue 15's targets: (what, measured ratio of CPU per message, at most, met); None where not measured."""
    s = res["summary"]
    ours, triton, nobatch, null = (s.get(n, {}) for n in ("vae-serve", "triton", "triton-nobatch", "null-stream"))

    def ratio(a: dict[str, Any], ka: str, b: dict[str, Any], kb: str) -> float | None:
        x, y = a.get(ka, {}).get("cpu0_us_per_request"), b.get(kb, {}).get("cpu0_us_per_request")
        return x / y if x and y else None

    out: list[Target] = []
    for m in ("encoder", "decoder"):
        for what, other, key, need in (("Triton unary ModelInfer C=64", triton, f"{m}/unary-c64", 0.6),
                                       ("Triton ModelStreamInfer 64x1 (batching off)", nobatch, f"{m}/stream64x1", 1.0)):
            r = ratio(ours, f"{m}/stream64x1", other, key)
            out.append((f"{m}: vae-serve ModelStreamInfer 64x1 CPU/msg / {what} CPU/req", r, need,
                        None if r is None else r <= need))
    # Not a target: how far the do-nothing grpc.aio stream alone is from the first one.
    r = ratio(null, "encoder/stream64x1", triton, "encoder/unary-c64")
    out.append(("(floor) do-nothing grpc.aio stream 64x1 CPU/msg / Triton unary ModelInfer C=64 CPU/req", r, 0.6,
                None if r is None else r <= 0.6))
    return out


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    lines = ["## Streams against Triton (issue 15; same client, same run)", "",
             "Single-row Open Inference Protocol requests from `python -m loadgen` on CPU 1 to each server on CPU 0; "
             f"{res['rounds']} rounds of {res['duration_s']:g} s per scenario, systems taking turns, medians. CPU is "
             "CPU 0's busy time per request or stream message. `stream64x1`: ModelStreamInfer, 64 streams with one "
             "message in flight each; `unary-c64`: ModelInfer, 64 in flight. Commands: "
             + "; ".join(f"`{n}`: `{c}`" for n, c in res["commands"].items()) + ".", ""]
    if res["triton_missing"]:
        lines += ["**Triton was not measured in this run** (`.venv-triton` missing: `scripts/ensure_reference_venvs.sh`).", ""]
    lines += ["| system | scenario | req/s | p50 ms | p99 ms | us CPU/req |", "| --- | --- | --- | --- | --- | --- |"]
    for name in res["systems"]:
        for key, v in res["summary"].get(name, {}).items():
            lines.append(f"| {name} | {key} | {v['requests_per_s'] or 0:,.0f} | {v['p50_ms'] or 0:.2f} | "
                         f"{v['p99_ms'] or 0:.2f} | {v['cpu0_us_per_request'] or 0:,.0f} |")
    lines += ["", ("Since issue 24 the streams pass through the native front end to its grpcio fallback on a Unix "
              "socket; issue 24 retired issue 15's streaming targets and asks only that streams keep working "
              "and that their cost be reported: the table below is kept for comparison, not as a target.")]
    lines += target_table("issue 15 (retired)", "at most", targets(res))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli("python -m benchmarks.references.streams", __doc__, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
