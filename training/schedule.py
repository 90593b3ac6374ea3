"""The run's schedules and its wall-clock: the KL weight, the learning rate, and `Clock` (`--time-budget-s`).

Used by `training.epoch` (per step) and `training.trainer` (between epochs); no training here.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from training import distributed as D
from training.config import TrainConfig


def kl_weight(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """beta, ramped linearly from ~0 over the first `kl_warmup_epochs` epochs (per step)."""
    if config.kl_warmup_epochs <= 0:
        return config.beta
    done = epoch * steps + step + 1
    return config.beta * min(1.0, done / (config.kl_warmup_epochs * steps))


def lr_factor(config: TrainConfig, done_steps: int, steps_per_epoch: int, time_fraction: float) -> float:
    """The learning rate's multiplier before step `done_steps` (0-based, counted over the whole run).

    A linear warm-up over `lr_warmup_epochs`, then constant or a cosine decay to 0 over the run. The run's
    progress is the larger of the fraction of `epochs` done and the fraction of `time_budget_s` spent, so
    the decay ends when whichever limit stops the run is reached.
    """
    warmup = config.lr_warmup_epochs * steps_per_epoch
    if done_steps < warmup:
        return (done_steps + 1) / warmup
    assert config.lr_schedule != "auto", "lr_factor needs a resolved config"
    if config.lr_schedule == "constant":
        return 1.0
    by_steps = done_steps / (config.epochs * steps_per_epoch) if config.epochs else 0.0  # 0: no epoch limit
    progress = max(by_steps, time_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Clock:
    """Wall-clock spent training, across sessions of a resumed run, against `--time-budget-s`.

    Under torchrun every rank must stop at the same step and use the same learning rate, so with a
    budget the elapsed time is the maximum over ranks (one all-reduce of a scalar per step).
    """

    budget_s: float
    ctx: D.DistContext
    spent_before_s: float = 0.0  # training seconds of earlier sessions (from the checkpoint)
    reserve_s: float = 0.0       # the slowest validation so far: stop early enough to run one more
    t0: float = field(default_factory=time.perf_counter)

    def elapsed_s(self) -> float:
        t = self.spent_before_s + time.perf_counter() - self.t0
        if self.ctx.is_distributed and self.budget_s:
            t = float(D.all_reduce_max(torch.tensor(t, dtype=torch.float64), self.ctx))
        return t

    def fraction(self, elapsed_s: float) -> float:
        return elapsed_s / self.budget_s if self.budget_s else 0.0

    def out_of_time(self, elapsed_s: float) -> bool:
        return bool(self.budget_s) and elapsed_s + self.reserve_s >= self.budget_s
