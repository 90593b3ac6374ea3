"""Score (issue 27) against the real server, on both gRPC front ends: vae.v1 Score and ScoreStream, the Open
Inference Protocol model `score` over gRPC, its stream and REST give the same bytes for the same seed, equal
to the export's graphs on ONNX Runtime with the numpy scorer; bad arguments are INVALID_ARGUMENT (400)
naming the field; the calibration the export wrote drives the percentiles, flags and metrics."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.inference import grpc_service_pb2_grpc as oip_grpc
from serving.client import VaeClient, in_order
from serving.manifest import Manifest
from serving.scoring import DEFAULT_K, OUTLIER_KIND, draw_eps, latent_samples, score_terms
from tests.helpers import x_batch
from tests.integration._server import REPO, ServerProcess

pytestmark = pytest.mark.usefixtures("grpc_frontend")  # every test on both gRPC front ends


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[VaeClient]:
    with VaeClient(server.target) as c:
        yield c


@pytest.fixture(scope="module")
def oip(server: ServerProcess) -> Iterator[oip_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield oip_grpc.GRPCInferenceServiceStub(channel)


def post_json(port: int, path: str, obj: Any) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _oip_request(x: np.ndarray, seed: int, **params: Any) -> oip_pb.ModelInferRequest:
    p = {"seed": oip_pb.InferParameter(uint64_param=seed)}
    for k, v in params.items():
        p[k] = (oip_pb.InferParameter(double_param=v) if isinstance(v, float)
                else oip_pb.InferParameter(int64_param=v))
    return oip_pb.ModelInferRequest(
        model_name="score", id="r1", parameters=p,
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()])


def _oip_outputs(resp: oip_pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(raw, np.float32).reshape(tuple(t.shape))
            for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def test_the_export_wrote_a_calibration_of_its_validation_split(manifest: Manifest) -> None:
    cal = manifest.calibration
    assert cal is not None and cal.k == DEFAULT_K and cal.split == "validation"
    config = manifest.raw["training"]["config"]
    n_val = round(config["val_fraction"] * 1797)  # digits: the run's validation split, half in the tables
    assert cal.count == n_val - n_val // 2
    assert cal.stats.mean.shape == (manifest.example_size,)
    assert cal.threshold(OUTLIER_KIND, 0.5) <= cal.threshold(OUTLIER_KIND, 0.99) <= cal.threshold(OUTLIER_KIND, 0.999)


def test_score_equals_the_graphs_with_the_numpy_scorer_and_every_protocol_agrees(
        client: VaeClient, oip: oip_grpc.GRPCInferenceServiceStub, server: ServerProcess, manifest: Manifest,
        sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 7, seed=3)
    r = client.score(x, seed=42, want_feature_scores=True)
    # The reference: ONNX Runtime on the export's graphs and serving.scoring, in this process.
    mu, var, logvar = sessions["encoder"].run(["mu", "var", "logvar"], {"x": x})
    eps = draw_eps(42, DEFAULT_K, 7, manifest.latent_dim)
    names = manifest.graphs["decoder"].output_names()
    decoded = dict(zip(names, sessions["decoder"].run(names, {"z": latent_samples(mu, var, eps)}), strict=True))
    assert manifest.calibration is not None
    ref = score_terms(x, mu, logvar, eps, decoded, manifest.likelihood, manifest.calibration.stats, True)
    np.testing.assert_allclose(r.nll, ref.nll, rtol=1e-5)
    assert ref.outlier is not None
    np.testing.assert_allclose(r.score, ref.outlier, rtol=1e-5)
    assert r.feature_scores is not None and ref.features is not None
    np.testing.assert_allclose(r.feature_scores, ref.features, rtol=1e-5, atol=1e-6)
    assert (r.k, r.seed, r.kind, r.quantile) == (DEFAULT_K, 42, OUTLIER_KIND, 0.99)
    assert r.percentile is not None and r.is_outlier is not None
    np.testing.assert_array_equal(r.is_outlier, r.score > r.threshold)
    assert r.calibration.startswith("calibrated: k=16")

    # The same seed, exactly the same answer: batched with another message's rows on a stream, over OIP gRPC,
    # its stream and REST.
    streamed = in_order(client.score_stream([x, x], seed=42))
    for s in streamed:
        np.testing.assert_array_equal(s.score, r.score)
        np.testing.assert_array_equal(s.nll, r.nll)
    resp = oip.ModelInfer(_oip_request(x, 42))
    got = _oip_outputs(resp)
    assert list(got) == ["score", "nll", "percentile", "is_outlier", "threshold"]
    np.testing.assert_array_equal(got["score"], r.score)
    np.testing.assert_array_equal(got["nll"], r.nll)
    np.testing.assert_array_equal(got["percentile"], r.percentile)
    np.testing.assert_array_equal(got["is_outlier"], r.is_outlier.astype(np.float32))
    assert resp.id == "r1" and resp.parameters["seed"].int64_param == 42
    assert resp.parameters["calibration"].string_param == r.calibration
    answers = list(oip.ModelStreamInfer(iter([_oip_request(x, 42)])))
    np.testing.assert_array_equal(_oip_outputs(answers[0].infer_response)["score"], r.score)
    status, body = post_json(server.http_port, "/v2/models/score/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
        "parameters": {"seed": 42}, "outputs": [{"name": "score"}, {"name": "feature_scores"}]})
    assert status == 200, body
    assert body["parameters"]["seed"] == 42 and body["parameters"]["kind"] == OUTLIER_KIND
    np.testing.assert_array_equal(np.asarray(body["outputs"][0]["data"], np.float32), r.score)
    np.testing.assert_array_equal(np.asarray(body["outputs"][1]["data"], np.float32).reshape(r.feature_scores.shape),
                                  r.feature_scores)


def test_k_quantile_and_kind_change_what_they_should(client: VaeClient, manifest: Manifest) -> None:
    x = x_batch(manifest, 4, seed=5)
    base = client.score(x, seed=1)
    strict = client.score(x, seed=1, quantile=0.5)
    np.testing.assert_array_equal(strict.score, base.score)
    assert strict.threshold < base.threshold
    nll = client.score(x, seed=1, kind="nll")
    np.testing.assert_array_equal(nll.score, base.nll)
    other_k = client.score(x, seed=1, k=4)  # not the calibrated k: scores without percentiles, and why
    assert other_k.percentile is None and other_k.is_outlier is None and np.isnan(other_k.threshold)
    assert "calibrated at k=16" in other_k.calibration
    tight = client.score(x, seed=1, k=64, kind="nll")
    assert tight.nll.mean() <= other_k.nll.mean() + 1.0  # more samples: a tighter (lower) bound, up to noise


@pytest.mark.parametrize(("args", "field", "expected"), [
    ({"k": 0}, "k", "1 <= k <= 256"),
    ({"k": 257}, "k", "1 <= k <= 256"),
    ({"quantile": 1.0}, "quantile", "a number in (0, 1)"),
    ({"quantile": 0.0}, "quantile", "a number in (0, 1)"),
    ({"kind": "elbo"}, "kind", "one of ['nll', 'feature-z']"),
])
def test_bad_arguments_are_invalid_argument_naming_the_field(client: VaeClient, manifest: Manifest,
                                                             args: dict[str, Any], field: str, expected: str) -> None:
    with pytest.raises(grpc.RpcError) as e:
        client.score(x_batch(manifest, 2), **args)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: expected ") and expected in e.value.details()


def test_wrong_shapes_and_too_many_decoder_rows_are_refused_on_every_protocol(
        client: VaeClient, oip: oip_grpc.GRPCInferenceServiceStub, server: ServerProcess, manifest: Manifest) -> None:
    bad = np.zeros((2, manifest.example_size + 1), np.float32)
    with pytest.raises(grpc.RpcError) as e:
        client.score(bad)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("x: expected shape")
    many = x_batch(manifest, 100)
    with pytest.raises(grpc.RpcError) as e:
        client.score(many, k=200)  # 20,000 decoder rows: over the default --max-queue-rows 16384
    assert "k x N <= 16384 decoder rows" in e.value.details() and "k <= 163 for N = 100" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        oip.ModelInfer(_oip_request(x_batch(manifest, 2), 1, quantile=2.0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "quantile" in e.value.details()
    status, body = post_json(server.http_port, "/v2/models/score/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, manifest.example_size],
                    "data": [0.0] * manifest.example_size}], "parameters": {"k": "many"}})
    assert status == 400 and body["error"].startswith("parameters.k: expected an integer")
    status, body = post_json(server.http_port, "/v2/models/score/infer", {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, manifest.example_size],
                    "data": [0.0] * manifest.example_size}], "parameters": {"quantlie": 0.9}})
    assert status == 400 and "quantlie" in body["error"]
    assert client.score(x_batch(manifest, 1)).score.shape == (1,)  # and the server goes on


def _by_name(server: ServerProcess, metric: str, name: str) -> float:
    return server.metrics().get((metric, (("name", name),)), 0.0)


def test_scored_rows_count_in_the_metrics(client: VaeClient, server: ServerProcess, manifest: Manifest) -> None:
    scored = _by_name(server, "vae_scored_rows_total", manifest.name)
    flagged = _by_name(server, "vae_flagged_rows_total", manifest.name)
    r = client.score(x_batch(manifest, 6, seed=11), seed=2)
    client.score(x_batch(manifest, 3, seed=11), seed=2, kind="nll")  # not the default kind: not counted
    assert _by_name(server, "vae_scored_rows_total", manifest.name) == scored + 6
    assert r.is_outlier is not None  # at the server's quantile, the request's default
    assert _by_name(server, "vae_flagged_rows_total", manifest.name) == flagged + int(r.is_outlier.sum())
    assert _by_name(server, "vae_outlier_quantile", manifest.name) == 0.99
    assert _by_name(server, "vae_score_percentile_count", manifest.name) == scored + 6


def test_the_client_cli_prints_a_table_and_writes_heat_maps(server: ServerProcess, manifest: Manifest,
                                                           tmp_path: Path) -> None:
    x = x_batch(manifest, 5, seed=4)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-m", "serving.client", "--target", server.target, "score", "--input",
                           str(tmp_path / "x.npy"), "--seed", "3", "--png", str(tmp_path / "top.png"), "--top", "3"],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["row", OUTLIER_KIND, "nll", "percentile", "outlier"] and len(lines) == 7
    summary = json.loads(lines[-1])
    assert summary["seed"] == 3 and len(summary["png_rows"]) == 3
    from PIL import Image

    with Image.open(tmp_path / "top.png") as img:
        assert img.size == (4 * (3 * 9 + 1), 4 * (2 * 9 + 1))  # 3 columns of 8x8 digits over their heat maps
