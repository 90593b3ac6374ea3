"""inference.GRPCInferenceService (Open Inference Protocol / KServe v2): a thin adapter over VaeCore.

Models: `encoder` (input `x`, outputs `mu`, `var`) and `decoder` (input `z`, output `x_mean`), version
"1" (the manifest version is accepted too). ModelInfer goes through the same validation, batcher,
deadlines, back-pressure and metrics as vae.v1.VaeService (`handle`, `VaeCore.input_tensor`); errors are
the codes Triton gives: INVALID_ARGUMENT for an unknown model, input name, datatype, shape or size, and
for raw and typed contents mixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from serving._proto.inference import grpc_service_pb2 as pb
from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc
from serving.core import VaeCore
from serving.errors import InvalidInput
from serving.metrics import Metrics
from serving.servicer import deadline_of, handle
from serving.tensors import F32

SERVER_NAME = "vae-serve"
SERVER_VERSION = "0.1.0"
PLATFORM = "onnxruntime_onnx"
MODEL_VERSION = "1"
FP32 = "FP32"


@dataclass(frozen=True)
class _ModelSpec:
    input_name: str
    input_tail: tuple[int, ...]
    outputs: dict[str, tuple[int, ...]]  # name -> shape without the batch dimension


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over the shared core."""

    def __init__(self, core: VaeCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics
        d, shape = core.latent_dim, core.example_shape
        self.models = {
            "encoder": _ModelSpec("x", shape, {"mu": (d,), "var": (d,)}),
            "decoder": _ModelSpec("z", (d,), {"x_mean": shape}),
        }
        self.versions = ("", MODEL_VERSION, core.manifest.version)

    def _model(self, name: str, version: str) -> _ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise InvalidInput("model_name", f"one of {sorted(self.models)}", repr(name))
        if version not in self.versions:
            raise InvalidInput("model_version", f"'', {MODEL_VERSION!r} or {self.core.manifest.version!r}",
                               repr(version))
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
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        return await handle(self.metrics, "ModelMetadata", context, self._metadata(request))

    async def _metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        spec = self._model(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[MODEL_VERSION], platform=PLATFORM,
            inputs=[meta(name=spec.input_name, datatype=FP32, shape=[-1, *spec.input_tail])],
            outputs=[meta(name=n, datatype=FP32, shape=[-1, *s]) for n, s in spec.outputs.items()])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await handle(self.metrics, "ModelInfer", context, self._infer(request, context))

    async def _infer(self, request: pb.ModelInferRequest,
                     context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        name = request.model_name
        spec = self._model(name, request.model_version)
        core = self.core
        if len(request.inputs) != 1 or request.inputs[0].name != spec.input_name:
            raise core.invalid(name, "inputs", f"one input named {spec.input_name!r}",
                               str([t.name for t in request.inputs]))
        t = request.inputs[0]
        if t.datatype != FP32:
            raise core.invalid(name, f"inputs[{t.name!r}].datatype", FP32, repr(t.datatype))
        raw = len(request.raw_input_contents) > 0
        if raw:
            if t.HasField("contents"):
                raise core.invalid(name, f"inputs[{t.name!r}].contents",
                                   "no typed contents when raw_input_contents is used", "both")
            if len(request.raw_input_contents) != 1:
                raise core.invalid(name, "raw_input_contents", "one entry per input (1)",
                                   f"{len(request.raw_input_contents)} entries")
            arr = core.input_tensor(name, t.name, t.shape, data=request.raw_input_contents[0])
        else:
            arr = core.input_tensor(name, t.name, t.shape, values=t.contents.fp32_contents)
        wanted = [o.name for o in request.outputs] or list(spec.outputs)
        unknown = [n for n in wanted if n not in spec.outputs]
        if unknown:
            raise core.invalid(name, "outputs", f"names among {list(spec.outputs)}", str(unknown))
        deadline = deadline_of(context)
        if name == "encoder":
            mu, var = await core.encode(arr, deadline)
            results = {"mu": mu, "var": var}
        else:
            results = {"x_mean": await core.decode(arr, deadline)}
        resp = pb.ModelInferResponse(model_name=name, model_version=MODEL_VERSION, id=request.id)
        for n in wanted:
            a = np.ascontiguousarray(results[n], dtype=F32)
            out = resp.outputs.add(name=n, datatype=FP32, shape=a.shape)
            if raw:
                resp.raw_output_contents.append(a.tobytes())
            else:
                out.contents.fp32_contents.extend(a.ravel().tolist())
        return resp
