"""The Open Inference Protocol on the wire: ModelInferResponse written straight to its bytes, and large
ModelInferRequests split without copying their raw tensors (serving.oip), against protobuf's own."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from serving._proto.inference import grpc_service_pb2 as pb
from serving.oip import MODEL_VERSION, SPLIT_MIN_BYTES, InferResponseWriter, parse_infer_request
from serving.tensors import split_bytes_field, varint


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


def _infer_request(rows: int, raw_count: int = 1) -> pb.ModelInferRequest:
    x = np.arange(rows * 784, dtype=np.float32).reshape(rows, 784)
    req = pb.ModelInferRequest(model_name="encoder", model_version="1", id="r")
    req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    req.outputs.add(name="mu")
    req.parameters["timeout"].int64_param = 5000
    for k in range(raw_count):
        req.raw_input_contents.append((x + k).tobytes())
    return req


@pytest.mark.parametrize("rows", [1, 30, 64, 300])
@pytest.mark.parametrize("raw_count", [0, 1, 2])
def test_a_large_request_parses_to_the_same_message_with_views_of_its_raw_tensors(rows: int, raw_count: int) -> None:
    req = _infer_request(rows, raw_count)
    data = req.SerializeToString()
    got = parse_infer_request(data)
    assert [bytes(r) for r in got.raw_input_contents] == list(req.raw_input_contents)
    assert got.model_name == "encoder" and got.id == "r" and list(got.inputs[0].shape) == [rows, 784]
    assert got.parameters["timeout"].int64_param == 5000 and got.outputs[0].name == "mu"
    if len(data) >= SPLIT_MIN_BYTES and raw_count:
        assert all(isinstance(r, memoryview) for r in got.raw_input_contents)  # no copy


def test_the_split_keeps_fields_in_any_order_and_unknown_fields() -> None:
    req = _infer_request(100)
    raw = req.raw_input_contents[0]
    # raw_input_contents first, then the rest, then an unknown varint (field 99) and fixed64/fixed32 fields
    extra = varint(99 << 3) + varint(7) + varint((98 << 3) | 1) + bytes(8) + varint((97 << 3) | 5) + bytes(4)
    data = b"\x3a" + varint(len(raw)) + raw + pb.ModelInferRequest(
        model_name="encoder", inputs=req.inputs).SerializeToString() + extra
    split = split_bytes_field(data, 7)
    assert split is not None
    rest, values = split
    assert [bytes(v) for v in values] == [raw]
    assert pb.ModelInferRequest.FromString(rest).model_name == "encoder"


@pytest.mark.parametrize("cut", [1, 2, 100, 5000])
def test_bytes_that_do_not_parse_still_fail_as_protobuf_would(cut: int) -> None:
    data = _infer_request(100).SerializeToString()
    for bad in (data[:-cut], data + b"\x3a\xff\xff\xff\xff\x0f", data + b"\x0b", b"\xff" * SPLIT_MIN_BYTES):
        with pytest.raises(DecodeError):
            parse_infer_request(bad)
