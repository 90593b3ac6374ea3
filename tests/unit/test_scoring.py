"""serving.scoring: the importance-weighted nll, feature scores and feature-z against direct arithmetic, and
the calibration table: fitted, read back, and refused (naming the key) when malformed, also through the
manifest."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.manifest import FileEntry, ManifestError, build_manifest, load_manifest, write_manifest
from serving.scoring import (
    CALIBRATION_STEPS,
    NLL_KIND,
    OUTLIER_KIND,
    Calibration,
    CalibrationError,
    draw_eps,
    input_entropy,
    latent_samples,
    score_terms,
)

D, LATENT = 6, 3


def _bernoulli_case(n: int, k: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, D)).astype(np.float32)
    mu = rng.normal(size=(n, LATENT)).astype(np.float32)
    logvar = rng.normal(scale=0.3, size=(n, LATENT)).astype(np.float32)
    eps = draw_eps(seed, k, n, LATENT)
    w = rng.normal(size=(LATENT, D))
    z = latent_samples(mu, np.exp(logvar), eps)  # (k * n, d)
    logits = (z.astype(np.float64) @ w).astype(np.float32)  # a linear "decoder"
    return {"x": x, "mu": mu, "logvar": logvar, "eps": eps, "decoded": {"x_mean": 1 / (1 + np.exp(-logits)),
                                                                       "logits": logits}}


def test_the_nll_is_the_importance_weighted_bound_and_k1_is_the_negative_elbo() -> None:
    c = _bernoulli_case(4, 5)
    t = score_terms(c["x"], c["mu"], c["logvar"], c["eps"], c["decoded"], "bernoulli", want_features=True)
    x = c["x"].astype(np.float64)
    logits = c["decoded"]["logits"].astype(np.float64).reshape(5, 4, D)
    ll = x * np.log(1 / (1 + np.exp(-logits))) + (1 - x) * np.log(1 - 1 / (1 + np.exp(-logits)))  # (k, n, D)
    sigma = np.exp(0.5 * c["logvar"].astype(np.float64))
    z = c["mu"] + sigma * c["eps"]
    log_p_z = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(axis=2)
    log_q_z = -0.5 * (c["eps"].astype(np.float64) ** 2 + math.log(2 * math.pi) + c["logvar"]).sum(axis=2)
    log_w = ll.sum(axis=2) + log_p_z - log_q_z
    want = -np.log(np.exp(log_w).mean(axis=0))
    np.testing.assert_allclose(t.nll, want, rtol=1e-5)
    assert t.features is not None
    np.testing.assert_allclose(t.features, -ll.mean(axis=0), rtol=1e-5)
    one = score_terms(c["x"], c["mu"], c["logvar"], c["eps"][:1], {n: a[:4] for n, a in c["decoded"].items()},
                      "bernoulli")
    kl = -0.5 * (1 + c["logvar"] - c["mu"] ** 2 - np.exp(c["logvar"])).sum(axis=1)
    np.testing.assert_allclose(one.nll, -ll[0].sum(axis=1) + (log_q_z - log_p_z)[0], rtol=1e-5)
    assert one.outlier is None and one.features is None  # no statistics, not asked
    assert np.all(np.isfinite(kl))


def test_the_gaussian_likelihood_uses_the_learned_variance_and_has_no_entropy_floor() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, D)).astype(np.float32)
    mu, logvar = np.zeros((2, LATENT), np.float32), np.zeros((2, LATENT), np.float32)
    eps = np.zeros((1, 2, LATENT), np.float32)  # z = 0: log p(z) - log q(z|x) = 0
    mean, var = np.full((2, D), 0.5, np.float32), np.full((2, D), 2.0, np.float32)
    t = score_terms(x, mu, logvar, eps, {"x_mean": mean, "x_var": var}, "gaussian")
    want = 0.5 * ((x - 0.5) ** 2 / 2.0 + math.log(2.0) + math.log(2 * math.pi)).sum(axis=1)
    np.testing.assert_allclose(t.nll, want, rtol=1e-5)
    assert not input_entropy(x, "gaussian").any()
    assert input_entropy(np.array([[0.0, 1.0, 0.5]]), "bernoulli")[0].tolist() == pytest.approx([0, 0, math.log(2)])


def _calibration(n: int = 400) -> Calibration:
    rng = np.random.default_rng(2)
    return Calibration.fit(rng.normal(100, 10, n), rng.gamma(2.0, 1.0, (n, D)), seed=7, k=16)


def test_a_fitted_calibration_gives_thresholds_percentiles_and_feature_z() -> None:
    cal = _calibration()
    rng = np.random.default_rng(2)
    nll, excess = rng.normal(100, 10, 400)[200:], rng.gamma(2.0, 1.0, (400, D))
    # statistics from the first half, tables from the second (out of sample for feature-z)
    np.testing.assert_allclose(cal.stats.mean, excess[:200].mean(axis=0))
    assert cal.threshold(OUTLIER_KIND, 0.5) == pytest.approx(np.median(cal.stats.z(excess[200:])))
    assert cal.threshold(NLL_KIND, 0.99) == pytest.approx(np.quantile(nll, 0.99))
    assert cal.threshold(NLL_KIND, 1.0) == pytest.approx(nll.max())
    assert float(cal.percentile(NLL_KIND, np.array([cal.threshold(NLL_KIND, 0.9)]))[0]) == pytest.approx(90, abs=0.01)
    assert cal.percentile(NLL_KIND, np.array([-1e9, 1e9])).tolist() == [0.0, 100.0]
    excess = np.zeros((1, D)) + cal.stats.mean
    assert cal.stats.z(excess)[0] == 0.0  # at the mean everywhere: nothing in excess
    excess[0, 2] += 3 * (cal.stats.std[2] + 0.01)
    assert cal.stats.z(excess)[0] == pytest.approx(3.0)
    assert cal.describe() == "k=16, 200 validation examples, seed 7"


def test_a_calibration_survives_json_and_malformed_ones_are_refused_naming_the_key() -> None:
    good = json.loads(json.dumps(_calibration().to_dict()))
    back = Calibration.from_dict(good, D)
    assert back.threshold(OUTLIER_KIND, 0.99) == _calibration().threshold(OUTLIER_KIND, 0.99)
    cases: list[tuple[str, Any, str]] = [
        ("count", 1, "calibration.count: expected an integer >= 2, got 1"),
        ("k", "16", "calibration.k: expected an integer >= 1, got '16'"),
        ("steps", 100, f"calibration.steps: expected {CALIBRATION_STEPS}, got 100"),
        ("quantiles", {"nll": []}, "calibration.quantiles: expected tables for ['nll', 'feature-z'], got ['nll']"),
        ("feature_mean", [0.0] * (D - 1), f"calibration.feature_mean: expected {D} finite numbers"),
        ("feature_std", [-1.0] * D, f"calibration.feature_std: expected {D} finite numbers (one per input feature, >= 0)"),
    ]
    for key, value, message in cases:
        bad = copy.deepcopy(good)
        bad[key] = value
        with pytest.raises(CalibrationError, match=re.escape(message)):
            Calibration.from_dict(bad, D)
    bad = copy.deepcopy(good)
    bad["quantiles"]["nll"][500] = bad["quantiles"]["nll"][0] - 1
    with pytest.raises(CalibrationError, match="quantiles.nll: expected non-decreasing numbers"):
        Calibration.from_dict(bad, D)
    bad["quantiles"]["nll"][500] = float("nan")
    with pytest.raises(CalibrationError, match="1001 finite numbers, got 1001 with a non-number or NaN/Inf"):
        Calibration.from_dict(bad, D)


def test_the_manifest_reads_its_calibration_refuses_a_malformed_one_and_serves_without(tmp_path: Path) -> None:
    files = {role: FileEntry(path=f"{role}.onnx", sha256="0" * 64, bytes=10) for role in ("encoder", "decoder")}
    common: dict[str, Any] = {
        "name": "m", "files": files, "example_shape": (D,), "latent_dim": LATENT, "likelihood": "bernoulli",
        "learned_variance": False, "normalization": {"kind": "scale", "offset": 0.0, "scale": 1.0}, "opset": 18,
        "versions": {}, "training": {}, "parity": {}}
    write_manifest(tmp_path, build_manifest(**common))
    assert load_manifest(tmp_path).calibration is None  # an export from before issue 27
    write_manifest(tmp_path, build_manifest(**common, calibration=_calibration().to_dict()))
    cal = load_manifest(tmp_path).calibration
    assert cal is not None and cal.count == 200
    assert not list(tmp_path.glob("*.tmp"))  # written atomically, nothing left beside it
    raw = json.loads((tmp_path / "model.json").read_text())
    raw["calibration"]["feature_mean"] = [0.0]
    (tmp_path / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=r"calibration.feature_mean: expected 6 finite numbers .* re-export"):
        load_manifest(tmp_path)
