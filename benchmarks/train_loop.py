"""Benchmark: examples/second of training.fit's hot loop vs the pytorch/examples VAE loop, same model.

    python -m benchmarks.train_loop [--data mnist:../shared/data/mnist] [--repeats 8] [--epochs-per-repeat 1]

All loops train MLP 784-400-20 (the example's model; `--data digits` gives 64-400-20) at batch 128 with
the same number of torch threads (--threads, default 1); only the loop differs:

A  training.epoch.train_one_epoch (what training.fit runs) with the defaults (`--backward auto`, here the hand-written step of
   training/mlp_step.py; `--matmul-precision auto`, on a CPU with AMX-BF16 the products from bfloat16
   operands): the split is one tensor in memory, each step's batch one `index_select` of its rows, the
   noise drawn for 32 steps at a time; the forward, the ELBO and the backward in plain tensor ops writing
   into each `.grad`; the fused Adam kernel (training.epoch.make_optimizer);
A float32  the same with `--matmul-precision highest` (B's arithmetic: what the loop alone gains);
A' the same loop with `--backward autograd`: one encoder Linear for (mu, logvar), BCE on logits, autograd;
B  pytorch/examples vae/main.py's train() (benchmarks/train_recipes.py): DataLoader over a TensorDataset
   (per-example indexing and collate), separate fc21/fc22 heads, sigmoid then BCE, the default Adam,
   `loss.item()` every step, PyTorch's default float32 products; where A's default differs, B is also run
   with A's products (`B_pytorch_examples_same_precision`), so no ratio hides the precision;
and, as a bound, the eleven matrix products of a step alone (`matmuls_only`, at A's precision, and at
float32 where that differs: no loop can beat them).

The loops take turns in one process (A, A', B, A, A', B, ...; each turn a fresh model and optimiser) so
drift in machine load hits all of them; the medians are reported, of wall-clock examples/s and of examples
per CPU-second of this process (which a busy machine disturbs less: time spent waiting for a core is not
counted). `torch.compile` of the step was measured too (see BENCHMARKS.md) and is not used.
Writes benchmarks/results/train_loop.json and prints a table. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.train_recipes import MNIST, ExampleVAE, example_train_epoch
from training import distributed as D
from training.config import TrainConfig
from training.data import load_data
from training.epoch import float32_matmul_precision, make_optimizer, noise_generator, train_one_epoch
from training.model import VAE

RESULTS = Path(__file__).resolve().parent / "results" / "train_loop.json"
BATCH = 128
A, A_FP32, B = "A_training_fit", "A_float32", "B_pytorch_examples"
B_SAME = "B_pytorch_examples_same_precision"  # B with A's default matmul precision
FLOOR, FLOOR_FP32 = "matmuls_only", "matmuls_only_float32"


def matmul_floor(n_in: int, hidden: int, latent: int) -> Callable[[], None]:
    """The eleven matrix products of one training step of the n_in-hidden-latent MLP VAE at batch 128 and
    nothing else (the forward's four, the backward's weight and input gradients; none for x): what any loop
    over this model must spend a step on, so its examples/s bound every loop's."""
    x, h, z = torch.rand(BATCH, n_in), torch.rand(BATCH, hidden), torch.randn(BATCH, latent)
    g_out, g_enc = torch.randn(BATCH, n_in), torch.randn(BATCH, 2 * latent)
    w1, w2 = torch.randn(hidden, n_in), torch.randn(2 * latent, hidden)
    w3, w4 = torch.randn(hidden, latent), torch.randn(n_in, hidden)

    def step() -> None:
        for a, b in ((x, w1.t()), (h, w2.t()), (z, w3.t()), (h, w4.t()),  # forward
                     (g_out.t(), h), (g_out, w4), (h.t(), z), (h, w3),       # decoder backward
                     (g_enc.t(), h), (g_enc, w2), (h.t(), x)):               # encoder backward
            torch.mm(a, b)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description="examples/s: training.fit's loop vs the pytorch/examples loop",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=f"mnist:{MNIST}", help="dataset spec, as for training.fit")
    p.add_argument("--repeats", type=int, default=8, help="timed turns of each loop (interleaved)")
    p.add_argument("--epochs-per-repeat", type=int, default=1, help="epochs timed per turn")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the same for every loop)")
    p.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = p.parse_args()
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    config = TrainConfig(data=args.data, hidden=(400,), latent_dim=20, batch_size=BATCH, lr=1e-3,
                         lr_schedule="constant", lr_warmup_epochs=0)
    x_train = load_data(config).train  # (N, D) in [0, 1]
    n, n_in = len(x_train), x_train.shape[1]
    configs = {A: config.resolved(n_in, n),  # as training.fit resolves it on this machine
               A_FP32: dataclasses.replace(config, matmul_precision="highest").resolved(n_in, n),
               "A_autograd": dataclasses.replace(config, backward="autograd").resolved(n_in, n)}
    default_precision = configs[A].matmul_precision
    # B as the example runs it (PyTorch's default float32 products), and with A's default products if those differ
    examples = {B: "highest"} | ({B_SAME: default_precision} if default_precision != "highest" else {})
    floors = {FLOOR: default_precision} | ({FLOOR_FP32: "highest"} if default_precision != "highest" else {})
    dataset = TensorDataset(x_train)
    ctx = D.DistContext()
    cpu = torch.device("cpu")
    floor = matmul_floor(n_in, 400, 20)
    names = [*configs, *examples, *floors]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu_time: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.repeats + 1):  # turn 0 warms every path up and is discarded
        for name in names:
            torch.manual_seed(rep)
            if name in configs:
                c = configs[name]
                vae = VAE(c, (n_in,))
                opt = make_optimizer(vae, c, cpu)
            elif name in examples:
                ex = ExampleVAE(n_in)
                ex_opt = torch.optim.Adam(ex.parameters(), lr=1e-3)
                loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
            t0, c0 = time.perf_counter(), time.process_time()
            for e in range(args.epochs_per_repeat):
                if name in floors:
                    with float32_matmul_precision(floors[name]):
                        for _ in range(-(-n // BATCH)):
                            floor()
                elif name in configs:  # train_one_epoch sets the config's precision itself
                    shard = D.epoch_shard(n, c.seed + rep, e, ctx)
                    train_one_epoch(vae, vae, opt, x_train, shard, BATCH, c, e,
                                    noise_generator(c.seed + rep, e, 0, cpu))
                else:
                    with float32_matmul_precision(examples[name]):
                        example_train_epoch(ex, ex_opt, loader)
            if rep:
                done = args.epochs_per_repeat * n
                wall[name].append(done / (time.perf_counter() - t0))
                cpu_time[name].append(done / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_time.items()}
    result = {
        "benchmark": "training examples/s, training.fit's loop (A: defaults; A float32: --matmul-precision highest; "
                     "A': --backward autograd) vs pytorch/examples vae/main.py's loop (B)",
        "command": "python -m benchmarks.train_loop " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "data": args.data.replace(str(MNIST), "../shared/data/mnist"), "train_examples": n,
        "batch_size": BATCH, "model": {"arch": "mlp", "hidden": [400], "latent_dim": 20},
        "backward": {k: c.backward for k, c in configs.items()},
        "matmul_precision": {k: c.matmul_precision for k, c in configs.items()} | examples | floors,
        "repeats": args.repeats, "epochs_per_repeat": args.epochs_per_repeat, "torch_threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
        "examples_per_s": {k: {"median": med[k], "runs": v} for k, v in wall.items()},
        "examples_per_cpu_s": {k: {"median": med_cpu[k], "runs": v} for k, v in cpu_time.items()},
        "ratio_A_over_B": med[A] / med[B],
        "ratio_A_over_B_cpu": med_cpu[A] / med_cpu[B],
        "ratio_A_float32_over_B": med[A_FP32] / med[B],
        "ratio_A_autograd_over_B": med["A_autograd"] / med[B],
        "ratio_floor_over_B": med[FLOOR] / med[B],
        "ratio_A_over_B_per_turn": statistics.median(
            a / bb for a, bb in zip(wall[A], wall[B], strict=True)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "amx_bf16": bool(torch.cpu.get_capabilities().get("amx_bf16"))},
    }
    if B_SAME in med:
        result["ratio_A_over_B_same_precision"] = med[A] / med[B_SAME]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'loop':<26}{'precision':>10}{'median examples/s':>19}{'min':>10}{'max':>10}{'per CPU-s':>11}")
    for k, v in wall.items():
        print(f"{k:<26}{result['matmul_precision'][k]:>10}{med[k]:>19.0f}{min(v):>10.0f}{max(v):>10.0f}"
              f"{med_cpu[k]:>11.0f}")
    print(f"ratio A/B: {result['ratio_A_over_B']:.2f}x wall-clock, {result['ratio_A_over_B_cpu']:.2f}x per CPU-second, "
          f"{result['ratio_A_over_B_per_turn']:.2f}x median of turns; A float32/B {result['ratio_A_float32_over_B']:.2f}x; "
          + (f"A/B at A's precision {result['ratio_A_over_B_same_precision']:.2f}x; " if B_SAME in med else "")
          + f"A'/B {result['ratio_A_autograd_over_B']:.2f}x; the matrix products alone {result['ratio_floor_over_B']:.2f}x B  "
          f"({n} examples, batch {BATCH}; written to {args.out})")


if __name__ == "__main__":
    main()
