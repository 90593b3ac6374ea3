"""inference.GRPCInferenceService (Open Inference Protocol / KServe v2): a thin adapter over VaeCore.

Models: each VAE graph of the repository, `<vae>.<graph>` (`serving.layout.oip_name`): `encoder`,
`decoder` and `score`, and the bare graph names while one model is loaded (a `--model-dir` server:
`encoder`, `decoder`, `score`, version "1", the manifest version accepted too). The repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload) is `OipModels`' too, on only with
--model-control explicit. The encoder's and decoder's inputs and outputs are the manifest's graph specs,
every one of them (encoder x -> mu, var, logvar; decoder z -> x_mean plus logits or x_var): ModelMetadata
says exactly what the ONNX graphs produce, and ModelInfer returns any of them. `score` (serving.detector,
the resolved version's detector and calibration): x -> score, nll, percentile, is_outlier (0/1),
threshold (1,) and, when asked for by name, feature_scores; request parameters k, seed, quantile, kind;
the response's parameters say the k, seed, kind and quantile used and the calibration.
`serving.dataplane.OipModels` holds what this adapter, the native front end and the REST one
(`serving.http`) share. ModelInfer goes through the same validation, batcher, deadlines, back-pressure
and metrics as vae.v1.VaeService (`serving.rpc`, `VaeCore.input_tensor`); errors are the codes Triton
gives: INVALID_ARGUMENT for an unknown model, input name, datatype, shape or size, and for raw and typed
contents mixed.

ModelStreamInfer (Triton's bidirectional extension, non-decoupled semantics): every ModelInferRequest
on the stream goes through ModelInfer above (`serving.rpc` runs it per message) and gets one
ModelStreamInferResponse: `infer_response` (carrying the request's id) on success; on failure
`error_message` (the text ModelInfer's status would carry) with `infer_response` holding only the
request's model_name and id. The stream stays open after a failed message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import grpc
import numpy as np

from serving._proto.inference import grpc_service_pb2 as pb
from serving.budget import Lease, current_lease
from serving.core import Job, Work
from serving.dataplane import FP32, MODEL_VERSION, DataPlane
from serving.detector import OIP_MODEL
from serving.errors import InvalidInput
from serving.repository import ModelVersion
from serving.rpc import StreamCodec, deadline_of
from serving.tensors import (
    F32,
    FP32_CONTENTS_TAG,
    field_tag,
    fp32_contents_bytes,
    length_delimited,
    split_bytes_field,
    varint,
)

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
_INFER_RESPONSE = field_tag(pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number)


def _stream_ok(request: pb.ModelInferRequest, body: bytes) -> bytes:
    return length_delimited(_INFER_RESPONSE, body)  # ModelInfer's response already carries the id


def _stream_error(request: pb.ModelInferRequest | None, code: grpc.StatusCode, text: str) -> bytes:
    echo = pb.ModelInferResponse() if request is None else pb.ModelInferResponse(
        model_name=request.model_name, id=request.id)
    return pb.ModelStreamInferResponse(error_message=text, infer_response=echo).SerializeToString()


STREAMS = {"ModelStreamInfer": StreamCodec(unary="ModelInfer", inner=lambda r: r, ok=_stream_ok,
                                           error=_stream_error)}


# Requests larger than this have their raw tensors taken out of the wire bytes before parsing
# (`parse_infer_request`); below it the scan costs more than the copies it saves.
SPLIT_MIN_BYTES = 64 << 10
_RAW_INPUTS = pb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


class _SplitInferRequest:
    """A parsed ModelInferRequest whose `raw_input_contents` are views into the received bytes."""

    __slots__ = ("_msg", "raw_input_contents")

    def __init__(self, msg: pb.ModelInferRequest, raw: list[memoryview]) -> None:
        self._msg = msg
        self.raw_input_contents = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._msg, name)


def parse_infer_request(data: bytes) -> Any:
    """ModelInferRequest from the wire, large raw tensors without a copy (a `_SplitInferRequest`, which
    reads as the message). Raises DecodeError as FromString does."""
    if len(data) >= SPLIT_MIN_BYTES:
        split = split_bytes_field(data, _RAW_INPUTS)
        if split is not None:
            return _SplitInferRequest(pb.ModelInferRequest.FromString(split[0]), split[1])
    return pb.ModelInferRequest.FromString(data)


# Records are cached for answers of at most this many rows (the per-call cost matters there; the cache stays
# a few hundred entries, not one per row count up to --max-queue-rows).
_CACHED_ROWS = 256
# Response heads (model name, version) cached: names come from requests, so the cache is bounded.
_CACHED_HEADS = 1024


class InferResponseWriter:
    """Serialises a ModelInferResponse straight to its wire form, without building the message.

    A response is model_name (1), model_version (2), id (3), one InferOutputTensor (5: name 1, datatype
    2, packed shape 3, and with typed contents `contents` 5 holding packed fp32_contents 6) per output,
    then, for raw contents, one raw_output_contents (6) per output: the bytes protobuf itself would
    write for the same message (fields in number order, defaults omitted; the tests compare the two).
    Building the message costs a Python object per output, a copy of every tensor into it and another
    when it is serialised; here each tensor is copied once, into the answer. The parts that depend only
    on the model, the output name and the shape are made once per shape (rows per request vary little).
    """

    def __init__(self) -> None:
        self._heads: dict[tuple[str, str], bytes] = {}   # (model, version) -> fields 1 and 2
        # (output name, shape, raw) -> the output tensor's whole record when raw (tag, length, name, datatype,
        # shape), else its record up to the tensor bytes: made once per shape (a handful: rows vary).
        self._tensors: dict[tuple[str, tuple[int, ...], bool], bytes] = {}
        self._raw_heads: dict[int, bytes] = {}  # bytes of a raw output -> its field 6 tag and length

    def serialize(self, model: str, request_id: str, outputs: list[tuple[str, np.ndarray]], raw: bool,
                  version: str = MODEL_VERSION) -> bytes:
        head = self._heads.get((model, version))
        if head is None:
            head = _string_field(1, model) + _string_field(2, version)
            if len(self._heads) < _CACHED_HEADS:
                self._heads[(model, version)] = head
        parts: list[bytes | memoryview] = [head]
        if request_id:
            parts.append(_string_field(3, request_id))
        datas: list[memoryview] = []
        tensors = self._tensors
        for n, a in outputs:
            if a.dtype != F32 or not a.flags.c_contiguous:
                a = np.ascontiguousarray(a, dtype=F32)
            data = a.data.cast("B")
            key = (n, a.shape, raw)
            record = tensors.get(key)
            if record is None:
                record = self._tensor_record(n, a.shape, raw, len(data))
                if a.shape[0] <= _CACHED_ROWS:
                    tensors[key] = record
            parts.append(record)
            if raw:
                datas.append(data)
            else:
                parts.append(data)
        if datas:
            raw_heads = self._raw_heads
            for data in datas:
                rh = raw_heads.get(len(data))
                if rh is None:
                    rh = _RAW + varint(len(data))
                    if len(raw_heads) < _CACHED_ROWS:
                        raw_heads[len(data)] = rh
                parts += (rh, data)
        return b"".join(parts)

    @staticmethod
    def _tensor_record(name: str, shape: tuple[int, ...], raw: bool, nbytes: int) -> bytes:
        """One InferOutputTensor record (field 5) of `shape`: whole when raw, else up to its data bytes."""
        dims = b"".join(varint(d) for d in shape)
        tensor = _string_field(1, name) + _string_field(2, FP32) + _SHAPE + varint(len(dims)) + dims
        if raw:
            return _OUTPUT + varint(len(tensor)) + tensor
        fp32 = FP32_CONTENTS_TAG + varint(nbytes)
        contents = _CONTENTS + varint(len(fp32) + nbytes)
        return _OUTPUT + varint(len(tensor) + len(contents) + len(fp32) + nbytes) + tensor + contents + fp32


def _parameter(v: Any) -> pb.InferParameter:
    if isinstance(v, bool):
        return pb.InferParameter(bool_param=v)
    if isinstance(v, int):
        return pb.InferParameter(uint64_param=v) if v >= 1 << 63 else pb.InferParameter(int64_param=v)
    if isinstance(v, float):
        return pb.InferParameter(double_param=v)
    return pb.InferParameter(string_param=str(v))


def _string_field(number: int, text: str) -> bytes:
    return length_delimited(field_tag(number), text.encode())


_OUTPUT = field_tag(pb.ModelInferResponse.DESCRIPTOR.fields_by_name["outputs"].number)
_RAW = field_tag(pb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number)
_SHAPE = field_tag(pb.ModelInferResponse.InferOutputTensor.DESCRIPTOR.fields_by_name["shape"].number)
_CONTENTS = field_tag(pb.ModelInferResponse.InferOutputTensor.DESCRIPTOR.fields_by_name["contents"].number)


class OipServicer:
    """Open Inference Protocol over the data plane (registered by `serving.rpc.add_service`; the native
    front end runs `batched` methods through a batcher callback, the rest as the coroutines below)."""

    streams = STREAMS
    parsers: ClassVar[Mapping[str, Callable[[bytes], Any]]] = {
        "ModelInfer": parse_infer_request, "ModelStreamInfer": parse_infer_request}

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.repo = plane.repo
        self.metrics = plane.metrics
        self.oip = plane.oip
        self._response = InferResponseWriter()
        self.batched: Mapping[str, Callable[[Any, Lease | None], Work | Job]] = {"ModelInfer": self.infer_work}

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repo.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.oip.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**self.oip.server_metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        m = self.oip.metadata(request.name, request.version)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"],
                                        inputs=[meta(**t) for t in m["inputs"]],
                                        outputs=[meta(**t) for t in m["outputs"]])

    def infer_work(self, request: pb.ModelInferRequest, lease: Lease | None) -> Work | Job:
        """ModelInfer up to the batcher: unpack the tensor, check it, and say how the outputs become the
        serialised ModelInferResponse (for `score`, two batcher runs: a Job)."""
        name = request.model_name
        oip = self.oip
        v, graph, spec = oip.model(name, request.model_version, lease)
        inputs = request.inputs  # (each access to a protobuf field makes a Python object: read once)
        t = inputs[0] if inputs else None
        oip.check_input(name, spec, [t.name] if len(inputs) == 1 else [i.name for i in inputs],  # type: ignore[union-attr]
                        t.datatype if t is not None else "")
        assert t is not None
        raw_contents = request.raw_input_contents
        raw = len(raw_contents) > 0
        if raw:
            if t.HasField("contents"):
                raise InvalidInput(f"inputs[{t.name!r}].contents",
                                   "no typed contents when raw_input_contents is used", "both", name)
            if len(raw_contents) != 1:
                raise InvalidInput("raw_input_contents", "one entry per input (1)",
                                   f"{len(raw_contents)} entries", name)
            data = raw_contents[0]
        else:
            data = fp32_contents_bytes(t.contents)
            if data is None:
                raise InvalidInput(f"inputs[{t.name!r}].contents", "fp32_contents only (datatype FP32)",
                                   "other typed contents", name)
        outputs = request.outputs
        requested = [o.name for o in outputs] if outputs else []
        if graph == OIP_MODEL:
            return self._score_job(v, request, t, data, requested, raw)
        work, wanted = oip.infer_work(v, graph, name, t.name, t.shape, data, requested, lease)
        serialize, rid, index, label = self._response.serialize, request.id, v.core.output_index[graph], v.label
        # The runner's outputs (manifest order) straight into the answer, in the order asked for.
        return Work(work.batcher, work.x,
                    lambda outs: serialize(name, rid, [(n, outs[index[n]]) for n in wanted], raw, label))

    def _score_job(self, v: ModelVersion, request: pb.ModelInferRequest, t: Any, data: bytes | memoryview,
                   requested: list[str], raw: bool) -> Job:
        """A `score` graph's ModelInfer (its version `v` resolved and pinned): two batcher runs, a Job."""
        params = {k: getattr(p, p.WhichOneof("parameter_choice") or "bool_param")
                  for k, p in request.parameters.items()}
        shape, field, rid, name = list(t.shape), t.name, request.id, request.model_name

        async def run(deadline: float | None) -> bytes:
            outputs, result = await self.oip.score(v, name, field, shape, data, requested, params, deadline)
            extra = {k: _parameter(p) for k, p in self.oip.score_parameters(result).items()}
            # Two serialised messages concatenated parse as their merge: the outputs, then the parameters.
            return (self._response.serialize(name, rid, outputs, raw, v.label)
                    + pb.ModelInferResponse(parameters=extra).SerializeToString())

        return Job(run)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> bytes:
        answer: bytes = await self.infer_work(request, current_lease.get()).run(deadline_of(context))
        return answer

    # -- the repository extension (Triton's; UNIMPLEMENTED unless --model-control explicit) ------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        rows = self.oip.repository_index(request.repository_name, request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        await self.plane.oip.load(request.repository_name, request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        await self.plane.oip.unload(request.repository_name, request.model_name, request.parameters)
        return pb.RepositoryModelUnloadResponse()
