"""Train a VAE: one process, or data-parallel under torchrun.

    python -m training.fit --data digits --out runs/demo [--epochs 60] [--time-budget-s 60] [--resume]
    torchrun --nproc_per_node=2 -m training.fit --data digits --out runs/ddp     # gloo on CPU, NCCL on GPU

The defaults (chosen by measurement, benchmarks/train_recipes.py and BENCHMARKS.md) scale the network with
the input when `--hidden` / `--latent-dim` are not given, warm the learning rate up for one epoch and
then decay it along a cosine to 0 by the end of the run (`--epochs` or `--time-budget-s`, whichever ends
it first), and keep the checkpoint with the best validation -ELBO (best.pt) for evaluation and export.

All randomness is explicit: the permutation of epoch e comes from `seed + e` (DistributedSampler
semantics, see training/distributed.py) and the reparameterisation noise and dynamic binarisation come
from a generator seeded from (seed, epoch, rank). A run killed at any point and restarted with `--resume`
therefore ends with exactly the metrics of an uninterrupted run (on CPU), unless `--time-budget-s` is set:
then where it stops, and the cosine schedule with it, follow the wall-clock.

`--batch-size` is the GLOBAL batch size: with N ranks each rank takes batch_size / N examples a step.

The run directory (written by rank 0 only) is described in training/rundir.py. This module is the command
line; the run is training/trainer.py, an epoch's steps training/epoch.py, the learning-rate and KL
schedules and the wall-clock budget training/schedule.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record

from training.checkpoint import CheckpointError
from training.config import (
    ARCHES,
    BACKWARDS,
    DEVICES,
    LIKELIHOODS,
    LR_SCHEDULES,
    MATMUL_PRECISIONS,
    OBJECTIVES,
    ConfigError,
    TrainConfig,
)
from training.data import DataError
from training.trainer import TrainingDiverged, fit

__all__ = ["build_parser", "config_from_args", "fit", "main"]

logger = logging.getLogger(__name__)

# Flags of the command line that are not TrainConfig fields.
RUNTIME_FLAGS: tuple[str, ...] = ("out", "resume", "progress", "dist_timeout_s", "log_level")


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The one parser; with `suppress_defaults`, only flags given on the command line appear."""
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                argument_default=argparse.SUPPRESS if suppress_defaults else None)

    def add(flag: str, default: Any, help: str, **kw: Any) -> None:
        if not suppress_defaults:
            kw["default"] = default
        p.add_argument(flag, help=help, **kw)

    add("--data", d.data, "digits | mnist:DIR | npy:FILE | images:DIR")
    add("--arch", d.arch, "encoder/decoder architecture", choices=ARCHES)
    add("--latent-dim", d.latent_dim, "latent dimensions d (0: a power of two near sqrt(input size), "
        "e.g. 8 for 8x8 digits, 32 for 28x28)", type=int)
    add("--hidden", list(d.hidden), "hidden layer sizes (mlp; conv uses the first); none given: scaled to the "
        "input (training.config.auto_hidden): 256 for 8x8 digits, 400 for 28x28", type=int, nargs="*")
    add("--conv-channels", list(d.conv_channels), "conv channels, one halving of H, W each", type=int, nargs="+")
    add("--likelihood", d.likelihood, "decoder P(x|z)", choices=LIKELIHOODS)
    add("--learn-variance", d.learn_variance, "Gaussian: learn a per-dimension variance",
        action=argparse.BooleanOptionalAction)
    add("--image-size", d.image_size, "images:DIR are resized to this square size", type=int)
    add("--binarize", d.binarize, "Bernoulli: dynamic binarisation of training batches",
        action=argparse.BooleanOptionalAction)
    add("--rescale", d.rescale, "Bernoulli: min-max scale float data outside [0, 1] (fitted on train)",
        action=argparse.BooleanOptionalAction)
    add("--epochs", d.epochs, "maximum number of epochs (and the length of the cosine schedule); 0: 150, or "
        "no limit when --time-budget-s is given", type=int)
    add("--time-budget-s", d.time_budget_s, "stop training after this many seconds of wall-clock (checked "
        "between steps; the last epoch may be partial), then finish as usual; 0: no limit", type=float)
    add("--batch-size", d.batch_size, "GLOBAL batch size (split evenly over torchrun ranks)", type=int)
    add("--lr", d.lr, "Adam learning rate (peak, after warm-up)", type=float)
    add("--lr-schedule", d.lr_schedule, "constant, or cosine decay to 0 over --epochs or --time-budget-s, "
        "whichever ends the run; auto: cosine from 4096 training examples up, constant below",
        choices=LR_SCHEDULES)
    add("--lr-warmup-epochs", d.lr_warmup_epochs, "ramp the learning rate linearly from 0 over this many epochs",
        type=int)
    add("--weight-decay", d.weight_decay, "Adam weight decay (L2, added to the gradient); 0: off", type=float)
    add("--objective", d.objective, "elbo, or iwae: the importance-weighted bound with --iwae-k samples",
        choices=OBJECTIVES)
    add("--iwae-k", d.iwae_k, "importance samples per example of --objective iwae", type=int)
    add("--beta", d.beta, "weight of the KL term (beta-VAE)", type=float)
    add("--kl-warmup-epochs", d.kl_warmup_epochs, "ramp the KL weight linearly from 0 over this many epochs",
        type=int)
    add("--free-bits", d.free_bits, "per-dimension KL floor in nats (training objective only)", type=float)
    add("--val-fraction", d.val_fraction, "fraction of examples for validation", type=float)
    add("--test-fraction", d.test_fraction, "fraction of examples for test (unless the data has a test file)",
        type=float)
    add("--seed", d.seed, "seed of the split, initialisation, shuffling and noise", type=int)
    add("--device", d.device, "training device", choices=DEVICES)
    add("--patience", d.patience, "stop after this many epochs without a better validation -ELBO (0: never)",
        type=int)
    add("--grad-clip", d.grad_clip, "clip the gradient norm to this (0: off)", type=float)
    add("--backward", d.backward, "manual: the hand-written forward/backward of the MLP ELBO (training/mlp_step.py; "
        "MLP, Bernoulli, --objective elbo, one process); autograd; auto: manual where it applies", choices=BACKWARDS)
    add("--matmul-precision", d.matmul_precision, "float32 matrix products of the training steps "
        "(torch.set_float32_matmul_precision; validation, test and export are always full float32): highest; "
        "medium: from bfloat16 operands (oneDNN, AMX); high: TF32 on CUDA; auto: medium for a Bernoulli MLP whose "
        "largest product has 8M+ multiply-adds a step on a CPU with AMX-BF16, else highest", choices=MATMUL_PRECISIONS)
    add("--out", "runs/latest", "run directory (written by rank 0 only)", type=Path)
    add("--resume", False, "continue from OUT/checkpoint.pt if it exists", action="store_true")
    add("--progress", True, "show a progress bar per epoch", action=argparse.BooleanOptionalAction)
    add("--dist-timeout-s", 300.0, "timeout of every collective under torchrun, so a dead rank fails the job "
        "instead of hanging it", type=float)
    add("--log-level", "INFO", "logging level")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    return TrainConfig(**values)


@record  # under torchrun, a failing rank's traceback is reported in the job's error summary
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    explicit = frozenset(vars(build_parser(suppress_defaults=True).parse_args(argv)))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=args.log_level if rank == 0 else "WARNING",
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        fit(config, args.out, resume=args.resume, progress=args.progress, dist_timeout_s=args.dist_timeout_s,
            explicit=explicit)
    except (ConfigError, DataError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    except TrainingDiverged as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
