"""vae.v1.VaeService: a thin adapter, proto <-> numpy, over `serving.core.VaeCore`.

`handle` is the one place where an RPC's outcome becomes metrics and a status code (via
`serving.errors.status_for`); the Open Inference Protocol adapter uses it too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.core import VaeCore
from serving.errors import status_for
from serving.metrics import Metrics
from serving.tensors import to_tensor

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline in the event loop's clock, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


async def handle(metrics: Metrics, method: str, context: grpc.aio.ServicerContext,
                 work: Awaitable[T]) -> T:
    """Await one RPC's work; count it, time it, and map any error to its status code."""
    hist = metrics.method(method)
    inflight = metrics.inflight_counts
    inflight[method] += 1
    t0 = time.perf_counter()

    def done(code: str) -> None:  # recorded before the status goes out, so a scrape after it sees it
        inflight[method] -= 1
        hist.observe(time.perf_counter() - t0)
        metrics.count_request(method, code)

    try:
        result = await work
    except asyncio.CancelledError:
        # grpc.aio cancels the handler both when the client cancels and when the deadline passes.
        remaining = context.time_remaining()
        done("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
        raise
    except Exception as e:
        status, message = status_for(e, method)
        done(status.name)
        await context.abort(status, message)
        raise  # unreachable: abort raises
    done("OK")
    return result


class VaeServicer(pb_grpc.VaeServiceServicer):
    """Each method: unpack the request, call the core, pack the response."""

    def __init__(self, core: VaeCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        self._info_response: pb.GetModelInfoResponse | None = None  # built on first use; never changes

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        return await handle(self.metrics, "Encode", context, self._encode(request, context))

    async def _encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        x = self.core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        mu, var = await self.core.encode(x, deadline_of(context))
        return pb.EncodeResponse(mu=to_tensor(mu), var=to_tensor(var))

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        return await handle(self.metrics, "Decode", context, self._decode(request, context))

    async def _decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        z = self.core.input_tensor("decoder", "z", request.z.shape, request.z.data)
        return pb.DecodeResponse(x=to_tensor(await self.core.decode(z, deadline_of(context))))

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        return await handle(self.metrics, "Sample", context, self._sample(request, context))

    async def _sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        seed = request.seed if request.HasField("seed") else None
        temperature = request.temperature if request.HasField("temperature") else None
        x, z, used = await self.core.sample(request.count, seed, temperature, deadline_of(context))
        return pb.SampleResponse(x=to_tensor(x), z=to_tensor(z) if request.return_z else None, seed=used)

    async def Reconstruct(self, request: pb.ReconstructRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReconstructResponse:
        return await handle(self.metrics, "Reconstruct", context, self._reconstruct(request, context))

    async def _reconstruct(self, request: pb.ReconstructRequest,
                           context: grpc.aio.ServicerContext) -> pb.ReconstructResponse:
        x = self.core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        use_mean = request.use_mean if request.HasField("use_mean") else True
        seed = request.seed if request.HasField("seed") else None
        r = await self.core.reconstruct(x, use_mean, seed, deadline_of(context))
        return pb.ReconstructResponse(x_hat=to_tensor(r.x_hat), recon_log_lik=to_tensor(r.recon_log_lik),
                                      kl=to_tensor(r.kl), seed=r.seed)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return await handle(self.metrics, "GetModelInfo", context, self._info())

    async def _info(self) -> pb.GetModelInfoResponse:
        if self._info_response is None:
            self._info_response = pb.GetModelInfoResponse(**self.core.info(),
                                                          manifest_json=json.dumps(self.core.manifest.raw))
        return self._info_response
