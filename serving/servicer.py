"""vae.v1.VaeService: a thin adapter, proto <-> numpy, over `serving.core.VaeCore`.

Each method is one function: unpack the request, call the core, pack the response. Metrics, status
codes, parsing and the response-size limit are `serving.rpc`'s, the same for every RPC. The streams
(EncodeStream, DecodeStream, ReconstructStream) are the unary methods per message (`STREAMS`): a
`*StreamRequest` carries an id and the unary request; its `*StreamResponse` echoes the id with the unary
response or a `Status` (code, message) saying why that message failed.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.core import VaeCore
from serving.metrics import Metrics
from serving.rpc import StreamCodec, deadline_of
from serving.tensors import field_tag, length_delimited, to_tensor

SERVICE = pb.DESCRIPTOR.services_by_name["VaeService"]


def _stream_codec(unary: str) -> StreamCodec:
    """The codec of `<unary>Stream`: its response type's `id`, `status` and `response` fields."""
    response_type = GetMessageClass(SERVICE.methods_by_name[unary + "Stream"].output_type)
    fields = response_type.DESCRIPTOR.fields_by_name
    id_tag, response_tag = field_tag(fields["id"].number), field_tag(fields["response"].number)

    def ok(request: Any, body: bytes) -> bytes:
        rid = request.id.encode()
        return (length_delimited(id_tag, rid) if rid else b"") + length_delimited(response_tag, body)

    def error(request: Any | None, code: grpc.StatusCode, text: str) -> bytes:
        status = pb.Status(code=code.value[0], message=text)
        return response_type(id="" if request is None else request.id, status=status).SerializeToString()

    return StreamCodec(unary=unary, inner=lambda r: r.request, ok=ok, error=error)


STREAMS = {unary + "Stream": _stream_codec(unary) for unary in ("Encode", "Decode", "Reconstruct")}


def public_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The manifest as clients see it (GetModelInfo): the training data source is reduced to its kind
    ("mnist:/home/me/data" -> "mnist"), since local paths are the operator's business."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    config = out.get("training", {}).get("config", {})
    if isinstance(config, dict) and isinstance(config.get("data"), str):
        config["data"] = config["data"].split(":", 1)[0]
    return out


class VaeServicer:
    """The vae.v1.VaeService RPCs (registered by `serving.rpc.add_service`)."""

    streams = STREAMS

    def __init__(self, core: VaeCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        self._info = pb.GetModelInfoResponse(**core.info(), manifest_json=json.dumps(public_manifest(core.manifest.raw)))

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        x = self.core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        mu, var = await self.core.encode(x, deadline_of(context))
        return pb.EncodeResponse(mu=to_tensor(mu), var=to_tensor(var))

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        z = self.core.input_tensor("decoder", "z", request.z.shape, request.z.data)
        return pb.DecodeResponse(x=to_tensor(await self.core.decode(z, deadline_of(context))))

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        seed = request.seed if request.HasField("seed") else None
        temperature = request.temperature if request.HasField("temperature") else None
        x, z, used = await self.core.sample(request.count, seed, temperature, deadline_of(context), request.return_z)
        return pb.SampleResponse(x=to_tensor(x), z=to_tensor(z) if request.return_z else None, seed=used)

    async def Reconstruct(self, request: pb.ReconstructRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReconstructResponse:
        x = self.core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        use_mean = request.use_mean if request.HasField("use_mean") else True
        seed = request.seed if request.HasField("seed") else None
        r = await self.core.reconstruct(x, use_mean, seed, deadline_of(context))
        return pb.ReconstructResponse(x_hat=to_tensor(r.x_hat), recon_log_lik=to_tensor(r.recon_log_lik),
                                      kl=to_tensor(r.kl), seed=r.seed)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return self._info
