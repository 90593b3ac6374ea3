"""The one request wrapper: what every request holds from arrival to answer, whatever its protocol.

A `RequestScope` is made when a request arrives (a grpcio unary call or stream message in `serving.rpc`,
a call of the native front end in `serving.native`, an HTTP request in `serving.http`) and ends exactly
once, with the code actually sent:

- metrics: `vae_inflight_requests` up on arrival, then `vae_request_duration_seconds` and
  `vae_requests_total{method, code}` when it ends (before the answer leaves, so a scrape right after an
  answer sees it);
- the bytes-in-flight lease (`serving.budget`): the request's bytes reserved on arrival, the response's
  by the core once it knows them, both given back when the scope ends;
- the deadline, in `time.monotonic()`'s clock (the batcher's);
- errors: `failed(exc)` maps any exception through `serving.errors`' one table (INTERNAL, logged, for
  anything unexpected) and counts invalid input against its model.

It is a plain object (slots, no task or future), so a front end that handles calls in batches pays a few
attribute writes per call for it.
"""

from __future__ import annotations

import time

from serving.budget import REQUEST_COPIES, InflightBudget, Lease
from serving.errors import InvalidInput, Status, http_status_for, status_for_cancelled
from serving.metrics import MethodMetrics, Metrics

_perf_counter = time.perf_counter


class RequestScope:
    """One request's metrics, lease and deadline; `ok`, `failed` or `cancelled` ends it (once)."""

    __slots__ = ("deadline", "ended", "lease", "mm", "t0")

    def __init__(self, mm: MethodMetrics, budget: InflightBudget, deadline: float | None = None) -> None:
        mm.started()
        self.mm = mm
        self.t0 = _perf_counter()
        self.lease: Lease = budget.lease()
        self.deadline = deadline
        self.ended = False

    def reserve_request(self, nbytes: int) -> None:
        """Reserve the request's copies on the lease (MemoryBusy when the budget has no room)."""
        self.lease.reserve(REQUEST_COPIES * nbytes, "request")

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def _end(self, code: str, release: bool = True) -> None:
        self.ended = True
        if release:
            self.lease.release()
        self.mm.finished(code, _perf_counter() - self.t0)

    def ok(self, release: bool = True) -> None:
        """End with OK. `release=False` keeps the lease for the caller to release once the answer is
        written (a stream's answer waiting for its turn to be written stays in flight)."""
        if not self.ended:
            self._end("OK", release)

    def failed(self, exc: BaseException, metrics: Metrics, release: bool = True) -> tuple[Status, str]:
        """End with `exc`'s status (the one table's; INTERNAL and a logged traceback if unexpected)."""
        status, message = http_status_for(exc, self.mm.method)
        if isinstance(exc, InvalidInput):  # before the lease is released: its pin says which model version
            metrics.count_invalid(exc.model, self.lease.pins)
        if not self.ended:
            self._end(status.grpc.name, release)
        return status, message

    def cancelled(self) -> None:
        """The client cancelled, or its deadline passed (told apart by the time left)."""
        if not self.ended:
            self._end(status_for_cancelled(self.time_remaining()).name)

    def end_with(self, code: str) -> None:
        """End with a code the transport itself answered (UNAVAILABLE while draining, ...)."""
        if not self.ended:
            self._end(code)
