"""The Open Inference Protocol over HTTP/REST (`serving.http`), driven by tritonclient.http unmodified
(sync and asyncio, JSON and binary tensors), plus raw HTTP for what a client library would never send."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as th
import tritonclient.http.aio as tha
from tritonclient.utils import InferenceServerException

from serving.manifest import Manifest
from tests.helpers import unread_bytes, wait_until, x_batch, z_batch
from tests.integration._server import REPO, ServerProcess, start_server

pytestmark = pytest.mark.usefixtures("grpc_frontend")
# The default front end only: the HTTP port: the same aiohttp server and data plane whichever front end serves gRPC.
GRPC_FRONTENDS = ("native",)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[th.InferenceServerClient]:
    c = th.InferenceServerClient(url=f"127.0.0.1:{server.http_port}", concurrency=4)
    yield c
    c.close()


def infer_input(name: str, a: np.ndarray, binary: bool) -> th.InferInput:
    i = th.InferInput(name, list(a.shape), "FP32")
    i.set_data_from_numpy(a, binary_data=binary)
    return i


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def post_json(port: int, path: str, obj: Any) -> tuple[int, dict[str, Any]]:
    status, _, body = request(port, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})
    return status, json.loads(body)


# -- tritonclient.http, unchanged -------------------------------------------------------------------

def test_health_and_metadata_with_tritonclient_http(client: th.InferenceServerClient,
                                                     sessions: dict[str, ort.InferenceSession]) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("encoder") and client.is_model_ready("decoder", "1")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "vae-serve"
    for model, sess in sessions.items():
        meta = client.get_model_metadata(model)
        assert meta["name"] == model and meta["versions"] == ["1"]
        for kind, args in (("inputs", sess.get_inputs()), ("outputs", sess.get_outputs())):
            assert meta[kind] == [{"name": a.name, "datatype": "FP32", "shape": [-1, *a.shape[1:]]} for a in args]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("nope")
    assert "model_name" in str(e.value) and e.value.status() == "400"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnx_runtime_with_json_and_binary_tensors(
        client: th.InferenceServerClient, manifest: Manifest, sessions: dict[str, ort.InferenceSession],
        binary: bool) -> None:
    x, z = x_batch(manifest, 5), z_batch(manifest, 4)
    r = client.infer("encoder", [infer_input("x", x, binary)], request_id="req-7",
                     outputs=[th.InferRequestedOutput(n, binary_data=binary) for n in ("mu", "var", "logvar")])
    for n, ref in zip(("mu", "var", "logvar"), sessions["encoder"].run(["mu", "var", "logvar"], {"x": x})):
        np.testing.assert_array_equal(r.as_numpy(n), ref)  # float32 survives JSON exactly
    assert r.get_response()["id"] == "req-7" and r.get_response()["model_name"] == "encoder"
    names = [o.name for o in sessions["decoder"].get_outputs()]
    r = client.infer("decoder", [infer_input("z", z, binary)], model_version="1",
                     outputs=[th.InferRequestedOutput(n, binary_data=binary) for n in names])
    for n, ref in zip(names, sessions["decoder"].run(names, {"z": z})):
        np.testing.assert_array_equal(r.as_numpy(n), ref)


def test_mixed_binary_and_json_outputs_and_the_default_of_every_output(
        client: th.InferenceServerClient, manifest: Manifest, sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 3, seed=2)
    r = client.infer("encoder", [infer_input("x", x, True)],
                     outputs=[th.InferRequestedOutput("var", binary_data=False),
                              th.InferRequestedOutput("mu", binary_data=True)])
    outs = r.get_response()["outputs"]
    assert [o["name"] for o in outs] == ["var", "mu"]
    assert "data" in outs[0] and outs[1]["parameters"]["binary_data_size"] == 4 * x.shape[0] * manifest.latent_dim
    mu, var = sessions["encoder"].run(["mu", "var"], {"x": x})
    np.testing.assert_array_equal(r.as_numpy("mu"), mu)
    np.testing.assert_array_equal(r.as_numpy("var"), var)
    r = client.infer("encoder", [infer_input("x", x, False)])  # no outputs named: all of them, JSON
    assert [o["name"] for o in r.get_response()["outputs"]] == ["mu", "var", "logvar"]


def test_tritonclient_http_aio_under_concurrency(server: ServerProcess, manifest: Manifest,
                                                 sessions: dict[str, ort.InferenceSession]) -> None:
    async def main() -> None:
        c = tha.InferenceServerClient(url=f"127.0.0.1:{server.http_port}", conn_limit=16)
        try:
            assert await c.is_server_ready()
            xs = [x_batch(manifest, 1 + i % 4, seed=i) for i in range(48)]
            rs = await asyncio.gather(*(c.infer("encoder", [infer_input("x", x, i % 2 == 0)])
                                        for i, x in enumerate(xs)))
            for x, r in zip(xs, rs):
                np.testing.assert_array_equal(r.as_numpy("mu"), sessions["encoder"].run(["mu"], {"x": x})[0])
        finally:
            await c.close()

    asyncio.run(main())


def test_request_compression_from_tritonclient_is_undone(client: th.InferenceServerClient, manifest: Manifest,
                                                          sessions: dict[str, ort.InferenceSession]) -> None:
    x = x_batch(manifest, 2, seed=5)
    for algo in ("gzip", "deflate"):
        r = client.infer("encoder", [infer_input("x", x, True)], request_compression_algorithm=algo)
        np.testing.assert_array_equal(r.as_numpy("mu"), sessions["encoder"].run(["mu"], {"x": x})[0])


# -- what tritonclient would never send: each a clear 400, and the server keeps serving --------------

def _infer_body(manifest: Manifest, **over: Any) -> dict[str, Any]:
    x = x_batch(manifest, 2)
    body: dict[str, Any] = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}
    body["inputs"][0].update(over)
    return body


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b.update(inputs="x"), "inputs: expected a list of input tensors"),
    (lambda b: b["inputs"][0].update(name="y"), "inputs: expected one input named 'x'"),
    (lambda b: b["inputs"][0].update(datatype="FP16"), "inputs['x'].datatype: expected FP32"),
    (lambda b: b["inputs"][0].update(shape=[2, "784"]), "inputs['x'].shape: expected a list of integers"),
    (lambda b: b["inputs"][0].update(data=[[1.0, 2.0], [3.0]]), "expected a flat or evenly nested list"),
    (lambda b: b["inputs"][0].update(data=["a"] * len(b["inputs"][0]["data"])), "expected numbers, got strings"),
    (lambda b: b["inputs"][0].update(data=b["inputs"][0]["data"][:-1]), "bytes of float32 for shape"),
    (lambda b: b["inputs"][0].pop("data"), "inputs['x'].data: expected the tensor's values"),
    (lambda b: b.update(outputs=[{"name": "nope"}]), "outputs: expected names among"),
    (lambda b: b.update(parameters={"timeout": "soon"}), "parameters.timeout: expected microseconds"),
    (lambda b: b.update(parameters={"binary_data_output": 1}), "parameters.binary_data_output: expected true"),
])
def test_malformed_json_requests_are_400_naming_the_field(server: ServerProcess, manifest: Manifest,
                                                          mutate: Any, message: str) -> None:
    body = _infer_body(manifest)
    mutate(body)
    status, answer = post_json(server.http_port, "/v2/models/encoder/infer", body)
    assert status == 400 and message in answer["error"], answer


@pytest.mark.parametrize(("body", "headers", "message"), [
    (b"{not json", {}, "body: expected a JSON inference request, got text that does not parse"),
    (b"\x80{}", {}, "bytes that are not UTF-8"),
    (b"[1, 2]", {}, "body: expected a JSON object, got list"),
    (b"{}", {"Inference-Header-Content-Length": "99"}, "Inference-Header-Content-Length: expected an integer"),
    (b"{}", {"Inference-Header-Content-Length": "x"}, "Inference-Header-Content-Length: expected an integer"),
])
def test_bodies_that_do_not_parse_are_400(server: ServerProcess, body: bytes, headers: dict[str, str],
                                          message: str) -> None:
    status, h, answer = request(server.http_port, "POST", "/v2/models/encoder/infer", body, headers)
    assert status == 400 and message in json.loads(answer)["error"] and h["content-type"].startswith(
        "application/json")


def test_binary_sizes_that_do_not_add_up_are_400(server: ServerProcess, manifest: Manifest) -> None:
    x = x_batch(manifest, 2)
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    ok = request(server.http_port, "POST", "/v2/models/encoder/infer", head + x.tobytes(),
                 {"Inference-Header-Content-Length": str(len(head))})
    assert ok[0] == 200
    short = request(server.http_port, "POST", "/v2/models/encoder/infer", head + x.tobytes()[:-4],
                    {"Inference-Header-Content-Length": str(len(head))})
    assert short[0] == 400 and "binary_data_size: expected the " in json.loads(short[2])["error"]
    extra = request(server.http_port, "POST", "/v2/models/encoder/infer",
                    json.dumps(_infer_body(manifest)).encode() + b"junk",
                    {"Inference-Header-Content-Length": str(len(json.dumps(_infer_body(manifest))))})
    assert extra[0] == 400 and "no bytes after the JSON header" in json.loads(extra[2])["error"]


def test_curl_posts_a_large_json_body_without_waiting_for_100_continue(server: ServerProcess,
                                                                     manifest: Manifest) -> None:
    body = json.dumps(_infer_body(manifest, shape=[40, *manifest.example_shape],
                                  data=x_batch(manifest, 40).ravel().tolist())).encode()
    assert len(body) > 1024  # curl sends "Expect: 100-continue" and waits a second for the answer to it
    t0 = time.perf_counter()
    out = subprocess.run(["curl", "-sS", "-X", "POST", "--data-binary", "@-", "-H", "Content-Type: application/json",
                          f"http://127.0.0.1:{server.http_port}/v2/models/encoder/infer"], input=body,
                         capture_output=True, timeout=30, check=True)
    assert time.perf_counter() - t0 < 0.9 and json.loads(out.stdout)["outputs"][0]["shape"] == [40, manifest.latent_dim]


def test_paths_methods_and_the_old_metrics_behaviour(server: ServerProcess) -> None:
    port = server.http_port
    for path in ("/", "/metrics/x", "/admin", "/v2/models", "/v2/models/encoder/explain", "/v3"):
        status, _, body = request(port, "GET", path)
        assert status == 404 and "not found" in json.loads(body)["error"], path
    status, h, _ = request(port, "POST", "/metrics", b"x")
    assert status == 405 and h["allow"] == "GET, HEAD"
    status, h, _ = request(port, "GET", "/v2/models/encoder/infer")
    assert status == 405 and h["allow"] == "POST"
    status, h, body = request(port, "GET", "/metrics")
    assert status == 200 and h["content-type"].startswith("text/plain") and b"vae_requests_total" in body
    status, _, body = request(port, "HEAD", "/v2/health/ready")
    assert status == 200 and body == b""
    assert request(port, "GET", "/v2/models/encoder/versions/1/ready")[0] == 200
    assert request(port, "GET", "/v2/models/encoder/versions/7/ready")[0] == 503
    assert request(port, "GET", "/v2/models/encoder/versions/1")[0] == 200


def test_http_requests_count_in_the_request_metrics(server: ServerProcess, manifest: Manifest) -> None:
    before_ok = server.metric("vae_requests_total", method="http/ModelInfer", code="OK")
    before_bad = server.metric("vae_requests_total", method="http/ModelInfer", code="INVALID_ARGUMENT")
    invalid = server.metric("vae_rejections_total", model="encoder", reason="invalid")
    assert post_json(server.http_port, "/v2/models/encoder/infer", _infer_body(manifest))[0] == 200
    assert post_json(server.http_port, "/v2/models/encoder/infer", {"inputs": []})[0] == 400
    assert server.metric("vae_rejections_total", model="encoder", reason="invalid") == invalid + 1
    assert server.metric("vae_requests_total", method="http/ModelInfer", code="OK") == before_ok + 1
    assert server.metric("vae_requests_total", method="http/ModelInfer", code="INVALID_ARGUMENT") == before_bad + 1
    assert server.metric("vae_request_duration_seconds_count", method="http/ModelInfer") >= 2


def test_a_body_over_the_message_limit_is_413_before_it_is_read(server: ServerProcess) -> None:
    limit = 16 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as s:
        s.sendall(f"POST /v2/models/encoder/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n"
                  f"Content-Type: application/json\r\n\r\n".encode())
        answer = s.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and "over --max-message-bytes" in answer
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"x" * 65536] * (limit // 65536 + 1)) + b"0\r\n\r\n"
    status, _, body = request(server.http_port, "POST", "/v2/models/encoder/infer", chunked,
                              {"Transfer-Encoding": "chunked"})
    assert status == 413 and "over --max-message-bytes" in json.loads(body)["error"]
    assert request(server.http_port, "GET", "/v2/health/ready")[0] == 200


def test_chunked_bodies_count_on_the_bytes_in_flight_budget_as_they_arrive(exported_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    """Bodies without a Content-Length reserve their bytes chunk by chunk: a second unfinished upload
    past --max-inflight-bytes is refused with 503 (the first, alone, is admitted)."""
    s = start_server(exported_model_dir, tmp_path, "--max-inflight-bytes", "2000000")
    head = (b"POST /v2/models/encoder/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    try:
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as first, \
                socket.create_connection(("127.0.0.1", s.http_port), timeout=30) as second:
            first.sendall(head + chunk)  # alone: admitted, and left unfinished
            # Handled, and its chunk read off the socket (so reserved on the budget) before the second comes.
            wait_until(lambda: s.metric("vae_inflight_requests", method="http/ModelInfer") == 1
                       and unread_bytes(s.http_port, first.getsockname()[1]) == 0, 30, "the first upload to be read")
            second.sendall(head + chunk)
            answer = second.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 503") and "--max-inflight-bytes" in answer, answer
            assert "Retry-After: 1" in answer
            first.sendall(b"0\r\n\r\n")  # a body of spaces: not a JSON request, but it was read
            assert first.recv(65536).decode().startswith("HTTP/1.1 400")
        assert request(s.http_port, "GET", "/v2/health/ready")[0] == 200
    finally:
        assert s.stop() == 0


def test_a_large_json_body_does_not_stall_other_requests(server: ServerProcess, manifest: Manifest) -> None:
    """A ~15 MB JSON request (the most the default limit allows) is parsed off the event loop: small
    binary requests sent meanwhile keep being answered."""
    n = (15 * 2**20) // (manifest.example_size * 20)  # ~20 characters per JSON float
    big = json.dumps({"inputs": [{"name": "x", "shape": [n, *manifest.example_shape], "datatype": "FP32",
                                  "data": np.random.default_rng(0).random(n * manifest.example_size).tolist()}],
                      "outputs": [{"name": "mu", "parameters": {"binary_data": True}}]}).encode()
    assert len(big) < 16 * 2**20
    small = json.dumps(_infer_body(manifest)).encode()
    done = threading.Event()
    result: list[int] = []

    def send_big() -> None:
        result.append(request(server.http_port, "POST", "/v2/models/encoder/infer", big)[0])
        done.set()

    t = threading.Thread(target=send_big)
    t0 = time.perf_counter()
    t.start()
    answered, worst = 0, 0.0
    while not done.is_set():
        t1 = time.perf_counter()
        assert request(server.http_port, "POST", "/v2/models/encoder/infer", small)[0] == 200
        worst = max(worst, time.perf_counter() - t1)
        answered += 1
    t.join()
    big_s = time.perf_counter() - t0
    print(f"big JSON request ({len(big) / 2**20:.1f} MiB) took {big_s:.2f} s; {answered} small requests "
          f"answered meanwhile, the slowest in {1e3 * worst:.0f} ms")
    assert result == [200]
    assert answered >= 3 and worst < big_s / 2


# -- back-pressure, deadlines, slow clients, drain -------------------------------------------------

def _binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def test_a_full_queue_is_503_with_retry_after(exported_model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--max-queue-rows", "12000",
                     "--max-message-bytes", str(64 << 20))
    try:
        # One row per run (~30 us each): 12,000 rows stay queued for a few tenths of a second.
        body, headers = _binary_body(x_batch(manifest, 12000))
        results: list[int] = []
        t = threading.Thread(target=lambda: results.append(request(
            s.http_port, "POST", "/v2/models/encoder/infer", body, headers)[0]))
        t.start()
        # The big request is queued first (else it would be the one refused).
        wait_until(lambda: s.metric("vae_queue_rows", model="encoder") > 0 or not t.is_alive(), 30,
                   "the big request to be queued", interval=0.002)
        seen: set[int] = set()
        small, small_headers = _binary_body(x_batch(manifest, 6000))  # no room until half the big one ran
        while t.is_alive() and 503 not in seen:
            status, h, answer = request(s.http_port, "POST", "/v2/models/encoder/infer", small, small_headers)
            seen.add(status)
            if status == 503:
                assert h["retry-after"] == "1" and "queue" in json.loads(answer)["error"]
        t.join(60)
        assert 503 in seen and results == [200] and seen <= {200, 503}
        assert s.metric("vae_requests_total", method="http/ModelInfer", code="RESOURCE_EXHAUSTED") >= 1
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("how", ["header", "parameter"])
def test_deadlines_from_the_timeout_header_and_the_triton_parameter(
        exported_model_dir: Path, manifest: Manifest, tmp_path: Path, how: str) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--max-queue-rows", "12000",
                     "--max-message-bytes", str(64 << 20))
    try:
        body, headers = _binary_body(x_batch(manifest, 12000))  # single-row runs: busy for a few tenths of a second
        t = threading.Thread(target=lambda: request(s.http_port, "POST", "/v2/models/encoder/infer", body, headers))
        t.start()
        wait_until(lambda: s.metric("vae_queue_rows", model="encoder") > 0 or not t.is_alive(), 30,
                   "the big request to be queued", interval=0.002)
        small = _infer_body(manifest)
        if how == "header":
            status, _, answer = request(s.http_port, "POST", "/v2/models/encoder/infer",
                                        json.dumps(small).encode(), {"Timeout-Ms": "5"})
        else:
            status, _, answer = request(s.http_port, "POST", "/v2/models/encoder/infer",
                                        json.dumps({**small, "parameters": {"timeout": 5000}}).encode())
        t.join(60)
        assert status == 504 and "deadline" in json.loads(answer)["error"], answer
        assert s.metric("vae_requests_total", method="http/ModelInfer", code="DEADLINE_EXCEEDED") == 1
        status, _, answer = request(s.http_port, "POST", "/v2/models/encoder/infer", json.dumps(small).encode(),
                                    {"Timeout-Ms": "-3"})
        assert status == 400 and "Timeout-Ms: expected milliseconds" in json.loads(answer)["error"]
    finally:
        assert s.stop() == 0


def test_slow_clients_time_out(exported_model_dir: Path, tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--http-read-timeout-s", "1")
    try:
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as idle:
            idle.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # a head never finished
            assert idle.recv(100) == b""
        assert time.perf_counter() - t0 < 5
        with socket.create_connection(("127.0.0.1", s.http_port), timeout=10) as slow:
            slow.sendall(b"POST /v2/models/encoder/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            answer = slow.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "http-read-timeout-s" in answer
        assert request(s.http_port, "GET", "/v2/health/ready")[0] == 200
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("run", range(5))
def test_sigterm_under_http_load_loses_no_request_sent_before_not_ready_was_visible(
        exported_model_dir: Path, manifest: Manifest, tmp_path: Path, run: int) -> None:
    """8 HTTP clients in closed loops (a new connection per request, honouring Retry-After), SIGTERM:
    /v2/health/ready turns 503 at once; every request sent before a poller saw that is answered 200;
    after it, requests are served for the drain delay, then answered 503 (shutting down) or refused;
    the exit is 0."""
    s = start_server(exported_model_dir, tmp_path, "--drain-delay-s", "1", "--grace-period-s", "10")
    body = json.dumps(_infer_body(manifest)).encode()
    visible: list[float] = []
    outcomes: list[tuple[float, str]] = []
    gone = threading.Event()

    def client() -> None:
        while not gone.is_set():
            t_send = time.monotonic()
            try:
                status, headers, _ = request(s.http_port, "POST", "/v2/models/encoder/infer", body)
                outcomes.append((t_send, str(status)))
                if status == 503:
                    time.sleep(float(headers["retry-after"]))  # as a well-behaved client does
            except ConnectionRefusedError:
                outcomes.append((t_send, "refused"))
                return
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                outcomes.append((t_send, f"broken: {e!r}"))
                return

    def poll() -> None:
        while not gone.is_set():
            try:
                if request(s.http_port, "GET", "/v2/health/ready")[0] == 503:
                    visible.append(time.monotonic())
                    return
            except OSError:
                return
            time.sleep(0.001)

    threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=poll)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(status == "200" for _, status in outcomes) >= 16, 30, "the load to be answered")
    s.proc.send_signal(signal.SIGTERM)
    code = s.proc.wait(30)
    gone.set()
    for t in threads:
        t.join(30)
    assert code == 0 and visible, s.log_path.read_text()[-2000:]
    before = [c for t, c in outcomes if t < visible[0]]
    after = [c for t, c in outcomes if t >= visible[0]]
    print(f"\n[http sigterm] {len(before)} sent before not-ready was visible ({before.count('200')} answered 200); "
          f"after: {after.count('200')} 200, {after.count('503')} 503, {after.count('refused')} refused, "
          f"{len([c for c in after if c.startswith('broken')])} broken")
    assert len(before) > 20 and set(before) == {"200"}, sorted(set(before))
    assert {c for c in after if not c.startswith("broken")} <= {"200", "503", "refused"}
    # A connection the kernel accepted in the instant the port closed is reset; rare, never before the drain.
    assert len([c for c in after if c.startswith("broken")]) <= 1, after[-10:]


def test_the_http_port_binds_its_own_host_and_the_old_flag_still_works(exported_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--metrics-host", "127.0.0.2")
    try:
        with socket.create_connection(("127.0.0.2", s.http_port), timeout=5):
            pass
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", s.http_port), timeout=5).close()
    finally:
        assert s.stop() == 0
    assert "--metrics-host is now --http-host" in s.log_path.read_text()


# -- the README's curl examples run as written -----------------------------------------------------

def test_the_readme_curl_examples_work(server: ServerProcess) -> None:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- http-examples -->\n```bash\n(.*?)```", readme, re.DOTALL)
    assert block is not None, "README.md: the ```bash block after <!-- http-examples --> is missing"
    script = block.group(1).replace("localhost:8080", f"localhost:{server.http_port}")
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert '"ready":true' in out.stdout and '"model_name":"encoder"' in out.stdout, out.stdout
