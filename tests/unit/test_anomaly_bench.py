"""benchmarks/anomaly.py's statistics: AUROC (ties counted half), TPR at a false-alarm rate, Wilson intervals."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.anomaly import auroc, tpr_at, wilson


def test_auroc_is_the_probability_a_positive_outscores_a_negative_with_ties_half() -> None:
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    pairs = (pos[:, None] > neg[None, :]).mean()
    assert auroc(neg, pos) == pytest.approx(pairs)


def test_tpr_at_one_percent_and_wilson_intervals() -> None:
    neg = np.arange(1000, dtype=float)  # 99th percentile: 989.01
    assert tpr_at(neg, np.array([989.0, 990.0, 2000.0, -1.0])) == 0.5
    lo, hi = wilson(25, 2500)
    assert lo < 0.01 < hi and (lo, hi) == pytest.approx((0.00677, 0.01472), abs=1e-4)
    assert wilson(0, 449)[0] == 0.0 and wilson(0, 449)[1] == pytest.approx(0.00849, abs=1e-4)
