"""The in-process ONNX Runtime ceiling: rows/s of the exported graphs called directly, no gRPC, no batcher.

    taskset -c 0 python -m benchmarks.ort_ceiling --model-dir exported/ [--threads 1] [--min-time-s 0.4]

Sessions are opened by `serving.runtime.load_model`, so they have exactly the server's options (one
intra-op thread by default, sequential execution, no spinning). For each batch size 1, 2, 4, ..., 512 the
graph runs back to back on one fixed input for at least `--min-time-s`, five times; the median rows/s
is reported, and rows per CPU-second of this process (robust to other work sharing the CPU, which
lowers rows/s but not rows per CPU-second). Prints one JSON line: {"threads", "encoder": {B: rows/s},
"decoder": {B: rows/s}, "encoder_per_cpu_s": {B: rows/CPU-s}, "decoder_per_cpu_s": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from serving.runtime import OrtRunner, load_model

BATCHES = tuple(2 ** i for i in range(10))  # 1 .. 512


def rows_per_s(runner: OrtRunner, x: np.ndarray, min_time_s: float, repeats: int = 5) -> tuple[float, float]:
    """Medians over `repeats` of (rows/s, rows per CPU-second) for back-to-back runs of x (B, ...)."""
    runner.run(x)  # first run at this shape allocates
    wall, cpu = [], []
    for _ in range(repeats):
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            runner.run(x)
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time_s:
                break
        wall.append(n * x.shape[0] / dt)
        cpu.append(n * x.shape[0] / max(time.process_time() - c0, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def measure(model_dir: Path, threads: int = 1, min_time_s: float = 0.4,
            batches: tuple[int, ...] = BATCHES) -> dict[str, object]:
    model = load_model(model_dir, "cpu", threads, max(batches))
    rng = np.random.default_rng(0)
    shape, d = tuple(model.manifest.example_shape), model.manifest.latent_dim
    result: dict[str, object] = {"threads": threads, "example_shape": list(shape), "latent_dim": d}
    for name, runner, tail in (("encoder", model.encoder, shape), ("decoder", model.decoder, (d,))):
        both = {str(b): rows_per_s(runner, rng.random((b, *tail), dtype=np.float32), min_time_s) for b in batches}
        result[name] = {b: w for b, (w, _) in both.items()}
        result[f"{name}_per_cpu_s"] = {b: c for b, (_, c) in both.items()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description="in-process ONNX Runtime rows/s by batch size",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("exported"), help="exported model directory")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--min-time-s", type=float, default=0.4, help="seconds per timed repeat")
    args = p.parse_args()
    print(json.dumps(measure(args.model_dir, args.threads, args.min_time_s)))


if __name__ == "__main__":
    main()
