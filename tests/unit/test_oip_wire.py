"""ModelInferResponse written straight to the wire (serving.oip.InferResponseWriter) against protobuf's own."""

from __future__ import annotations

import numpy as np
import pytest

from serving._proto.inference import grpc_service_pb2 as pb
from serving.oip import MODEL_VERSION, InferResponseWriter
from serving.tensors import varint


def reference(model: str, request_id: str, outputs: list[tuple[str, np.ndarray]], raw: bool) -> pb.ModelInferResponse:
    """The same response built as a message, the way protobuf would send it."""
    ref = pb.ModelInferResponse(model_name=model, model_version=MODEL_VERSION, id=request_id)
    for name, a in outputs:
        out = ref.outputs.add(name=name, datatype="FP32", shape=a.shape)
        if raw:
            ref.raw_output_contents.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
        else:
            out.contents.fp32_contents.extend(a.ravel().tolist())
    return ref


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 129, 5_000])
@pytest.mark.parametrize("request_id", ["", "req-7", "\u00e9" * 200])
def test_the_written_response_is_byte_for_byte_what_protobuf_writes(raw: bool, rows: int, request_id: str) -> None:
    rng = np.random.default_rng(rows)
    batch = rng.standard_normal((rows + 2, 784)).astype(np.float32)
    outputs = [("mu", rng.standard_normal((rows, 20)).astype(np.float32)),
               ("x_mean", batch[1:rows + 1].reshape(rows, 28, 28)),   # a view into a larger batch
               ("var", np.asfortranarray(rng.random((rows, 20)).astype(np.float32)))]  # not C-contiguous
    got = InferResponseWriter().serialize("encoder", request_id, outputs, raw)
    ref = reference("encoder", request_id, outputs, raw)
    assert got == ref.SerializeToString(deterministic=True)
    parsed = pb.ModelInferResponse.FromString(got)
    assert parsed == ref
    if raw:
        np.testing.assert_array_equal(np.frombuffer(parsed.raw_output_contents[1], "<f4").reshape(rows, 28, 28),
                                      outputs[1][1])


def test_the_writer_reuses_its_cached_parts_across_models_and_outputs() -> None:
    w = InferResponseWriter()
    a = np.ones((2, 20), np.float32)
    for model, names in (("encoder", ["mu", "var"]), ("decoder", ["x_mean"]), ("encoder", ["logvar"])):
        outs = [(n, a) for n in names]
        assert w.serialize(model, "x", outs, True) == reference(model, "x", outs, True).SerializeToString()


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16_383, 16_384, 2**31, 2**63 - 1])
def test_varint_matches_protobuf(n: int) -> None:
    msg = pb.InferParameter(int64_param=n)  # field 2, varint
    assert msg.SerializeToString() == b"\x10" + varint(n)
