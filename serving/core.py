"""The protocol-free serving core: validation, encode/decode/sample/reconstruct on numpy arrays.

Both adapters (servicer.py for vae.v1, oip.py for the Open Inference Protocol) turn their messages into
calls here; validation, batching, the ELBO terms and the rejection metrics live here once.

Shapes: x (N, *example_shape), z (N, d), mu/var (N, d); all float32, model space.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.batcher import Batcher, Outputs
from serving.budget import RESPONSE_COPIES, Lease, current_lease
from serving.config import ServeConfig
from serving.errors import InvalidInput, ResponseTooLarge
from serving.metrics import Metrics, ModelMetrics
from serving.runtime import CPU, LoadedModel
from serving.tensors import F32, all_finite

LOG_2PI = math.log(2.0 * math.pi)
# ELBO terms of more elements than this are computed off the event loop.
_INLINE_ELEMENTS = 1 << 16
# Room for a response's framing beside its tensor bytes (field tags, lengths, shapes, names).
_RESPONSE_OVERHEAD_BYTES = 4096
# Rows per chunk of the float64 ELBO arithmetic (bounds its temporaries).
_ELBO_CHUNK_ROWS = 256
# On the CPU provider, batches of at most this many rows run on the event loop (serving.batcher): ONNX
# Runtime takes ~10-20 us for them, less than the hand-off to the runner thread and back. On a GPU every
# batch goes to the thread (a launch and a synchronisation would hold the event loop). With the native
# gRPC front end every CPU batch runs on the loop: calls keep arriving in Rust while ONNX Runtime runs
# (the loop is not what receives them), and the hand-off cost more than it saved: 129 against 112 us of
# server CPU per single-row ModelInfer at C = 64 (one core, same client, 2026-12-02).
INLINE_ROWS_CPU = 8
# --preferred-batch-size 0 on the CPU: batches stop growing here (see VaeCore.__init__). Measured
# 2026-12-02 beside Triton, C=8 B=64: 64 gave 1.22x / 1.12x Triton's rows/s (encoder / decoder), 256 1.07x / 1.06x.
CPU_PREFERRED_ROWS = 64


@dataclass(frozen=True, slots=True)
class Work:
    """One request's single batcher run, validated and with its answer's bytes reserved: the batcher to
    run `x` on, and `finish`, which turns that run's outputs (the runner's, in manifest order) into the
    answer. The asynchronous adapters await `run`; the native front end enqueues `x` with a callback
    (`Batcher.enqueue`) and calls `finish` itself: the same checks and the same answer either way."""

    batcher: Batcher
    x: np.ndarray
    finish: Callable[[Outputs], Any]

    async def run(self, deadline: float | None) -> Any:
        return self.finish(await self.batcher.submit(self.x, deadline))


@dataclass(frozen=True, slots=True)
class Job:
    """A request of several batcher runs one after another (Score: the encoder, then the decoder on k x N
    rows), where an adapter would otherwise hand back one `Work`: `run(deadline)` gives the answer. The native
    front end runs it as a task; the asynchronous adapters await `run` as they would a Work's."""

    run: Callable[[float | None], Awaitable[Any]]


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

    def __init__(self, model: LoadedModel, config: ServeConfig, metrics: Metrics,
                 graph_metrics: Mapping[str, ModelMetrics] | None = None) -> None:
        """`graph_metrics`: each graph's metric children (default: the one-model server's, by graph name)."""
        graph_metrics = metrics.models if graph_metrics is None else graph_metrics
        self.model = model
        self.manifest = model.manifest
        self.graphs = self.manifest.graphs  # the tensor contract: every input and output, from the manifest
        self.config = config
        self.metrics = metrics
        self.example_shape: tuple[int, ...] = tuple(self.manifest.example_shape)
        self.latent_dim = self.manifest.latent_dim
        self.max_rows = config.max_queue_rows
        on_cpu = model.providers == [CPU]
        inline_rows = (config.max_batch_size if config.frontend == "native" else INLINE_ROWS_CPU) if on_cpu else 0
        # Past ~32 rows ONNX Runtime's cost per row on the CPU is flat (benchmarks.ort_ceiling), so there a
        # batch stops growing at CPU_PREFERRED_ROWS: waiting and merging would only add latency and copies.
        # A GPU's cost per row keeps falling with the batch: it fills batches to --max-batch-size.
        preferred = config.preferred_batch_size or (
            min(CPU_PREFERRED_ROWS, config.max_batch_size) if on_cpu else config.max_batch_size)
        self.batchers = {
            runner.name: Batcher(runner, max_batch_size=config.max_batch_size,
                                 max_queue_delay_us=config.max_queue_delay_us, max_queue_rows=config.max_queue_rows,
                                 metrics=graph_metrics[runner.name], inline_rows=inline_rows,
                                 preferred_batch_size=preferred)
            for runner in (model.encoder, model.decoder)}
        self.encoder, self.decoder = self.batchers["encoder"], self.batchers["decoder"]
        # Output positions by name, in the order the runners return them (the manifest's order); adapters
        # read it, nobody writes it.
        self.output_index = {role: {n: i for i, n in enumerate(g.output_names())} for role, g in self.graphs.items()}
        enc, dec = self.output_index["encoder"], self.output_index["decoder"]
        self._i_mu, self._i_var, self._i_logvar = enc["mu"], enc["var"], enc["logvar"]
        self._i_mean, self._i_logits, self._i_xvar = dec["x_mean"], dec.get("logits"), dec.get("x_var")
        # (model, outputs asked for) -> what run_work needs: input name, floats returned and made per row, and
        # (output name, position) of each returned output
        self._tails = {role: g.input.tail for role, g in self.graphs.items()}
        self._tail_sizes = {role: math.prod(t) for role, t in self._tails.items()}
        self._run_plans: dict[tuple[str, frozenset[str] | None], tuple[str, int, int, tuple[tuple[str, int], ...]]] = {}
        # float32 values per row over every output of each graph (sizes the response checks; fixed)
        self._row_floats = {role: sum(math.prod(t.tail) for t in g.outputs) for role, g in self.graphs.items()}

    def start(self) -> None:
        for b in self.batchers.values():
            b.start()

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()

    async def unload(self) -> None:
        """Close the batchers and free the ONNX Runtime sessions (an unloaded model version)."""
        await self.close()
        self.model.encoder.release()
        self.model.decoder.release()

    # -- validation at the edge ---------------------------------------------------------------

    def input_tensor(self, model: str, field: str, shape: Sequence[int], data: bytes | memoryview) -> np.ndarray:
        """Validate and decode the input tensor of `model` (its one input in the manifest: x or z).

        `data` is raw little-endian float32 (decoded with np.frombuffer, no copy). Raises InvalidInput
        naming `field`.
        """
        tail = self._tails[model]
        shape = tuple(shape)  # proto repeated int64: ints already
        if len(shape) != 1 + len(tail) or shape[1:] != tail or not 1 <= shape[0] <= self.max_rows:
            want = f"shape (N, {', '.join(str(s) for s in tail)}) float32 with 1 <= N <= {self.max_rows}"
            raise InvalidInput(field, want, _shape_str(shape), model)
        count = shape[0] * self._tail_sizes[model]
        if len(data) != 4 * count:
            raise InvalidInput(field, f"{4 * count} bytes of float32 for shape {_shape_str(shape)}",
                               f"{len(data)} bytes", model)
        flat = np.frombuffer(data, dtype=F32)
        if not flat.flags.aligned:
            # A view into a received message at an offset not a multiple of 4 (OIP raw contents): numpy
            # handles unaligned data element by element, so the finite check below and every later copy
            # would cost ~10x a memcpy (108 us against 9 us for 64 rows of 784); one memcpy aligns it.
            flat = np.frombuffer(bytes(data), dtype=F32)
        arr = flat.reshape(shape)
        if not all_finite(flat):
            bad = int(np.argwhere(~np.isfinite(arr.reshape(shape[0], -1)))[0, 0])
            raise InvalidInput(field, "finite values", f"NaN or Inf in row {bad}", model)
        return arr

    def check_response_size(self, field: str, rows: int, floats_per_row: int, work_floats_per_row: int = 0,
                            lease: Lease | None = None) -> None:
        """Refuse, before any compute, a request whose answer cannot fit in --max-message-bytes, then
        reserve its answer (plus `work_floats_per_row` of outputs it needs but does not return) on the
        request's lease of the bytes-in-flight budget (`lease`, else the current task's)."""
        limit = self.config.max_message_bytes
        size = 4 * rows * floats_per_row + _RESPONSE_OVERHEAD_BYTES
        if size > limit:
            fit = max(0, (limit - _RESPONSE_OVERHEAD_BYTES) // (4 * floats_per_row))
            raise ResponseTooLarge(f"{field}: {rows} rows make a response of about {size:,} bytes, over "
                                   f"--max-message-bytes {limit:,}; at most {fit} rows fit in one response")
        if lease is None:
            lease = current_lease.get()
        if lease is not None:
            lease.reserve(RESPONSE_COPIES * (size + 4 * rows * work_floats_per_row), field)

    def floats_per_row(self, model: str, outputs: Sequence[str] | None = None) -> int:
        """float32 values per row in the named outputs of `model` (default: all of them)."""
        if outputs is None:
            return self._row_floats[model]
        return sum(math.prod(t.tail) for t in self.graphs[model].outputs if t.name in outputs)

    # -- operations -----------------------------------------------------------------------------

    def run_work(self, model: str, x: np.ndarray, outputs: Sequence[str] | None = None,
                 lease: Lease | None = None) -> Work:
        """`model` on its validated input -> the named outputs (default: every one the manifest declares),
        by name."""
        key = (model, None if outputs is None else frozenset(outputs))  # at most 2^outputs keys per model
        plan = self._run_plans.get(key)
        if plan is None:
            returned = self.floats_per_row(model, outputs)
            index = self.output_index[model]
            items = tuple((n, i) for n, i in index.items() if outputs is None or n in outputs)
            plan = self._run_plans[key] = (self.graphs[model].input.name, returned,
                                           self.floats_per_row(model) - returned, items)
        field, returned, made, items = plan
        self.check_response_size(field, x.shape[0], returned, made, lease)
        return Work(self.batchers[model], x, lambda outs: {n: outs[i] for n, i in items})

    async def run(self, model: str, x: np.ndarray, deadline: float | None = None,
                  outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        result: dict[str, np.ndarray] = await self.run_work(model, x, outputs).run(deadline)
        return result

    def encode_work(self, x: np.ndarray, lease: Lease | None = None) -> Work:
        """x (N, *example_shape) -> (mu (N, d), var (N, d))."""
        self.check_response_size("x", x.shape[0], 2 * self.latent_dim, self.latent_dim, lease)  # + logvar
        i_mu, i_var = self._i_mu, self._i_var
        return Work(self.encoder, x, lambda outs: (outs[i_mu], outs[i_var]))

    async def encode(self, x: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        result: tuple[np.ndarray, np.ndarray] = await self.encode_work(x).run(deadline)
        return result

    def decode_work(self, z: np.ndarray, lease: Lease | None = None) -> Work:
        """z (N, d) -> x_mean (N, *example_shape)."""
        x_size = self.manifest.example_size
        self.check_response_size("z", z.shape[0], x_size, self.floats_per_row("decoder") - x_size, lease)
        i_mean = self._i_mean
        return Work(self.decoder, z, lambda outs: outs[i_mean])

    async def decode(self, z: np.ndarray, deadline: float | None = None) -> np.ndarray:
        result: np.ndarray = await self.decode_work(z).run(deadline)
        return result

    def sample_z(self, count: int, seed: int | None, temperature: float | None) -> tuple[np.ndarray, int]:
        """Validate Sample's arguments and draw z (count, d) ~ N(0, temperature^2 I) from the seed.

        z is drawn before batching, so the same seed gives the same samples however requests merge.
        """
        limit = min(self.config.max_sample_count, self.max_rows)  # more could never fit in the queue
        if not 1 <= count <= limit:
            raise InvalidInput("count", f"1 <= count <= {limit}", str(count), "decoder")
        t = 1.0 if temperature is None else float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise InvalidInput("temperature", "a finite number > 0", repr(t), "decoder")
        used = secrets.randbits(63) if seed is None else int(seed)
        z = np.random.default_rng(used).standard_normal((count, self.latent_dim), dtype=np.float32)
        if t != 1.0:
            z *= np.float32(t)
        return z, used

    def sample_work(self, count: int, seed: int | None = None, temperature: float | None = None,
                    return_z: bool = True, lease: Lease | None = None) -> Work:
        """-> (x (count, *example_shape), z (count, d), the seed used). The response carries z only when
        `return_z` (which only sizes the response check here)."""
        z, used = self.sample_z(count, seed, temperature)
        x_size = self.manifest.example_size
        self.check_response_size("count", count, x_size + (self.latent_dim if return_z else 0),
                                 self.floats_per_row("decoder") - x_size, lease)
        i_mean = self._i_mean
        return Work(self.decoder, z, lambda outs: (outs[i_mean], z, used))

    async def sample(self, count: int, seed: int | None = None, temperature: float | None = None,
                     deadline: float | None = None, return_z: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
        result: tuple[np.ndarray, np.ndarray, int] = await self.sample_work(
            count, seed, temperature, return_z).run(deadline)
        return result

    async def reconstruct(self, x: np.ndarray, use_mean: bool = True, seed: int | None = None,
                          deadline: float | None = None) -> Reconstruction:
        """Encode, take z = mu (or mu + sigma * eps), decode; with per-example ELBO terms."""
        # Returned: x_hat and the two ELBO terms; made on the way: every encoder and decoder output.
        self.check_response_size("x", x.shape[0], self.manifest.example_size + 2,
                                 self.floats_per_row("encoder") + self.floats_per_row("decoder"))
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
        logvar = enc[self._i_logvar]
        if x.size > _INLINE_ELEMENTS:
            ll, kl = await asyncio.get_running_loop().run_in_executor(
                None, self._elbo_terms, x, dec, mu, var, logvar)
        else:
            ll, kl = self._elbo_terms(x, dec, mu, var, logvar)
        if not (math.isfinite(float(ll.sum())) and math.isfinite(float(kl.sum()))):
            bad = np.flatnonzero(~(np.isfinite(ll) & np.isfinite(kl)))  # a sum may overflow on finite rows
            if bad.size:
                raise InvalidInput("x", "values whose ELBO terms are finite in float32",
                                   f"a non-finite recon_log_lik or kl in row {int(bad[0])}", "encoder")
        return Reconstruction(x_hat=dec[self._i_mean], recon_log_lik=ll, kl=kl, seed=used)

    def _elbo_terms(self, x: np.ndarray, dec: list[np.ndarray], mu: np.ndarray, var: np.ndarray,
                    logvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log P(x|z) (N,) and KL(N(mu, var) || N(0, I)) (N,), accumulated in float64.

        Rows go through in chunks of `_ELBO_CHUNK_ROWS`, so the float64 temporaries stay a few MB
        whatever the request size (a whole 16,384 x 784 request in float64 would be 100 MB per copy).
        """
        n = x.shape[0]
        ll = np.empty(n, dtype=np.float64)
        xs = x.reshape(n, -1)
        bern = self.manifest.likelihood == "bernoulli"
        learned = self.manifest.learned_variance
        for a in range(0, n, _ELBO_CHUNK_ROWS):
            b = min(n, a + _ELBO_CHUNK_ROWS)
            xf = xs[a:b].astype(np.float64)
            if bern:
                assert self._i_logits is not None  # the manifest guarantees it
                logits = dec[self._i_logits][a:b].reshape(b - a, -1).astype(np.float64)
                # x * l - softplus(l) == x log p + (1 - x) log(1 - p), stable for large |l|.
                ll[a:b] = (xf * logits - np.logaddexp(0.0, logits)).sum(axis=1)
            else:
                mean = dec[self._i_mean][a:b].reshape(b - a, -1).astype(np.float64)
                if learned:
                    assert self._i_xvar is not None  # the manifest guarantees it
                    v = dec[self._i_xvar][a:b].reshape(b - a, -1).astype(np.float64)
                    ll[a:b] = -0.5 * ((xf - mean) ** 2 / v + np.log(v) + LOG_2PI).sum(axis=1)
                else:  # unit variance
                    ll[a:b] = -0.5 * ((xf - mean) ** 2 + LOG_2PI).sum(axis=1)
        mu64, var64 = mu.astype(np.float64), var.astype(np.float64)  # (N, d): small
        kl = -0.5 * (1.0 + logvar.astype(np.float64) - mu64 ** 2 - var64).sum(axis=1)
        with np.errstate(over="ignore"):  # an overflow becomes inf, which reconstruct() refuses
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
