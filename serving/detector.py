"""Score: the served outlier detector, protocol-free, over the core's batchers (issue 27).

Every front end turns its request into `Detector.score(x, ScoreArgs)` and the `ScoreResult` back into its
encoding: vae.v1 `Score` / `ScoreStream` (serving.servicer), the Open Inference Protocol model `score`
over gRPC, its stream and REST (serving.oip, serving.http; `OIP_OUTPUTS`, `oip_args`).

Each loaded model version has its own Detector (`serving.repository.ModelVersion.detector`): a request
resolves and pins its version as Encode's does, and is scored by that version's batchers against that
version's calibration (its model.json); the OIP model is that VAE's graph `score` (`serving.layout`).

One request is two batcher runs: the encoder on x (N rows), then the decoder on the k x N latent samples
(`serving.scoring.latent_samples`: k x N rows through the decoder's batcher like any other rows, so they
batch with Decode and Sample). eps comes from the request's seed (drawn here when unset, and returned):
the same seed gives the same scores on every protocol, however the rows were batched.

Percentiles, `is_outlier` and the threshold come from the export's calibration table when the request's
k is the one it was calibrated with (the server's default k); otherwise (and for exports without one)
the scores come alone and `calibration` says why.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.core import VaeCore
from serving.errors import InvalidInput
from serving.manifest import GraphSpec, TensorSpec
from serving.metrics import Metrics
from serving.scoring import (
    DEFAULT_K,
    NLL_KIND,
    OUTLIER_KIND,
    SCORE_KINDS,
    ScoreTerms,
    draw_eps,
    latent_samples,
    score_terms,
)
from serving.tensors import F32

# Score's arithmetic over more elements than this (k x N x features) runs off the event loop.
_INLINE_ELEMENTS = 1 << 18
# OIP model `score`: its outputs, in order; every one but feature_scores unless asked for by name.
OIP_OUTPUTS: tuple[str, ...] = ("score", "nll", "percentile", "is_outlier", "threshold", "feature_scores")
OIP_DEFAULT_OUTPUTS: tuple[str, ...] = OIP_OUTPUTS[:-1]
# The graph `score` of every VAE: the OIP model `serving.layout.oip_name(vae, OIP_MODEL)` (`digits.score`),
# `score` alone while one model is loaded, as `encoder` and `decoder` are.
OIP_MODEL = "score"


@dataclass(frozen=True)
class ScoreArgs:
    """A Score request's parameters; None: the server's default."""

    k: int | None = None
    seed: int | None = None
    quantile: float | None = None
    kind: str | None = None
    want_feature_scores: bool = False


@dataclass(frozen=True)
class ScoreResult:
    score: np.ndarray                  # (N,) float32: the `kind` score, nats
    nll: np.ndarray                    # (N,) float32: the importance-weighted -log p(x), nats
    percentile: np.ndarray | None      # (N,) float32 in [0, 100]; None when not calibrated for k
    is_outlier: np.ndarray | None      # (N,) bool: score > threshold; None when not calibrated
    threshold: float                   # the score at `quantile` of the calibration data; NaN when not calibrated
    feature_scores: np.ndarray | None  # (N, *example_shape) float32, when asked
    k: int
    seed: int
    kind: str
    quantile: float
    calibration: str                   # "calibrated: ..." or why there are no percentiles

    @property
    def calibrated(self) -> bool:
        return self.percentile is not None


def _int_arg(field: str, v: Any, model: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InvalidInput(field, "an integer", repr(v)[:80], model)
    return int(v)


def oip_args(params: dict[str, Any], want_feature_scores: bool) -> ScoreArgs:
    """The `score` model's request parameters (k, seed, quantile, kind; plain values, from InferParameter
    or JSON) -> ScoreArgs. Unknown parameters are refused (a misspelt `quantile` must not go unnoticed)."""
    known = ("k", "seed", "quantile", "kind")
    unknown = sorted(set(params) - set(known) - {"binary_data_output", "timeout"})
    if unknown:
        raise InvalidInput("parameters", f"names among {list(known)}", str(unknown), OIP_MODEL)
    k = params.get("k")
    seed = params.get("seed")
    q = params.get("quantile")
    kind = params.get("kind")
    if q is not None and (isinstance(q, bool) or not isinstance(q, (int, float))):
        raise InvalidInput("parameters.quantile", "a number in (0, 1)", repr(q)[:80], OIP_MODEL)
    if kind is not None and not isinstance(kind, str):
        raise InvalidInput("parameters.kind", f"one of {list(SCORE_KINDS)}", repr(kind)[:80], OIP_MODEL)
    return ScoreArgs(k=None if k is None else _int_arg("parameters.k", k, OIP_MODEL),
                     seed=None if seed is None else _int_arg("parameters.seed", seed, OIP_MODEL),
                     quantile=None if q is None else float(q), kind=kind or None,
                     want_feature_scores=want_feature_scores)


def oip_graph(x: TensorSpec) -> GraphSpec:
    """The OIP model `score`'s tensors, for a VAE whose encoder takes `x`: what ModelMetadata shows and
    infer requests are checked against, next to the encoder's and decoder's manifest specs."""
    return GraphSpec(inputs=(x,), outputs=tuple(
        TensorSpec(n, "float32", (1,) if n == "threshold" else x.shape if n == "feature_scores" else (-1,))
        for n in OIP_OUTPUTS))


class Detector:
    """Score over one model version: validation, the two batcher runs through that version's core, its
    own calibration (its model.json), its metric children."""

    def __init__(self, core: VaeCore, metrics: Metrics, labels: tuple[str, ...]) -> None:
        """`labels`: the score metrics' label values, (name,) or with a model repository (name, version)."""
        self.core = core
        self.graph = oip_graph(core.graphs["encoder"].input)
        config = core.config
        self.calibration = core.manifest.calibration
        self.default_quantile = config.outlier_quantile
        self.default_k = self.calibration.k if self.calibration is not None else DEFAULT_K
        # feature-z needs the calibration's feature statistics: without them the nll is the default.
        self.default_kind = OUTLIER_KIND if self.calibration is not None else NLL_KIND
        self.max_k = config.max_score_k
        self.labels = labels
        self._scored = metrics.scored_rows.labels(*labels)
        self._flagged = metrics.flagged_rows.labels(*labels)
        self._percentile = metrics.score_percentile.labels(*labels)
        metrics.outlier_quantile.labels(*labels).set(self.default_quantile)
        self._server_threshold = (self.calibration.threshold(OUTLIER_KIND, self.default_quantile)
                                  if self.calibration is not None else math.nan)
        self._index = core.output_index["decoder"]

    def check(self, x: np.ndarray, args: ScoreArgs) -> tuple[int, int, float, str]:
        """(k, seed, quantile, kind) with defaults filled in; InvalidInput naming the field otherwise."""
        k = self.default_k if args.k is None else args.k
        n = x.shape[0]
        rows = self.core.max_rows
        limit = min(self.max_k, rows // n)
        if not 1 <= k <= self.max_k:
            raise InvalidInput("k", f"1 <= k <= {self.max_k} (--max-score-k)", str(k), "decoder")
        if k * n > rows:
            raise InvalidInput("k", f"k x N <= {rows} decoder rows (--max-queue-rows): k <= {limit} for N = {n}",
                               f"k = {k}, N = {n}: {k * n} rows", "decoder")
        q = self.default_quantile if args.quantile is None else args.quantile
        if not (math.isfinite(q) and 0.0 < q < 1.0):
            raise InvalidInput("quantile", "a number in (0, 1), e.g. 0.99", repr(q), "decoder")
        kind = self.default_kind if not args.kind else args.kind
        if kind not in SCORE_KINDS:
            raise InvalidInput("kind", f"one of {list(SCORE_KINDS)} (empty: {self.default_kind!r})",
                               repr(kind)[:80], "decoder")
        if kind == OUTLIER_KIND and self.calibration is None:
            raise InvalidInput("kind", f"{NLL_KIND!r}: {OUTLIER_KIND!r} needs the calibration this export lacks "
                               "(re-export the model to add it)", repr(kind), "decoder")
        seed = secrets.randbits(63) if args.seed is None else args.seed
        if not 0 <= seed < 1 << 64:
            raise InvalidInput("seed", "an integer in [0, 2^64)", str(seed), "decoder")
        return k, seed, q, kind

    async def score(self, x: np.ndarray, args: ScoreArgs, deadline: float | None = None) -> ScoreResult:
        """x (N, *example_shape), validated by `VaeCore.input_tensor` -> the scores (see the module docstring)."""
        core = self.core
        k, seed, q, kind = self.check(x, args)
        n = x.shape[0]
        features = core.manifest.example_size if args.want_feature_scores else 0
        # Returned: score, nll, percentile, is_outlier (+ the features); made on the way: the encoder's
        # outputs for N rows and the decoder's for k x N.
        core.check_response_size("x", n, 4 + features, core.floats_per_row("encoder")
                                 + k * core.floats_per_row("decoder"))
        enc = await core.encoder.submit(x, deadline)
        ei = core.output_index["encoder"]
        mu, var, logvar = enc[ei["mu"]], enc[ei["var"]], enc[ei["logvar"]]
        eps = draw_eps(seed, k, n, core.latent_dim)
        dec = await core.decoder.submit(latent_samples(mu, var, eps), deadline)
        decoded = {name: dec[i] for name, i in self._index.items()}
        likelihood = core.manifest.likelihood
        stats = self.calibration.stats if self.calibration is not None else None
        args_ = (x, mu, logvar, eps, decoded, likelihood, stats, args.want_feature_scores)
        if k * x.size > _INLINE_ELEMENTS:
            terms: ScoreTerms = await asyncio.get_running_loop().run_in_executor(None, score_terms, *args_)
        else:
            terms = score_terms(*args_)
        score = terms.of(kind)
        if not math.isfinite(float(score.sum())):
            bad = np.flatnonzero(~np.isfinite(score))
            if bad.size:
                raise InvalidInput("x", "values whose scores are finite in float32",
                                   f"a non-finite score in row {int(bad[0])}", "encoder")
        return self._result(terms, score, k, seed, q, kind)

    def _result(self, terms: ScoreTerms, score: np.ndarray, k: int, seed: int, q: float, kind: str) -> ScoreResult:
        cal = self.calibration
        if cal is None:
            return ScoreResult(score, terms.nll, None, None, math.nan, terms.features, k, seed, kind, q,
                               "no calibration: this export has none (re-export the model to add it); scores "
                               "come without percentiles or outlier flags")
        if k != cal.k:
            return ScoreResult(score, terms.nll, None, None, math.nan, terms.features, k, seed, kind, q,
                               f"no calibration for k={k}: the export is calibrated at k={cal.k} (the default); "
                               f"scores come without percentiles or outlier flags")
        threshold = cal.threshold(kind, q)
        percentile = cal.percentile(kind, score)
        if kind == OUTLIER_KIND:
            observe = self._percentile.observe
            for p in percentile.tolist():
                observe(p)
            self._scored.inc(len(score))
            self._flagged.inc(int((score > self._server_threshold).sum()))
        return ScoreResult(score, terms.nll, percentile, score > threshold, threshold, terms.features, k, seed,
                           kind, q, "calibrated: " + cal.describe())

    def oip_outputs(self, result: ScoreResult, wanted: list[str]) -> list[tuple[str, np.ndarray]]:
        """The `score` model's output tensors by name (FP32; is_outlier as 0/1, threshold shape (1,)).
        Uncalibrated: percentile and is_outlier are NaN, as is the threshold."""
        n = result.score.shape[0]
        nan = np.full(n, np.nan, dtype=F32)
        values = {
            "score": result.score, "nll": result.nll,
            "percentile": result.percentile if result.percentile is not None else nan,
            "is_outlier": result.is_outlier.astype(F32) if result.is_outlier is not None else nan,
            "threshold": np.array([result.threshold], dtype=F32),
        }
        if result.feature_scores is not None:
            values["feature_scores"] = result.feature_scores
        return [(name, values[name]) for name in wanted]
