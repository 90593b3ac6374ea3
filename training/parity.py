"""The export's parity gate: ONNX Runtime (CPU) against PyTorch on real and random inputs.

`check_parity` runs both graphs at several batch sizes (PARITY_BATCH_SIZES and one over twice the training
batch), on random inputs and on the run's test split when it can be read here, and raises ParityError when
an output differs by more than the tolerance or is NaN/Inf. training.export publishes nothing then.

The scorer is gated too (`training.calibrate.score_parity`): the importance-weighted nll and per-feature
scores of Score (ORT graphs + the numpy scorer) against PyTorch for the same eps, at SCORE_TOLERANCE
relative (|diff| / max(1, |reference|)).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.manifest import GraphSpec
from training.calibrate import SCORE_TOLERANCE, score_parity
from training.config import TrainConfig
from training.model import VAE, DecoderGraph, EncoderGraph

logger = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 7, 128)
SCORE_PARITY_K = 4  # importance samples per example in the scorer's gate (on up to 64 examples)


class ParityError(Exception):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance, or produced NaN/Inf."""


def real_examples(config: TrainConfig, n: int) -> np.ndarray | None:
    """Up to n test-split examples in model space, or None when the run's data cannot be read here."""
    try:
        from training.data import load_data  # the data module pulls in sklearn/PIL: import lazily
        splits = load_data(config)
    except Exception as e:  # noqa: BLE001  # the data may live on another machine: random inputs still gate the export
        logger.warning("parity: cannot load the run's data %r (%s); checking random inputs only",
                       config.data, e)
        return None
    source = splits.test if len(splits.test) else splits.val
    return source[:n].numpy().astype(np.float32)


# Outputs gated on |diff| / max(1, |reference|) rather than |diff|: the Bernoulli logits are unbounded
# pre-activations (|logit| reaches 50 on MNIST), where float32's spacing alone is ~4e-6, so two correct
# matmul implementations differ by a few ulps there. Every other output is gated on the absolute difference.
SCALED_OUTPUTS: frozenset[str] = frozenset({"logits"})


def _diffs(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, max |got - want| / max(1, |want|)); raises ParityError on NaN/Inf."""
    if not np.all(np.isfinite(got)):
        raise ParityError("ONNX Runtime produced NaN or Inf")
    if not got.size:
        return 0.0, 0.0
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(d.max()), float((d / np.maximum(1.0, np.abs(want.astype(np.float64)))).max())


def check_parity(model: VAE, encoder_path: Path, decoder_path: Path, graphs: dict[str, GraphSpec],
                 real: np.ndarray | None, train_batch_size: int, tolerance: float,
                 seed: int = 0) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch; raise ParityError beyond `tolerance` or on NaN."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(encoder_path), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    sizes = sorted({*PARITY_BATCH_SIZES, 2 * train_batch_size + 3})
    shape, d = model.example_shape, model.config.latent_dim
    encoder_outputs, decoder_outputs = graphs["encoder"].output_names(), graphs["decoder"].output_names()
    keys = [f"encoder.{n}" for n in encoder_outputs] + [f"decoder.{n}" for n in decoder_outputs]
    worst = dict.fromkeys(keys, 0.0)  # max |ORT - PyTorch|
    worst_scaled = dict.fromkeys(keys, 0.0)  # max |ORT - PyTorch| / max(1, |PyTorch|)

    def record(key: str, got: np.ndarray, want: np.ndarray) -> None:
        a, r = _diffs(got, want)
        worst[key], worst_scaled[key] = max(worst[key], a), max(worst_scaled[key], r)

    cases: list[tuple[str, np.ndarray]] = []
    for b in sizes:
        if model.likelihood == "bernoulli":
            cases.append((f"random-{b}", rng.random((b, *shape), dtype=np.float32)))
        else:
            cases.append((f"random-{b}", rng.standard_normal((b, *shape), dtype=np.float32)))
        if real is not None and len(real):
            idx = np.arange(b) % len(real)
            cases.append((f"real-{b}", real[idx]))
    enc_graph, dec_graph = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    with torch.no_grad():
        for label, x in cases:
            want = [t.numpy() for t in enc_graph(torch.from_numpy(x))]
            got = enc.run(encoder_outputs, {"x": x})
            for n, g, w in zip(encoder_outputs, got, want):
                record(f"encoder.{n}", g, w)
            # The decoder sees both prior draws and the posterior means of the case's inputs.
            for z in (rng.standard_normal((len(x), d), dtype=np.float32), want[0]):
                want_x = [t.numpy() for t in dec_graph(torch.from_numpy(z))]
                got_x = dec.run(decoder_outputs, {"z": z})
                for n, g, w in zip(decoder_outputs, got_x, want_x):
                    record(f"decoder.{n}", g, w)
            logger.debug("parity %s ok", label)
    gated = {k: worst_scaled[k] if k.split(".")[1] in SCALED_OUTPUTS else worst[k] for k in keys}
    score_x = real[:64] if real is not None and len(real) else cases[-1][1][:64]
    score = score_parity(model, encoder_path, decoder_path, score_x, SCORE_PARITY_K, seed)
    report = {"tolerance": tolerance, "provider": "CPUExecutionProvider", "batch_sizes": sizes,
              "real_examples": real is not None and len(real) > 0, "max_abs_diff": worst,
              "max_scaled_diff": worst_scaled, "scaled_outputs": sorted(SCALED_OUTPUTS), "gated": gated,
              "score": {"k": SCORE_PARITY_K, "examples": len(score_x), "tolerance": SCORE_TOLERANCE,
                        "max_scaled_diff": score},
              "passed": all(v <= tolerance for v in gated.values())
              and all(v <= SCORE_TOLERANCE for v in score.values())}
    if not report["passed"]:
        bad = {k: v for k, v in gated.items() if v > tolerance}
        bad.update({k: v for k, v in score.items() if v > SCORE_TOLERANCE})
        raise ParityError(f"max |ORT - PyTorch| above {tolerance:g}: "
                          + ", ".join(f"{k}={v:.3g}" for k, v in bad.items()))
    return report
