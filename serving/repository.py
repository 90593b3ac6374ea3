"""The models a server serves and their versions: loaded, routed to, drained and unloaded, protocol-free.

    python -m serving --model-repository models/ --model-control poll --repository-poll-s 10
    python -m serving --model-dir exported/          # the same machinery: a one-model repository

The layout on disk, the names and the version policy are `serving.layout`'s. `Repository` owns the
routing table {model name: {version: ModelVersion}}, replaced whole on the event loop, so a request
sees one table. A `ModelVersion` is one export at work: its ONNX Runtime sessions, its own batchers
(`VaeCore`) and metric children. A request resolves its model version once (`resolve`) and pins it
on its lease (`serving.budget.Lease.pin`), and every batcher run it makes goes to that version's
batchers: every answer is computed by exactly one whole version.

A version goes through, in order: verify (the manifest's checksums and shapes) -> load -> warm up (all
three `serving.runtime.load_model`, on a thread: the server keeps serving) -> route (the new table) ->
and the version it replaces, no longer routed to, finishes what its requests still hold (queued and in
flight: it is unloaded when its last pin is released, or after `--grace-period-s` plus
`--http-read-timeout-s`, whichever comes first) -> unload. One model changes at a time, so memory
during a swap is the old version plus the new one. A version that fails verification, loading or
warm-up is refused: one log line, `vae_model_versions_refused_total{name}`, and it is not tried again
until its files change; what was serving keeps serving, and the version policy picks among the
versions that were not refused.

Model control (`--model-control`, Triton's): `none` loads every model at start-up; `poll` does too and
rescans the repository every `--repository-poll-s`; `explicit` loads `--load-model` at start-up and then
what `load`/`unload` (the OIP repository extension, `serving.repo_api`) say. At start-up every model
must load (else the server refuses to start, as with a bad `--model-dir`).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import layout
from serving.budget import Lease, current_lease
from serving.config import ServeConfig
from serving.core import VaeCore
from serving.detector import OIP_MODEL, Detector
from serving.errors import InvalidInput, ModelLoadError, ModelNotFound, StartupError, quote
from serving.layout import GRAPH_SEPARATOR, LayoutError, VersionPolicy, oip_name, split_oip_name
from serving.manifest import GraphSpec
from serving.metrics import Metrics, ModelMetrics
from serving.runtime import LoadedModel, load_model

logger = logging.getLogger(__name__)

# The one version of a `--model-dir` server: the version a one-model server has always answered to.
LEGACY_VERSION = 1


@dataclass(eq=False)
class ModelVersion:
    """One loaded version of one model: its core (sessions, batchers) and who is using it."""

    name: str
    version: int
    path: Path
    core: VaeCore
    graph_metrics: dict[str, ModelMetrics]
    detector: Detector  # Score over this version's core and calibration
    graphs: dict[str, GraphSpec]  # its OIP graphs: the manifest's (encoder, decoder) and `score`
    users: int = 0  # requests that resolved this version and have not ended (their lease pins it)
    memo: dict[str, Any] = field(default_factory=dict)  # adapters' per-version caches (metadata, info)

    @property
    def label(self) -> str:
        return str(self.version)

    def unpin(self) -> None:
        self.users -= 1

    def answers_to(self, version: str) -> bool:
        """Whether an asked-for version string names this one: its number, or its manifest's content hash."""
        return version == self.label or version == self.core.manifest.version


def _libc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    return trim  # type: ignore[no-any-return]


_MALLOC_TRIM = _libc_trim()


