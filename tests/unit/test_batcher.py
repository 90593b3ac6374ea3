"""The dynamic batcher against a fake runner: merging, splitting, ordering, back-pressure, drops."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from serving.batcher import Batcher
from serving.errors import DeadlineExpired, InvalidInput, QueueFull, ShuttingDown
from serving.metrics import Metrics


class FakeRunner:
    """Returns [2x, row sums]; records every batch; can be held busy with `gate` to let arrivals queue."""

    name = "fake"

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail = fail

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.started.set()
        self.gate.wait(5)
        self.batches.append(x.copy())
        if self.fail:
            raise RuntimeError("runner exploded")
        return [x * 2, x.reshape(x.shape[0], -1).sum(axis=1)]


def rows(start: int, n: int, width: int = 3) -> np.ndarray:
    """n distinct rows (n, width): row i is filled with the value start + i."""
    return np.repeat(np.arange(start, start + n, dtype=np.float32)[:, None], width, axis=1)


def run_with(runner: FakeRunner, body: Callable[[Batcher], Awaitable[None]], **kw: int) -> Metrics:
    metrics = Metrics()
    opts = {"max_batch_size": 8, "max_queue_delay_us": 0, "max_queue_rows": 64, **kw}

    async def main() -> None:
        b = Batcher(runner, metrics=metrics.models["encoder"], **opts)
        b.start()
        try:
            await body(b)
        finally:
            runner.gate.set()
            await b.close()

    asyncio.run(main())
    return metrics


async def hold_runner_busy(b: Batcher, runner: FakeRunner) -> asyncio.Task[list[np.ndarray]]:
    """Submit one row and keep the runner inside run() until runner.gate is set."""
    runner.gate.clear()
    runner.started.clear()
    first = asyncio.ensure_future(b.submit(rows(1000, 1)))
    await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 5)
    return first


def sample_value(metrics: Metrics, name: str, **labels: str) -> float:
    v = metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_a_request_to_an_idle_batcher_runs_at_once_on_its_own() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        out = await b.submit(rows(0, 2))
        np.testing.assert_array_equal(out[0], rows(0, 2) * 2)

    run_with(runner, body)
    assert [len(x) for x in runner.batches] == [2]


def test_requests_arriving_while_the_runner_is_busy_merge_into_one_batch_and_each_gets_its_rows() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        tasks = [asyncio.ensure_future(b.submit(rows(10 * i, 1))) for i in range(6)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        outs = await asyncio.gather(*tasks)
        await first
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out[0], rows(10 * i, 1) * 2)
            assert out[1].tolist() == [3 * 10 * i]

    metrics = run_with(runner, body)
    assert [len(x) for x in runner.batches] == [1, 6]
    assert sample_value(metrics, "vae_rows_total", model="encoder") == 7
    assert sample_value(metrics, "vae_batches_total", model="encoder") == 2


def test_a_request_larger_than_max_batch_size_is_split_and_reassembled_in_order() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        out = await b.submit(rows(0, 21))
        np.testing.assert_array_equal(out[0], rows(0, 21) * 2)
        np.testing.assert_array_equal(out[1], rows(0, 21).sum(axis=1))

    run_with(runner, body, max_batch_size=8)
    assert [len(x) for x in runner.batches] == [8, 8, 5]


def test_split_requests_share_batches_with_their_neighbours_without_mixing_rows() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        sizes = [3, 7, 2, 9, 1]
        starts = np.cumsum([0, *sizes])[:-1] * 100
        tasks = [asyncio.ensure_future(b.submit(rows(int(s), n))) for s, n in zip(starts, sizes)]
        await asyncio.sleep(0.01)
        runner.gate.set()
        outs = await asyncio.gather(*tasks)
        await first
        for s, n, out in zip(starts, sizes, outs):
            np.testing.assert_array_equal(out[0], rows(int(s), n) * 2)

    run_with(runner, body, max_batch_size=8)
    assert [len(x) for x in runner.batches] == [1, 8, 8, 6]


def test_a_full_queue_rejects_at_once_without_queueing() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        queued = asyncio.ensure_future(b.submit(rows(0, 60)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="max-queue-rows 64"):
            await b.submit(rows(100, 5))
        assert b.queued_rows == 60
        runner.gate.set()
        await queued
        await first

    metrics = run_with(runner, body)
    assert sample_value(metrics, "vae_rejections_total", model="encoder", reason="queue_full") == 1
    assert all(100 not in x for x in runner.batches)


def test_a_request_whose_deadline_passes_in_the_queue_is_dropped_before_compute() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        deadline = time.monotonic() + 0.005  # the batcher's clock
        late = asyncio.ensure_future(b.submit(rows(77, 2), deadline=deadline))
        ok = asyncio.ensure_future(b.submit(rows(5, 1)))
        await asyncio.sleep(0.02)
        runner.gate.set()
        with pytest.raises(DeadlineExpired, match="not computed"):
            await late
        await ok
        await first

    metrics = run_with(runner, body)
    assert all(77 not in x for x in runner.batches)
    assert sample_value(metrics, "vae_rejections_total", model="encoder", reason="deadline") == 1
    assert sample_value(metrics, "vae_rows_total", model="encoder") == 2


def test_a_cancelled_request_is_dropped_before_compute() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        gone = asyncio.ensure_future(b.submit(rows(55, 3)))
        await asyncio.sleep(0)
        gone.cancel()
        ok = asyncio.ensure_future(b.submit(rows(5, 1)))
        await asyncio.sleep(0.01)
        runner.gate.set()
        await ok
        await first
        assert gone.cancelled()

    metrics = run_with(runner, body)
    assert all(55 not in x for x in runner.batches)
    assert sample_value(metrics, "vae_rejections_total", model="encoder", reason="cancelled") == 1




def test_a_request_that_fails_is_freed_without_the_cyclic_garbage_collector() -> None:
    """The error `submit` raises is also its future's; the future must not keep the frame (and x) alive."""
    import gc
    import weakref

    runner = FakeRunner()
    gc.disable()
    try:
        async def body(b: Batcher) -> None:
            first = await hold_runner_busy(b, runner)
            x = rows(0, 2)
            ref = weakref.ref(x)
            task = asyncio.ensure_future(b.submit(x, deadline=0.0))  # expired before its turn
            del x
            runner.gate.set()
            await first
            with pytest.raises(DeadlineExpired):
                await task
            del task
            assert ref() is None

        run_with(runner, body)
    finally:
        gc.enable()


