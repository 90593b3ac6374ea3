"""Benchmark: a training Linear's three products in float32 and with bfloat16 operands, by size.

    taskset -c 1 python -m benchmarks.matmul_precision [--batch 128 64] [--repeats 5]

For each (batch, in, out): the forward (`addmm` with the bias), the weight gradient (`addmm` into a
preallocated `.grad`, beta 0) and the input gradient (`mm`), as training/mlp_step.py runs them, timed under
`torch.set_float32_matmul_precision("highest")` and `"medium"` (oneDNN computes from bfloat16 operands with
float32 accumulation where the CPU has AMX or AVX512-BF16). The evidence behind
training.config.BF16_MIN_PRODUCT_MACS, the size from which `--matmul-precision auto` picks "medium".
Prints a table; writes nothing. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from training.config import BF16_MIN_PRODUCT_MACS
from training.epoch import float32_matmul_precision

SHAPES = ((64, 256), (128, 256), (256, 256), (200, 400), (256, 512), (400, 400), (784, 100), (784, 200),
          (784, 400), (3072, 1000))


def median_us(fn: Callable[[], object], reps: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description="a Linear's training products: float32 against bfloat16 operands",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[128, 64], help="batch sizes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per cell (the median is shown)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    caps = torch.cpu.get_capabilities()
    print(f"CPU: amx_bf16 {bool(caps.get('amx_bf16'))}, avx512_bf16 {bool(caps.get('avx512_bf16'))}; "
          f"torch {torch.__version__}, {args.threads} thread(s); auto picks medium from "
          f"{BF16_MIN_PRODUCT_MACS / 1e6:g}M multiply-adds")
    print(f"{'batch x in x out':<22}{'M MACs':>8}{'float32 us':>12}{'bfloat16 us':>13}{'speed-up':>10}")
    for b in args.batch:
        for n_in, n_out in SHAPES:
            x, w, bias = torch.rand(b, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
            g, grad = torch.randn(b, n_out), torch.empty(n_out, n_in)

            def products(x: torch.Tensor = x, w: torch.Tensor = w, bias: torch.Tensor = bias,
                         g: torch.Tensor = g, grad: torch.Tensor = grad) -> None:
                torch.addmm(bias, x, w.t())
                torch.addmm(grad, g.t(), x, beta=0, out=grad)
                torch.mm(g, w)

            reps = max(5, int(2e8 / (3 * b * n_in * n_out)))
            us = {}
            for precision in ("highest", "medium"):
                with float32_matmul_precision(precision):
                    us[precision] = median_us(products, reps, args.repeats)
            print(f"{f'{b} x {n_in} x {n_out}':<22}{b * n_in * n_out / 1e6:>8.2f}{us['highest']:>12.1f}"
                  f"{us['medium']:>13.1f}{us['highest'] / us['medium']:>9.2f}x")


if __name__ == "__main__":
    main()
