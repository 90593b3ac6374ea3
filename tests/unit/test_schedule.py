"""training.schedule: training.fit's learning-rate schedule and wall-clock budget (no training)."""

from __future__ import annotations

import pytest

from training import distributed as D
from training.config import TrainConfig
from training.schedule import Clock, lr_factor


def test_the_learning_rate_warms_up_linearly_then_decays_along_a_cosine_to_zero() -> None:
    c = TrainConfig(epochs=10, lr_warmup_epochs=1, lr_schedule="cosine")
    steps = 5  # per epoch; 50 in the run
    assert [lr_factor(c, s, steps, 0.0) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lr_factor(c, 25, steps, 0.0) == pytest.approx(0.5)  # half-way through the run
    assert lr_factor(c, 49, steps, 0.0) < 0.01
    constant = TrainConfig(epochs=10, lr_warmup_epochs=0, lr_schedule="constant")
    assert {lr_factor(constant, s, steps, 0.9) for s in range(50)} == {1.0}


def test_a_time_budget_drives_the_cosine_when_it_ends_the_run_first() -> None:
    c = TrainConfig(epochs=1000, lr_warmup_epochs=0, lr_schedule="cosine")
    assert lr_factor(c, 10, 5, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_factor(c, 10, 5, time_fraction=1.0) == pytest.approx(0.0)
    unlimited = TrainConfig(epochs=0, time_budget_s=10, lr_warmup_epochs=0, lr_schedule="cosine")
    assert lr_factor(unlimited, 10**6, 5, time_fraction=0.25) == pytest.approx(0.5 * (1 + 2 ** -0.5))


def test_the_clock_counts_earlier_sessions_and_keeps_time_for_one_validation() -> None:
    clock = Clock(10.0, D.DistContext(), spent_before_s=9.0)
    assert not clock.out_of_time(9.5)
    clock.reserve_s = 0.6
    assert clock.out_of_time(9.5) and clock.fraction(5.0) == 0.5
    assert not Clock(0.0, D.DistContext()).out_of_time(1e9)  # no budget: never out of time
