"""Errors raised by the serving core, and the one table that maps them to gRPC status codes.

    ServeError                   base of every error the core raises on purpose
    ├── InvalidInput             INVALID_ARGUMENT: the message names the field, expected and got
    ├── QueueFull                RESOURCE_EXHAUSTED: the model's bounded queue has no room
    ├── DeadlineExpired          DEADLINE_EXCEEDED: the deadline passed while the request queued
    ├── ShuttingDown             UNAVAILABLE: the server is draining
    └── StartupError             not an RPC error: the server refuses to start (bad model, providers)

Adapters (servicer.py, oip.py) never choose a status code themselves: they call `status_for`, which
applies `STATUS_TABLE`; anything not in the table is INTERNAL with a generic message and a logged
traceback, and the server keeps serving.
"""

from __future__ import annotations

import logging

import grpc

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """Base of the errors the serving core raises on purpose."""


class InvalidInput(ServeError):
    """A request field is malformed; the message names the field, what was expected and what arrived."""

    def __init__(self, field: str, expected: str, got: str) -> None:
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field = field


class QueueFull(ServeError):
    """The model's queue holds --max-queue-rows rows already."""


class DeadlineExpired(ServeError):
    """The request's deadline passed while it waited in the queue; it was not computed."""


class ShuttingDown(ServeError):
    """The server is draining and takes no new work."""


class StartupError(ServeError):
    """The server cannot start: the model, its checksums or the providers are not as required."""


STATUS_TABLE: dict[type[ServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
}

INTERNAL_MESSAGE = "internal error; the server logged the details"


def status_for(exc: BaseException, method: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and message for an exception; logs a traceback for anything unexpected."""
    for cls in type(exc).__mro__:
        code = STATUS_TABLE.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code, str(exc)
    logger.error("unexpected error in %s", method or "request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
