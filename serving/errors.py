"""Errors raised by the serving core, and the one table that maps them to gRPC status codes.

    ServeError                   base of every error the core raises on purpose
    ├── InvalidInput             INVALID_ARGUMENT: the message names the field, expected and got
    ├── QueueFull                RESOURCE_EXHAUSTED: the model's bounded queue has no room
    ├── ResponseTooLarge         RESOURCE_EXHAUSTED: the answer would exceed --max-message-bytes
    ├── MemoryBusy               RESOURCE_EXHAUSTED: the bytes in flight would exceed --max-inflight-bytes
    ├── DeadlineExpired          DEADLINE_EXCEEDED: the deadline passed while the request queued
    ├── ShuttingDown             UNAVAILABLE: the server is draining
    ├── NotFound                 NOT_FOUND: no such thing to answer about (a health service name)
    │   └── ModelNotFound        NOT_FOUND: no such model or version loaded (the message lists those that are)
    ├── ModelLoadError           INVALID_ARGUMENT: a repository load found no version that verifies and loads
    ├── ExtensionOff             UNIMPLEMENTED: the repository extension without --model-control explicit
    ├── RequestTooLarge          RESOURCE_EXHAUSTED: the request is over --max-message-bytes (native front)
    ├── TooManyRpcs              RESOURCE_EXHAUSTED: --max-concurrent-rpcs calls are in flight (native front)
    └── StartupError             not an RPC error: the server refuses to start (bad model, providers)

Adapters (servicer.py, oip.py, http.py, native.py) never choose a status code themselves: the one request
wrapper (`serving.scope.RequestScope.failed`, used by every front end) calls `http_status_for`, and
`status_for` is its gRPC-only view; both apply `STATUS_TABLE` (the one table:
each error's gRPC code, HTTP status and, for back-pressure, the Retry-After seconds; cancellation and
deadlines are told apart by `status_for_cancelled`); anything not in the table is INTERNAL (HTTP 500)
with a generic message and a logged traceback, and the server keeps serving. Messages quote request
values through `quote`, cut short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of the errors the serving core raises on purpose."""


# What an error message quotes from a request is cut to this many characters: a 20,000-character model
# name echoed back would not fit in the status trailer (gRPC's metadata limit) and would turn the answer
# into RESOURCE_EXHAUSTED "metadata size exceeds hard limit".
MAX_QUOTED_CHARS = 200


def quote(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`text` cut to `limit` characters, saying how long it was when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


class InvalidInput(ServeError):
    """A request field is malformed; the message names the field, what was expected and what arrived.

    `model` is the model the request was for ("encoder", "decoder") when known: the RPC wrapper
    counts the rejection against it (`vae_rejections_total{reason="invalid"}`).
    """

    def __init__(self, field: str, expected: str, got: str, model: str | None = None) -> None:
        super().__init__(f"{quote(field)}: expected {quote(expected, 400)}, got {quote(got)}")
        self.field = field
        self.model = model


class QueueFull(ServeError):
    """The model's queue holds --max-queue-rows rows already."""


class ResponseTooLarge(ServeError):
    """The response would be larger than --max-message-bytes; refused before compute when the size is
    known from the request."""


class MemoryBusy(ServeError):
    """Admitting the request would put more than --max-inflight-bytes of request and response data in
    flight; retry later (or elsewhere)."""


class DeadlineExpired(ServeError):
    """The request's deadline passed while it waited in the queue; it was not computed."""


class ShuttingDown(ServeError):
    """The server is draining and takes no new work."""


class NotFound(ServeError):
    """The request names something the server does not have (a health service name)."""


class ModelNotFound(NotFound):
    """The request names a model, or a version of one, that is not loaded; the message says what is."""


class ModelLoadError(ServeError):
    """An explicit load (the repository extension) found no version of the model that verifies and loads;
    the message gives each version's reason."""


class ExtensionOff(ServeError):
    """A call of the model repository extension to a server that does not run it (--model-control is not
    explicit)."""


class RequestTooLarge(ServeError):
    """The request is larger than --max-message-bytes: refused before it is parsed."""


class TooManyRpcs(ServeError):
    """--max-concurrent-rpcs calls are in flight already."""


class StartupError(ServeError):
    """The server cannot start: the model, its checksums or the providers are not as required."""


@dataclass(frozen=True)
class Status:
    """What one kind of error is answered with, on each protocol."""

    grpc: grpc.StatusCode
    http: int
    retry_after_s: int | None = None  # back-pressure: when to try again (HTTP Retry-After)


# HTTP statuses as Triton and KServe answer the Open Inference Protocol over REST: 400 for a bad request,
# 503 with Retry-After when the server is full or draining, 504 when the deadline passed in the queue.
# A response over --max-message-bytes is the client's to fix (fewer rows, or binary outputs): 400.
STATUS_TABLE: dict[type[ServeError], Status] = {
    InvalidInput: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    QueueFull: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, 1),
    ResponseTooLarge: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 400),
    MemoryBusy: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, 1),
    DeadlineExpired: Status(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ShuttingDown: Status(grpc.StatusCode.UNAVAILABLE, 503, 1),
    NotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    ModelNotFound: Status(grpc.StatusCode.NOT_FOUND, 404),
    ModelLoadError: Status(grpc.StatusCode.INVALID_ARGUMENT, 400),
    ExtensionOff: Status(grpc.StatusCode.UNIMPLEMENTED, 404),
    RequestTooLarge: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    TooManyRpcs: Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 503, 1),
}
INTERNAL = Status(grpc.StatusCode.INTERNAL, 500)
# HTTP statuses the HTTP layer answers itself (routing, body limits, slow bodies) -> the gRPC code they
# count under in vae_requests_total, so that one error-ratio rule covers both protocols.
GRPC_BY_HTTP: dict[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK, 400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED}

INTERNAL_MESSAGE = "internal error; the server logged the details"


# A client whose deadline passes cancels its call (RST_STREAM) as the server's copy of the same deadline
# passes, give or take the network's latency, and either can arrive first: within this much of the
# deadline a cancellation is the deadline's.
DEADLINE_MARGIN_S = 0.005


def status_for_cancelled(time_remaining: float | None) -> grpc.StatusCode:
    """The code to count for a handler that grpc.aio cancelled: it does so both when the client cancels
    and when the deadline passes; the time left tells them apart (within `DEADLINE_MARGIN_S`)."""
    if time_remaining is not None and time_remaining <= DEADLINE_MARGIN_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _lookup(exc: BaseException, method: str) -> tuple[Status, str]:
    for cls in type(exc).__mro__:
        status = STATUS_TABLE.get(cls)  # type: ignore[arg-type]
        if status is not None:
            return status, str(exc)
    logger.error("unexpected error in %s", method or "request", exc_info=exc)
    return INTERNAL, INTERNAL_MESSAGE


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for an exception; logs a traceback for anything unexpected."""
    status, message = _lookup(exc, method)
    return status.grpc, message


def http_status_for(exc: BaseException, method: str = "") -> tuple[Status, str]:
    """The whole Status (HTTP status, gRPC code for the metrics, Retry-After) and message for an exception."""
    return _lookup(exc, method)
