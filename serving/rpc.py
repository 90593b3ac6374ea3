"""The one RPC wrapper: every unary method of every adapter is registered through `add_service`.

An adapter (servicer.py, oip.py) is a class whose methods are named after a service's RPCs and are one
function each: `async def Encode(self, request, context) -> response`. `add_service` wraps each of them
so that, in one place and the same way for every RPC (probes included):

- the request arrives as bytes and is parsed here (by protobuf, or by the adapter's own parser for that
  method, listed in its optional `parsers`): a body that does not parse is INVALID_ARGUMENT with a
  short message (grpcio's own deserializer would answer UNKNOWN and log a traceback per request);
- the response is serialised here (or returned as bytes by the adapter) and refused with
  RESOURCE_EXHAUSTED when it is larger than `--max-message-bytes` (grpcio would fail it after the
  handler returned, with OK in the metrics);
- the outcome is counted (`vae_requests_total{method, code}` with the code actually sent, latency,
  in-flight) and any exception becomes its status code through `serving.errors`' one table;
- an InvalidInput that names its model counts in `vae_rejections_total{reason="invalid"}`
  (all of which, with the lease below and the deadline, is `serving.scope.RequestScope`, the one request
  wrapper that the native front end and the HTTP port use too);
- the RPC holds a lease on the bytes-in-flight budget (`serving.budget`) for its request and response.

Bidirectional streams (`_stream`) reuse all of that per message. An adapter lists its streams in
`streams`: stream method name -> `StreamCodec`, which names the unary method each message goes through
and how a stream message wraps a unary request and response. Every message read from a stream is
parsed, checked and run by that unary method exactly as a unary call would be (same errors, batcher,
limits, bytes-in-flight lease, the stream's deadline), and gets one answer message: the unary response,
or an error message built by the codec from the table's code and text (the stream stays open).
Messages are handled concurrently, so answers may leave out of order (the codec carries the id).
Metrics count each message as one request of the stream method (`vae_requests_total{method=
"ModelStreamInfer"}`), `vae_open_streams` the open streams.

Flow control: a stream holds at most `max_stream_inflight` messages read but not yet written back; at
that many the reader stops reading, so the client's writes stall in HTTP/2 flow control instead of
piling up in server memory. An answer that the client does not read stays in flight (its bytes on the
lease) until it is written. Writes are one at a time per stream: the message task that finds no write
in progress writes every answer queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection, reflection_pb2

from serving.budget import InflightBudget, Lease, current_lease
from serving.errors import InvalidInput, ResponseTooLarge, Status
from serving.metrics import MethodMetrics, Metrics
from serving.scope import RequestScope

logger = logging.getLogger(__name__)

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | bytes]]


@dataclass(frozen=True)
class StreamCodec:
    """How the messages of one bidirectional stream map onto a unary RPC of the same adapter.

    `unary`: the adapter method each message goes through; `inner(msg)`: the unary request inside a
    parsed stream message; `ok(msg, body)`: the serialised answer for the serialised unary response
    `body`; `error(msg, code, text)`: the serialised answer saying that the message failed (`msg` is
    None when it did not parse).
    """

    unary: str
    inner: Callable[[Any], Message]
    ok: Callable[[Any, bytes], bytes]
    error: Callable[[Any | None, grpc.StatusCode, str], bytes]


class Adapter(Protocol):
    """What `add_service` needs of an adapter: its metrics and streams; the RPCs are its methods by name. It
    may also have `parsers`: method name -> a function from the request's bytes to what the method takes
    (raising DecodeError on bytes that do not parse), in place of the request type's FromString."""

    metrics: Metrics

    @property
    def streams(self) -> Mapping[str, StreamCodec]: ...


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in `time.monotonic()`'s clock (the batcher's), or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def parse_request(parse: Callable[[bytes], Any], data: bytes, request_type: str) -> Any:
    try:
        return parse(data)
    except DecodeError:
        raise InvalidInput("request", f"a serialized {request_type}",
                           f"{len(data)} bytes that do not parse as one") from None