def test_closing_fails_queued_requests_with_shutting_down() -> None:
    runner = FakeRunner()

    async def main() -> None:
        b = Batcher(runner, max_batch_size=4, max_queue_delay_us=0, max_queue_rows=64)
        b.start()
        first = await hold_runner_busy(b, runner)
        queued = asyncio.ensure_future(b.submit(rows(0, 2)))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0.01)
        runner.gate.set()
        await closing
        with pytest.raises(ShuttingDown):
            await queued
        first.cancel()
        with pytest.raises(ShuttingDown):
            await b.submit(rows(0, 1))

    asyncio.run(main())


def test_queue_delay_lets_a_partial_batch_wait_for_arrivals_still_coming() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        a = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0)

        async def trickle() -> None:
            for i in range(3):
                await asyncio.sleep(0)
                await b.submit(rows(10 + i, 1))

        t = asyncio.ensure_future(trickle())
        runner.gate.set()
        await asyncio.gather(a, first, t)

    run_with(runner, body, max_queue_delay_us=1_000_000)
    assert sum(len(x) for x in runner.batches) == 5


def test_a_partial_batch_keeps_gathering_arrivals_until_the_queue_delay_passes() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        first = await hold_runner_busy(b, runner)
        second = asyncio.ensure_future(b.submit(rows(0, 1)))  # queued behind the busy runner
        await asyncio.sleep(0.005)
        runner.gate.set()
        await first
        await asyncio.sleep(0.02)  # well after the run ended, but within the 200 ms delay
        third = await b.submit(rows(1, 1))
        np.testing.assert_array_equal(third[0], rows(1, 1) * 2)
        np.testing.assert_array_equal((await second)[0], rows(0, 1) * 2)

    run_with(runner, body, max_queue_delay_us=200_000)
    assert [len(x) for x in runner.batches] == [1, 2]  # the second and third requests shared one run


def test_a_batch_that_fills_while_gathering_runs_without_waiting_out_the_delay() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        loop = asyncio.get_running_loop()
        first = await hold_runner_busy(b, runner)
        second = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0.005)
        runner.gate.set()
        await first
        await asyncio.sleep(0.005)  # the gatherer is now waiting on its 30 s timer
        t0 = loop.time()
        await b.submit(rows(1, 3))  # fills the batch: 1 + 3 rows = max_batch_size
        await second
        assert loop.time() - t0 < 1.0

    run_with(runner, body, max_batch_size=4, max_queue_delay_us=30_000_000)
    assert [len(x) for x in runner.batches] == [1, 4]


