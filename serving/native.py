"""The native gRPC front end (`--grpc-frontend native`, the default): calls reach Python in batches.

    clients --HTTP/2--> pygrpc-native (tonic/hyper on a tokio thread, no GIL)
                          |  unary calls of VaeService, GRPCInferenceService, Health/Check
                          v
              receiver thread: recv_batch(...) -> inbox --pipe--> event loop: `_handle(events)`
                          |  per call: size, concurrency and drain checks, parse, validate (the adapters'
                          |  own `batched` functions), `Batcher.enqueue(x, call.done)`: no task, no future
                          v
              the batchers (serving.batcher, shared with grpcio and HTTP) run many calls' rows at once
                          v
              `_NativeCall.done(outputs)` -> the adapter's answer bytes -> `respond(call_id, bytes)`

What the front does not serve natively (bidirectional streams, Health/Watch, server reflection, unknown
methods) it hands, over HTTP/2, to a grpcio server on a private Unix socket (`set_fallback`), which
serves the same adapters through `serving.rpc`: clients see one port with every service.

Per call, the hot path (`batched` methods: OIP ModelInfer, vae.v1 Encode, Decode, Sample) costs a
`_NativeCall` (the one request wrapper, `serving.scope.RequestScope`: metrics, lease, deadline) and the
adapter's parse and checks; the other unary methods (metadata, readiness, GetModelInfo, Reconstruct, Score,
Health/Check) run as one asyncio task each, through the same adapters' coroutines, as does ModelInfer of
the OIP model `score` (two batcher runs in a row: the adapter hands back a `serving.core.Job`).

Contracts, the same as on the grpcio front end (tests run both):
- a request over --max-message-bytes is refused with RESOURCE_EXHAUSTED before it is parsed, and its
  bytes are dropped at once. pygrpc-native 0.5.0 has no receive limit of its own, so the request has
  been received whole by then (see budget.py for the worst case; the deployment caps it at the proxy);
- --max-concurrent-rpcs: calls beyond it get RESOURCE_EXHAUSTED at once;
- deadlines come from `grpc-timeout`: the front answers DEADLINE_EXCEEDED itself when one passes and
  tells us (a cancel event); a call still queued is then dropped, never computed. A client's cancel
  drops queued work the same way;
- drain (`stop`): new calls get UNAVAILABLE, calls in flight get the grace period, then the port closes.
No TLS in pygrpc-native 0.5.0: with --tls-* the server runs the grpcio front end (serving.server).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from google.protobuf.descriptor import ServiceDescriptor
from pygrpc_native import EVENT_CALL, NativeGrpcFront

from serving.batcher import Batcher, Outputs, Ticket
from serving.budget import current_lease
from serving.core import Job, Work
from serving.dataplane import DataPlane
from serving.errors import RequestTooLarge, ShuttingDown, TooManyRpcs
from serving.metrics import MethodMetrics
from serving.rpc import Adapter, check_size, parse_request, parser_of, wire
from serving.scope import RequestScope

logger = logging.getLogger(__name__)

# grpc-timeout units (gRPC over HTTP/2: "TimeoutValue TimeoutUnit", at most 8 digits).
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


def grpc_timeout_s(value: bytes) -> float:
    """A `grpc-timeout` header's seconds ("100m" -> 0.1). The front has already refused malformed ones
    (it enforces the deadline itself); anything unreadable here counts as no time left."""
    try:
        return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]
    except (KeyError, ValueError, IndexError):
        return 0.0


# Calls taken from the front per trip across the GIL; a trip waits at most RECV_TIMEOUT_MS (so that
# `stop` is noticed even when no call comes).
MAX_EVENTS = 512
RECV_TIMEOUT_MS = 100


@dataclass(frozen=True)
class _Method:
    """One unary method served natively: how its requests parse and what runs them."""

    path: str
    mm: MethodMetrics
    parse: Callable[[bytes], Any]
    request_type: str
    batched: Callable[[Any, Any], Work | Job] | None  # the hot path: request, lease -> the batcher run
    impl: Callable[[Any, Any], Any]             # otherwise: the adapter's coroutine (request, context)


class _NativeCall(RequestScope):
    """One call in flight: the request wrapper plus its id, and what to answer with. It is also the
    context the adapters' coroutines see (they only ask it for `time_remaining`)."""

    __slots__ = ("call_id", "finish", "front", "group", "task")

    def __init__(self, front: NativeFront, mm: MethodMetrics, deadline: float | None, call_id: int) -> None:
        super().__init__(mm, front.plane.budget, deadline)
        self.front = front
        self.call_id = call_id
        self.group: _Group | None = None
        self.task: asyncio.Task[None] | None = None
        self.finish: Callable[[Outputs], Any] | None = None

    def done(self, result: Outputs | BaseException) -> None:
        """The batcher's answer (event loop): write the response, or the error's status."""
        front = self.front
        front.calls.pop(self.call_id, None)
        self.group = None  # call <-> group is a reference cycle: broken here, the rows go with refcounting
        if isinstance(result, BaseException):
            # Not raised here: a raised exception's traceback holds this frame, which holds the exception
            # (a cycle), and with it every frame up to the batcher's, each holding requests' rows, until
            # the cyclic collector runs.
            front.fail(self, result)
            return
        try:
            assert self.finish is not None
            out = check_size(wire(self.finish(result)), front.max_message_bytes)
        except Exception as e:  # noqa: BLE001  # every error becomes its status (INTERNAL if unexpected, logged)
            front.fail(self, e)
            return
        self.ok()
        front.native.respond(self.call_id, out)
        front.check_idle()

    def drop(self) -> None:
        """Drop this call's work: its share of a queued group (dropped with the last member) or its task."""
        if self.group is not None:
            self.group.leave()
            self.group = None
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def abandon(self) -> None:
        """The client went away or its deadline passed (the front has answered it): drop the work."""
        self.drop()
        self.cancelled()