def _trim_heap() -> None:
    """Give the heap pages an unloaded version freed back to the system (glibc keeps them otherwise, and
    RSS would stay at its highest: old + new versions for good)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class Repository:
    """The routing table and its changes (see the module docstring)."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.legacy = config.model_repository is None  # --model-dir: answers exactly as a one-model server
        self.root = config.model_repository
        self.policy = VersionPolicy.parse(config.version_policy)
        self.models: dict[str, dict[int, ModelVersion]] = {}  # routed: name -> version -> loaded (ascending)
        self.ready = False  # the server's readiness (OIP ServerReady, /v2/health/ready): set by serving.server
        self.on_change: list[Callable[[], None]] = []  # told after each change of the table (health)
        self._refused: dict[tuple[str, int], tuple[tuple[str, int, int], ...]] = {}  # -> fingerprint refused
        # (name, version asked for) -> what it resolved to, until the table changes: a request's lookup is
        # one dict access (only names that resolved are kept, so the caches stay as small as the table).
        self._resolved: dict[tuple[str, str], ModelVersion] = {}
        self._resolved_oip: dict[tuple[str, str], tuple[ModelVersion, str]] = {}
        self._lock = asyncio.Lock()  # one model changes at a time: memory is old + new at most
        self._poller: asyncio.Task[None] | None = None
        # Every load on one thread: its allocations come from one malloc arena, which the next load reuses
        # once the old version is freed (loads on changing threads would grow RSS by a version per swap).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")

    # -- start and stop -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the control mode loads at start-up; StartupError if a model cannot be served."""
        if self.legacy:
            model = await self._load_on_loader(self.config.model_dir)
            name = model.manifest.name
            self._set({name: {LEGACY_VERSION: self._open(name, LEGACY_VERSION, self.config.model_dir, model)}})
            self.metrics.model_loads.labels(name).inc()
            return
        assert self.root is not None
        try:
            names = sorted(layout.scan(self.root))
        except LayoutError as e:
            raise StartupError(str(e)) from None
        if self.config.model_control == "explicit":
            wanted = [n.strip() for n in self.config.load_model.split(",") if n.strip()]
            names = names if "*" in wanted else wanted
        for name in names:
            try:
                await self.load(name, startup=True)
            except (ModelNotFound, ModelLoadError, LayoutError) as e:
                raise StartupError(f"{'load-model' if self.config.model_control == 'explicit' else 'model-repository'}"
                                   f": {e}") from None
        if self.config.model_control == "poll":
            self._poller = asyncio.ensure_future(self._poll())

    async def close(self) -> None:
        """Stop polling; stop every version's batchers (after the server's own drain). A change in progress
        (a load, or a retired version's last requests, which the drain has ended) finishes first."""
        async with self._lock:
            if self._poller is not None:
                self._poller.cancel()
            for versions in self.models.values():
                for v in versions.values():
                    await v.core.close()
        self._loader.shutdown(wait=False)

    # -- resolving requests -------------------------------------------------------------------------

    def resolve(self, name: str, version: str, lease: Lease | None = None, pin: bool = True) -> ModelVersion:
        """The version a request asks for (empty name: the one model; empty version: the newest routed),
        pinned on the request's lease (`lease`, else the current one) until it ends; ModelNotFound else."""
        v = self._resolved.get((name, version))
        if v is None:
            versions = self.models.get(name) if name else self._only()
            if versions is None:
                raise ModelNotFound(f"model: expected one of {sorted(self.models)}, got {quote(repr(name))}")
            v = self._resolved[(name, version)] = self._version(name, versions, version, "version")
        return self._pin(v, lease) if pin else v

    def resolve_oip(self, name: str, version: str, lease: Lease | None = None,
                    pin: bool = True) -> tuple[ModelVersion, str]:
        """An OIP model name and version -> (the version, the graph), pinned as `resolve` does."""
        hit = self._resolved_oip.get((name, version))
        if hit is None:
            hit = self._resolved_oip[(name, version)] = self._find_oip(name, version)
        v, graph = hit
        return (self._pin(v, lease) if pin else v), graph

    def _find_oip(self, name: str, version: str) -> tuple[ModelVersion, str]:
        vae, graph = split_oip_name(name)
        versions = self._only() if vae is None else self.models.get(vae)
        if versions is None or graph not in next(iter(versions.values())).graphs:
            names = self.oip_names()
            if self.legacy:  # what a one-model server has always answered: its graphs' names
                graphs = [n for n in names if GRAPH_SEPARATOR not in n]
                raise InvalidInput("model_name", f"one of {sorted(graphs)}", repr(name))
            raise ModelNotFound(f"model_name: expected one of {sorted(names)}, got {quote(repr(name))}")
        v = versions.get(LEGACY_VERSION)
        if self.legacy and v is not None and not (version == "" or v.answers_to(version)):
            raise InvalidInput("model_version", f"'', {v.label!r} or {v.core.manifest.version!r}", repr(version), name)
        return self._version(name, versions, version, "model_version"), graph

    def oip_names(self) -> list[str]:
        """Every OIP model name that answers now: each graph of each model, and bare graph names with one model."""
        names = [oip_name(n, g) for n, vs in self.models.items() if vs for g in next(iter(vs.values())).graphs]
        only = self._only()
        if only:
            names += list(next(iter(only.values())).graphs)
        return names

    def _only(self) -> dict[int, ModelVersion] | None:
        return next(iter(self.models.values())) if len(self.models) == 1 else None

    @staticmethod
    def _version(name: str, versions: dict[int, ModelVersion], version: str, field_name: str) -> ModelVersion:
        if versions:
            if not version:
                return versions[max(versions)]
            for v in versions.values():
                if v.answers_to(version):
                    return v
        raise ModelNotFound(f"{field_name}: {quote(repr(name))} has versions {[str(v) for v in sorted(versions)]} "
                            f"ready, got {quote(repr(version))}")

    @staticmethod
    def _pin(v: ModelVersion, lease: Lease | None) -> ModelVersion:
        lease = current_lease.get() if lease is None else lease
        if lease is not None:
            v.users += 1
            lease.pin(v)
        return v

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The repository index (Triton's): one entry per model version on disk or loaded, with its state."""
        rows: dict[tuple[str, int], dict[str, str]] = {}
        on_disk = {} if self.legacy or self.root is None else layout.scan(self.root)
        for name, dirs in on_disk.items():
            for v in dirs:
                refused = (name, v) in self._refused
                rows[(name, v)] = {"name": name, "version": str(v), "state": "UNAVAILABLE",
                                   "reason": "refused: did not verify, load or warm up" if refused else "unloaded"}
            if not dirs:
                rows[(name, 0)] = {"name": name, "version": "", "state": "UNAVAILABLE", "reason": "no versions"}
        for name, routed in self.models.items():
            for n in routed:
                rows[(name, n)] = {"name": name, "version": str(n), "state": "READY", "reason": ""}
        out = [rows[k] for k in sorted(rows)]
        return [r for r in out if r["state"] == "READY"] if ready_only else out

    # -- changing the table -------------------------------------------------------------------------

    async def load(self, name: str, startup: bool = False) -> None:
        """Load (or reload) one model: the versions the policy picks among those on disk that verify are
        routed to, the others drained and unloaded. ModelNotFound if it is not in the repository;
        ModelLoadError if a version it tried failed and none loaded (what served before keeps serving)."""
        assert self.root is not None
        layout.check_name(name)
        async with self._lock:
            model_dir = self.root / name
            if not model_dir.is_dir():
                raise ModelNotFound(f"model_name: expected one of {sorted(layout.scan(self.root))} (the "
                                    f"repository's models), got {quote(repr(name))}")
            for key in [k for k in self._refused if k[0] == name]:  # asked for: try refused versions again
                del self._refused[key]
            await self._sync(name, layout.versions(model_dir), required=True, startup=startup)

    async def unload(self, name: str) -> None:
        """Stop routing to every version of `name`, drain and unload them; ModelNotFound if none is loaded."""
        async with self._lock:
            if name not in self.models:
                raise ModelNotFound(f"model_name: expected one of {sorted(self.models)} (loaded), "
                                    f"got {quote(repr(name))}")
            await self._unroute(name)

    async def _unroute(self, name: str) -> None:
        """Stop routing to `name` (under the lock), then drain and unload its versions."""
        versions = self.models[name]
        table = dict(self.models)
        del table[name]
        self._set(table)
        await asyncio.gather(*(self._retire(v) for v in versions.values()))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.repository_poll_s)
            try:
                await self.rescan()
            except Exception:  # one bad scan must not stop polling
                logger.exception("model repository: rescan failed; trying again in %.1f s",
                                 self.config.repository_poll_s)

    async def rescan(self) -> None:
        """Poll mode, once: every model on disk synced, models gone from disk unloaded."""
        assert self.root is not None
        on_disk = layout.scan(self.root)
        for name, versions in sorted(on_disk.items()):
            async with self._lock:
                await self._sync(name, versions, required=False, startup=False)
        for name in sorted(set(self.models) - set(on_disk)):
            logger.info("model %s: gone from the repository; unloading it", name)
            async with self._lock:
                if name in self.models:
                    await self._unroute(name)

    async def _sync(self, name: str, on_disk: dict[int, Path], required: bool, startup: bool) -> None:
        """Make `name`'s routed versions the policy's pick among `on_disk` minus those refused (under the lock)."""
        routed = self.models.get(name, {})
        fresh: dict[int, ModelVersion] = {}
        reasons: list[str] = []
        while True:
            candidates = [v for v, p in on_disk.items()
                          if (name, v) not in self._refused or self._refused[(name, v)] != layout.fingerprint(p)]
            wanted = self.policy.select(candidates)
            missing = [v for v in wanted if v not in routed and v not in fresh]
            if not missing:
                break
            for v in missing:
                path = on_disk[v]
                try:
                    model = await self._load_on_loader(path)
                except StartupError as e:
                    self._refuse(name, v, path, str(e))
                    reasons.append(f"version {v}: {e}")
                    continue
                self._refused.pop((name, v), None)
                fresh[v] = self._open(name, v, path, model)
        if required and reasons and not fresh:
            raise ModelLoadError(f"model {name}: {quote('; '.join(reasons), 600)}")
        table_versions = {v: routed.get(v) or fresh[v] for v in wanted}
        if not table_versions:
            if startup or (required and not routed):
                why = "; ".join(reasons) or f"no version directory matches --version-policy {self.config.version_policy}"
                if startup:
                    raise StartupError(f"model {name}: no version can be served ({why})")
                raise ModelNotFound(f"model {name}: no version can be served ({quote(why, 600)})")
            if routed and not on_disk:  # its versions were deleted from disk: unload them, as Triton's poll does
                await self._unroute(name)
            return  # (else every version on disk was refused: what serves keeps serving)
        gone = [v for k, v in routed.items() if k not in table_versions]
        if not fresh and not gone:
            return
        table = dict(self.models)
        table[name] = dict(sorted(table_versions.items()))
        self._set(table)
        for mv in fresh.values():
            self.metrics.model_loads.labels(name).inc()
            logger.info("model %s version %d: routed to (%s)", name, mv.version, mv.path)
        await asyncio.gather(*(self._retire(v) for v in gone))

    async def _load_on_loader(self, path: Path) -> LoadedModel:
        """Verify, open and warm up one export on the loader thread (blocking ONNX Runtime work)."""
        c = self.config
        return await asyncio.get_running_loop().run_in_executor(
            self._loader, load_model, path, c.providers, c.intra_op_threads, c.max_batch_size)

    def _open(self, name: str, version: int, path: Path, model: LoadedModel) -> ModelVersion:
        """A verified, warm export -> a ModelVersion with its batchers started (event loop)."""
        if self.legacy:
            graph_metrics = self.metrics.models
            self.metrics.set_model_info(model.manifest.name, model.manifest.version, model.providers)
        else:
            graph_metrics = {g: self.metrics.model_metrics(oip_name(name, g), str(version))
                             for g in model.manifest.graphs}
            self.metrics.set_model_info(name, str(version), model.providers)
        core = VaeCore(model, self.config, self.metrics, graph_metrics)
        detector = Detector(core, self.metrics, self._score_labels(name, version))
        core.start()
        return ModelVersion(name, version, path, core, graph_metrics, detector,
                            {**core.graphs, OIP_MODEL: detector.graph})

    def _score_labels(self, name: str, version: int) -> tuple[str, ...]:
        """The score metrics' labels of one version: (name, version) as vae_model_info's; (name,) with --model-dir."""
        return (name,) if self.legacy else (name, str(version))

    def _refuse(self, name: str, version: int, path: Path, why: str) -> None:
        self._refused[(name, version)] = layout.fingerprint(path)
        self.metrics.versions_refused.labels(name).inc()
        logger.error("model %s version %d refused, not served: %s", name, version, why)

    def _set(self, table: dict[str, dict[int, ModelVersion]]) -> None:
        self.models = table
        self._resolved, self._resolved_oip = {}, {}
        for listener in self.on_change:
            listener()

    async def _retire(self, v: ModelVersion) -> None:
        """A version no longer routed to: wait for its last request, then unload it."""
        c = self.config
        end = time.monotonic() + c.grace_period_s + c.http_read_timeout_s
        while v.users > 0 and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if v.users > 0:
            logger.warning("model %s version %d: %d requests still hold it after %.0f s; unloading it anyway "
                           "(their queued work fails UNAVAILABLE)", v.name, v.version, v.users,
                           c.grace_period_s + c.http_read_timeout_s)
        await v.core.unload()
        _trim_heap()
        if not self.legacy:
            for mm in v.graph_metrics.values():
                self.metrics.drop_model(mm)
            self.metrics.drop_score(v.detector.labels)
            self.metrics.set_model_info(v.name, v.label, v.core.model.providers, loaded=False)
        self.metrics.model_unloads.labels(v.name).inc()
        logger.info("model %s version %d: unloaded", v.name, v.version)
