"""Every Prometheus object of the server, in one place (namespace `vae`; see docs/ARCHITECTURE.md).

Each server owns a `Metrics` on its own `CollectorRegistry`, so several servers can live in one process
(tests). Label children are resolved once and cached: the per-request cost is a few lock-protected
increments, no label lookups. Gauges of current state (queue depth, in-flight RPCs) cost nothing per
request: they read plain counters when /metrics is scraped (`Gauge.set_function`).

Under `--workers N` (serving.workers) every worker process writes its samples to the directory in
PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode) and `/metrics`, on any worker, is the
whole server (`exposition_registry`: a MultiProcessCollector over every worker's files). Counters and
histograms add up across workers; queue depth stays per worker (a `pid` label), in-flight RPCs add up.
Gauges there cannot read a function at scrape time, so `refresh` copies the live values into them,
which each worker does every `REFRESH_S`.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from serving.config import MULTIPROC_ENV

# Request latency: 50 us .. 10 s, roughly x2 apart, so p99 can be aggregated across replicas.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 0.01, 0.02,
    0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS: tuple[float, ...] = tuple(float(2 ** i) for i in range(11))  # 1, 2, 4, ..., 1024
# Score: where scored rows fall in the calibration distribution, in percent (a drift shows as mass moving up).
PERCENTILE_BUCKETS: tuple[float, ...] = (10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0)
REJECTION_REASONS: tuple[str, ...] = ("queue_full", "deadline", "cancelled", "invalid")
REFRESH_S = 0.5  # multiprocess mode: how often a worker copies its live gauges into its files


def observer(child: Histogram) -> Callable[[float], None]:
    """`child.observe`, minus prometheus-client's linear scan over the buckets (22 comparisons in Python
    for a slow request): a bisection over the same bounds, then the same two increments. Falls back to
    `observe` if the client's internals are not the ones this was written against (0.20-0.26)."""
    bounds, buckets, total = (getattr(child, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if not (isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
            and bounds and bounds[-1] == math.inf and total is not None):
        return child.observe
    bucket_incs = [b.inc for b in buckets]
    total_inc = total.inc

    def observe(amount: float) -> None:
        total_inc(amount)
        bucket_incs[bisect_left(bounds, amount)](1)

    return observe


def multiprocess() -> bool:
    """Whether this process writes its metrics for a multiprocess exposition (set by serving.workers)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class ModelMetrics:
    """The per-model children the batcher touches (labels already applied): `model` is the OIP model
    (a graph), and with a model repository `version` its version (`Metrics.versioned`)."""

    def __init__(self, m: Metrics, model: str, version: str = "") -> None:
        lv = (model, version) if m.versioned else (model,)
        self.labels = lv
        self.queue_wait = observer(m.queue_wait.labels(*lv))  # each: observe(value)
        self.compute = observer(m.compute.labels(*lv))
        self.batch_size = observer(m.batch_size.labels(*lv))
        self.queue_rows = m.queue_rows.labels(*lv)
        self.queue_requests = m.queue_requests.labels(*lv)
        self.rows = m.rows.labels(*lv)
        self.batches = m.batches.labels(*lv)
        self.rejected = {r: m.rejections.labels(*lv, r) for r in REJECTION_REASONS}
        self.live = m.live


class MethodMetrics:
    """The per-method children `serving.rpc` touches: latency, in-flight count, answers by status code.

    For a streaming method (`stream`), each message is one request (its answer's code, its latency from
    read to answer) and `streams` counts the open streams (`vae_open_streams`).
    """

    __slots__ = ("_bounds", "_buckets", "_child", "_codes", "_counts", "_direct", "_requests", "_sum",
                 "duration", "inflight", "method", "streams")

    def __init__(self, m: Metrics, method: str, stream: bool = False) -> None:
        self.method = method
        self._child = m.request_duration.labels(method)
        self.duration = observer(self._child)
        self.inflight = 0  # RPCs (messages) of this method being handled (event loop only); read at scrape time
        self.streams = 0   # open streams of this method (streaming methods only)
        self._requests = m.requests
        self._codes: dict[str, Counter] = {}
        # In one process, answers are tallied in plain ints and added to the Prometheus objects when they are
        # collected (`flush`, run first by every collection of the registry): a scrape sees every answer
        # sent before it, at a few integer additions per answer instead of three locked increments. Under
        # --workers the samples live in files other processes read, so they are written at once.
        self._direct = m.multiprocess or not hasattr(self._child, "_buckets")
        self._bounds: list[float] = list(getattr(self._child, "_upper_bounds", LATENCY_BUCKETS_S))
        self._buckets = [0] * len(self._bounds)
        self._sum = 0.0
        self._counts: dict[str, int] = {}
        m.live(m.inflight.labels(method), lambda: self.inflight)
        if stream:
            m.live(m.open_streams.labels(method), lambda: self.streams)
        m.tallies.append(self)

    def started(self) -> None:
        self.inflight += 1

    def finished(self, code: str, seconds: float) -> None:
        """Record one answered RPC: before its status goes out, so a scrape right after it sees it."""
        self.inflight -= 1
        if self._direct:
            self.duration(seconds)
            self._counter(code).inc()
            return
        self._buckets[bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds
        counts = self._counts
        counts[code] = counts.get(code, 0) + 1

    def _counter(self, code: str) -> Counter:
        c = self._codes.get(code)
        if c is None:
            c = self._codes[code] = self._requests.labels(self.method, code)
        return c

    def flush(self) -> None:
        """Add the answers tallied since the last flush to the Prometheus objects."""
        if not self._counts:
            return
        buckets, child = self._buckets, self._child
        for i, n in enumerate(buckets):
            if n:
                child._buckets[i].inc(n)
                buckets[i] = 0
        child._sum.inc(self._sum)
        self._sum = 0.0
        for code, n in self._counts.items():
            self._counter(code).inc(n)
        self._counts = {}


class _Flush(Collector):
    """Registered first in a server's registry: every collection (a scrape) first flushes the tallies."""

    def __init__(self, m: Metrics) -> None:
        self._m = m

    def collect(self) -> Iterable[Metric]:
        self._m.flush()
        return []


class Metrics:
    """All metric families of one server."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 models: Iterable[str] = ("encoder", "decoder"), versioned: bool = False) -> None:
        """`models`: the per-model children made now (a one-model server's graphs); `versioned`: a model
        repository's server, whose per-model series also carry `version` (`model_metrics` makes them)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.versioned = versioned
        per_model = ("model", "version") if versioned else ("model",)
        self.multiprocess = multiprocess()
        self.tallies: list[MethodMetrics] = []
        self.registry.register(_Flush(self))
        # process_resident_memory_bytes and friends (deploy/prometheus/rules.yml's VaeServeMemoryClimb): this
        # process's own; under --workers, those of the worker that answers the scrape.
        ProcessCollector(registry=self.registry)
        self._live: list[tuple[Gauge, Callable[[], float]]] = []
        r, ns = self.registry, "vae"
        # multiprocess_mode: how each gauge's per-worker values combine (ignored in a single process)
        self.requests = Counter("requests_total", "RPCs answered, by method and gRPC status code",
                                ("method", "code"), namespace=ns, registry=r)
        self.request_duration = Histogram("request_duration_seconds", "RPC latency in the server",
                                          ("method",), namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S)
        self.queue_wait = Histogram("queue_wait_seconds", "time a request waited for its first batch",
                                    per_model, namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S)
        self.compute = Histogram("compute_duration_seconds", "ONNX Runtime run time per batch",
                                 per_model, namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S)
        self.batch_size = Histogram("batch_size_rows", "rows in each ONNX Runtime run", per_model,
                                    namespace=ns, registry=r, buckets=BATCH_BUCKETS)
        self.queue_rows = Gauge("queue_rows", "rows waiting in the queue", per_model, namespace=ns,
                                registry=r, multiprocess_mode="liveall")
        self.queue_requests = Gauge("queue_requests", "requests waiting in the queue", per_model,
                                    namespace=ns, registry=r, multiprocess_mode="liveall")
        self.inflight = Gauge("inflight_requests", "RPCs (stream messages) being handled", ("method",),
                              namespace=ns, registry=r, multiprocess_mode="livesum")
        self.open_streams = Gauge("open_streams", "bidirectional streams open", ("method",), namespace=ns,
                                  registry=r, multiprocess_mode="livesum")
        self.rows = Counter("rows_total", "rows computed", per_model, namespace=ns, registry=r)
        self.batches = Counter("batches_total", "ONNX Runtime runs", per_model, namespace=ns, registry=r)
        self.rejections = Counter("rejections_total", "requests refused or dropped before compute",
                                  (*per_model, "reason"), namespace=ns, registry=r)
        self.model_info = Gauge("model_info", "each model version being served (value 1)",
                                ("name", "version", "providers"), namespace=ns, registry=r, multiprocess_mode="max")
        self.model_loads = Counter("model_loads_total", "model versions loaded, verified and routed to", ("name",),
                                   namespace=ns, registry=r)
        self.model_unloads = Counter("model_unloads_total", "model versions unloaded (after their last request)",
                                     ("name",), namespace=ns, registry=r)
        self.versions_refused = Counter("model_versions_refused_total", "model versions that failed verification, "
                                        "loading or warm-up and were not served", ("name",), namespace=ns, registry=r)
        self.worker_restarts = Counter("worker_restarts_total", "worker processes that died and were restarted "
                                       "(--workers)", namespace=ns, registry=r)
        # Score, per VAE (`name`, as vae_model_info's) and with a model repository per version: each version
        # is scored against its own calibration (serving.detector).
        per_vae = ("name", "version") if versioned else ("name",)
        self.scored_rows = Counter("scored_rows_total", "rows scored by Score (the model's calibrated default k "
                                   "and score kind only)", per_vae, namespace=ns, registry=r)
        self.flagged_rows = Counter("flagged_rows_total", "of those, rows over the server's --outlier-quantile "
                                    "threshold", per_vae, namespace=ns, registry=r)
        self.score_percentile = Histogram("score_percentile", "scored rows' percentile in the calibration "
                                          "distribution (same rows as vae_scored_rows_total)", per_vae,
                                          namespace=ns, registry=r, buckets=PERCENTILE_BUCKETS)
        self.outlier_quantile = Gauge("outlier_quantile", "the server's --outlier-quantile (flagged rows are "
                                      "expected at 1 - this rate on data like the calibration data)", per_vae,
                                      namespace=ns, registry=r, multiprocess_mode="max")
        self.models = {name: ModelMetrics(self, name) for name in models}
        self._methods: dict[str, MethodMetrics] = {}

    def count_invalid(self, model: str | None, pins: Sequence[object] | None = None) -> None:
        """One request refused as invalid input for `model` (when the error named a model we serve): a
        graph of the model version the request had resolved (`pins`, from its lease), else of this server."""
        if pins and model:
            graphs: dict[str, ModelMetrics] = getattr(pins[0], "graph_metrics", {})
            mm = graphs.get(model.rpartition(".")[2])  # "encoder", or an OIP name "<vae>.encoder"
            if mm is not None:
                mm.rejected["invalid"].inc()
                return
        if model in self.models:
            self.models[model].rejected["invalid"].inc()

    def model_metrics(self, model: str, version: str) -> ModelMetrics:
        """The per-model children of one version of an OIP model (a repository's server)."""
        mm = ModelMetrics(self, model, version)
        self.models[f"{model}:{version}"] = mm
        return mm

    def drop_model(self, mm: ModelMetrics) -> None:
        """Remove the series of an unloaded model version (and the gauges reading its batcher)."""
        self.models = {k: v for k, v in self.models.items() if v is not mm}
        for fam in (self.queue_wait, self.compute, self.batch_size, self.queue_rows, self.queue_requests,
                    self.rows, self.batches):
            _remove(fam, mm.labels)
        for reason in REJECTION_REASONS:
            _remove(self.rejections, (*mm.labels, reason))
        gone = {id(mm.queue_rows), id(mm.queue_requests)}
        self._live = [(g, f) for g, f in self._live if id(g) not in gone]

    def drop_score(self, labels: tuple[str, ...]) -> None:
        """Remove the Score series of an unloaded model version (`labels`: its detector's)."""
        for fam in (self.scored_rows, self.flagged_rows, self.score_percentile, self.outlier_quantile):
            _remove(fam, labels)

    def live(self, gauge: Gauge, value: Callable[[], float]) -> None:
        """`gauge` shows `value()`: read at scrape time, or (multiprocess mode) copied by `refresh`."""
        if self.multiprocess:
            self._live.append((gauge, value))
        else:
            gauge.set_function(value)

    def flush(self) -> None:
        """Add every method's tallied answers to the Prometheus objects (before any collection)."""
        for t in self.tallies:
            t.flush()

    def refresh(self) -> None:
        """Multiprocess mode: write the live gauges' current values (a worker calls this periodically)."""
        for gauge, value in self._live:
            gauge.set(value())

    @property
    def exposition_registry(self) -> CollectorRegistry:
        """What /metrics exposes: this registry, or under --workers every worker's files together."""
        if not self.multiprocess:
            return self.registry
        r = CollectorRegistry()
        MultiProcessCollector(r)
        ProcessCollector(registry=r)
        return r

    def method_metrics(self, method: str, stream: bool = False) -> MethodMetrics:
        """The children of one RPC method (created, with its gauges, on the method's first call)."""
        mm = self._methods.get(method)
        if mm is None:
            mm = self._methods[method] = MethodMetrics(self, method, stream)
        return mm

    def set_model_info(self, name: str, version: str, providers: Iterable[str], loaded: bool = True) -> None:
        labels = (name, version, ",".join(providers))
        if loaded:
            self.model_info.labels(*labels).set(1)
        else:  # 0 first: under --workers the sample stays in the worker's file after the remove
            self.model_info.labels(*labels).set(0)
            _remove(self.model_info, labels)


def _remove(family: Counter | Gauge | Histogram, labels: tuple[str, ...]) -> None:
    try:
        family.remove(*labels)
    except KeyError:  # never made
        pass
