"""The one RPC wrapper: every unary method of every adapter is registered through `add_service`.

An adapter (servicer.py, oip.py) is a class whose methods are named after a service's RPCs and are one
function each: `async def Encode(self, request, context) -> response`. `add_service` wraps each of them
so that, in one place and the same way for every RPC (probes included):

- the request arrives as bytes and is parsed here: a body that does not parse is INVALID_ARGUMENT with a
  short message (grpcio's own deserializer would answer UNKNOWN and log a traceback per request);
- the response is serialised here and refused with RESOURCE_EXHAUSTED when it is larger than
  `--max-message-bytes` (grpcio would fail it after the handler returned, with OK in the metrics);
- the outcome is counted (`vae_requests_total{method, code}` with the code actually sent, latency,
  in-flight) and any exception becomes its status code through `serving.errors.status_for`;
- an InvalidInput that names its model counts in `vae_rejections_total{reason="invalid"}`;
- the RPC holds a lease on the bytes-in-flight budget (`serving.budget`) for its request and response.

Streaming methods of a service are left to the adapter (none are served yet: grpcio answers
UNIMPLEMENTED for them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from serving.budget import REQUEST_COPIES, InflightBudget, current_lease
from serving.errors import InvalidInput, ResponseTooLarge, status_for, status_for_cancelled
from serving.metrics import MethodMetrics, Metrics

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


class Adapter(Protocol):
    """What `add_service` needs of an adapter: its metrics; the RPCs are its methods by name."""

    metrics: Metrics


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in the event loop's clock, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _unary(method: MethodDescriptor, impl: Handler, mm: MethodMetrics, metrics: Metrics,
           max_response_bytes: int, budget: InflightBudget
           ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    parse = GetMessageClass(method.input_type).FromString
    name = method.name
    request_type = method.input_type.full_name

    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        mm.started()
        t0 = time.perf_counter()
        lease = budget.lease()
        token = current_lease.set(lease)
        failure: tuple[grpc.StatusCode, str] | None = None
        try:
            lease.reserve(REQUEST_COPIES * len(data), "request")
            try:
                request = parse(data)
            except DecodeError:
                raise InvalidInput("request", f"a serialized {request_type}",
                                   f"{len(data)} bytes that do not parse as one") from None
            out = (await impl(request, context)).SerializeToString()
            if len(out) > max_response_bytes:
                raise ResponseTooLarge(f"response: {len(out):,} bytes, over --max-message-bytes "
                                       f"{max_response_bytes:,}; ask for fewer rows per request")
        except asyncio.CancelledError:
            mm.finished(status_for_cancelled(context.time_remaining()).name, time.perf_counter() - t0)
            raise
        except Exception as e:  # noqa: BLE001  # every error becomes its status (INTERNAL if unexpected, logged)
            failure = status_for(e, name)
            if isinstance(e, InvalidInput) and e.model in metrics.models:
                metrics.models[e.model].rejected["invalid"].inc()
        finally:
            lease.release()
            current_lease.reset(token)
        if failure is not None:
            # Abort outside the except block, holding nothing: the abort's exception then keeps no
            # traceback chain to this frame, whose request bytes would otherwise live until a GC cycle.
            del data
            request = out = None
            mm.finished(failure[0].name, time.perf_counter() - t0)
            await context.abort(*failure)
        mm.finished("OK", time.perf_counter() - t0)
        return out

    return handler


def add_service(server: grpc.aio.Server, service: ServiceDescriptor, adapter: Adapter,
                max_response_bytes: int, budget: InflightBudget) -> None:
    """Register every unary RPC of `service` on `server`, served by the adapter's method of that name."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue
        impl = getattr(adapter, method.name, None)
        if impl is None:
            raise TypeError(f"{type(adapter).__name__} does not implement {service.full_name}.{method.name}")
        mm = adapter.metrics.method_metrics(method.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(method, impl, mm, adapter.metrics, max_response_bytes, budget))  # bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
