"""The Open Inference Protocol (KServe v2) beside vae.v1 on the same port, driven by tritonclient unmodified.

tritonclient registers its own protobuf package `inference`, which cannot share a process's descriptor pool
with the server's generated `inference` code. So the server runs in a subprocess, and this module is not
collected with the rest of the suite (its name does not start with `test_`): `test_oip.py` runs it in a
pytest process of its own, where nothing imports `serving._proto.inference`.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.manifest import Manifest
from tests.helpers import x_batch
from tests.integration._server import ServerProcess, start_server


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(url=server.target)
    yield c
    c.close()


def infer_input(name: str, a: np.ndarray, datatype: str = "FP32") -> tc.InferInput:
    i = tc.InferInput(name, list(a.shape), datatype)
    i.set_data_from_numpy(a)
    return i


def test_server_and_models_are_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder") and client.is_model_ready("decoder")
    assert client.is_model_ready("encoder", "1")
    assert not client.is_model_ready("nope")


def test_server_metadata_names_the_server(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "vae-serve" and meta["version"]


def test_model_metadata_gives_every_tensor_of_the_onnx_graphs_with_a_variable_batch(
        client: tc.InferenceServerClient, manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    for model, sess in sessions.items():
        meta = client.get_model_metadata(model, as_json=True)
        assert meta["name"] == model and meta["versions"] == ["1"]
        for kind, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            # Exactly what the ONNX graph takes and produces (names, order, fixed dims), batch dim -1.
            assert meta[kind] == [{"name": a.name, "datatype": "FP32",
                                   "shape": ["-1", *[str(s) for s in a.shape[1:]]]} for a in args]
    d = manifest.latent_dim
    assert [o["name"] for o in client.get_model_metadata("encoder", as_json=True)["outputs"]] == ["mu", "var", "logvar"]
    assert client.get_model_metadata("decoder", as_json=True)["inputs"] == [
        {"name": "z", "datatype": "FP32", "shape": ["-1", str(d)]}]


def test_every_declared_output_is_returned_by_default_and_matches_onnx_runtime(
        client: tc.InferenceServerClient, manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    z = np.random.default_rng(3).standard_normal((3, manifest.latent_dim), dtype=np.float32)
    r = client.infer("decoder", [infer_input("z", z)])
    names = [o.name for o in sessions["decoder"].get_outputs()]
    assert [o.name for o in r.get_response().outputs] == names and len(names) >= 2  # x_mean + logits/x_var
    for n, ref in zip(names, sessions["decoder"].run(names, {"z": z})):
        np.testing.assert_allclose(r.as_numpy(n), ref, rtol=1e-6, atol=1e-6)


def test_encoder_infer_with_raw_inputs_matches_onnx_runtime_and_echoes_the_id(
        client: tc.InferenceServerClient, manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 5)
    r = client.infer("encoder", [infer_input("x", x)], request_id="req-42")
    mu, var, _ = sessions["encoder"].run(["mu", "var", "logvar"], {"x": x})
    np.testing.assert_allclose(r.as_numpy("mu"), mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(r.as_numpy("var"), var, rtol=1e-6, atol=1e-6)
    assert r.get_response().id == "req-42" and r.get_response().model_name == "encoder"


def test_decoder_infer_matches_onnx_runtime(client: tc.InferenceServerClient, manifest: Manifest,
                                            sessions: dict[str, ort.InferenceSession]) -> None:
    z = np.random.default_rng(1).standard_normal((4, manifest.latent_dim), dtype=np.float32)
    r = client.infer("decoder", [infer_input("z", z)], model_version="1")
    np.testing.assert_allclose(r.as_numpy("x_mean"), sessions["decoder"].run(["x_mean"], {"z": z})[0],
                               rtol=1e-6, atol=1e-6)


def test_requested_outputs_are_honoured(client: tc.InferenceServerClient, manifest: Manifest) -> None:
    r = client.infer("encoder", [infer_input("x", x_batch(manifest, 2))], outputs=[tc.InferRequestedOutput("var")])
    assert [o.name for o in r.get_response().outputs] == ["var"] and r.as_numpy("mu") is None


def test_typed_fp32_contents_are_accepted_and_answered_typed(server: ServerProcess, manifest: Manifest,
                                                            sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 3)
    req = service_pb2.ModelInferRequest(model_name="encoder", id="typed")
    t = req.inputs.add(name="x", datatype="FP32", shape=x.shape)
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.target) as ch:
        resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert not resp.raw_output_contents and resp.id == "typed"
    mu = np.array(resp.outputs[0].contents.fp32_contents, dtype=np.float32).reshape(tuple(resp.outputs[0].shape))
    np.testing.assert_allclose(mu, sessions["encoder"].run(["mu"], {"x": x})[0], rtol=1e-6, atol=1e-6)


def test_concurrent_infers_are_batched(server: ServerProcess, client: tc.InferenceServerClient,
                                       manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 64, seed=2)
    ref = sessions["encoder"].run(["mu"], {"x": x})[0]
    for _ in range(5):
        runs0 = server.metric("vae_batches_total", model="encoder")
        results: dict[int, object] = {}
        done = threading.Semaphore(0)

        def callback(results: dict[int, object], done: threading.Semaphore, i: int,
                     result: tc.InferResult | None, error: InferenceServerException | None) -> None:
            results[i] = error if error is not None else result.as_numpy("mu")  # type: ignore[union-attr]
            done.release()

        for i in range(64):
            client.async_infer("encoder", [infer_input("x", x[i:i + 1])], functools.partial(callback, results, done, i))
        for _ in range(64):
            assert done.acquire(timeout=30)
        for i in range(64):
            got = results[i]
            assert isinstance(got, np.ndarray), got
            np.testing.assert_allclose(got, ref[i:i + 1], rtol=1e-5, atol=1e-6)
        if server.metric("vae_batches_total", model="encoder") - runs0 < 64:
            break
    else:
        pytest.fail("64 concurrent ModelInfer calls never shared an ONNX Runtime run")
    assert server.metric("vae_requests_total", method="ModelInfer", code="OK") >= 64


def _status(e: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(e.value.status())


@pytest.mark.parametrize("model, name, make, datatype, message", [
    ("nope", "x", lambda m: x_batch(m, 1), "FP32", "model_name: expected one of"),
    ("encoder", "y", lambda m: x_batch(m, 1), "FP32", "inputs: expected one input named 'x'"),
    ("encoder", "x", lambda m: x_batch(m, 1).astype(np.float64), "FP64", "datatype: expected FP32, got 'FP64'"),
    ("encoder", "x", lambda m: np.zeros((2, m.example_size + 1), np.float32), "FP32", "x: expected shape"),
    ("decoder", "z", lambda m: np.zeros((2, m.latent_dim + 1), np.float32), "FP32", "z: expected shape"),
])
def test_bad_infer_requests_are_invalid_argument(client: tc.InferenceServerClient, manifest: Manifest,
                                                 model: str, name: str, make: object, datatype: str,
                                                 message: str) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.infer(model, [infer_input(name, make(manifest), datatype)])  # type: ignore[operator]
    assert _status(e) == "StatusCode.INVALID_ARGUMENT"
    assert message in str(e.value.message())


def _raw_request(manifest: Manifest, nbytes: int, typed_too: bool = False) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="encoder")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, *manifest.example_shape])
    if typed_too:
        t.contents.fp32_contents.extend([0.0] * manifest.example_size)
    req.raw_input_contents.append(b"\0" * nbytes)
    return req


@pytest.mark.parametrize("case, message", [("short", "bytes of float32"), ("mixed", "no typed contents")])
def test_byte_size_mismatch_and_mixed_contents_are_invalid_argument(server: ServerProcess, manifest: Manifest,
                                                                    case: str, message: str) -> None:
    full = 4 * manifest.example_size
    req = _raw_request(manifest, full - 4) if case == "short" else _raw_request(manifest, full, typed_too=True)
    with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_a_full_queue_is_resource_exhausted_over_oip(exported_model_dir: Path, manifest: Manifest,
                                                     tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--max-queue-rows", "3000")
    try:
        c = tc.InferenceServerClient(url=s.target)
        results: list[object] = []
        done = threading.Event()

        def callback(result: tc.InferResult | None, error: InferenceServerException | None) -> None:
            results.append(error if error is not None else result)
            done.set()

        c.async_infer("encoder", [infer_input("x", x_batch(manifest, 3000))], callback)
        while s.metric("vae_queue_rows", model="encoder") == 0 and not done.is_set():
            time.sleep(0.002)  # until the big request is queued; 3,000 single-row runs take 60-150 ms
        with pytest.raises(InferenceServerException) as e:
            c.infer("encoder", [infer_input("x", x_batch(manifest, 2000))])
        assert _status(e) == "StatusCode.RESOURCE_EXHAUSTED"
        assert done.wait(60) and not isinstance(results[0], Exception)
        c.close()
    finally:
        assert s.stop() == 0


# -- ModelStreamInfer: tritonclient's start_stream / async_stream_infer, unchanged ----------------------

class StreamAnswers:
    """What a tritonclient stream callback receives, by arrival."""

    def __init__(self) -> None:
        self.got: list[tuple[tc.InferResult | None, InferenceServerException | None]] = []
        self.cv = threading.Condition()

    def __call__(self, result: tc.InferResult | None, error: InferenceServerException | None) -> None:
        with self.cv:
            self.got.append((result, error))
            self.cv.notify_all()

    def wait(self, n: int, timeout_s: float = 30) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.got) >= n, timeout_s), f"{len(self.got)} of {n} answers"


def test_stream_infer_answers_every_request_with_its_id_matching_onnx_runtime(
        server: ServerProcess, manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 100, seed=5)
    ref = sessions["encoder"].run(["mu"], {"x": x})[0]
    answers = StreamAnswers()
    c = tc.InferenceServerClient(url=server.target)
    ok0 = server.metric("vae_requests_total", method="ModelStreamInfer", code="OK")
    c.start_stream(callback=answers)
    try:
        for i in range(100):
            c.async_stream_infer("encoder", [infer_input("x", x[i:i + 1])], request_id=f"r{i}")
        answers.wait(100)
    finally:
        c.stop_stream()
        c.close()
    by_id = {}
    for result, error in answers.got:
        assert error is None, error
        assert result is not None
        by_id[result.get_response().id] = result.as_numpy("mu")
    assert sorted(by_id) == sorted(f"r{i}" for i in range(100))
    for i in range(100):
        np.testing.assert_allclose(by_id[f"r{i}"], ref[i:i + 1], rtol=1e-5, atol=1e-6)
    assert server.metric("vae_requests_total", method="ModelStreamInfer", code="OK") == ok0 + 100
    assert server.metric("vae_open_streams", method="ModelStreamInfer") == 0


def test_an_invalid_stream_request_gets_an_error_message_and_the_stream_stays_open(
        server: ServerProcess, manifest: Manifest) -> None:
    answers = StreamAnswers()
    c = tc.InferenceServerClient(url=server.target)
    c.start_stream(callback=answers)
    try:
        c.async_stream_infer("nope", [infer_input("x", x_batch(manifest, 1))], request_id="bad-model")
        answers.wait(1)
        c.async_stream_infer("encoder", [infer_input("x", np.zeros((1, manifest.example_size + 1), np.float32))],
                             request_id="bad-shape")
        answers.wait(2)
        c.async_stream_infer("encoder", [infer_input("x", x_batch(manifest, 2))], request_id="good")
        answers.wait(3)
    finally:
        c.stop_stream()
        c.close()
    (r0, e0), (r1, e1), (r2, e2) = answers.got
    assert r0 is None and e0 is not None and "model_name: expected one of" in e0.message()
    assert r1 is None and e1 is not None and "x: expected shape" in e1.message()
    assert e2 is None and r2 is not None and r2.get_response().id == "good" and r2.as_numpy("mu").shape[0] == 2


def test_a_full_queue_is_an_error_answer_on_the_stream_not_a_dead_stream(exported_model_dir: Path, manifest: Manifest,
                                                                        tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--max-queue-rows", "3000")
    answers = StreamAnswers()
    c = tc.InferenceServerClient(url=s.target)
    try:
        c.start_stream(callback=answers)
        c.async_stream_infer("encoder", [infer_input("x", x_batch(manifest, 3000))], request_id="big")
        while s.metric("vae_queue_rows", model="encoder") == 0 and not answers.got:
            time.sleep(0.002)  # until the big message is queued; 3,000 single-row runs take 60-150 ms
        c.async_stream_infer("encoder", [infer_input("x", x_batch(manifest, 2000))], request_id="refused")
        answers.wait(2, 60)
        c.async_stream_infer("encoder", [infer_input("x", x_batch(manifest, 1))], request_id="after")
        answers.wait(3, 60)
        c.stop_stream()
        c.close()
        errors = [e for _, e in answers.got if e is not None]
        assert len(errors) == 1 and "--max-queue-rows" in errors[0].message(), errors
        ids = sorted(r.get_response().id for r, _ in answers.got if r is not None)
        assert ids == ["after", "big"]
        assert s.metric("vae_requests_total", method="ModelStreamInfer", code="RESOURCE_EXHAUSTED") == 1
    finally:
        assert s.stop() == 0
