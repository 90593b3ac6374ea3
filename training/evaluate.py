"""Evaluate a trained run on its test split: -ELBO, IWAE bound, active units, per-dimension KL.

    python -m training.evaluate --run RUN_DIR [--k 1000] [--checkpoint best|last] [--device cpu]

The test split is rebuilt from the run's own config (same data, seed and normalisation); the result is
merged into RUN_DIR/summary.json under the key "test" (keys in docs/ARCHITECTURE.md) and printed.
The -ELBO terms and active units come from training/heldout.py, as training.fit's validation metrics do.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.checkpoint import CheckpointError
from training.config import CHECKPOINT_CHOICES
from training.data import DataError, load_data
from training.heldout import heldout_sums, stats_from_sums
from training.model import VAE, iwae_log_likelihood
from training.rundir import RunDir

logger = logging.getLogger(__name__)


def evaluate_model(model: VAE, x: Tensor, k: int, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Test metrics for x (N, *shape) in model space: -ELBO (1 sample), IWAE (k samples), active units."""
    if len(x) == 0:
        raise DataError("test split is empty (test_fraction 0?): nothing to evaluate")
    g = torch.Generator(device=x.device).manual_seed(seed)
    eps = torch.randn((len(x), model.config.latent_dim), generator=g, device=x.device)
    stats = stats_from_sums(heldout_sums(model, x, eps))
    iwae = torch.cat([iwae_log_likelihood(model, x[i:i + batch_size], k, generator=g)
                      for i in range(0, len(x), batch_size)])
    stats.update(iwae_log_likelihood=float(iwae.double().mean()), iwae_k=k, n_examples=len(x))
    return stats


def evaluate_run(run_dir: Path, k: int, which: str = "best", device: str = "cpu") -> dict[str, Any]:
    """Evaluate RUN_DIR's best or last checkpoint on its test split; merge into summary.json."""
    run = RunDir(run_dir)
    loaded = run.load(which)
    state, config, ckpt_path = loaded.state, loaded.config, loaded.path
    model = loaded.model.to(device)
    splits = load_data(config)
    if splits.normalization.to_dict() != dict(state["normalization"]):
        raise DataError(f"{config.data}: the data changed since training: its normalisation no longer matches "
                        f"{ckpt_path}")
    if tuple(state["example_shape"]) != splits.example_shape:
        raise DataError(f"{config.data}: examples are {splits.example_shape}, the checkpoint expects "
                        f"{tuple(state['example_shape'])}")
    test = evaluate_model(model, splits.test.to(device), k=k, seed=config.seed + 7)
    test.update(checkpoint=ckpt_path.name, epoch=int(state["epoch"]))
    run.update_summary({"test": test})
    return test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run directory written by training.fit")
    parser.add_argument("--k", type=int, default=1000, help="importance samples for the IWAE bound")
    parser.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                        help="best.pt (lowest validation -ELBO) or checkpoint.pt (last epoch)")
    parser.add_argument("--device", default="cpu", help="torch device to evaluate on")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.k < 1:
        parser.error(f"--k: expected an integer >= 1, got {args.k}")
    try:
        test = evaluate_run(args.run, args.k, args.checkpoint, args.device)
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = len(test["kl_per_dim"])
    print(f"test ({test['n_examples']} examples, {test['checkpoint']} from epoch {test['epoch']}):")
    print(f"  -ELBO                 {test['neg_elbo']:.3f} nats (recon log-lik {test['recon_log_lik']:.3f}, "
          f"KL {test['kl']:.3f})")
    print(f"  IWAE log p(x), k={test['iwae_k']:<5d} {test['iwae_log_likelihood']:.3f} nats")
    print(f"  active units          {test['active_units']}/{d}")
    print("  KL per dim            " + " ".join(f"{v:.2f}" for v in test["kl_per_dim"]))
    if not math.isfinite(test["neg_elbo"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
