"""Calibration at export: the anomaly scores of the run's validation split, through the served path.

`training.export` calls `calibrate` after the parity gate: the exported graphs on ONNX Runtime (CPU) and
the serving scorer (`serving.scoring`, numpy), exactly what `Score` computes, on the validation split (data
the model never trained on), with k importance samples and eps from a fixed seed. The result, a
`serving.scoring.Calibration` (quantile tables of every served score, the feature statistics of
feature-z, the count, seed and k), goes into model.json's `calibration`.

`score_parity` is the parity gate's part for the scorer: the same eps through the PyTorch model
(`training.model.importance_log_weights`, float64) and through ONNX Runtime + numpy must give the same
nll and per-feature scores.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.scoring import Calibration, ScoreTerms, draw_eps, latent_samples, score_terms
from training.config import TrainConfig
from training.model import VAE, importance_log_weights

logger = logging.getLogger(__name__)

# Rows of x per ONNX Runtime run while calibrating (k x this many decoder rows at a time).
_CHUNK_ROWS = 256
# Score parity: largest |ORT + numpy - PyTorch| / max(1, |PyTorch|) of the nll and per-feature scores, as the
# graphs' own gate (measured on 8x8 digits: 6e-8 and 3e-7).
SCORE_TOLERANCE = 1e-5


def validation_examples(config: TrainConfig) -> np.ndarray | None:
    """The run's validation split in model space, or None when the run's data cannot be read here."""
    try:
        from training.data import load_data  # sklearn/PIL: import lazily
        splits = load_data(config)
    except Exception as e:  # noqa: BLE001  # the data may live on another machine: export without calibration
        logger.warning("calibration: cannot load the run's data %r (%s); exporting without calibration "
                       "(Score then serves scores without percentiles)", config.data, e)
        return None
    return splits.val.numpy().astype(np.float32)


def _sessions(encoder_path: Path, decoder_path: Path) -> tuple[Any, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return (ort.InferenceSession(str(encoder_path), opts, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"]))


def served_terms(enc: Any, dec: Any, x: np.ndarray, likelihood: str, k: int, seed: int,
                 calibration: Calibration | None = None) -> ScoreTerms:
    """What the server's Score computes for x (N, *shape) with eps from `seed`: ORT graphs, numpy scorer."""
    mu, var, logvar = enc.run(["mu", "var", "logvar"], {"x": x})
    eps = draw_eps(seed, k, x.shape[0], mu.shape[1])
    names = [o.name for o in dec.get_outputs()]
    decoded = dict(zip(names, dec.run(names, {"z": latent_samples(mu, var, eps)})))
    return score_terms(x, mu, logvar, eps, decoded, likelihood,
                       calibration.stats if calibration is not None else None, want_features=True)


def calibrate(encoder_path: Path, decoder_path: Path, val: np.ndarray, likelihood: str, k: int,
              seed: int) -> Calibration:
    """Score `val` (N, *shape) as the server would, in chunks (chunk c's eps from seed + c)."""
    enc, dec = _sessions(encoder_path, decoder_path)
    nll, excess = [], []
    for c, a in enumerate(range(0, len(val), _CHUNK_ROWS)):
        terms = served_terms(enc, dec, val[a:a + _CHUNK_ROWS], likelihood, k, seed + c)
        nll.append(terms.nll)
        excess.append(terms.excess)
    cal = Calibration.fit(np.concatenate(nll), np.concatenate(excess), seed=seed, k=k)
    logger.info("calibration: %s; thresholds at 0.99: %s", cal.describe(),
                {kind: round(cal.threshold(kind, 0.99), 3) for kind in cal.quantiles})
    return cal


def score_parity(model: VAE, encoder_path: Path, decoder_path: Path, x: np.ndarray, k: int,
                 seed: int = 0) -> dict[str, float]:
    """max |ORT + numpy - PyTorch| / max(1, |PyTorch|) of the nll (N,) and the per-feature scores (N, D) for
    the same eps; PyTorch in float64."""
    enc, dec = _sessions(encoder_path, decoder_path)
    got = served_terms(enc, dec, x, model.likelihood, k, seed)
    eps = draw_eps(seed, k, x.shape[0], model.config.latent_dim)
    ref = model.double()
    try:
        with torch.no_grad():
            xt = torch.from_numpy(x.astype(np.float64))
            mu, logvar = ref.encode(xt)
            e = torch.from_numpy(eps.astype(np.float64))
            log_w, _ = importance_log_weights(ref, xt, mu, logvar, e)  # (k, N)
            nll = -(torch.logsumexp(log_w, dim=0) - np.log(k)).numpy()
            z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * e
            out = ref.decode(z.reshape(-1, z.shape[-1]))
            xr = xt.unsqueeze(0).expand(k, *xt.shape).reshape(-1, *xt.shape[1:])
            if out.logits is not None:
                ll = xr * out.logits - torch.nn.functional.softplus(out.logits)
            else:
                lv = out.logvar if out.logvar is not None else torch.zeros_like(out.mean)
                ll = -0.5 * ((xr - out.mean) ** 2 * torch.exp(-lv) + lv + np.log(2 * np.pi))
            cross = (-ll).reshape(k, *xt.shape).mean(dim=0).numpy()
    finally:
        model.float()

    def worst(a: np.ndarray, b: np.ndarray) -> float:
        return float((np.abs(a.astype(np.float64) - b) / np.maximum(1.0, np.abs(b))).max())

    assert got.features is not None
    return {"score.nll": worst(got.nll, nll), "score.feature_scores": worst(got.features, cross)}
