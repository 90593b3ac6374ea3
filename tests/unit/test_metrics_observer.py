"""serving.metrics.observer: the bisecting observe gives exactly what prometheus-client's own does."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from serving.metrics import LATENCY_BUCKETS_S, observer


def _samples(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for m in h.collect() for s in m.samples if not s.name.endswith("_created")]


def test_the_bisecting_observer_matches_prometheus_clients_observe_on_every_bucket_edge() -> None:
    values = [0.0, 1e-6, *LATENCY_BUCKETS_S, *(b * 1.0001 for b in LATENCY_BUCKETS_S), 11.0, 1e9, -1.0]
    ours, theirs = (Histogram("h", "h", ("m",), registry=CollectorRegistry(), buckets=LATENCY_BUCKETS_S)
                    for _ in range(2))
    fast = observer(ours.labels("x"))
    assert fast != ours.labels("x").observe  # the fast path, not the fallback
    for v in values:
        fast(v)
        theirs.labels("x").observe(v)
    assert _samples(ours) == _samples(theirs)


def test_an_object_without_the_expected_internals_falls_back_to_its_own_observe() -> None:
    class Odd:
        def observe(self, amount: float) -> None:
            self.seen = amount

    odd = Odd()
    observer(odd)(3.0)  # type: ignore[arg-type]
    assert odd.seen == 3.0
