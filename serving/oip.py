"""inference.GRPCInferenceService (Open Inference Protocol / KServe v2): a thin adapter over VaeCore.

Models: `encoder` and `decoder`, version "1" (the manifest version is accepted too). Their inputs and
outputs are the manifest's graph specs, every one of them (encoder x -> mu, var, logvar; decoder z ->
x_mean plus logits or x_var): ModelMetadata says exactly what the ONNX graphs produce, and ModelInfer
returns any of them. ModelInfer goes through the same validation, batcher, deadlines, back-pressure and
metrics as vae.v1.VaeService (`serving.rpc`, `VaeCore.input_tensor`); errors are the codes Triton gives:
INVALID_ARGUMENT for an unknown model, input name, datatype, shape or size, and for raw and typed
contents mixed.

ModelStreamInfer (Triton's bidirectional extension, non-decoupled semantics): every ModelInferRequest
on the stream goes through ModelInfer above (`serving.rpc` runs it per message) and gets one
ModelStreamInferResponse: `infer_response` (carrying the request's id) on success; on failure
`error_message` (the text ModelInfer's status would carry) with `infer_response` holding only the
request's model_name and id. The stream stays open after a failed message.
"""

from __future__ import annotations

import grpc
import numpy as np

from serving import __version__
from serving._proto.inference import grpc_service_pb2 as pb
from serving.core import VaeCore
from serving.errors import InvalidInput
from serving.manifest import GraphSpec
from serving.metrics import Metrics
from serving.rpc import StreamCodec, deadline_of, field_tag, length_delimited
from serving.tensors import F32, fp32_contents_bytes, set_fp32_contents

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVER_NAME = "vae-serve"
PLATFORM = "onnxruntime_onnx"
MODEL_VERSION = "1"
# Manifest dtype -> Open Inference Protocol datatype (the export writes float32 only).
DATATYPES = {"float32": "FP32"}
FP32 = DATATYPES["float32"]
_INFER_RESPONSE = field_tag(pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number)


def _stream_ok(request: pb.ModelInferRequest, body: bytes) -> bytes:
    return length_delimited(_INFER_RESPONSE, body)  # ModelInfer's response already carries the id


def _stream_error(request: pb.ModelInferRequest | None, code: grpc.StatusCode, text: str) -> bytes:
    echo = pb.ModelInferResponse() if request is None else pb.ModelInferResponse(
        model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=text, infer_response=echo).SerializeToString()


STREAMS = {"ModelStreamInfer": StreamCodec(unary="ModelInfer", inner=lambda r: r, ok=_stream_ok,
                                           error=_stream_error)}


class OipServicer:
    """Open Inference Protocol over the shared core (registered by `serving.rpc.add_service`)."""

    streams = STREAMS

    def __init__(self, core: VaeCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        self.models: dict[str, GraphSpec] = dict(core.graphs)
        self.versions = ("", MODEL_VERSION, core.manifest.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        self._metadata = {
            name: pb.ModelMetadataResponse(
                name=name, versions=[MODEL_VERSION], platform=PLATFORM,
                inputs=[meta(name=t.name, datatype=DATATYPES[t.dtype], shape=t.shape) for t in g.inputs],
                outputs=[meta(name=t.name, datatype=DATATYPES[t.dtype], shape=t.shape) for t in g.outputs])
            for name, g in self.models.items()}

    def _model(self, name: str, version: str) -> GraphSpec:
        spec = self.models.get(name)
        if spec is None:
            raise InvalidInput("model_name", f"one of {sorted(self.models)}", repr(name))
        if version not in self.versions:
            raise InvalidInput("model_version", f"'', {MODEL_VERSION!r} or {self.core.manifest.version!r}",
                               repr(version), name)
        return spec

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        ok = request.name in self.models and request.version in self.versions
        return pb.ModelReadyResponse(ready=ok and self.core.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        self._model(request.name, request.version)
        return self._metadata[request.name]

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        name = request.model_name
        spec = self._model(name, request.model_version)
        want_in = spec.input
        if len(request.inputs) != 1 or request.inputs[0].name != want_in.name:
            raise InvalidInput("inputs", f"one input named {want_in.name!r}",
                               str([t.name for t in request.inputs]), name)
        t = request.inputs[0]
        if t.datatype != DATATYPES[want_in.dtype]:
            raise InvalidInput(f"inputs[{t.name!r}].datatype", DATATYPES[want_in.dtype], repr(t.datatype), name)
        raw = len(request.raw_input_contents) > 0
        core = self.core
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(f"inputs[{t.name!r}].contents",
                                   "no typed contents when raw_input_contents is used", "both", name)
            if len(request.raw_input_contents) != 1:
                raise InvalidInput("raw_input_contents", "one entry per input (1)",
                                   f"{len(request.raw_input_contents)} entries", name)
            arr = core.input_tensor(name, t.name, t.shape, request.raw_input_contents[0])
        else:
            data = fp32_contents_bytes(t.contents)
            if data is None:
                raise InvalidInput(f"inputs[{t.name!r}].contents", "fp32_contents only (datatype FP32)",
                                   "other typed contents", name)
            arr = core.input_tensor(name, t.name, t.shape, data)
        declared = spec.output_names()
        requested = [o.name for o in request.outputs]
        wanted = requested or declared
        unknown = [n for n in wanted if n not in declared]
        if unknown:
            raise InvalidInput("outputs", f"names among {declared}", str(unknown), name)
        results = await core.run(name, arr, deadline_of(context), requested or None)
        resp = pb.ModelInferResponse(model_name=name, model_version=MODEL_VERSION, id=request.id)
        for n in wanted:
            a = np.ascontiguousarray(results[n], dtype=F32)
            out = resp.outputs.add(name=n, datatype=FP32, shape=a.shape)
            if raw:
                resp.raw_output_contents.append(a.tobytes())
            else:
                set_fp32_contents(out.contents, a)
        return resp
