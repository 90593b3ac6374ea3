"""Score with a model repository (issues 26 and 27 together), on both gRPC front ends: a Score request names
its model and version as Encode's does (vae.v1 `model`/`version`, OIP `<vae>.score` and `model_version`,
REST), and is answered by that version alone: its graphs, its default k and kind, and its own calibration
(its model.json), never another's. Versions are tiny exports (tests/tiny_export.py) calibrated at
"export" the way training.export does; each is checked against its own graphs on ONNX Runtime with the
numpy scorer, in this process."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.inference import grpc_service_pb2_grpc as oip_grpc
from serving.client import Scored, VaeClient, in_order
from serving.manifest import load_manifest
from serving.scoring import DEFAULT_K, OUTLIER_KIND
from tests.integration._server import ServerProcess, start_server
from tests.tiny_export import EXAMPLE_DIM, publish_version
from training.calibrate import served_terms

pytestmark = pytest.mark.usefixtures("grpc_frontend")  # every test on both gRPC front ends

SEED = 7
VERSIONS = (("a", 1), ("a", 2), ("b", 1))  # (model, version); a's newest is 2


def _value(server: ServerProcess, metric: str, **labels: str) -> float:
    return server.metrics().get((metric, tuple(sorted(labels.items()))), 0.0)


def _expected(version_dir: Path, x: np.ndarray) -> dict[str, np.ndarray | float]:
    """What `version_dir`'s export scores for x at the defaults (k = 16, feature-z, quantile 0.99): its own
    graphs on ONNX Runtime, the numpy scorer, its own calibration."""
    m = load_manifest(version_dir)
    cal = m.calibration
    assert cal is not None and cal.k == DEFAULT_K
    enc, dec = (ort.InferenceSession(str(version_dir / f"{g}.onnx"), providers=["CPUExecutionProvider"])
                for g in ("encoder", "decoder"))
    terms = served_terms(enc, dec, x, m.likelihood, DEFAULT_K, SEED, cal)
    assert terms.outlier is not None
    return {"score": terms.outlier, "nll": terms.nll, "percentile": cal.percentile(OUTLIER_KIND, terms.outlier),
            "threshold": cal.threshold(OUTLIER_KIND, 0.99)}


def _oip_request(name: str, version: str, x: np.ndarray) -> oip_pb.ModelInferRequest:
    return oip_pb.ModelInferRequest(
        model_name=name, model_version=version, parameters={"seed": oip_pb.InferParameter(uint64_param=SEED)},
        inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.tobytes()])


def _outputs(resp: oip_pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {t.name: np.frombuffer(raw, np.float32).reshape(tuple(t.shape))
            for t, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def test_score_answers_from_the_model_and_version_asked_for_with_that_versions_own_calibration(
        tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    repo = tmp_path / "repo"
    for name, version in VERSIONS:  # each calibrated on its own held-out data, as each export would be
        publish_version(repo, name, version, offset=3.0 * version if name == "a" else -2.0,
                        calibrate_on=rng.uniform(0, 1, (300, EXAMPLE_DIM)).astype(np.float32))
    x = rng.uniform(0, 1, (5, EXAMPLE_DIM)).astype(np.float32)
    expected = {(n, v): _expected(repo / n / str(v), x) for n, v in VERSIONS}
    for i, a in enumerate(VERSIONS):  # the same x and seed score differently on each version
        for b in VERSIONS[i + 1:]:
            assert not np.allclose(expected[a]["score"], expected[b]["score"], rtol=1e-3), (a, b)
            assert expected[a]["threshold"] != expected[b]["threshold"], (a, b)
    server = start_server(repo, tmp_path, "--model-repository", str(repo), "--version-policy", "all")
    try:
        answers: dict[tuple[str, int], Scored] = {}
        for n, v in VERSIONS:
            with VaeClient(server.target, model=n, version=str(v)) as client:
                r = answers[(n, v)] = client.score(x, seed=SEED)
                want = expected[(n, v)]
                np.testing.assert_allclose(r.score, want["score"], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(r.nll, want["nll"], rtol=1e-5)
                assert r.percentile is not None and r.is_outlier is not None
                np.testing.assert_allclose(r.percentile, want["percentile"], rtol=1e-4, atol=1e-3)
                assert r.threshold == pytest.approx(want["threshold"], rel=1e-12)
                np.testing.assert_array_equal(r.is_outlier, r.score > r.threshold)
                assert (r.k, r.kind, r.seed) == (DEFAULT_K, OUTLIER_KIND, SEED)
                assert r.calibration.startswith(f"calibrated: k={DEFAULT_K}, 150 validation")
                streamed = in_order(client.score_stream([x], seed=SEED))  # ScoreStream: the same version
                np.testing.assert_array_equal(streamed[0].score, r.score)
        with VaeClient(server.target, model="a") as client:  # no version: the newest, 2
            np.testing.assert_array_equal(client.score(x, seed=SEED).score, answers[("a", 2)].score)

        with grpc.insecure_channel(server.target) as channel:
            oip = oip_grpc.GRPCInferenceServiceStub(channel)
            for (n, v), r in answers.items():  # OIP: the same bytes as vae.v1, from the version asked for
                resp = oip.ModelInfer(_oip_request(f"{n}.score", str(v), x), timeout=30)
                assert (resp.model_name, resp.model_version) == (f"{n}.score", str(v))
                got = _outputs(resp)
                np.testing.assert_array_equal(got["score"], r.score)
                np.testing.assert_array_equal(got["percentile"], r.percentile)
                np.testing.assert_array_equal(got["threshold"], np.array([r.threshold], np.float32))
            meta = oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="a.score"))
            assert list(meta.versions) == ["1", "2"] and [t.name for t in meta.inputs] == ["x"]
            assert oip.ModelReady(oip_pb.ModelReadyRequest(name="b.score", version="1")).ready
            for request, message in ((_oip_request("score", "", x), "got 'score'"),  # two models: name one
                                     (_oip_request("b.score", "2", x), "'b.score' has versions ['1'] ready")):
                with pytest.raises(grpc.RpcError) as e:
                    oip.ModelInfer(request, timeout=30)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and message in (e.value.details() or "")
        with VaeClient(server.target) as client, pytest.raises(grpc.RpcError) as e:
            client.score(x, seed=SEED)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert "model: expected one of ['a', 'b'], got ''" in (e.value.details() or "")

        body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}], "parameters": {"seed": SEED}}).encode()
        base = f"http://localhost:{server.http_port}/v2/models"
        with urllib.request.urlopen(urllib.request.Request(f"{base}/a.score/versions/1/infer", body)) as h:
            rest = json.loads(h.read())
        assert rest["model_version"] == "1" and rest["parameters"]["seed"] == SEED
        np.testing.assert_array_equal(np.asarray(rest["outputs"][0]["data"], np.float32), answers[("a", 1)].score)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(f"{base}/c.score/infer", body))
        assert err.value.code == 404

        # Score metrics per model version (as vae_model_info's labels): a version 1 scored on vae.v1, its
        # stream, OIP gRPC and REST; b's version 1 on all but REST.
        assert _value(server, "vae_scored_rows_total", name="a", version="1") == 4 * len(x)
        assert _value(server, "vae_scored_rows_total", name="b", version="1") == 3 * len(x)
        assert _value(server, "vae_outlier_quantile", name="a", version="2") == 0.99
        flags = answers[("b", 1)].is_outlier
        assert flags is not None
        assert _value(server, "vae_flagged_rows_total", name="b", version="1") == 3 * int(flags.sum())
    finally:
        assert server.stop() == 0, server.log()
