"""Dynamic batching, one `Batcher` per model, counting rows, not requests.

    submit(x) / enqueue(x, done) --queue (requests, bounded in rows)--> runner --> one ORT run per batch

- Idle runner: a request is handed to the runner thread at the end of the current event-loop pass
  (`call_soon`, microseconds; no timer), together with any others that became ready in that pass;
  batching adds no latency at low load.
- Busy runner: arrivals accumulate in the queue while ONNX Runtime runs in the runner thread (it
  releases the GIL, so the event loop keeps receiving). When the run ends, what is queued becomes the
  next batch: requests from the head until the batch has `preferred_batch_size` rows (Triton's term),
  never more than `max_batch_size`. If the queue holds fewer than `preferred_batch_size` rows, it keeps
  gathering until it does or `max_queue_delay_us` has passed since the oldest queued request arrived: one
  event-loop pass at a time while the remaining wait is under a millisecond (asyncio timers are
  millisecond-grained), on a timer beyond that. Stopping at the first pass without an arrival would
  keep batches at ~2 rows on one core, where the event loop itself is the bottleneck. Past the preferred
  size neither waiting nor merging pays on the CPU: ONNX Runtime's cost per row is flat from ~32 rows
  (benchmarks.ort_ceiling), while merging copies every row once more.
- Small batches on the CPU (at most `inline_rows` rows; every batch with the native gRPC front end, which
  receives outside the loop) run on the event loop itself: the hand-off to the runner thread and back
  costs more than ONNX Runtime's run of a few rows. Larger ones go to the runner thread, so the loop keeps
  receiving. An inline run's results are handled one pass later, so that pass's arrivals join the next.
- A request larger than `max_batch_size` rows is split across consecutive batches and reassembled in
  order; a batch may end with the head of one request and start with the tail of another.
- Back-pressure: more than `max_queue_rows` queued rows -> QueueFull at once, nothing queued.
- A request whose deadline passed or whose caller went away (a cancelled `submit`, `Ticket.cancel`) while
  it queued is dropped when its turn comes, never computed.

The runner is anything with `name` and `run(x) -> list[np.ndarray]` (`serving.runtime.OrtRunner`, or a
fake in tests); `run` executes on one dedicated thread per batcher, never on the event loop. The thread
hands each finished batch back through a pipe the event loop watches (`add_reader`; `call_soon_threadsafe`
lost wake-ups under uvloop here); the loop delivers the results and dispatches the next batch at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from serving.errors import DeadlineExpired, InvalidInput, QueueFull, ShuttingDown
from serving.metrics import ModelMetrics
from serving.tensors import nonfinite_rows

logger = logging.getLogger(__name__)

Outputs = list[np.ndarray]

_TIMER_RESOLUTION_S = 1e-3  # below this remaining wait the gatherer yields loop passes, not a timer
# The batcher's clock (queue delay, queue wait, deadlines); not `loop.time()`, whose uvloop ticks are 1 ms.
_now = time.monotonic


class Runner(Protocol):
    """What the batcher runs: one input of shape (B, ...) -> outputs of shape (B, ...) each."""

    name: str

    def run(self, x: np.ndarray) -> Outputs: ...


Done = Callable[[Outputs | BaseException], None]  # told a request's outputs (each (n, ...)) or its error


class _Request:
    """One queued request; `taken` rows of it have gone into batches so far. It ends exactly once: `done`
    is called with its outputs or its error, on the event loop."""

    __slots__ = ("deadline", "done", "ended", "n", "parts", "t_enqueue", "taken", "x")

    def __init__(self, x: np.ndarray, done: Done, deadline: float | None, t_enqueue: float) -> None:
        self.x = x
        self.done = done
        self.ended = False  # answered, failed, or abandoned by its caller (`Ticket.cancel`)
        self.n: int = x.shape[0]
        self.taken = 0
        self.deadline = deadline
        self.t_enqueue = t_enqueue
        self.parts: Outputs | None = None  # the whole outputs of a request split across batches

    def end(self, result: Outputs | BaseException) -> None:
        if not self.ended:
            self.ended = True
            self.parts = None
            self.done(result)


class Ticket:
    """A queued request as its submitter holds it: `cancel` drops it (never computed if still queued; its
    `done` is not called)."""

    __slots__ = ("_req",)

    def __init__(self, req: _Request) -> None:
        self._req = req

    def cancel(self) -> None:
        self._req.ended = True


# (request, first row, row count): a slice of one request inside a batch.
_Slice = tuple[_Request, int, int]


class Batcher:
    """Merges concurrent requests for one model into ONNX Runtime runs of up to `max_batch_size` rows.

    Everything but `Runner.run` happens on the event loop thread; `start` binds the batcher to the
    running loop.
    """

    def __init__(self, runner: Runner, *, max_batch_size: int, max_queue_delay_us: int,
                 max_queue_rows: int, metrics: ModelMetrics | None = None, inline_rows: int = 0,
                 preferred_batch_size: int = 0) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_queue_delay_us < 0 or inline_rows < 0 \
                or not 0 <= preferred_batch_size <= max_batch_size:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1, max_queue_delay_us and "
                             "inline_rows >= 0, preferred_batch_size in [0, max_batch_size]")
        self.runner = runner
        self.name = runner.name
        self._input_name: str = getattr(runner, "input_name", "input")  # named in errors
        self.max_batch_size = max_batch_size
        # A batch stops taking requests, and stops waiting for more, once it has this many rows (0: the max).
        self.preferred_batch_size = preferred_batch_size or max_batch_size
        self.max_queue_rows = max_queue_rows
        self._delay_s = max_queue_delay_us * 1e-6
        self._inline_rows = inline_rows  # batches of at most this many rows run on the event loop
        self._m = metrics
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._busy = False  # a batch is on the runner thread (or about to be dispatched)
        self._jobs: queue.SimpleQueue[tuple[list[_Slice], int] | None] = queue.SimpleQueue()
        self._results: deque[tuple[list[_Slice], int, Outputs | BaseException, float, np.ndarray | None]] = deque()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        self._gather_timer: asyncio.TimerHandle | None = None
        if metrics is not None:  # read when /metrics is scraped: no per-request cost
            metrics.live(metrics.queue_rows, lambda: self._queued_rows)
            metrics.live(metrics.queue_requests, lambda: len(self._queue))

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        """Bind to the running event loop and start the runner thread."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._loop.add_reader(self._wake_r, self._on_wake)
        self._thread = threading.Thread(target=self._runner_thread, name=f"runner-{self.name}", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop taking work; let a run in progress finish; fail anything still queued with ShuttingDown."""
        self._closed = True
        gathering = self._gather_timer is not None
        if self._gather_timer is not None:
            self._gather_timer.cancel()
            self._gather_timer = None
        while self._queue:
            self._queue.popleft().end(ShuttingDown("the server is shutting down"))
        self._queued_rows = 0
        if gathering:
            self._dispatch()  # the cancelled gather would have: with the queue empty, this goes idle
        if self._idle is not None:
            await self._idle.wait()
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._loop is not None and self._wake_r >= 0:
            self._loop.remove_reader(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    async def submit(self, x: np.ndarray, deadline: float | None = None) -> Outputs:
        """Queue x (n, ...) and wait for its outputs, each (n, ...), in the runner's output order.

        `deadline` is in `time.monotonic()`'s clock; a request still queued at its deadline is dropped
        with DeadlineExpired. Cancelling the awaiting task drops the request if it is still queued.
        """
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        fut: asyncio.Future[Outputs] = loop.create_future()

        def done(result: Outputs | BaseException) -> None:
            if not fut.done():
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

        ticket = self.enqueue(x, done, deadline)
        try:
            return await fut
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        except BaseException:
            # The error raised here (DeadlineExpired, ...) is also the future's, and its traceback holds this
            # frame, which holds the future: a cycle that would keep x, and every caller's frame and rows,
            # until the cyclic collector runs. Letting go of the future breaks it.
            fut = None  # type: ignore[assignment]
            raise

    def enqueue(self, x: np.ndarray, done: Done, deadline: float | None = None) -> Ticket:
        """Queue x (n, ...); `done(outputs or error)` is called once, on the event loop, when it ends.

        The callback form of `submit`, for front ends that handle calls in batches (serving.native): no
        future or task per request. Raises ShuttingDown or QueueFull at once (nothing queued, `done` not
        called).
        """
        n = x.shape[0]
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        if self._queued_rows + n > self.max_queue_rows:
            if self._m is not None:
                self._m.rejected["queue_full"].inc()
            raise QueueFull(f"{self.name} queue: {self._queued_rows} rows queued, {n} more would exceed "
                            f"--max-queue-rows {self.max_queue_rows}; retry later")
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        req = _Request(x, done, deadline, _now())
        self._queue.append(req)
        self._queued_rows += n
        if not self._busy:
            # Idle runner: this request starts at the end of the current event-loop pass (microseconds),
            # so requests that became ready in the same pass share its run.
            self._busy = True
            loop.call_soon(self._dispatch)
        elif self._gather_timer is not None and self._queued_rows >= self.preferred_batch_size:
            self._gather_timer.cancel()  # the batch being gathered has its preferred size: run it now
            self._gather_timer = None
            loop.call_soon(self._dispatch)
        return Ticket(req)

    # -- event loop side -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Take the next batch from the queue and hand it to the runner thread (or go idle)."""
        assert self._loop is not None and self._idle is not None
        batch, rows = self._take(_now())
        if batch:
            self._busy = True
            if self._idle.is_set():
                self._idle.clear()
            if rows <= self._inline_rows:
                # Handled on the next pass, like a thread's result, even with nothing queued: the batcher
                # stays busy for that pass, so what arrives in it is gathered into the next batch instead
                # of each arrival finding an idle runner and running alone (delivering at once cut C = 64
                # to one row per run, 0.66x the requests/s).
                self._loop.call_soon(self._finished, batch, rows, *self._execute(batch, rows))
            else:
                self._jobs.put((batch, rows))
        else:
            self._busy = False
            self._idle.set()

    def _gather_then_dispatch(self) -> None:
        """Let a partial batch fill until it is full or the oldest queued request has waited the delay."""
        loop = self._loop
        assert loop is not None
        self._gather_timer = None
        q = self._queue
        remaining = self._delay_s - (_now() - q[0].t_enqueue) if q else 0.0
        if self._queued_rows >= self.preferred_batch_size or remaining <= 0:
            self._dispatch()
        elif remaining < _TIMER_RESOLUTION_S:
            loop.call_soon(self._gather_then_dispatch)  # one pass: receive whatever is ready, then look again
        else:
            # Sleep in the event loop (it keeps receiving); `submit` cuts this short when the batch fills.
            self._gather_timer = loop.call_later(remaining - _TIMER_RESOLUTION_S / 2, self._gather_then_dispatch)

    def _on_wake(self) -> None:
        """The runner thread finished a batch: drain the pipe, then handle the results."""
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        while self._results:
            self._finished(*self._results.popleft())

    def _finished(self, batch: list[_Slice], rows: int, outs: Outputs | BaseException, dt: float,
                  bad: np.ndarray | None) -> None:
        """Back on the event loop after a run: deliver results, then start the next batch at once."""
        if isinstance(outs, BaseException):
            logger.error("%s: run of %d rows failed", self.name, rows, exc_info=outs)
            for req, _, _ in batch:
                req.end(outs)
        else:
            if self._m is not None:
                self._m.compute(dt)
                self._m.batch_size(rows)
                self._m.rows.inc(rows)
                self._m.batches.inc()
            self._deliver(batch, outs, bad)
        q = self._queue
        if q and self._delay_s > 0 and self._queued_rows < self.preferred_batch_size:
            # A partial batch: requests answered just now are likely to send their next one; let
            # whatever is already arriving join, for one event-loop pass at a time.
            assert self._loop is not None
            self._loop.call_soon(self._gather_then_dispatch)
        else:
            self._dispatch()

    def _take(self, now: float) -> tuple[list[_Slice], int]:
        """Pop requests from the queue head until the batch has preferred_batch_size rows (at most
        max_batch_size: the last one may be split), dropping expired and cancelled requests."""
        batch: list[_Slice] = []
        rows = 0
        q, m = self._queue, self._m
        while q and rows < self.preferred_batch_size:
            req = q[0]
            expired = req.deadline is not None and now >= req.deadline
            if expired or req.ended:
                q.popleft()
                self._queued_rows -= req.n - req.taken
                if not req.ended:
                    req.end(DeadlineExpired(
                        f"{self.name}: the deadline passed after {1e3 * (now - req.t_enqueue):.1f} ms in "
                        f"the queue; not computed"))
                if m is not None and req.taken == 0:
                    m.rejected["deadline" if expired else "cancelled"].inc()
                continue
            if req.taken == 0 and m is not None:
                m.queue_wait(now - req.t_enqueue)
            count = min(req.n - req.taken, self.max_batch_size - rows)
            batch.append((req, req.taken, count))
            req.taken += count
            rows += count
            self._queued_rows -= count
            if req.taken == req.n:
                q.popleft()
        return batch, rows

    def _deliver(self, batch: list[_Slice], outs: Outputs, bad: np.ndarray | None = None) -> None:
        """Hand each request its rows (views into the batch outputs); reassemble split requests.

        A request with a non-finite output row (`bad`) fails with InvalidInput instead: never NaN under OK.
        """
        offset = 0
        for req, start, count in batch:
            end = offset + count
            if req.ended:
                offset = end
                continue
            if bad is not None and bad[offset:end].any():
                row = start + int(np.flatnonzero(bad[offset:end])[0])
                req.end(InvalidInput(
                    self._input_name, "values the model maps to finite outputs",
                    f"row {row}, whose {self.name} outputs overflow float32 (NaN or Inf)", self.name))
            elif start == 0 and count == req.n:
                req.end([o[offset:end] for o in outs])
            else:
                # A split request: its outputs are allocated once and filled batch by batch (one
                # copy; collecting parts and concatenating them would hold each output twice).
                if req.parts is None:
                    req.parts = [np.empty((req.n, *o.shape[1:]), dtype=o.dtype) for o in outs]
                for whole, o in zip(req.parts, outs):
                    whole[start:start + count] = o[offset:end]
                if start + count == req.n:
                    req.end(req.parts)
            offset = end

    # -- runner thread ---------------------------------------------------------------------------

    def _runner_thread(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch, rows = job
            self._results.append((batch, rows, *self._execute(batch, rows)))  # deque.append: thread-safe
            try:
                os.write(self._wake_w, b"\0")
            except OSError:  # the pipe is closed: nobody is waiting any more
                return

    def _execute(self, batch: list[_Slice], rows: int) -> tuple[Outputs | BaseException, float, np.ndarray | None]:
        """Run one batch (runner thread, or the event loop for a small one): its outputs or the error it
        failed with, the run's duration, and which rows came out non-finite."""
        try:
            outs, dt = self._compute(batch, rows)
            return outs, dt, nonfinite_rows(outs)
        except Exception as e:  # noqa: BLE001  # the run failed: every request in this batch fails with it
            return e, 0.0, None

    def _compute(self, batch: list[_Slice], rows: int) -> tuple[Outputs, float]:
        """Assemble the batch input (B, ...) and run the model once."""
        if len(batch) == 1 and batch[0][1] == 0 and batch[0][2] == batch[0][0].n:
            x = batch[0][0].x  # one whole request: no copy
        else:
            x = np.concatenate([req.x[start:start + count] for req, start, count in batch])
        t0 = time.perf_counter()
        outs = self.runner.run(x)
        dt = time.perf_counter() - t0
        for o in outs:
            if o.shape[0] != rows:
                raise RuntimeError(f"{self.name}: runner returned {o.shape[0]} rows for {rows}")
        return outs, dt
