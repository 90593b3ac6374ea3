"""Benchmark: examples/second of training.fit's hot loop vs the pytorch/examples VAE loop, same model.

    python -m benchmarks.train_loop [--data mnist:../shared/data/mnist] [--repeats 5] [--epochs-per-repeat 2]

Both loops train MLP 784-400-20 (the example's model; `--data digits` gives 64-400-20) at batch 128 with
one torch thread; only the loop differs:

A  training.fit.train_one_epoch: the split is one tensor in memory, gathered once per epoch and sliced
   into batches; one encoder Linear for (mu, logvar); BCE on logits; the fused Adam kernel
   (training.fit.make_optimizer);
B  pytorch/examples vae/main.py's train() (benchmarks/train_recipes.py): DataLoader over a TensorDataset
   (per-example indexing and collate), separate fc21/fc22 heads, sigmoid then BCE, the default Adam.

A and B alternate in one process (A, B, A, B, ...) so drift in machine load hits both; the medians are
reported. `torch.compile` of the step was measured too (see BENCHMARKS.md) and is not used: on this
CPU it saves about 15% of a step but costs about 30 s of compilation, more than a default run gains.
Writes benchmarks/results/train_loop.json and prints a table. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
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


def main() -> None:
    p = argparse.ArgumentParser(description="examples/s: training.fit's loop vs the pytorch/examples loop",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=f"mnist:{MNIST}", help="dataset spec, as for training.fit")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each loop (interleaved)")
    p.add_argument("--epochs-per-repeat", type=int, default=2, help="epochs timed per repeat")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the same for both loops)")
    p.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(data=args.data, hidden=(400,), latent_dim=20, batch_size=BATCH, lr=1e-3,
                         lr_schedule="constant", lr_warmup_epochs=0)
    x_train = load_data(config).train  # (N, D) in [0, 1]
    config = config.resolved(x_train.shape[1], len(x_train))  # as training.fit does: --backward auto chosen
    dataset = TensorDataset(x_train)
    ctx = D.DistContext()
    cpu = torch.device("cpu")
    timings: dict[str, list[float]] = {"A_training_fit": [], "B_pytorch_examples": []}
    for rep in range(args.repeats + 1):  # repeat 0 warms both paths up and is discarded
        for name, runs in timings.items():
            torch.manual_seed(rep)
            if name == "A_training_fit":
                vae = VAE(config, (x_train.shape[1],))
                opt = make_optimizer(vae, config, cpu)
            else:
                ex = ExampleVAE(x_train.shape[1])
                ex_opt = torch.optim.Adam(ex.parameters(), lr=1e-3)
                loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
            t0 = time.perf_counter()
            for e in range(args.epochs_per_repeat):
                if name == "A_training_fit":
                    shard = D.epoch_shard(len(x_train), config.seed + rep, e, ctx)
                    train_one_epoch(vae, vae, opt, x_train, shard, BATCH, config, e,
                                    noise_generator(config.seed + rep, e, 0, cpu))
                else:
                    example_train_epoch(ex, ex_opt, loader)
            if rep:
                runs.append(args.epochs_per_repeat * len(x_train) / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "benchmark": "training examples/s, training.fit's loop (A) vs pytorch/examples vae/main.py's loop (B)",
        "command": "python -m benchmarks.train_loop " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "data": args.data.replace(str(MNIST), "../shared/data/mnist"), "train_examples": len(x_train),
        "batch_size": BATCH, "model": {"arch": "mlp", "hidden": [400], "latent_dim": 20},
        "repeats": args.repeats, "epochs_per_repeat": args.epochs_per_repeat, "torch_threads": args.threads,
        "examples_per_s": {k: {"median": med[k], "runs": v} for k, v in timings.items()},
        "ratio_A_over_B": med["A_training_fit"] / med["B_pytorch_examples"],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'loop':<20}{'median examples/s':>19}{'min':>10}{'max':>10}")
    for k, v in timings.items():
        print(f"{k:<20}{med[k]:>19.0f}{min(v):>10.0f}{max(v):>10.0f}")
    print(f"ratio A/B: {result['ratio_A_over_B']:.2f}x  ({len(x_train)} examples, batch {BATCH}; "
          f"written to {args.out})")


if __name__ == "__main__":
    main()
