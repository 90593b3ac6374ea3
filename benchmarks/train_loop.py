"""Benchmark: examples/second of training.fit's hot loop vs the pytorch/examples VAE loop, same model.

    python -m benchmarks.train_loop [--data mnist:../shared/data/mnist] [--repeats 8] [--epochs-per-repeat 1]

All loops train MLP 784-400-20 (the example's model; `--data digits` gives 64-400-20) at batch 128 with
the same number of torch threads (--threads, default 1); only the loop differs:

A  training.fit.train_one_epoch with the defaults (`--backward auto`, here the hand-written step of
   training/mlp_step.py): the split is one tensor in memory, each step's batch one `index_select` of its
   rows, the noise drawn for 32 steps at a time; the forward, the ELBO and the backward in plain tensor ops
   writing into each `.grad`; the fused Adam kernel (training.fit.make_optimizer);
A' the same loop with `--backward autograd`: one encoder Linear for (mu, logvar), BCE on logits, autograd;
B  pytorch/examples vae/main.py's train() (benchmarks/train_recipes.py): DataLoader over a TensorDataset
   (per-example indexing and collate), separate fc21/fc22 heads, sigmoid then BCE, the default Adam,
   `loss.item()` every step;
and, as a bound, the eleven matrix products of a step alone (`matmuls_only`, no loop can beat it).

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
from training.fit import make_optimizer, noise_generator, train_one_epoch
from training.model import VAE

RESULTS = Path(__file__).resolve().parent / "results" / "train_loop.json"
BATCH = 128
FLOOR = "matmuls_only"


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
    configs = {"A_training_fit": config.resolved(x_train.shape[1], len(x_train)),  # as training.fit resolves it
               "A_autograd": dataclasses.replace(config, backward="autograd").resolved(x_train.shape[1], len(x_train))}
    dataset = TensorDataset(x_train)
    ctx = D.DistContext()
    cpu = torch.device("cpu")
    floor = matmul_floor(x_train.shape[1], 400, 20)
    names = [*configs, "B_pytorch_examples", FLOOR]
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu_time: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.repeats + 1):  # turn 0 warms every path up and is discarded
        for name in names:
            torch.manual_seed(rep)
            if name in configs:
                c = configs[name]
                vae = VAE(c, (x_train.shape[1],))
                opt = make_optimizer(vae, c, cpu)
            elif name != FLOOR:
                ex = ExampleVAE(x_train.shape[1])
                ex_opt = torch.optim.Adam(ex.parameters(), lr=1e-3)
                loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
            t0, c0 = time.perf_counter(), time.process_time()
            for e in range(args.epochs_per_repeat):
                if name == FLOOR:
                    for _ in range(-(-len(x_train) // BATCH)):
                        floor()
                elif name in configs:
                    shard = D.epoch_shard(len(x_train), c.seed + rep, e, ctx)
                    train_one_epoch(vae, vae, opt, x_train, shard, BATCH, c, e,
                                    noise_generator(c.seed + rep, e, 0, cpu))
                else:
                    example_train_epoch(ex, ex_opt, loader)
            if rep:
                n = args.epochs_per_repeat * len(x_train)
                wall[name].append(n / (time.perf_counter() - t0))
                cpu_time[name].append(n / (time.process_time() - c0))
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_time.items()}
    b = "B_pytorch_examples"
    result = {
        "benchmark": "training examples/s, training.fit's loop (A: defaults; A': --backward autograd) vs "
                     "pytorch/examples vae/main.py's loop (B)",
        "command": "python -m benchmarks.train_loop " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "data": args.data.replace(str(MNIST), "../shared/data/mnist"), "train_examples": len(x_train),
        "batch_size": BATCH, "model": {"arch": "mlp", "hidden": [400], "latent_dim": 20},
        "backward": {k: c.backward for k, c in configs.items()},
        "repeats": args.repeats, "epochs_per_repeat": args.epochs_per_repeat, "torch_threads": args.threads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg(),
        "examples_per_s": {k: {"median": med[k], "runs": v} for k, v in wall.items()},
        "examples_per_cpu_s": {k: {"median": med_cpu[k], "runs": v} for k, v in cpu_time.items()},
        "ratio_A_over_B": med["A_training_fit"] / med[b],
        "ratio_A_over_B_cpu": med_cpu["A_training_fit"] / med_cpu[b],
        "ratio_A_autograd_over_B": med["A_autograd"] / med[b],
        "ratio_floor_over_B": med[FLOOR] / med[b],
        "ratio_A_over_B_per_turn": statistics.median(
            a / bb for a, bb in zip(wall["A_training_fit"], wall[b], strict=True)),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'loop':<20}{'median examples/s':>19}{'min':>10}{'max':>10}{'per CPU-s':>11}")
    for k, v in wall.items():
        print(f"{k:<20}{med[k]:>19.0f}{min(v):>10.0f}{max(v):>10.0f}{med_cpu[k]:>11.0f}")
    print(f"ratio A/B: {result['ratio_A_over_B']:.2f}x wall-clock, {result['ratio_A_over_B_cpu']:.2f}x per CPU-second, "
          f"{result['ratio_A_over_B_per_turn']:.2f}x median of turns; A'/B {result['ratio_A_autograd_over_B']:.2f}x; "
          f"the matrix products alone {result['ratio_floor_over_B']:.2f}x B  "
          f"({len(x_train)} examples, batch {BATCH}; written to {args.out})")


if __name__ == "__main__":
    main()