def wire(response: Message | bytes) -> bytes:
    """A handler's answer on the wire: adapters may return a message or its serialised bytes."""
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


def check_size(out: bytes, max_response_bytes: int) -> bytes:
    if len(out) > max_response_bytes:
        raise ResponseTooLarge(f"response: {len(out):,} bytes, over --max-message-bytes "
                               f"{max_response_bytes:,}; ask for fewer rows per request")
    return out


def parser_of(adapter: Adapter, method: MethodDescriptor) -> Callable[[bytes], Any]:
    """How the requests of `method` are parsed: the adapter's own parser for it, else protobuf's."""
    own = getattr(adapter, "parsers", {}).get(method.name)
    return own if own is not None else GetMessageClass(method.input_type).FromString


def _unary(method: MethodDescriptor, impl: Handler, mm: MethodMetrics, metrics: Metrics,
           max_response_bytes: int, budget: InflightBudget, parse: Callable[[bytes], Any]
           ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    request_type = method.input_type.full_name

    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        scope = RequestScope(mm, budget, deadline_of(context))
        token = current_lease.set(scope.lease)
        failure: tuple[Status, str] | None = None
        try:
            scope.reserve_request(len(data))
            request = parse_request(parse, data, request_type)
            out = check_size(wire(await impl(request, context)), max_response_bytes)
        except asyncio.CancelledError:
            scope.cancelled()
            raise
        except Exception as e:  # noqa: BLE001  # every error becomes its status (INTERNAL if unexpected, logged)
            failure = scope.failed(e, metrics)
        finally:
            current_lease.reset(token)
        if failure is not None:
            # Abort outside the except block, holding nothing: the abort's exception then keeps no
            # traceback chain to this frame, whose request bytes would otherwise live until a GC cycle.
            del data
            request, out = None, b""
            await context.abort(failure[0].grpc, failure[1])
        scope.ok()
        return out

    return handler


class _Stream:
    """One open stream: messages in flight (read, answer not yet written), answers queued for writing,
    and the reader's wait for room."""

    __slots__ = ("context", "inflight", "pending", "tasks", "waiter", "wake_below", "writing")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context
        self.inflight = 0
        self.pending: deque[tuple[bytes, Lease]] = deque()  # answers waiting for the write in progress
        self.writing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.waiter: asyncio.Future[None] | None = None
        self.wake_below = 0

    async def send(self, out: bytes, lease: Lease) -> None:
        """Write `out`, or queue it behind the write in progress (whose task then writes it)."""
        pending = self.pending
        pending.append((out, lease))
        if self.writing:
            return
        self.writing = True
        try:
            while pending:
                await self.context.write(pending[0][0])
                pending.popleft()[1].release()
                self.inflight -= 1
                w = self.waiter
                if w is not None and self.inflight < self.wake_below and not w.done():
                    w.set_result(None)
        finally:
            self.writing = False

    async def wait_below(self, n: int) -> None:
        """Until fewer than `n` messages are in flight."""
        while self.inflight >= n:
            self.waiter = asyncio.get_running_loop().create_future()
            self.wake_below = n
            try:
                await self.waiter
            finally:
                self.waiter = None

    def abandon(self) -> None:
        """The stream ended early (cancelled, deadline, shutdown): cancel the messages still in work,
        give back what unwritten answers hold."""
        for task in list(self.tasks):
            task.cancel()
        while self.pending:
            self.pending.popleft()[1].release()


def _stream(method: MethodDescriptor, codec: StreamCodec, impl: Handler, mm: MethodMetrics, metrics: Metrics,
            max_response_bytes: int, budget: InflightBudget, max_inflight: int, parse: Callable[[bytes], Any]
            ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
    name = method.name
    request_type = method.input_type.full_name
    inner, ok, error = codec.inner, codec.ok, codec.error

    async def message(st: _Stream, data: bytes, scope: RequestScope) -> None:
        """One message, start to answer: the unary path of `_unary` with the failure as an answer."""
        current_lease.set(scope.lease)  # this task's own context: the core reserves the response on it
        request: Any = None
        try:
            request = parse_request(parse, data, request_type)  # first: even a refusal must carry the id
            scope.reserve_request(len(data))
            body = wire(await impl(inner(request), st.context))
            out = check_size(ok(request, body), max_response_bytes)
        except asyncio.CancelledError:
            scope.cancelled()
            raise
        except Exception as e:  # noqa: BLE001  # every error becomes an answer (INTERNAL if unexpected, logged)
            status, text = scope.failed(e, metrics, release=False)
            out = error(request, status.grpc, text)
        del data, request
        scope.ok(release=False)  # the lease is given back once the answer is written (`_Stream.send`)
        try:
            await st.send(out, scope.lease)
        except Exception as e:  # noqa: BLE001  # the stream has ended under us; its handler cleans up
            logger.debug("%s: answer not written: %r", name, e)

    async def handler(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        st = _Stream(context)
        read, create_task = context.read, asyncio.get_running_loop().create_task
        tasks = st.tasks
        deadline = deadline_of(context)
        mm.streams += 1
        try:
            while True:
                if st.inflight >= max_inflight:
                    await st.wait_below(max_inflight)  # stop reading: HTTP/2 flow control holds the client
                data = await read()
                if data is grpc.aio.EOF:
                    break
                st.inflight += 1
                task = create_task(message(st, data, RequestScope(mm, budget, deadline)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await st.wait_below(1)  # the client half-closed: answer everything read, then end with OK
        except BaseException:
            st.abandon()
            raise
        finally:
            mm.streams -= 1

    return handler


def _server_stream(method: MethodDescriptor, impl: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]],
                   parse: Callable[[bytes], Any]) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[None]]:
    """A server-streaming method (the adapter writes with `context.write`): its request parsed here, so
    that bytes that do not parse are INVALID_ARGUMENT as everywhere else."""
    request_type = method.input_type.full_name

    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            request = parse_request(parse, data, request_type)
        except InvalidInput as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        await impl(request, context)

    return handler


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, adapter: Adapter,
                max_response_bytes: int, budget: InflightBudget, max_stream_inflight: int = 64) -> None:
    """Register every RPC of `service` on `server`: unary ones served by the adapter's method of that
    name, bidirectional streams by the adapter's `streams` codec over its unary method, server streams
    (Health/Watch) by the adapter's method writing to its context."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    streams = adapter.streams
    for method in service.methods:
        if method.server_streaming and not method.client_streaming:  # Health/Watch: parsed here, no metrics
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(method, getattr(adapter, method.name), parser_of(adapter, method)),
                response_serializer=wire)
            continue
        if method.client_streaming or method.server_streaming:
            codec = streams.get(method.name)
            if codec is None or not (method.client_streaming and method.server_streaming):
                raise TypeError(f"{type(adapter).__name__} has no bidirectional stream codec for "
                                f"{service.full_name}.{method.name}")
            mm = adapter.metrics.method_metrics(method.name, stream=True)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(_stream(  # bytes in, bytes out
                method, codec, getattr(adapter, codec.unary), mm, adapter.metrics, max_response_bytes, budget,
                max_stream_inflight, parser_of(adapter, method)))
            continue
        impl = getattr(adapter, method.name, None)
        if impl is None:
            raise TypeError(f"{type(adapter).__name__} does not implement {service.full_name}.{method.name}")
        mm = adapter.metrics.method_metrics(method.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(method, impl, mm, adapter.metrics, max_response_bytes, budget,
                   parser_of(adapter, method)))  # bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def add_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection (grpc_reflection's servicer) whose requests are parsed here: a message that does
    not parse ends the stream INVALID_ARGUMENT, as on every other method (grpcio would answer UNKNOWN and
    log a traceback)."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    request_type = reflection_pb2.ServerReflectionRequest

    async def info(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def parsed() -> Any:
            async for data in requests:
                try:
                    yield parse_request(request_type.FromString, data, request_type.DESCRIPTOR.full_name)
                except InvalidInput as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response

    handler = grpc.stream_stream_rpc_method_handler(info, response_serializer=wire)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME, {"ServerReflectionInfo": handler}),))