class _Group:
    """The hot calls of one batch of events for one model: their rows, concatenated, are one batcher request
    (one queue entry, one deadline check, one slice of a run), and each call gets its rows of the outputs.

    The group's deadline is its members' latest (none if one has none): a member whose deadline passes
    is answered DEADLINE_EXCEEDED by the front and left out, the others still run. The request is dropped
    from the queue once every member has gone (cancelled or expired): never computed then.
    """

    __slots__ = ("calls", "live", "ticket", "xs")

    def __init__(self) -> None:
        self.calls: list[tuple[_NativeCall, int]] = []  # (call, its rows), in row order
        self.xs: list[np.ndarray] = []                  # their inputs, in the same order
        self.live = 0
        self.ticket: Ticket | None = None

    def leave(self) -> None:
        self.live -= 1
        if self.live == 0 and self.ticket is not None:
            self.ticket.cancel()
            self._release()

    def _release(self) -> None:
        """Drop the calls and the queued request: group -> calls -> group and group -> ticket -> request
        -> `done` -> group are reference cycles, which would keep every input array alive until the
        cyclic garbage collector runs (rarely: serving.server raises its threshold)."""
        self.calls = []
        self.ticket = None

    def done(self, result: Outputs | BaseException) -> None:
        calls = self.calls
        self._release()
        if isinstance(result, BaseException):
            for call, _ in calls:
                if not call.ended:
                    call.done(result)
            return
        start = 0
        for call, rows in calls:
            end = start + rows
            if not call.ended:
                call.done([o[start:end] for o in result])
            start = end


def _enqueue(batcher: Batcher, members: list[tuple[_NativeCall, Work]]) -> None:
    """Queue one model's hot calls of a batch of events as few requests (see `_Group`): consecutive calls
    together until the group has --preferred-batch-size rows, never over --max-batch-size (a larger call
    alone), so that a group never holds more rows than its calls would one by one, nor is refused by a
    queue that would have taken each of them; past the preferred size, merging would only copy."""
    limit, preferred = batcher.max_batch_size, batcher.preferred_batch_size
    group, rows = _Group(), 0
    for call, work in members:
        n = work.x.shape[0]
        if group.calls and (rows >= preferred or rows + n > limit):
            _submit(batcher, group)
            group, rows = _Group(), 0
        group.calls.append((call, n))
        group.xs.append(work.x)
        call.group = group
        rows += n
    _submit(batcher, group)


