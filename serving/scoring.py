"""Anomaly scores from the exported graphs, protocol-free and numpy-only (no torch, no ONNX Runtime).

The scorer is split around the two graph runs so that the serving core can put each through its batcher:

    x (N, *shape) --encoder--> mu, var, logvar (N, d)
    eps = draw_eps(seed, k, N, d)                       (k, N, d), from the request's seed, on the server
    z = latent_samples(mu, var, eps)                    (k * N, d), sample-major: row i * N + n
      --decoder--> x_mean [, logits | x_var]            (k * N, *shape)
    score_terms(...)                                    nll (N,), outlier score (N,), feature scores (N, *shape)

The negative log-likelihood is the importance-weighted bound (Burda et al. 2016) in nats:

    log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x),  z_i = mu + sigma * eps_i
    nll = -(logsumexp_i log w_i - log k)                 k = 1: the -ELBO of one sample; k > 1: tighter

Per-feature scores are -log p(x_d | z_i) averaged over the k samples: shaped like the input.

The default outlier score (`OUTLIER_KIND`, "feature-z") compares each feature with what held-out data
of the training distribution does there. Per feature, the excess cross-entropy
`e_d = -mean_i log p(x_d | z_i) - H(x_d)` (H the entropy of x_d under the likelihood family: for a
Bernoulli decoder fed intensities in [0, 1] a pixel of 0.5 costs log 2 nats however good the model, the
input-complexity correction of Serra et al. (2020) computed exactly; 0 for binary inputs and for the
Gaussian decoder) is standardised by its mean and standard deviation on the calibration data, and the
positive parts are summed:

    feature-z = sum_d max(0, (e_d - mean_d) / (std_d + FEATURE_STD_FLOOR))

so ink where the training distribution never has any counts far more than noise in a busy region. The
means and deviations are written with the calibration (an export without them serves the nll alone),
from the first half of the validation split; the quantile tables come from the second half.
How it was chosen: MNIST models trained on digits 0-4 (2 seeds), AUROC of their validation digits against
the first half of the t10k digits 5-9 (the tuning split; benchmarks/anomaly.py reports on the other half):
reconstruction MSE at z = mu (what Alibi Detect's OutlierVAE thresholds) 0.849 / 0.875; the nll, k = 16,
0.769 / 0.788 (it favours simple inputs, Nalisnick et al. 2019); nll minus a compressor's code length
(Serra et al. 2020: zlib 0.523, PNG 0.530: the digits' complexity hardly differs); typicality |nll - median|
0.589; nll minus the exact entropy floor sum_d H(x_d) 0.826; the sampled reconstruction term minus it
0.848; per-feature squared error standardised as feature-z 0.873 / 0.889; feature-z 0.883 / 0.897 (floor
0.01; 0.001: 0.880). On untuned data (BENCHMARKS.md, "Anomaly scores", 5 seeds): 0.887 against MSE's
0.864 on held-out classes, short of the +0.03 asked for, and below MSE on occluded digits (0.984 against
0.992: a white square over a busy region is diluted by that region's large deviations); the best of the
scores measured here all the same.

Everything here is float64 inside and float32 out, in chunks of rows so temporaries stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)
NLL_KIND = "nll"
OUTLIER_KIND = "feature-z"
FEATURE_STD_FLOOR = 0.01  # nats: chosen on the tuning split of benchmarks/anomaly.py (1e-3 did no better)
SCORE_KINDS: tuple[str, ...] = (NLL_KIND, OUTLIER_KIND)
DEFAULT_K = 16
# Levels of the calibration table: 0, 0.001, ..., 0.999, 1 (1001 values; the first the minimum, the last
# the maximum), fine enough to read a threshold to 0.1% in either tail.
CALIBRATION_STEPS = 1000
CALIBRATION_LEVELS = np.arange(CALIBRATION_STEPS + 1, dtype=np.float64) / CALIBRATION_STEPS
# Rows of x per chunk of the float64 arithmetic (each chunk holds k of these rows' decoder outputs).
_CHUNK_ROWS = 64
_ENTROPY_EPS = 1e-12


class CalibrationError(ValueError):
    """A calibration block that does not match its schema (model.json's `calibration`)."""


def draw_eps(seed: int, k: int, n: int, d: int) -> np.ndarray:
    """eps (k, n, d) float32 ~ N(0, I) from `seed`: the same seed, k and rows give the same draws wherever
    the rows are batched."""
    return np.random.default_rng(seed).standard_normal((k, n, d), dtype=np.float32)


def latent_samples(mu: np.ndarray, var: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z_i = mu + sigma * eps_i: mu, var (N, d), eps (k, N, d) -> (k * N, d) float32, sample-major."""
    k, n, d = eps.shape
    z = mu[None].astype(np.float32) + np.sqrt(var.astype(np.float32))[None] * eps  # (k, N, d)
    return np.ascontiguousarray(z.reshape(k * n, d), dtype=np.float32)


def input_entropy(x: np.ndarray, likelihood: str) -> np.ndarray:
    """H(x_d) per feature (N, D) float64: the Bernoulli entropy of each intensity (0 at 0 and 1); 0 for the
    Gaussian decoder (whose cross-entropy floor does not depend on x)."""
    n = x.shape[0]
    xf = x.reshape(n, -1).astype(np.float64)
    if likelihood != "bernoulli":
        return np.zeros_like(xf)
    xf = np.clip(xf, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(xf * np.log(xf) + (1.0 - xf) * np.log(1.0 - xf))
    return np.nan_to_num(h, nan=0.0)  # 0 log 0 = 0


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature mean and standard deviation of the excess cross-entropy e_d on calibration data."""

    mean: np.ndarray  # (D,) float64
    std: np.ndarray   # (D,) float64

    def z(self, excess: np.ndarray) -> np.ndarray:
        """feature-z (N,) of the per-feature excess (N, D)."""
        return np.maximum(0.0, (excess - self.mean) / (self.std + FEATURE_STD_FLOOR)).sum(axis=1)


@dataclass(frozen=True)
class ScoreTerms:
    """What `score_terms` gives for N examples."""

    nll: np.ndarray                   # (N,) float32, nats
    excess: np.ndarray                # (N, D) float64: e_d, the per-feature excess cross-entropy
    outlier: np.ndarray | None        # (N,) float32, feature-z; None without feature statistics
    features: np.ndarray | None       # (N, *shape) float32, -log p(x_d|z) averaged over the k samples

    def of(self, kind: str) -> np.ndarray:
        if kind == NLL_KIND:
            return self.nll
        assert self.outlier is not None  # callers ask for feature-z only with statistics
        return self.outlier


def score_terms(x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, eps: np.ndarray,
                decoded: dict[str, np.ndarray], likelihood: str, stats: FeatureStats | None = None,
                want_features: bool = False) -> ScoreTerms:
    """The scores of x (N, *shape) from its encoder outputs mu, logvar (N, d), the noise eps (k, N, d) and
    the decoder's outputs at `latent_samples(mu, var, eps)`, by name (x_mean, and logits or x_var;
    each (k * N, *shape)). feature-z needs `stats`."""
    k, n, _ = eps.shape
    size = int(np.prod(x.shape[1:]))
    xs = x.reshape(n, size)
    dec = {name: a.reshape(k, n, size) for name, a in decoded.items()}
    nll = np.empty(n, dtype=np.float64)
    cross = np.empty((n, size), dtype=np.float64)  # -log p(x_d|z) averaged over the k samples
    mu64, logvar64 = mu.astype(np.float64), logvar.astype(np.float64)
    sigma = np.exp(0.5 * logvar64)
    for a in range(0, n, _CHUNK_ROWS):
        b = min(n, a + _CHUNK_ROWS)
        if likelihood == "bernoulli":
            # float32 per element (each within a few ulps of float64; Score's parity gate checks the sums),
            # float64 sums: x * l - softplus(l) == x log p + (1 - x) log(1 - p), stable for large |l|.
            logits = dec["logits"][:, a:b]                          # (k, c, D) float32
            ll = xs[a:b][None] * logits - np.maximum(logits, 0) - np.log1p(np.exp(-np.abs(logits)))
        else:
            xf = xs[a:b].astype(np.float64)[None]                  # (1, c, D)
            mean = dec["x_mean"][:, a:b].astype(np.float64)
            if "x_var" in dec:
                v = dec["x_var"][:, a:b].astype(np.float64)
                ll = -0.5 * ((xf - mean) ** 2 / v + np.log(v) + LOG_2PI)
            else:
                ll = -0.5 * ((xf - mean) ** 2 + LOG_2PI)
        e = eps[:, a:b].astype(np.float64)                          # (k, c, d)
        z = mu64[None, a:b] + sigma[None, a:b] * e
        # log p(z) - log q(z|x); the 2 pi terms cancel.
        log_pz_qz = (-0.5 * (z ** 2 - e ** 2 - logvar64[None, a:b])).sum(axis=2)  # (k, c)
        log_w = ll.sum(axis=2, dtype=np.float64) + log_pz_qz       # (k, c)
        top = log_w.max(axis=0)
        nll[a:b] = -(top + np.log(np.exp(log_w - top).sum(axis=0)) - math.log(k))
        cross[a:b] = -ll.mean(axis=0, dtype=np.float64)
    excess = cross - input_entropy(x, likelihood)
    with np.errstate(over="ignore"):
        return ScoreTerms(nll=nll.astype(np.float32), excess=excess,
                          outlier=None if stats is None else stats.z(excess).astype(np.float32),
                          features=cross.astype(np.float32).reshape(x.shape) if want_features else None)


# -- calibration --------------------------------------------------------------------------------------


def _finite_list(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in v)


@dataclass(frozen=True, eq=False)
class Calibration:
    """The score distributions of held-out data, written at export into model.json's `calibration`:

        {"split": "validation", "count": n, "seed": s, "k": k, "steps": 1000,
         "quantiles": {kind: [1001 non-decreasing numbers: the 0, 0.1%, ..., 99.9%, 100% quantiles]},
         "feature_mean": [D numbers], "feature_std": [D numbers >= 0]}

    The feature statistics define feature-z (`FeatureStats`); `count` is the examples in the tables (as
    many again went into the statistics). A threshold at quantile q is the table read
    at q (linear between levels); an example's percentile is the fraction of calibration scores at or
    below its score (the table inverted, in percent)."""

    split: str
    count: int
    seed: int
    k: int
    quantiles: dict[str, np.ndarray]  # kind -> (CALIBRATION_STEPS + 1,) float64
    stats: FeatureStats

    @classmethod
    def fit(cls, nll: np.ndarray, excess: np.ndarray, seed: int, k: int, split: str = "validation") -> Calibration:
        """From held-out examples' nll (N,) and per-feature excess (N, D) (`ScoreTerms`), in random order:
        the feature statistics from the first half, the quantile tables from the second. The tables must be
        of examples the statistics never saw: in-sample, a pixel that is rarely inked sets its own deviation,
        the calibration's tail comes out lighter than new data's, and the false-alarm rate higher than asked."""
        n = len(nll)
        if n < 4 or excess.shape[0] != n:
            raise CalibrationError(f"calibration: expected at least 4 examples with nll (N,) and excess (N, D), "
                                   f"got {nll.shape} and {excess.shape}")
        half = n // 2
        stats = FeatureStats(mean=excess[:half].mean(axis=0), std=excess[:half].std(axis=0))
        scores = {NLL_KIND: nll[half:].astype(np.float64), OUTLIER_KIND: stats.z(excess[half:])}
        return cls(split=split, count=n - half, seed=int(seed), k=int(k), stats=stats,
                   quantiles={kind: np.quantile(v, CALIBRATION_LEVELS) for kind, v in scores.items()})

    def threshold(self, kind: str, quantile: float) -> float:
        return float(np.interp(quantile, CALIBRATION_LEVELS, self.quantiles[kind]))

    def percentile(self, kind: str, scores: np.ndarray) -> np.ndarray:
        """(N,) float32 in [0, 100]: where each score falls in the calibration distribution."""
        table = self.quantiles[kind]
        # Equal neighbouring quantiles (ties): np.interp gives a level between them; a score above the
        # maximum is 100, below the minimum 0.
        return (100.0 * np.interp(scores.astype(np.float64), table, CALIBRATION_LEVELS)).astype(np.float32)

    def describe(self) -> str:
        return f"k={self.k}, {self.count} {self.split} examples, seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "count": self.count, "seed": self.seed, "k": self.k,
                "steps": CALIBRATION_STEPS,
                "quantiles": {kind: [float(v) for v in t] for kind, t in self.quantiles.items()},
                "feature_mean": [float(v) for v in self.stats.mean],
                "feature_std": [float(v) for v in self.stats.std]}

    @classmethod
    def from_dict(cls, d: Any, features: int) -> Calibration:
        """Validate model.json's `calibration` for a model of `features` input features; CalibrationError
        naming the key otherwise."""
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration: expected an object, got {type(d).__name__}")
        for key, low in (("count", 2), ("seed", 0), ("k", 1), ("steps", CALIBRATION_STEPS)):
            v = d.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < low or (key == "steps" and v != low):
                want = f"{low}" if key == "steps" else f"an integer >= {low}"
                raise CalibrationError(f"calibration.{key}: expected {want}, got {v!r}"[:200])
        if not isinstance(d.get("split"), str):
            raise CalibrationError(f"calibration.split: expected a string, got {d.get('split')!r}"[:200])
        q = d.get("quantiles")
        if not isinstance(q, dict) or set(q) != set(SCORE_KINDS):
            got = sorted(q) if isinstance(q, dict) else type(q).__name__
            raise CalibrationError(f"calibration.quantiles: expected tables for {list(SCORE_KINDS)}, got {got}")
        tables: dict[str, np.ndarray] = {}
        for kind, t in q.items():
            if not _finite_list(t, CALIBRATION_STEPS + 1):
                n = len(t) if isinstance(t, list) else type(t).__name__
                raise CalibrationError(f"calibration.quantiles.{kind}: expected {CALIBRATION_STEPS + 1} finite "
                                       f"numbers, got {n}" + (" with a non-number or NaN/Inf" if isinstance(t, list)
                                                             and len(t) == CALIBRATION_STEPS + 1 else ""))
            arr = np.asarray(t, dtype=np.float64)
            if np.any(np.diff(arr) < 0):
                bad = int(np.flatnonzero(np.diff(arr) < 0)[0])
                raise CalibrationError(f"calibration.quantiles.{kind}: expected non-decreasing numbers, got "
                                       f"{arr[bad]!r} then {arr[bad + 1]!r} at levels {bad} and {bad + 1}")
            tables[kind] = arr
        for key in ("feature_mean", "feature_std"):
            v = d.get(key)
            if not isinstance(v, list) or not _finite_list(v, features) or (key == "feature_std" and min(v) < 0):
                n = len(v) if isinstance(v, list) else type(v).__name__
                raise CalibrationError(f"calibration.{key}: expected {features} finite numbers (one per input "
                                       f"feature{', >= 0' if key == 'feature_std' else ''}), got {n}")
        stats = FeatureStats(mean=np.asarray(d["feature_mean"], dtype=np.float64),
                             std=np.asarray(d["feature_std"], dtype=np.float64))
        return cls(split=d["split"], count=d["count"], seed=d["seed"], k=d["k"], quantiles=tables, stats=stats)
