"""The one table from serving errors to gRPC status codes."""

from __future__ import annotations

import logging

import grpc
import pytest

from serving.errors import (
    INTERNAL_MESSAGE,
    DeadlineExpired,
    InvalidInput,
    QueueFull,
    ShuttingDown,
    status_for,
    status_for_cancelled,
)


@pytest.mark.parametrize("exc, code", [
    (InvalidInput("x", "shape (N, 64)", "(3, 65)"), grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpired("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDown("bye"), grpc.StatusCode.UNAVAILABLE),
])
def test_each_serving_error_maps_to_its_status_code_with_its_message(exc: Exception,
                                                                     code: grpc.StatusCode) -> None:
    assert status_for(exc) == (code, str(exc))


def test_invalid_input_names_the_field_the_expectation_and_what_arrived() -> None:
    assert str(InvalidInput("x", "shape (N, 64)", "(3, 65)")) == "x: expected shape (N, 64), got (3, 65)"


def test_anything_unexpected_is_internal_with_a_generic_message_and_a_logged_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    try:
        raise ZeroDivisionError("secret detail")
    except ZeroDivisionError as e:
        with caplog.at_level(logging.ERROR, logger="serving.errors"):
            code, message = status_for(e, "Encode")
    assert code == grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE
    assert "secret" not in message
    assert "unexpected error in Encode" in caplog.text and caplog.records[0].exc_info is not None


@pytest.mark.parametrize(("remaining", "code"), [
    (None, grpc.StatusCode.CANCELLED),               # no deadline: the client cancelled
    (3.0, grpc.StatusCode.CANCELLED),                # long before its deadline
    (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
    (0.001, grpc.StatusCode.DEADLINE_EXCEEDED),      # the client's cancel at its deadline, arriving first
])
def test_a_cancelled_handler_counts_as_its_cause(remaining: float | None, code: grpc.StatusCode) -> None:
    assert status_for_cancelled(remaining) == code
