"""`python -m loadgen` for a few seconds against the real server (real export, real gRPC)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_module
from tests.integration._server import REPO, ServerProcess

pytestmark = pytest.mark.slow


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("loadgen", *args, timeout=60, check=False)


def result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize(("rpc", "rows", "model"), [("encode", 1, "encoder"), ("sample", 4, "decoder"),
                                                    ("reconstruct", 2, "encoder"), ("decode", 3, "decoder"),
                                                    ("infer-encoder", 2, "encoder"), ("http-encoder", 2, "encoder"),
                                                    ("http-decoder", 1, "decoder"), ("http-json-encoder", 3, "encoder"),
                                                    ("http-json-decoder", 2, "decoder")])
def test_a_short_closed_loop_run_reports_requests_cpu_memory_and_batches(
        server: ServerProcess, rpc: str, rows: int, model: str) -> None:
    ready = server.ready_path
    r = result(bench("--ready-file", str(ready), "--rpc", rpc, "--rows", str(rows), "--concurrency", "8",
                     "--duration-s", "1", "--warmup-s", "0.3"))
    assert r["requests"] > 10 and r["errors"] == {} and r["rows_per_s"] == pytest.approx(rows * r["requests_per_s"])
    s = r["server"]
    assert s["pid"] == server.proc.pid and s["cpu_us_per_request"] > 0 and 10 < s["pss_mb"] < 1000
    b = r["server_batches"]
    assert b["model"] == model and b["runs"] > 0 and b["rows"] >= rows * r["requests"] * 0.5


@pytest.mark.parametrize(("rpc", "model"), [("infer-encoder", "encoder"), ("decode", "decoder"),
                                            ("reconstruct", "encoder")])
def test_a_streaming_run_reports_cpu_per_message_and_the_server_counts_stream_messages(
        server: ServerProcess, rpc: str, model: str) -> None:
    method = {"infer-encoder": "ModelStreamInfer", "decode": "DecodeStream", "reconstruct": "ReconstructStream"}[rpc]
    before = server.metric("vae_requests_total", method=method, code="OK")
    proc = bench("--ready-file", str(server.ready_path), "--rpc", rpc, "--streams", "4", "--stream-inflight", "4",
                 "--duration-s", "1", "--warmup-s", "0.3")
    r = result(proc)
    assert r["loop"] == "stream" and r["streams"] == 4 and r["stream_inflight"] == 4 and r["concurrency"] == 16
    assert r["requests"] > 10 and r["errors"] == {} and r["stuck"] == 0
    assert r["server"]["cpu_us_per_request"] > 0 and r["server_batches"]["model"] == model
    assert server.metric("vae_requests_total", method=method, code="OK") - before >= r["requests"]
    assert "4 streams x 4 in flight" in proc.stdout


def test_sample_has_no_stream_and_the_flag_says_so(server: ServerProcess) -> None:
    proc = bench("--ready-file", str(server.ready_path), "--rpc", "sample", "--streams", "2", "--duration-s", "1")
    assert proc.returncode == 2 and "streams: expected" in proc.stderr


def test_an_open_loop_run_against_the_real_server(server: ServerProcess) -> None:
    proc = bench("--target", server.target, "--server-pid", str(server.proc.pid), "--rpc", "encode",
                 "--rate", "100", "--duration-s", "1", "--warmup-s", "0.2")
    r = result(proc)
    assert r["loop"] == "open" and r["requests_per_s"] == pytest.approx(100, rel=0.2) and r["errors"] == {}
    assert "req/s" in proc.stdout


def test_a_remote_target_is_refused_before_anything_is_sent() -> None:
    proc = bench("--target", "192.0.2.1:50051", "--duration-s", "1")
    assert proc.returncode == 2 and "only loopback" in proc.stderr


@pytest.mark.skipif(shutil.which("h2load") is None,
                    reason="h2load missing (Debian nghttp2-client; `make test` installs it as root)")
def test_the_grpc_floor_measures_do_nothing_servers_of_each_kind_with_h2load(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    proc = run_module("benchmarks.grpc_floor", "--kinds", "aio-uvloop", "sync-4", "--rounds", "1", "--requests",
                      "400", "--streams", "16", "--out", str(out), timeout=120)
    res = json.loads(out.read_text())
    assert list(res["kinds"]) == ["aio-uvloop", "sync-4"] and res["requests"] == 400
    for r in res["kinds"].values():
        assert r["server_cpu_us_per_request"] > 0 and r["requests_per_s"] > 0
        assert r["server_cpu_us_per_request_rounds"] == [r["server_cpu_us_per_request"]]
    assert "aio-uvloop" in proc.stdout and "us CPU/request" in proc.stdout


def test_the_naive_reference_server_answers_model_infer_like_onnx_runtime(exported_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    import grpc
    import numpy as np
    import onnxruntime as ort

    from loadgen.process import LocalServer
    from serving._proto.inference import grpc_service_pb2 as pb
    from serving._proto.inference import grpc_service_pb2_grpc as pb_grpc

    s = LocalServer.start([sys.executable, "-m", "benchmarks.references.naive_server", "--model-dir",
                           str(exported_model_dir)], tmp_path, cwd=REPO)
    try:
        sess = ort.InferenceSession(str(exported_model_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).random((3, *sess.get_inputs()[0].shape[1:]), dtype=np.float32)
        req = pb.ModelInferRequest(model_name="encoder", raw_input_contents=[x.tobytes()])
        req.inputs.add(name="x", datatype="FP32", shape=x.shape)
        with grpc.insecure_channel(s.target) as ch:
            resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
        names = [o.name for o in sess.get_outputs()]
        assert [o.name for o in resp.outputs] == names
        for raw, ref in zip(resp.raw_output_contents, sess.run(names, {"x": x})):
            np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(ref.shape), ref)
        r = result(bench("--ready-file", str(s.ready_path), "--rpc", "infer-encoder", "--concurrency", "4",
                         "--duration-s", "0.5", "--warmup-s", "0.2", "--example-shape",
                         *[str(d) for d in x.shape[1:]]))
        assert r["requests"] > 10 and r["errors"] == {}
    finally:
        assert s.stop() == 0