def test_a_batch_stops_at_the_preferred_size_and_runs_without_waiting_out_the_delay() -> None:
    runner = FakeRunner()

    async def body(b: Batcher) -> None:
        loop = asyncio.get_running_loop()
        first = await hold_runner_busy(b, runner)
        queued = [asyncio.ensure_future(b.submit(rows(10 * i, n))) for i, n in enumerate((2, 3, 4, 1))]
        await asyncio.sleep(0.005)
        t0 = loop.time()
        runner.gate.set()  # 10 rows queued: 2 + 3 reach the preferred 4, then 4; the last row waits its turn
        await first
        outs = await asyncio.gather(*queued[:3])
        assert loop.time() - t0 < 1.0  # the batches of the preferred size did not wait out the 30 s delay
        for i, (n, out) in enumerate(zip((2, 3, 4), outs)):
            np.testing.assert_array_equal(out[0], rows(10 * i, n) * 2)
        assert [len(x) for x in runner.batches] == [1, 5, 4]  # never more rows merged past the preferred size
        queued[3].cancel()

    run_with(runner, body, max_batch_size=8, preferred_batch_size=4, max_queue_delay_us=30_000_000)


def test_a_preferred_size_over_the_max_is_refused() -> None:
    with pytest.raises(ValueError, match="preferred_batch_size"):
        Batcher(FakeRunner(), max_batch_size=4, max_queue_delay_us=0, max_queue_rows=8, preferred_batch_size=5)


class ThreadRecordingRunner(FakeRunner):
    """A FakeRunner that records which thread ran each batch."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(fail)
        self.threads: list[str] = []

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.threads.append(threading.current_thread().name)
        return super().run(x)


def test_small_batches_run_on_the_event_loop_and_larger_ones_on_the_runner_thread() -> None:
    runner = ThreadRecordingRunner()

    async def body(b: Batcher) -> None:
        small = await b.submit(rows(0, 2))       # <= inline_rows: on the event loop
        large = await b.submit(rows(10, 5))      # > inline_rows: on the runner thread
        np.testing.assert_array_equal(small[0], rows(0, 2) * 2)
        np.testing.assert_array_equal(large[0], rows(10, 5) * 2)
        # Arrivals while an inline batch is being handled still merge into the next batch.
        outs = await asyncio.gather(*(b.submit(rows(20 + i, 1)) for i in range(3)))
        for i, out in enumerate(outs):
            np.testing.assert_array_equal(out[0], rows(20 + i, 1) * 2)

    metrics = run_with(runner, body, inline_rows=3)
    loop_thread = threading.main_thread().name
    assert runner.threads[:2] == [loop_thread, "runner-fake"]
    assert all(t == loop_thread for t in runner.threads[2:])
    assert sum(len(x) for x in runner.batches) == 10
    assert sample_value(metrics, "vae_rows_total", model="encoder") == 10


@pytest.mark.parametrize("inline_rows", [0, 4])  # on the runner thread, on the event loop
def test_a_failing_run_fails_its_requests_and_the_batcher_keeps_serving(inline_rows: int) -> None:
    runner = ThreadRecordingRunner(fail=True)

    async def body(b: Batcher) -> None:
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit(rows(0, 2))
        runner.fail = False
        out = await b.submit(rows(3, 1))
        np.testing.assert_array_equal(out[0], rows(3, 1) * 2)

    run_with(runner, body, inline_rows=inline_rows)
    assert runner.threads == [threading.main_thread().name if inline_rows else "runner-fake"] * 2


def test_non_finite_outputs_of_an_inline_run_fail_only_their_request() -> None:
    class Overflowing(ThreadRecordingRunner):
        """Rows holding a value over 500 come out as Inf, as an overflowing model's would."""

        def run(self, x: np.ndarray) -> list[np.ndarray]:
            outs = super().run(x)
            return [np.where(x > 500, np.float32(np.inf), outs[0]), outs[1]]

    runner = Overflowing()

    async def body(b: Batcher) -> None:
        bad = rows(0, 1)
        bad[0, 1] = 999
        # Submitted in one event-loop pass: one batch of three.
        done = await asyncio.gather(*(b.submit(x) for x in (rows(5, 1), bad, rows(7, 1))), return_exceptions=True)
        first, second, third = done
        assert isinstance(first, list) and isinstance(third, list)
        np.testing.assert_array_equal(first[0], rows(5, 1) * 2)
        assert isinstance(second, InvalidInput) and "row 0" in str(second)
        np.testing.assert_array_equal(third[0], rows(7, 1) * 2)

    run_with(runner, body, inline_rows=8)
    assert [len(x) for x in runner.batches] == [3]
    assert runner.threads == [threading.main_thread().name]
