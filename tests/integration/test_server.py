"""The real server (`python -m serving`, port 0) on a real export, called over real gRPC.

Every answer is checked against ONNX Runtime run directly on the same files.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.client import VaeClient
from serving.manifest import Manifest, load_manifest
from serving.tensors import from_tensor, to_tensor
from tests.conftest import run_module
from tests.helpers import wait_until, wait_until_async
from tests.integration._server import REPO, ServerProcess, serving_cmd, start_failure, start_server

pytestmark = pytest.mark.usefixtures("grpc_frontend")  # every test on both gRPC front ends


class Direct:
    """ONNX Runtime run directly on the exported files: the reference for every RPC."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest: Manifest = load_manifest(model_dir)
        self.enc = ort.InferenceSession(str(model_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
        self.dec = ort.InferenceSession(str(model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip([o.name for o in self.enc.get_outputs()], self.enc.run(None, {"x": x})))

    def decode(self, z: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip([o.name for o in self.dec.get_outputs()], self.dec.run(None, {"z": z})))

    def elbo_terms(self, x: np.ndarray, z: np.ndarray, mu: np.ndarray, var: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        d = self.decode(z)
        n = x.shape[0]
        xf = x.reshape(n, -1).astype(np.float64)
        if "logits" in d:
            l = d["logits"].reshape(n, -1).astype(np.float64)
            ll = (xf * l - np.log1p(np.exp(-np.abs(l))) - np.maximum(l, 0)).sum(1)
        else:
            v = d["x_var"].reshape(n, -1).astype(np.float64) if "x_var" in d else np.ones_like(xf)
            m = d["x_mean"].reshape(n, -1).astype(np.float64)
            ll = (-0.5 * ((xf - m) ** 2 / v + np.log(v) + math.log(2 * math.pi))).sum(1)
        kl = (-0.5 * (1 + np.log(var.astype(np.float64)) - mu.astype(np.float64) ** 2 - var)).sum(1)
        return ll, kl


@pytest.fixture(scope="module")
def direct(exported_model_dir: Path) -> Direct:
    return Direct(exported_model_dir)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[VaeClient]:
    with VaeClient(server.target, timeout_s=30) as c:
        yield c


def examples(direct: Direct, n: int, seed: int = 0) -> np.ndarray:
    """n distinct examples (n, *example_shape) in model space ([0, 1], fine for either likelihood)."""
    return np.random.default_rng(seed).random((n, *direct.manifest.example_shape), dtype=np.float32)


# -- every RPC against ONNX Runtime ----------------------------------------------------------------

def test_get_model_info_gives_the_manifest_facts_and_the_providers_in_use(client: VaeClient,
                                                                          direct: Direct) -> None:
    info = client.info()
    m = direct.manifest
    assert (info["name"], info["version"], info["latent_dim"]) == (m.name, m.version, m.latent_dim)
    assert info["example_shape"] == list(m.example_shape) and info["likelihood"] == m.likelihood
    assert info["providers"] == ["CPUExecutionProvider"]
    assert (info["max_batch_size"], info["max_queue_rows"], info["max_sample_count"]) == (256, 16384, 4096)
    assert info["manifest"]["files"]["encoder"]["sha256"] == m.files["encoder"].sha256


def test_encode_matches_onnx_runtime(client: VaeClient, direct: Direct) -> None:
    x = examples(direct, 7)
    mu, var = client.encode(x)
    ref = direct.encode(x)
    np.testing.assert_allclose(mu, ref["mu"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, ref["var"], rtol=1e-6, atol=1e-6)


def test_decode_matches_onnx_runtime(client: VaeClient, direct: Direct) -> None:
    z = np.random.default_rng(1).standard_normal((5, direct.manifest.latent_dim), dtype=np.float32)
    np.testing.assert_allclose(client.decode(z), direct.decode(z)["x_mean"], rtol=1e-6, atol=1e-6)


def test_sample_decodes_the_returned_z_and_the_same_seed_gives_the_same_samples(client: VaeClient,
                                                                                direct: Direct) -> None:
    a = client.sample(9, seed=42, return_z=True)
    b = client.sample(9, seed=42)
    assert a.seed == b.seed == 42 and a.z is not None
    assert a.x.shape == (9, *direct.manifest.example_shape) and a.z.shape == (9, direct.manifest.latent_dim)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_allclose(a.x, direct.decode(a.z)["x_mean"], rtol=1e-6, atol=1e-6)
    expected_z = np.random.default_rng(42).standard_normal(a.z.shape, dtype=np.float32)
    np.testing.assert_array_equal(a.z, expected_z)
    assert not np.array_equal(client.sample(9, seed=43).x, a.x)


def test_sample_temperature_scales_z(client: VaeClient) -> None:
    hot = client.sample(4, seed=7, temperature=1.0, return_z=True)
    cold = client.sample(4, seed=7, temperature=0.25, return_z=True)
    assert hot.z is not None and cold.z is not None
    np.testing.assert_allclose(cold.z, 0.25 * hot.z, rtol=1e-6)


def test_sample_without_a_seed_returns_the_seed_it_used(client: VaeClient) -> None:
    a = client.sample(3)
    np.testing.assert_array_equal(client.sample(3, seed=a.seed).x, a.x)


def test_reconstruct_at_the_mean_matches_onnx_runtime_with_elbo_terms(client: VaeClient,
                                                                     direct: Direct) -> None:
    x = examples(direct, 6, seed=3)
    r = client.reconstruct(x)
    enc = direct.encode(x)
    np.testing.assert_allclose(r.x_hat, direct.decode(enc["mu"])["x_mean"], rtol=1e-5, atol=1e-6)
    ll, kl = direct.elbo_terms(x, enc["mu"], enc["mu"], enc["var"])
    np.testing.assert_allclose(r.recon_log_lik, ll, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(r.kl, kl, rtol=1e-4, atol=1e-4)
    assert r.seed == 0 and np.all(r.kl >= 0)


def test_reconstruct_with_a_sampled_z_is_reproducible_from_its_seed(client: VaeClient, direct: Direct) -> None:
    x = examples(direct, 4, seed=4)
    r = client.reconstruct(x, use_mean=False, seed=11)
    enc = direct.encode(x)
    eps = np.random.default_rng(11).standard_normal(enc["mu"].shape, dtype=np.float32)
    z = enc["mu"] + np.sqrt(enc["var"]) * eps
    np.testing.assert_allclose(r.x_hat, direct.decode(z)["x_mean"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(client.reconstruct(x, use_mean=False, seed=11).x_hat, r.x_hat)


def test_a_request_larger_than_the_max_batch_is_split_and_reassembled_in_order(
        server: ServerProcess, client: VaeClient, direct: Direct) -> None:
    before = server.metric("vae_batches_total", model="encoder")
    x = examples(direct, 600, seed=5)
    mu, _ = client.encode(x)
    np.testing.assert_allclose(mu, direct.encode(x)["mu"], rtol=1e-5, atol=1e-5)
    assert server.metric("vae_batches_total", model="encoder") - before >= 3  # 600 rows, 256 per run


def test_64_concurrent_single_row_requests_each_get_their_own_answer_in_batches(
        server: ServerProcess, direct: Direct) -> None:
    x = examples(direct, 64, seed=6)
    ref = direct.encode(x)["mu"]

    async def burst() -> list[pb.EncodeResponse]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            reqs = [pb.EncodeRequest(x=to_tensor(x[i:i + 1])) for i in range(64)]
            return list(await asyncio.gather(*(stub.Encode(r, timeout=30) for r in reqs)))

    batched = False
    for _ in range(5):  # on a loaded machine a round may happen to run one by one; batches show quickly
        rows0 = server.metric("vae_rows_total", model="encoder")
        runs0 = server.metric("vae_batch_size_rows_count", model="encoder")
        replies = asyncio.run(burst())
        for i, r in enumerate(replies):
            np.testing.assert_allclose(from_tensor(r.mu), ref[i:i + 1], rtol=1e-5, atol=1e-6)
        rows = server.metric("vae_rows_total", model="encoder") - rows0
        runs = server.metric("vae_batch_size_rows_count", model="encoder") - runs0
        assert rows == 64
        if runs < rows:
            batched = True
            break
    assert batched, "64 concurrent requests never shared an ONNX Runtime run"
    assert server.metric("vae_batch_size_rows_bucket", model="encoder", le="1.0") < \
        server.metric("vae_batch_size_rows_count", model="encoder")


# -- bad input --------------------------------------------------------------------------------------

def _raw(shape: tuple[int, ...], nbytes: int | None = None, fill: float = 0.5) -> pb.Tensor:
    n = math.prod(shape)
    data = np.full(n, fill, dtype="<f4").tobytes()
    return pb.Tensor(shape=shape, data=data if nbytes is None else data[:nbytes])


BAD = [
    ("Encode", lambda s, d: pb.EncodeRequest(x=_raw((2, *s, 1))), r"x: expected shape \(N, .*\) float32.*got \(2,"),
    ("Encode", lambda s, d: pb.EncodeRequest(x=_raw((2, math.prod(s) + 1))), r"x: expected shape \(N, "),
    ("Encode", lambda s, d: pb.EncodeRequest(x=_raw((0, *s))), r"x: expected .*1 <= N <= 16384, got \(0,"),
    ("Encode", lambda s, d: pb.EncodeRequest(), r"x: expected shape \(N, .*got \(\)"),
    ("Encode", lambda s, d: pb.EncodeRequest(x=_raw((2, *s), nbytes=10)),
     r"x: expected \d+ bytes of float32 for shape \(2, .*got 10 bytes"),
    ("Encode", lambda s, d: pb.EncodeRequest(x=_raw((2, *s), fill=float("nan"))),
     r"x: expected finite values, got NaN or Inf in row 0"),
    ("Reconstruct", lambda s, d: pb.ReconstructRequest(x=_raw((1, *s), fill=float("inf"))),
     r"x: expected finite values, got NaN or Inf"),
    ("Decode", lambda s, d: pb.DecodeRequest(z=_raw((3, d + 1))), r"z: expected shape \(N, \d+\) float32"),
    ("Sample", lambda s, d: pb.SampleRequest(count=0), r"count: expected 1 <= count <= 4096, got 0"),
    ("Sample", lambda s, d: pb.SampleRequest(count=-5), r"count: expected 1 <= count <= 4096, got -5"),
    ("Sample", lambda s, d: pb.SampleRequest(count=4097), r"count: expected 1 <= count <= 4096, got 4097"),
    ("Sample", lambda s, d: pb.SampleRequest(count=2, temperature=0.0),
     r"temperature: expected a finite number > 0, got 0.0"),
    ("Sample", lambda s, d: pb.SampleRequest(count=2, temperature=-1.0), r"temperature: .*got -1.0"),
]


@pytest.mark.parametrize("method, make, message", BAD, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_bad_input_is_invalid_argument_naming_the_field_expected_and_got(
        server: ServerProcess, client: VaeClient, direct: Direct, method: str, make: object,
        message: str) -> None:
    before = server.metric("vae_requests_total", method=method, code="INVALID_ARGUMENT")
    req = make(direct.manifest.example_shape, direct.manifest.latent_dim)  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as e:
        getattr(client.stub, method)(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert __import__("re").search(message, e.value.details()), e.value.details()
    assert server.metric("vae_requests_total", method=method, code="INVALID_ARGUMENT") == before + 1
    client.info()  # still serving


def test_a_message_over_the_size_limit_is_refused(direct: Direct, exported_model_dir: Path,
                                                  tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-message-bytes", "4096")
    try:
        with VaeClient(s.target) as c, pytest.raises(grpc.RpcError) as e:
            c.encode(examples(direct, 64))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        assert s.stop() == 0


# -- back-pressure and deadlines ----------------------------------------------------------------

@pytest.fixture(scope="module")
def slow_server(exported_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One row per ONNX Runtime run, so a big request keeps the runner busy for a while."""
    s = start_server(exported_model_dir, tmp_path_factory.mktemp("slow"), "--max-batch-size", "1",
                     "--max-queue-rows", "4000")
    yield s
    assert s.stop() == 0, s.log()


def test_a_full_queue_answers_resource_exhausted_at_once(slow_server: ServerProcess, direct: Direct) -> None:
    # 4000 rows at one row per run keep the runner busy for a while; 2000 more cannot fit until 2000 ran.
    big, small = examples(direct, 4000), examples(direct, 2000)

    async def go() -> tuple[object, bool]:
        async with grpc.aio.insecure_channel(slow_server.target) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            first = asyncio.ensure_future(stub.Encode(pb.EncodeRequest(x=to_tensor(big)), timeout=60))
            await wait_until_async(lambda: slow_server.metric("vae_queue_rows", model="encoder") > 0 or first.done(),
                                   30, "the big request to be queued")
            try:
                await stub.Encode(pb.EncodeRequest(x=to_tensor(small)), timeout=60)
                err: object = None
            except grpc.aio.AioRpcError as e:
                err = e
            # "At once": answered while the big request was still being computed, not after it.
            answered_while_busy = not first.done()
            await first
            return err, answered_while_busy

    err, answered_while_busy = asyncio.run(go())
    assert isinstance(err, grpc.aio.AioRpcError), "the second request was accepted into a full queue"
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max-queue-rows 4000" in (err.details() or "")
    assert answered_while_busy
    assert slow_server.metric("vae_rejections_total", model="encoder", reason="queue_full") >= 1


def test_a_request_whose_deadline_expires_in_the_queue_is_not_computed(slow_server: ServerProcess,
                                                                       direct: Direct) -> None:
    big, late = examples(direct, 3990), examples(direct, 3)  # 3,990 single-row runs: 80-200 ms

    async def go() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(slow_server.target) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            first = asyncio.ensure_future(stub.Encode(pb.EncodeRequest(x=to_tensor(big)), timeout=60))
            await wait_until_async(lambda: slow_server.metric("vae_queue_rows", model="encoder") > 0 or first.done(),
                                   30, "the big request to be queued", interval=0.002)
            try:
                await stub.Encode(pb.EncodeRequest(x=to_tensor(late)), timeout=0.03)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
            await first
            # The runner reaches the expired request right after `first`.
            await wait_until_async(lambda: sum(slow_server.metric("vae_rejections_total", model="encoder", reason=r)
                                               for r in ("deadline", "cancelled")) > dropped0,
                                   4, "the expired request to be dropped", interval=0.01)
            return code

    rows0 = slow_server.metric("vae_rows_total", model="encoder")
    expired0 = slow_server.metric("vae_requests_total", method="Encode", code="DEADLINE_EXCEEDED")
    dropped0 = sum(slow_server.metric("vae_rejections_total", model="encoder", reason=r)
                   for r in ("deadline", "cancelled"))
    assert asyncio.run(go()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert slow_server.metric("vae_rows_total", model="encoder") - rows0 == 3990  # the 3 late rows: never
    assert sum(slow_server.metric("vae_rejections_total", model="encoder", reason=r)
               for r in ("deadline", "cancelled")) == dropped0 + 1
    # Counted under the status the client saw, not as a client cancellation.
    assert slow_server.metric("vae_requests_total", method="Encode", code="DEADLINE_EXCEEDED") == expired0 + 1


# -- health, reflection, metrics, lifecycle ---------------------------------------------------------

def test_health_is_serving_for_the_server_and_each_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "vae.v1.VaeService", "inference.GRPCInferenceService"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5)))
        names = {s.name for s in reply.list_services_response.service}
    assert {"vae.v1.VaeService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_metrics_port_serves_every_contract_metric(server: ServerProcess, client: VaeClient) -> None:
    client.info()
    names = {name for name, _ in server.metrics()}
    for n in ("vae_requests_total", "vae_request_duration_seconds_bucket", "vae_queue_wait_seconds_bucket",
              "vae_compute_duration_seconds_bucket", "vae_batch_size_rows_bucket", "vae_queue_rows",
              "vae_queue_requests", "vae_inflight_requests", "vae_rows_total", "vae_batches_total",
              "vae_rejections_total", "vae_model_info"):
        assert n in names, n
    assert server.metric("vae_requests_total", method="GetModelInfo", code="OK") >= 1


@pytest.mark.slow
def test_sigterm_under_load_finishes_every_in_flight_request_goes_not_serving_and_exits_0(
        exported_model_dir: Path, direct: Direct, tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--grace-period-s", "20")
    x = examples(direct, 300)
    ref = direct.encode(x)["mu"]
    statuses: list[int] = []

    def watch() -> None:
        with grpc.insecure_channel(s.target) as ch:
            for r in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30):
                statuses.append(r.status)
                if r.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    return

    watcher = threading.Thread(target=watch)
    watcher.start()

    async def load() -> list[object]:
        async with grpc.aio.insecure_channel(s.target) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            await stub.GetModelInfo(pb.GetModelInfoRequest())
            calls = [stub.Encode(pb.EncodeRequest(x=to_tensor(x[i * 30:(i + 1) * 30])), timeout=60)
                     for i in range(10)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await asyncio.sleep(0.05)
            s.proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*tasks, return_exceptions=True))

    wait_until(lambda: bool(statuses), 30, "the first health status", interval=0.01)
    replies = asyncio.run(load())
    failed = [r for r in replies if isinstance(r, BaseException)]
    assert not failed, failed
    for i, r in enumerate(replies):
        np.testing.assert_allclose(from_tensor(r.mu), ref[i * 30:(i + 1) * 30], rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]
    assert s.proc.wait(30) == 0, s.log()
    watcher.join(10)
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    with VaeClient(s.target, timeout_s=2) as c, pytest.raises(grpc.RpcError) as e:
        c.info()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_missing_model_dir_stops_start_up_with_a_clear_error(tmp_path: Path) -> None:
    proc = start_failure(tmp_path / "nothing")
    assert proc.returncode == 1 and "no manifest" in proc.stderr


def test_explicit_cuda_without_a_usable_gpu_refuses_to_start(exported_model_dir: Path, tmp_path: Path) -> None:
    # Where CUDA works the server starts and serves: find that out through a ready file, not a timeout.
    ready = tmp_path / "ready.json"
    with subprocess.Popen([*serving_cmd(exported_model_dir, "--providers", "cuda", "--http-port", "-1"),
                           "--ready-file", str(ready)], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        wait_until(lambda: p.poll() is not None or ready.exists(), 120, "the server to start or exit", interval=0.05)
        if ready.exists():
            p.terminate()
            p.communicate(timeout=60)
            pytest.skip("CUDA works on this machine: --providers cuda started")
        _, stderr = p.communicate(timeout=60)
    proc = subprocess.CompletedProcess(p.args, p.returncode, "", stderr)
    assert proc.returncode == 1
    assert "providers: expected CUDAExecutionProvider for --providers cuda" in proc.stderr


def test_bad_flags_exit_2_naming_the_flag() -> None:
    proc = run_module("serving", "--max-batch-size", "0", timeout=60, check=False)
    assert proc.returncode == 2 and "max-batch-size: expected an integer >= 1" in proc.stderr


def _make_pki(d: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost and a client certificate (openssl CLI)."""
    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
       "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        sh("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
           "-subj", f"/CN={'localhost' if name == 'server' else 'client'}")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
           "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")
    return {p.stem + p.suffix: p for p in d.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")
def test_mutual_tls_serves_clients_with_a_certificate_and_refuses_others(exported_model_dir: Path,
                                                                         tmp_path: Path) -> None:
    pki = _make_pki(tmp_path)
    # TLS runs on the grpcio front end (pygrpc-native 0.5.0 has none): `auto` picks it and says so once.
    s = start_server(exported_model_dir, tmp_path / "srv", "--tls-cert", str(pki["server.pem"]),
                     "--tls-key", str(pki["server.key"]), "--tls-client-ca", str(pki["ca.pem"]),
                     "--grpc-frontend", "auto")
    try:
        assert s.log().count("the gRPC port uses the grpcio front end") == 1, s.log()
        ca = pki["ca.pem"].read_bytes()
        good = grpc.ssl_channel_credentials(ca, pki["client.key"].read_bytes(), pki["client.pem"].read_bytes())
        with VaeClient(f"localhost:{s.grpc_port}", credentials=good, timeout_s=10) as c:
            assert c.info()["latent_dim"] >= 1
        with VaeClient(f"localhost:{s.grpc_port}", credentials=grpc.ssl_channel_credentials(ca),
                       timeout_s=5) as c, pytest.raises(grpc.RpcError) as e:
            c.info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        with VaeClient(s.target, timeout_s=5) as c, pytest.raises(grpc.RpcError):
            c.info()  # plaintext to a TLS port
    finally:
        assert s.stop() == 0


def test_http_over_tls_needs_a_client_certificate_when_the_grpc_port_does(exported_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    import ssl
    import urllib.request

    pki = _make_pki(tmp_path)
    s = start_server(exported_model_dir, tmp_path / "srv", "--tls-cert", str(pki["server.pem"]),
                     "--tls-key", str(pki["server.key"]), "--tls-client-ca", str(pki["ca.pem"]), "--http-tls",
                     "--grpc-frontend", "auto")
    try:
        url = f"https://localhost:{s.http_port}/metrics"
        ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        ctx.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
            assert "vae_requests_total" in r.read().decode()
        with urllib.request.urlopen(f"https://localhost:{s.http_port}/v2/health/ready", context=ctx, timeout=10) as r:
            assert r.status == 200
        anonymous = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            urllib.request.urlopen(url, context=anonymous, timeout=10).read()
        with pytest.raises(OSError):  # plain HTTP to the TLS metrics port
            urllib.request.urlopen(f"http://localhost:{s.http_port}/metrics", timeout=10).read()
    finally:
        assert s.stop() == 0


def test_the_client_cli_prints_info_and_writes_png_grids(server: ServerProcess, direct: Direct,
                                                         tmp_path: Path) -> None:
    def cli(*args: str) -> str:
        return run_module("serving.client", "--target", server.target, *args, timeout=60).stdout

    assert '"latent_dim"' in cli("info")
    np.save(tmp_path / "x.npy", examples(direct, 4))
    assert '"n": 4' in cli("encode", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "e.npz"))
    cli("sample", "--count", "9", "--seed", "1", "--png", str(tmp_path / "s.png"))
    cli("reconstruct", "--input", str(tmp_path / "x.npy"), "--png", str(tmp_path / "r.png"))
    cli("decode", "--input", str(tmp_path / "e.npz"), "--png", str(tmp_path / "d.png"))
    for name in ("s.png", "r.png", "d.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sustained_concurrent_load_of_large_requests_never_stalls(server: ServerProcess, direct: Direct) -> None:
    """8 clients x 64 rows for 2 s (2 rows of 256 per run): every answer within a second, none lost.

    Guards against lost event-loop wake-ups (seen with uvloop): those left requests queued for seconds.
    """
    x = examples(direct, 64, seed=9)
    ref = direct.encode(x)["mu"]
    req = pb.EncodeRequest(x=to_tensor(x))

    async def load() -> list[float]:
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pb_grpc.VaeServiceStub(ch)
            t_end = time.perf_counter() + 2.0

            async def worker() -> None:
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    r = await stub.Encode(req, timeout=30)
                    latencies.append(time.perf_counter() - t0)
                    np.testing.assert_allclose(from_tensor(r.mu), ref, rtol=1e-5, atol=1e-6)

            await asyncio.gather(*(worker() for _ in range(8)))
        return latencies

    latencies = asyncio.run(load())
    assert len(latencies) >= 16
    assert max(latencies) < 1.0, f"a request took {max(latencies):.2f} s"
