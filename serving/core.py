"""The protocol-free serving core: validation, encode/decode/sample/reconstruct on numpy arrays.

Both adapters (servicer.py for vae.v1, oip.py for the Open Inference Protocol) turn their messages into
calls here; validation, batching, the ELBO terms and the rejection metrics live here once.

Shapes: x (N, *example_shape), z (N, d), mu/var (N, d); all float32, model space.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.batcher import Batcher
from serving.config import ServeConfig
from serving.errors import InvalidInput
from serving.metrics import Metrics
from serving.runtime import LoadedModel
from serving.tensors import F32

LOG_2PI = math.log(2.0 * math.pi)
# ELBO terms of more elements than this are computed off the event loop.
_INLINE_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class Reconstruction:
    x_hat: np.ndarray          # (N, *example_shape) decoder mean at z
    recon_log_lik: np.ndarray  # (N,) log P(x|z)
    kl: np.ndarray             # (N,) KL(Q(z|x) || N(0, I))
    seed: int                  # seed of eps (0 when z = mu)


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class VaeCore:
    """Owns one batcher per model and the operations both protocols expose."""

    def __init__(self, model: LoadedModel, config: ServeConfig, metrics: Metrics) -> None:
        self.model = model
        self.manifest = model.manifest
        self.config = config
        self.metrics = metrics
        self.example_shape: tuple[int, ...] = tuple(self.manifest.example_shape)
        self.latent_dim = self.manifest.latent_dim
        self.max_rows = config.max_queue_rows
        self.ready = False  # set by the server once both models are loaded, warmed up and serving
        self.encoder, self.decoder = (
            Batcher(runner, max_batch_size=config.max_batch_size, max_queue_delay_us=config.max_queue_delay_us,
                    max_queue_rows=config.max_queue_rows, metrics=metrics.models[runner.name])
            for runner in (model.encoder, model.decoder))
        enc_names, dec_names = model.encoder.output_names, model.decoder.output_names
        self._i_mu, self._i_var = enc_names.index("mu"), enc_names.index("var")
        self._i_logvar = enc_names.index("logvar") if "logvar" in enc_names else None
        self._i_mean = dec_names.index("x_mean")
        self._i_logits = dec_names.index("logits") if "logits" in dec_names else None
        self._i_xvar = dec_names.index("x_var") if "x_var" in dec_names else None

    def start(self) -> None:
        self.encoder.start()
        self.decoder.start()

    async def close(self) -> None:
        await self.encoder.close()
        await self.decoder.close()

    # -- validation at the edge ---------------------------------------------------------------

    def invalid(self, model: str, field: str, expected: str, got: str) -> InvalidInput:
        """Count an invalid request against `model` and build the error to raise."""
        self.metrics.models[model].rejected["invalid"].inc()
        return InvalidInput(field, expected, got)

    def input_tensor(self, model: str, field: str, shape: Sequence[int], data: bytes | None = None,
                     values: Sequence[float] | None = None) -> np.ndarray:
        """Validate and decode one input tensor for `model` ("encoder": x, "decoder": z).

        `data` is raw little-endian float32 (decoded with np.frombuffer, no copy); `values` is a typed
        list (Open Inference Protocol fp32_contents). Raises InvalidInput naming `field`.
        """
        tail = self.example_shape if model == "encoder" else (self.latent_dim,)
        shape = tuple(shape)  # proto repeated int64: ints already
        if len(shape) != 1 + len(tail) or shape[1:] != tail or not 1 <= shape[0] <= self.max_rows:
            want = f"shape (N, {', '.join(str(s) for s in tail)}) float32 with 1 <= N <= {self.max_rows}"
            raise self.invalid(model, field, want, _shape_str(shape))
        count = math.prod(shape)
        if data is not None:
            if len(data) != 4 * count:
                raise self.invalid(model, field, f"{4 * count} bytes of float32 for shape {_shape_str(shape)}",
                                    f"{len(data)} bytes")
            arr = np.frombuffer(data, dtype=F32).reshape(shape)
        else:
            vals = values if values is not None else ()
            if len(vals) != count:
                raise self.invalid(model, field, f"{count} float32 values for shape {_shape_str(shape)}",
                                    f"{len(vals)} values")
            arr = np.asarray(vals, dtype=F32).reshape(shape)
        # A finite sum proves every value finite (NaN and Inf propagate); only a non-finite sum, which
        # may also be an overflow of large finite values, needs the element-wise check.
        if not math.isfinite(float(arr.sum())) and not np.isfinite(arr).all():
            bad = int(np.argwhere(~np.isfinite(arr.reshape(shape[0], -1)))[0, 0])
            raise self.invalid(model, field, "finite values", f"NaN or Inf in row {bad}")
        return arr

    # -- operations -----------------------------------------------------------------------------

    async def encode(self, x: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x (N, *example_shape) -> mu (N, d), var (N, d)."""
        outs = await self.encoder.submit(x, deadline)
        return outs[self._i_mu], outs[self._i_var]

    async def decode(self, z: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """z (N, d) -> x_mean (N, *example_shape)."""
        outs = await self.decoder.submit(z, deadline)
        return outs[self._i_mean]

    def sample_z(self, count: int, seed: int | None, temperature: float | None) -> tuple[np.ndarray, int]:
        """Validate Sample's arguments and draw z (count, d) ~ N(0, temperature^2 I) from the seed.

        z is drawn before batching, so the same seed gives the same samples however requests merge.
        """
        limit = min(self.config.max_sample_count, self.max_rows)  # more could never fit in the queue
        if not 1 <= count <= limit:
            raise self.invalid("decoder", "count", f"1 <= count <= {limit}", str(count))
        t = 1.0 if temperature is None else float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise self.invalid("decoder", "temperature", "a finite number > 0", repr(t))
        used = secrets.randbits(63) if seed is None else int(seed)
        z = np.random.default_rng(used).standard_normal((count, self.latent_dim), dtype=np.float32)
        if t != 1.0:
            z *= np.float32(t)
        return z, used

    async def sample(self, count: int, seed: int | None = None, temperature: float | None = None,
                     deadline: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """-> x (count, *example_shape), z (count, d), the seed used."""
        z, used = self.sample_z(count, seed, temperature)
        return await self.decode(z, deadline), z, used

    async def reconstruct(self, x: np.ndarray, use_mean: bool = True, seed: int | None = None,
                          deadline: float | None = None) -> Reconstruction:
        """Encode, take z = mu (or mu + sigma * eps), decode; with per-example ELBO terms."""
        enc = await self.encoder.submit(x, deadline)
        mu, var = enc[self._i_mu], enc[self._i_var]
        used = 0
        if use_mean:
            z = mu
        else:
            used = secrets.randbits(63) if seed is None else int(seed)
            eps = np.random.default_rng(used).standard_normal(mu.shape, dtype=np.float32)  # (N, d)
            z = mu + np.sqrt(var) * eps
        dec = await self.decoder.submit(np.ascontiguousarray(z, dtype=F32), deadline)
        logvar = enc[self._i_logvar] if self._i_logvar is not None else None
        if x.size > _INLINE_ELEMENTS:
            ll, kl = await asyncio.get_running_loop().run_in_executor(
                None, self._elbo_terms, x, dec, mu, var, logvar)
        else:
            ll, kl = self._elbo_terms(x, dec, mu, var, logvar)
        return Reconstruction(x_hat=dec[self._i_mean], recon_log_lik=ll, kl=kl, seed=used)

    def _elbo_terms(self, x: np.ndarray, dec: list[np.ndarray], mu: np.ndarray, var: np.ndarray,
                    logvar: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """log P(x|z) (N,) and KL(N(mu, var) || N(0, I)) (N,), accumulated in float64."""
        n = x.shape[0]
        xf = x.reshape(n, -1).astype(np.float64)
        if self.manifest.likelihood == "bernoulli":
            assert self._i_logits is not None  # the manifest guarantees it
            logits = dec[self._i_logits].reshape(n, -1).astype(np.float64)
            # x * l - softplus(l) == x log p + (1 - x) log(1 - p), stable for large |l|.
            ll = (xf * logits - np.logaddexp(0.0, logits)).sum(axis=1)
        else:
            mean = dec[self._i_mean].reshape(n, -1).astype(np.float64)
            if self.manifest.learned_variance:
                assert self._i_xvar is not None  # the manifest guarantees it
                v = dec[self._i_xvar].reshape(n, -1).astype(np.float64)
                ll = -0.5 * ((xf - mean) ** 2 / v + np.log(v) + LOG_2PI).sum(axis=1)
            else:  # unit variance
                ll = -0.5 * ((xf - mean) ** 2 + LOG_2PI).sum(axis=1)
        mu64, var64 = mu.astype(np.float64), var.astype(np.float64)
        lv = logvar.astype(np.float64) if logvar is not None else np.log(var64)
        kl = -0.5 * (1.0 + lv - mu64 ** 2 - var64).sum(axis=1)
        return ll.astype(F32), kl.astype(F32)

    def info(self) -> dict[str, Any]:
        """Manifest facts, providers in use and batching settings (GetModelInfo)."""
        m, c = self.manifest, self.config
        norm = m.normalization

        def as_list(v: Any) -> list[float]:
            return [float(a) for a in v] if isinstance(v, list) else [float(v)]

        return {
            "name": m.name, "version": m.version, "example_shape": list(m.example_shape),
            "latent_dim": m.latent_dim, "likelihood": m.likelihood, "learned_variance": m.learned_variance,
            "normalization_kind": str(norm.get("kind", "")),
            "normalization_offset": as_list(norm["offset"]), "normalization_scale": as_list(norm["scale"]),
            "providers": list(self.model.providers), "max_batch_size": c.max_batch_size,
            "max_queue_delay_us": c.max_queue_delay_us, "max_queue_rows": c.max_queue_rows,
            "max_sample_count": c.max_sample_count,
        }
