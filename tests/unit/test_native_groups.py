"""serving.native's per-batch pieces without a server: grpc-timeout headers, and how a batch's hot calls
become batcher requests (groups of at most --max-batch-size rows, one deadline, cancelled when all left)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from serving import native
from serving.native import _enqueue, _Group, grpc_timeout_s


@pytest.mark.parametrize(("header", "seconds"), [(b"100m", 0.1), (b"2S", 2.0), (b"1H", 3600.0), (b"1M", 60.0),
                                                 (b"250u", 250e-6), (b"7n", 7e-9), (b"", 0.0), (b"12x", 0.0),
                                                 (b"m", 0.0)])
def test_a_grpc_timeout_header_reads_as_seconds_and_anything_unreadable_as_no_time_left(
        header: bytes, seconds: float) -> None:
    assert grpc_timeout_s(header) == pytest.approx(seconds)


class FakeBatcher:
    max_batch_size = 8
    preferred_batch_size = 8

    def __init__(self) -> None:
        self.queued: list[tuple[np.ndarray, Any, float | None]] = []
        self.cancelled = 0

    def enqueue(self, x: np.ndarray, done: Any, deadline: float | None) -> Any:
        self.queued.append((x, done, deadline))
        outer = self

        class Ticket:
            def cancel(self) -> None:
                outer.cancelled += 1

        return Ticket()


class FakeCall:
    def __init__(self, rows: int, deadline: float | None) -> None:
        self.x = np.full((rows, 2), rows, dtype=np.float32)
        self.deadline = deadline
        self.group: _Group | None = None
        self.ended = False
        self.got: Any = None

    def done(self, result: Any) -> None:
        self.ended = True
        self.got = result


class FakeWork:
    def __init__(self, x: np.ndarray) -> None:
        self.x = x


def test_hot_calls_share_requests_of_at_most_max_batch_size_rows_and_each_gets_its_own_rows() -> None:
    b = FakeBatcher()
    calls = [FakeCall(r, d) for r, d in ((3, 5.0), (4, 7.0), (2, 6.0), (20, None), (1, 1.0))]
    _enqueue(b, [(c, FakeWork(c.x)) for c in calls])  # type: ignore[arg-type, misc, list-item]
    assert [x.shape[0] for x, _, _ in b.queued] == [7, 2, 20, 1]  # 3+4, then 2 (2+20 > 8), 20 alone, 1
    assert [d for _, _, d in b.queued] == [7.0, 6.0, None, 1.0]    # the latest deadline of each group
    for x, done, _ in b.queued:
        done([x * 10])
    for c in calls:
        assert c.got[0].shape == (c.x.shape[0], 2)
        np.testing.assert_array_equal(c.got[0], c.x * 10)


def test_a_group_closes_at_the_preferred_size_so_large_calls_are_never_copied_together() -> None:
    b = FakeBatcher()
    b.preferred_batch_size = 4
    calls = [FakeCall(r, None) for r in (1, 2, 1, 1, 5, 4, 2, 2)]
    _enqueue(b, [(c, FakeWork(c.x)) for c in calls])  # type: ignore[arg-type, misc, list-item]
    # 1+2+1 reaches 4: closed; 1 then 5 (1+5 <= 8): 6 >= 4, closed; 4 alone; 2+2.
    assert [x.shape[0] for x, _, _ in b.queued] == [4, 6, 4, 4]
    assert b.queued[2][0] is calls[5].x  # a call of the preferred size or more is queued as it came: no copy


def test_a_group_is_cancelled_only_when_every_call_in_it_has_gone_and_a_gone_call_gets_nothing() -> None:
    b = FakeBatcher()
    a, c = FakeCall(1, None), FakeCall(1, None)
    _enqueue(b, [(a, FakeWork(a.x)), (c, FakeWork(c.x))])  # type: ignore[arg-type, misc, list-item]
    group = a.group
    assert group is not None and c.group is group
    a.ended = True
    group.leave()
    assert b.cancelled == 0
    x, done, _ = b.queued[0]
    done([x])
    assert a.got is None and c.got is not None

    d, e = FakeCall(1, None), FakeCall(1, None)
    _enqueue(b, [(d, FakeWork(d.x)), (e, FakeWork(e.x))])  # type: ignore[arg-type, misc, list-item]
    group = d.group
    assert group is not None
    group.leave()
    assert b.cancelled == 0
    group.leave()
    assert b.cancelled == 1


def test_a_failed_run_fails_every_call_still_waiting() -> None:
    b = FakeBatcher()
    calls = [FakeCall(1, None) for _ in range(3)]
    _enqueue(b, [(c, FakeWork(c.x)) for c in calls])  # type: ignore[arg-type, misc, list-item]
    err = RuntimeError("run failed")
    b.queued[0][1](err)
    assert all(c.got is err for c in calls)
    assert native.MAX_EVENTS >= 1


class _Runner:
    name = "encoder"

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return [x * 2]


class _Native:
    def __init__(self) -> None:
        self.answered: list[int] = []

    def respond(self, call_id: int, data: bytes) -> bool:
        self.answered.append(call_id)
        return True

    def fail(self, call_id: int, code: int, message: str) -> bool:
        self.answered.append(call_id)
        return True


class _Front:
    """What a _NativeCall touches of its NativeFront."""

    def __init__(self) -> None:
        from serving.budget import InflightBudget
        from serving.metrics import Metrics

        self.metrics = Metrics()
        self.plane = type("Plane", (), {"budget": InflightBudget(0)})()
        self.calls: dict[int, Any] = {}
        self.native = _Native()
        self.max_message_bytes = 1 << 20

    def check_idle(self) -> None:
        pass

    def fail(self, call: Any, exc: BaseException) -> None:
        call.failed(exc, self.metrics)
        self.native.fail(call.call_id, 1, str(exc))


@pytest.mark.parametrize("how", ["answered", "abandoned", "expired"])
def test_a_finished_or_abandoned_calls_rows_are_freed_without_the_cyclic_garbage_collector(how: str) -> None:
    """The calls of a group, the group and its queued request refer to each other; once the calls end, their
    input arrays must go by reference counting alone (the server runs the cyclic collector rarely, and a
    soak held tens of MB of finished requests' rows until it did)."""
    import asyncio
    import gc
    import weakref

    from serving.batcher import Batcher
    from serving.core import Work
    from serving.native import _NativeCall

    async def main() -> list[weakref.ref[np.ndarray]]:
        front = _Front()
        batcher = Batcher(_Runner(), max_batch_size=8, max_queue_delay_us=0, max_queue_rows=64, inline_rows=8)
        batcher.start()
        mm = front.metrics.method_metrics("ModelInfer")
        refs = []
        members = []
        for i in range(3):
            x = np.full((8, 3), i, dtype=np.float32)  # a whole group: queued as it is, not copied
            refs.append(weakref.ref(x))
            # "expired": a deadline already past, so the batcher fails the group with DeadlineExpired
            call = _NativeCall(front, mm, 0.0 if how == "expired" else None, i)  # type: ignore[arg-type]
            call.finish = lambda outs: b"answer"
            front.calls[i] = call
            members.append((call, Work(batcher, x, call.finish)))
            del x, call
        _enqueue(batcher, members)
        if how == "abandoned":  # every caller went away before the run: the request is dropped, never computed
            for call, _ in members:
                front.calls.pop(call.call_id).abandon()
        del members
        await asyncio.sleep(0.01)
        assert front.native.answered == ([] if how == "abandoned" else [0, 1, 2])
        await batcher.close()
        return refs

    gc.disable()
    try:
        refs = asyncio.run(main())
        assert [r() is None for r in refs] == [True] * 3
    finally:
        gc.enable()
