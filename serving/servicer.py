"""vae.v1.VaeService: a thin adapter, proto <-> numpy, over `serving.core.VaeCore`.

Every request names its model and version (`model`, `version`; empty: the one model, its newest
version): the repository (`serving.repository`) resolves them to one version's core, once per request.

Each method is one function: unpack the request, call the core, pack the response. Metrics, status
codes, parsing and the response-size limit are `serving.rpc`'s, the same for every RPC. Score is the
resolved version's `serving.detector.Detector`'s. The streams (EncodeStream, DecodeStream,
ReconstructStream, ScoreStream) are the unary methods per message (`STREAMS`): a `*StreamRequest`
carries an id and the unary request; its `*StreamResponse` echoes the id with the unary response or a
`Status` (code, message) saying why that message failed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.batcher import Outputs
from serving.budget import Lease, current_lease
from serving.core import VaeCore, Work
from serving.dataplane import DataPlane
from serving.detector import ScoreArgs
from serving.repository import ModelVersion
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


STREAMS = {unary + "Stream": _stream_codec(unary) for unary in ("Encode", "Decode", "Reconstruct", "Score")}


def public_manifest(raw: dict[str, Any]) -> dict[str, Any]:
    """The manifest as clients see it (GetModelInfo): the training data source is reduced to its kind
    ("mnist:/home/me/data" -> "mnist"), since local paths are the operator's business."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    config = out.get("training", {}).get("config", {})
    if isinstance(config, dict) and isinstance(config.get("data"), str):
        config["data"] = config["data"].split(":", 1)[0]
    return out


class VaeServicer:
    """The vae.v1.VaeService RPCs (registered by `serving.rpc.add_service`; the native front end runs the
    `batched` ones through a batcher callback, the rest as the coroutines below)."""

    streams = STREAMS

    def __init__(self, plane: DataPlane) -> None:
        self.repo = plane.repo
        self.metrics = plane.metrics
        self.batched: Mapping[str, Callable[[Any, Lease | None], Work]] = {
            "Encode": self.encode_work, "Decode": self.decode_work, "Sample": self.sample_work}

    def version(self, request: Any, lease: Lease | None) -> ModelVersion:
        """The model version the request names (pinned on its lease until it ends)."""
        return self.repo.resolve(request.model, request.version, lease)

    def core(self, request: Any, lease: Lease | None) -> VaeCore:
        """The core of the model version the request names (pinned on its lease until it ends)."""
        return self.version(request, lease).core

    def encode_work(self, request: pb.EncodeRequest, lease: Lease | None) -> Work:
        core = self.core(request, lease)
        work = core.encode_work(core.input_tensor("encoder", "x", request.x.shape, request.x.data), lease)
        finish = work.finish

        def answer(outs: Outputs) -> pb.EncodeResponse:
            mu, var = finish(outs)
            return pb.EncodeResponse(mu=to_tensor(mu), var=to_tensor(var))

        return Work(work.batcher, work.x, answer)

    def decode_work(self, request: pb.DecodeRequest, lease: Lease | None) -> Work:
        core = self.core(request, lease)
        work = core.decode_work(core.input_tensor("decoder", "z", request.z.shape, request.z.data), lease)
        finish = work.finish
        return Work(work.batcher, work.x, lambda outs: pb.DecodeResponse(x=to_tensor(finish(outs))))

    def sample_work(self, request: pb.SampleRequest, lease: Lease | None) -> Work:
        seed = request.seed if request.HasField("seed") else None
        temperature = request.temperature if request.HasField("temperature") else None
        return_z = request.return_z
        work = self.core(request, lease).sample_work(request.count, seed, temperature, return_z, lease)
        finish = work.finish

        def answer(outs: Outputs) -> pb.SampleResponse:
            x, z, used = finish(outs)
            return pb.SampleResponse(x=to_tensor(x), z=to_tensor(z) if return_z else None, seed=used)

        return Work(work.batcher, work.x, answer)

    async def Encode(self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
        answer: pb.EncodeResponse = await self.encode_work(request, current_lease.get()).run(deadline_of(context))
        return answer

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        answer: pb.DecodeResponse = await self.decode_work(request, current_lease.get()).run(deadline_of(context))
        return answer

    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        answer: pb.SampleResponse = await self.sample_work(request, current_lease.get()).run(deadline_of(context))
        return answer

    async def Reconstruct(self, request: pb.ReconstructRequest,
                          context: grpc.aio.ServicerContext) -> pb.ReconstructResponse:
        core = self.core(request, current_lease.get())  # encoder and decoder of the same version
        x = core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        use_mean = request.use_mean if request.HasField("use_mean") else True
        seed = request.seed if request.HasField("seed") else None
        r = await core.reconstruct(x, use_mean, seed, deadline_of(context))
        return pb.ReconstructResponse(x_hat=to_tensor(r.x_hat), recon_log_lik=to_tensor(r.recon_log_lik),
                                      kl=to_tensor(r.kl), seed=r.seed)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        v = self.version(request, current_lease.get())  # its core and its calibration, as Encode's
        x = v.core.input_tensor("encoder", "x", request.x.shape, request.x.data)
        args = ScoreArgs(k=request.k if request.HasField("k") else None,
                         seed=request.seed if request.HasField("seed") else None,
                         quantile=request.quantile if request.HasField("quantile") else None,
                         kind=request.kind or None, want_feature_scores=request.want_feature_scores)
        r = await v.detector.score(x, args, deadline_of(context))
        return pb.ScoreResponse(
            score=to_tensor(r.score), nll=to_tensor(r.nll),
            percentile=to_tensor(r.percentile) if r.percentile is not None else None,
            is_outlier=r.is_outlier.tolist() if r.is_outlier is not None else None, threshold=r.threshold,
            feature_scores=to_tensor(r.feature_scores) if r.feature_scores is not None else None,
            k=r.k, seed=r.seed, kind=r.kind, quantile=r.quantile, calibrated=r.calibrated,
            calibration=r.calibration)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        v = self.repo.resolve(request.model, request.version, pin=False)
        info: pb.GetModelInfoResponse | None = v.memo.get("vae-info")
        if info is None:
            core = v.core
            facts = core.info()
            if not self.repo.legacy:  # the repository's name and version number (the manifest's are in manifest_json)
                facts.update(name=v.name, version=v.label)
            info = v.memo["vae-info"] = pb.GetModelInfoResponse(
                **facts, manifest_json=json.dumps(public_manifest(core.manifest.raw)))
        return info