def _submit(batcher: Batcher, group: _Group) -> None:
    """Queue `group` (its calls' inputs concatenated); refused (QueueFull, ShuttingDown): each call fails."""
    calls = group.calls
    group.live = len(calls)
    deadline: float | None = 0.0
    for call, _ in calls:
        deadline = None if deadline is None or call.deadline is None else max(deadline, call.deadline)
    x = group.xs[0] if len(calls) == 1 else np.concatenate(group.xs)  # (rows of every call, ...): one copy
    group.xs = []
    try:
        group.ticket = batcher.enqueue(x, group.done, deadline)
    except Exception as e:  # noqa: BLE001  # QueueFull, ShuttingDown: every member gets it
        group._release()
        for call, _ in calls:
            call.front.calls.pop(call.call_id, None)
            call.front.fail(call, e)


class NativeFront:
    """The gRPC port served by pygrpc-native, over the data plane; see the module docstring."""

    def __init__(self, plane: DataPlane, services: Sequence[tuple[ServiceDescriptor, Adapter]],
                 max_concurrent_streams: int, reuse_port: bool = False) -> None:
        config = plane.config
        self.plane = plane
        self.metrics = plane.metrics
        self.max_message_bytes = config.max_message_bytes
        self.max_concurrent_rpcs = config.max_concurrent_rpcs
        self.calls: dict[int, _NativeCall] = {}
        self.closing = False
        self._methods: list[_Method] = []
        for service, adapter in services:
            batched: Mapping[str, Callable[[Any, Any], Work | Job]] = getattr(adapter, "batched", {})
            for method in service.methods:
                if method.client_streaming or method.server_streaming:
                    continue  # the fallback serves it
                name = method.name
                self._methods.append(_Method(
                    f"/{service.full_name}/{name}", adapter.metrics.method_metrics(name), parser_of(adapter, method),
                    method.input_type.full_name, batched.get(name), getattr(adapter, name)))
        self.native = NativeGrpcFront(
            f"{config.host}:{config.port}", [(m.path, False) for m in self._methods],
            # Each event's client key is the call's `grpc-timeout` header (bytes), or the peer (str) when it has
            # none: the deadline without the whole metadata and peer turned into Python objects per call.
            io_threads=config.grpc_io_threads, client_key_metadata="grpc-timeout", reuse_port=reuse_port,
            max_concurrent_streams=max_concurrent_streams,
            keepalive_permit_without_calls=False)  # as grpc-core servers: ping only connections with calls
        self.port = self.native.bound_port
        self._inbox: deque[list[Any]] = deque()
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def set_fallback(self, socket_path: str) -> None:
        """Where calls this front does not serve go (a grpcio server on a Unix socket)."""
        self.native.set_fallback(socket_path)

    def start(self) -> None:
        """Start taking calls; the event loop running now handles them."""
        self._loop = loop = asyncio.get_running_loop()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        loop.add_reader(self._wake_r, self._on_wake)
        self.native.start()
        self._thread = threading.Thread(target=self._receive, name="native-grpc-receiver", daemon=True)
        self._thread.start()

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls (UNAVAILABLE) and give those in flight `grace_s`; those left then get
        UNAVAILABLE. The port stays open (`close`) for what the fallback is still answering."""
        self.closing = True
        if self.calls:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace_s)
            except TimeoutError:
                logger.warning("native gRPC: %d calls still in flight after the %.1f s grace period; failing "
                               "them UNAVAILABLE", len(self.calls), grace_s)
        for call in list(self.calls.values()):
            self.calls.pop(call.call_id, None)
            call.drop()
            self.fail(call, ShuttingDown("the server stopped before answering"))  # counted as sent: UNAVAILABLE

    async def close(self) -> None:
        """Close the port and stop the receiver (after `drain`)."""
        self.closing = True
        self.native.close()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._loop is not None and self._wake_r >= 0:
            self._on_wake()  # anything received before the close: answered UNAVAILABLE
            self._loop.remove_reader(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- receiver thread ---------------------------------------------------------------------------

    def _receive(self) -> None:
        """Take calls from the front in batches (the wait is in Rust, GIL released) and wake the loop."""
        native, inbox = self.native, self._inbox
        while True:
            events = native.recv_batch(MAX_EVENTS, RECV_TIMEOUT_MS)
            if events is None:  # closed
                return
            if events:
                inbox.append(events)  # deque.append: thread-safe
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:  # the pipe is closed: stopping
                    return

    # -- event loop ----------------------------------------------------------------------------------

    def _on_wake(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        inbox = self._inbox
        while inbox:
            self._handle(inbox.popleft())

    def _handle(self, events: list[Any]) -> None:
        """One batch of events: start every call (or refuse it), cancel what was cancelled."""
        calls, methods, now = self.calls, self._methods, time.monotonic()
        hot: dict[Batcher, list[tuple[_NativeCall, Work]]] = {}
        for kind, call_id, method_id, payload, key in events:
            if kind != EVENT_CALL:  # a cancel: the client went away or the deadline passed
                call = calls.pop(call_id, None)
                if call is not None:
                    call.abandon()
                    self.check_idle()
                continue
            m = methods[method_id]
            call = _NativeCall(self, m.mm, None if type(key) is not bytes else now + grpc_timeout_s(key), call_id)
            try:
                if self.closing:
                    raise ShuttingDown("the server is shutting down; send to another replica")
                if self.max_concurrent_rpcs and len(calls) >= self.max_concurrent_rpcs:
                    raise TooManyRpcs(f"{len(calls)} calls in flight: --max-concurrent-rpcs "
                                      f"{self.max_concurrent_rpcs}; retry later")
                size = len(payload)
                if size > self.max_message_bytes:
                    raise RequestTooLarge(f"request: {size:,} bytes, over --max-message-bytes "
                                          f"{self.max_message_bytes:,}; send fewer rows per request")
                call.reserve_request(size)
                request = parse_request(m.parse, payload, m.request_type)
                if m.batched is not None:
                    work = m.batched(request, call.lease)
                    if isinstance(work, Job):  # several batcher runs (OIP `score`): a task of its own
                        calls[call_id] = call
                        call.task = asyncio.ensure_future(self._run(call, partial(work.run, call.deadline)))
                        continue
                    call.finish = work.finish
                    calls[call_id] = call
                    members = hot.get(work.batcher)
                    if members is None:
                        hot[work.batcher] = [(call, work)]
                    else:
                        members.append((call, work))
                else:
                    calls[call_id] = call
                    call.task = asyncio.ensure_future(self._run(call, partial(m.impl, request, call)))
            except Exception as e:  # noqa: BLE001  # every error becomes its status (INTERNAL if unexpected)
                calls.pop(call_id, None)
                self.fail(call, e)
        del events, payload
        for batcher, members in hot.items():
            _enqueue(batcher, members)


    async def _run(self, call: _NativeCall, answer: Callable[[], Awaitable[Any]]) -> None:
        """A method off the hot path (the adapter's coroutine, with the call as its context) or a Job."""
        current_lease.set(call.lease)  # this task's own context: the core reserves the response on it
        try:
            out = check_size(wire(await answer()), self.max_message_bytes)
        except asyncio.CancelledError:
            return  # abandoned: the front has answered, `abandon` counted it
        except Exception as e:  # noqa: BLE001
            self.calls.pop(call.call_id, None)
            self.fail(call, e)
            return
        finally:
            call.task = None  # call -> task -> this coroutine -> call: a cycle, broken here
        self.calls.pop(call.call_id, None)
        call.ok()
        self.native.respond(call.call_id, out)
        self.check_idle()

    def fail(self, call: _NativeCall, exc: BaseException) -> None:
        status, message = call.failed(exc, self.metrics)
        self.native.fail(call.call_id, status.grpc.value[0], message)
        self.check_idle()

    def check_idle(self) -> None:
        if self.closing and not self.calls:
            self._idle.set()
