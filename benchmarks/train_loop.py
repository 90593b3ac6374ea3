"""Benchmark: epochs/second of training.fit's in-memory loop vs the usual DataLoader + per-example transform.

    python -m benchmarks.train_loop [--data digits] [--repeats 7] [--epochs-per-repeat 2] [--threads 1]

Both loops train the same model (TrainConfig defaults unless flags say otherwise) with the same optimiser
and objective; only the data path differs:

A  training.fit.train_one_epoch: the split is one tensor in memory, each batch is sliced out of the
   epoch's permutation (no per-example Python work);
B  the usual pattern: a torch Dataset over the raw examples whose __getitem__ converts and normalises one
   example, batched by DataLoader(shuffle=True, num_workers=0) with the default collate.

A and B alternate in one process (A, B, A, B, ...) so drift in machine load hits both; the medians are
reported. Writes benchmarks/results/train_loop.json and prints a table. Not a test: timings vary.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training import distributed as D
from training.config import TrainConfig
from training.data import _validate, fit_normalization, read_raw, split_indices
from training.fit import noise_generator, train_one_epoch
from training.model import VAE, training_objective

RESULTS = Path(__file__).resolve().parent / "results" / "train_loop.json"


class PerExampleDataset(Dataset):  # type: ignore[type-arg]
    """The usual Dataset: raw examples, converted and normalised one at a time in __getitem__."""

    def __init__(self, raw: np.ndarray, offset: float, scale: float) -> None:
        self.raw, self.offset, self.scale = raw, offset, scale

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.as_tensor(self.raw[i], dtype=torch.float32)
        return ((x - self.offset) / self.scale).flatten().clamp(0, 1)


def dataloader_epoch(model: VAE, opt: torch.optim.Optimizer, loader: DataLoader, config: TrainConfig,  # type: ignore[type-arg]
                     gen: torch.Generator) -> None:
    model.train()
    for x in loader:
        eps = torch.randn((len(x), config.latent_dim), generator=gen)
        terms, _, _ = model(x, eps)
        loss = training_objective(terms, config.beta, config.free_bits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    p = argparse.ArgumentParser(description="epochs/s: in-memory slicing vs DataLoader",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="digits", help="dataset spec, as for training.fit (mlp examples)")
    p.add_argument("--batch-size", type=int, default=TrainConfig().batch_size, help="batch size")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats of each loop (interleaved)")
    p.add_argument("--epochs-per-repeat", type=int, default=2, help="epochs timed per repeat")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (fair to both loops)")
    p.add_argument("--out", type=Path, default=RESULTS, help="result JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(data=args.data, batch_size=args.batch_size)

    raw = read_raw(config)
    _validate(raw, config)
    tr, _, _ = split_indices(len(raw.x), config.val_fraction, config.test_fraction, config.seed,
                             has_test=raw.test_x is not None)
    norm = fit_normalization(raw.x[tr], raw, config)
    x_train = torch.from_numpy(np.clip(norm.apply(raw.x[tr]), 0, 1).reshape(len(tr), -1))  # (N, D)
    dataset = PerExampleDataset(raw.x[tr], float(norm.offset), float(norm.scale))  # type: ignore[arg-type]

    def fresh() -> tuple[VAE, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = VAE(config, (x_train.shape[1],))
        return m, torch.optim.Adam(m.parameters(), lr=config.lr)

    ctx = D.DistContext()
    timings: dict[str, list[float]] = {"A_in_memory": [], "B_dataloader": []}
    for rep in range(args.repeats + 1):  # repeat 0 warms both paths up and is discarded
        for name, runs in timings.items():
            model, opt = fresh()
            loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(rep))
            t0 = time.perf_counter()
            for e in range(args.epochs_per_repeat):
                gen = noise_generator(config.seed, e, 0, torch.device("cpu"))
                if name == "A_in_memory":
                    shard = D.epoch_shard(len(x_train), config.seed, e, ctx)
                    train_one_epoch(model, model, opt, x_train, shard, config.batch_size, config, e, gen)
                else:
                    dataloader_epoch(model, opt, loader, config, gen)
            if rep:
                runs.append(args.epochs_per_repeat / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in timings.items()}
    result = {
        "benchmark": "training loop epochs/second, in-memory slicing (A) vs DataLoader + per-example transform (B)",
        "command": "python -m benchmarks.train_loop " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "data": args.data, "train_examples": len(x_train), "batch_size": config.batch_size,
        "model": {"arch": config.arch, "hidden": list(config.hidden), "latent_dim": config.latent_dim},
        "repeats": args.repeats, "epochs_per_repeat": args.epochs_per_repeat, "torch_threads": args.threads,
        "epochs_per_s": {k: {"median": med[k], "runs": v} for k, v in timings.items()},
        "ratio_A_over_B": med["A_in_memory"] / med["B_dataloader"],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'loop':<16}{'median epochs/s':>18}{'min':>10}{'max':>10}")
    for k, v in timings.items():
        print(f"{k:<16}{med[k]:>18.2f}{min(v):>10.2f}{max(v):>10.2f}")
    print(f"ratio A/B: {result['ratio_A_over_B']:.2f}x  ({len(x_train)} examples, batch {config.batch_size}; "
          f"written to {args.out})")


if __name__ == "__main__":
    main()
