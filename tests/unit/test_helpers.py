"""tests/helpers.py's waits: they return what the condition gave, and fail naming what they waited for."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from tests.helpers import wait_until, wait_until_async


def test_wait_until_returns_the_first_value_that_is_not_none_or_false() -> None:
    calls = itertools.count()
    assert wait_until(lambda: None if next(calls) < 3 else 0, 5, "a count", interval=0) == 0


def test_wait_until_fails_naming_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.05 s waiting for the impossible"):
        wait_until(lambda: False, 0.05, "the impossible", interval=0.01)


def test_wait_until_async_awaits_a_coroutine_condition() -> None:
    calls = itertools.count()

    async def ready() -> bool:
        return next(calls) >= 2

    assert asyncio.run(wait_until_async(ready, 5, "two calls", interval=0)) is True
