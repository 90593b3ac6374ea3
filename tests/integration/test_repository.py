"""A model repository under load: new versions in poll mode, a corrupt one, unload and load in explicit mode.

Versions are small exports whose outputs name the version that computed them (tests/tiny_export.py:
the encoder's mu at x = 0 is the version number, and the decoder adds it again), so every answer says
which version made it: 64 clients at once check that each answer was computed by exactly one whole
version (a Reconstruct through encoder and decoder of two different versions would give a value no
version gives) and that no request failed while the versions changed under them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.inference import grpc_service_pb2_grpc as oip_grpc
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.client import VaeClient
from serving.tensors import to_tensor
from tests.conftest import REPO
from tests.helpers import wait_until
from tests.integration._server import ServerProcess, start_failure, start_server
from tests.tiny_export import EXAMPLE_DIM, _weights, publish_version

# The load tests run on both gRPC front ends (`grpc_frontend`: each resolves versions on its own path);
# memory and tritonclient's calls are the repository's, on the default front end.
CLIENTS = 64
CHANNELS = 8
SWAPS = 20
POLL_S = "0.05"
ZERO = np.zeros((1, EXAMPLE_DIM), np.float32)


def x_hat_of(enc_version: int, dec_version: int) -> np.ndarray:
    """Reconstruct's x_hat at x = 0 through encoder `enc_version` and decoder `dec_version` (z = mu = v)."""
    z = np.full((1, 2), enc_version, np.float64)
    logits = z @ _weights(2, EXAMPLE_DIM, 3).astype(np.float64) + dec_version
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass
class Load:
    """What the clients saw: answers by version, and every failure (code, message)."""

    versions: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    mixed: list[str] = field(default_factory=list)  # answers not from exactly one whole version
    stop: bool = False

    def check_infer(self, r: oip_pb.ModelInferResponse) -> None:
        mu = np.frombuffer(r.raw_output_contents[0], np.float32)
        if not np.all(mu == float(r.model_version)):
            self.mixed.append(f"ModelInfer: version {r.model_version} answered mu {mu.tolist()}")
        self.versions[r.model_version] += 1

    def check_reconstruct(self, r: pb.ReconstructResponse, known: int) -> None:
        x_hat = np.frombuffer(r.x_hat.data, np.float32).astype(np.float64)
        whole = [v for v in range(1, known + 1) if np.allclose(x_hat, x_hat_of(v, v), atol=1e-5)]
        if len(whole) != 1:
            self.mixed.append(f"Reconstruct: x_hat {x_hat.tolist()} is no single version's")
        else:
            self.versions[str(whole[0])] += 1


async def _client(i: int, channel: grpc.aio.Channel, load: Load, known: int, allowed: set[grpc.StatusCode]) -> None:
    oip, vae = oip_grpc.GRPCInferenceServiceStub(channel), pb_grpc.VaeServiceStub(channel)
    infer = oip_pb.ModelInferRequest(model_name="m.encoder", raw_input_contents=[ZERO.tobytes()],
                                     inputs=[oip_pb.ModelInferRequest.InferInputTensor(
                                         name="x", datatype="FP32", shape=[1, EXAMPLE_DIM])])
    recon = pb.ReconstructRequest(x=to_tensor(ZERO), model="m")
    while not load.stop:
        try:
            if i % 2:
                load.check_infer(await oip.ModelInfer(infer, timeout=30))
            else:
                load.check_reconstruct(await vae.Reconstruct(recon, timeout=30), known)
        except grpc.aio.AioRpcError as e:
            load.failures.append((e.code().name, e.details() or ""))
            if e.code() in allowed:
                await asyncio.sleep(0.01)


async def _under_load(server: ServerProcess, known: int, drive: object,
                      allowed: frozenset[grpc.StatusCode] = frozenset()) -> Load:
    """Run CLIENTS clients on CHANNELS channels while `drive()` (a coroutine function) changes the repository."""
    load = Load()
    channels = [grpc.aio.insecure_channel(server.target) for _ in range(CHANNELS)]
    tasks = [asyncio.ensure_future(_client(i, channels[i % CHANNELS], load, known, set(allowed)))
             for i in range(CLIENTS)]
    try:
        await asyncio.sleep(0.2)
        await drive()  # type: ignore[operator]
        await asyncio.sleep(0.2)
    finally:
        load.stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    return load


def _value(server: ServerProcess, metric: str, **labels: str) -> float:
    """One sample of /metrics (labels may include `name`, which `LocalServer.metric` cannot take)."""
    return server.metrics().get((metric, tuple(sorted(labels.items()))), 0.0)


async def _metric(server: ServerProcess, metric: str, want: float, timeout: float = 30, **labels: str) -> None:
    end = time.monotonic() + timeout
    while (got := await asyncio.to_thread(_value, server, metric, **labels)) < want:
        if time.monotonic() > end:
            raise AssertionError(f"{metric}{labels} stayed at {got}, expected {want}:\n{server.log()[-3000:]}")
        await asyncio.sleep(0.02)


def _start(repo: Path, tmp_path: Path, *flags: str) -> ServerProcess:
    return start_server(repo, tmp_path, "--model-repository", str(repo), "--max-queue-delay-us", "200", *flags)


@pytest.mark.usefixtures("grpc_frontend")
def test_poll_mode_swaps_20_versions_and_refuses_a_corrupt_one_under_64_clients_with_no_failed_request(
        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "m", 1)
    server = _start(repo, tmp_path, "--model-control", "poll", "--repository-poll-s", POLL_S)
    last = SWAPS + 1

    async def drive() -> None:
        for v in range(2, last + 1):
            publish_version(repo, "m", v)
            await _metric(server, "vae_model_unloads_total", v - 1, name="m")  # v routed to, v - 1 drained
        publish_version(repo, "m", last + 1, corrupt=True)  # a checksum mismatch: refused, last keeps serving
        await _metric(server, "vae_model_versions_refused_total", 1, name="m")
        await asyncio.sleep(0.3)  # several more polls: refused once, not retried

    try:
        t0 = time.monotonic()
        load = asyncio.run(_under_load(server, last + 1, drive))
        took = time.monotonic() - t0
        log = server.log()
        assert load.failures == [], load.failures[:5]
        assert load.mixed == [], load.mixed[:5]
        assert set(load.versions) == {str(v) for v in range(1, last + 1)}, load.versions
        assert _value(server, "vae_model_loads_total", name="m") == last
        assert _value(server, "vae_model_versions_refused_total", name="m") == 1
        assert _value(server, "vae_model_info", name="m", version=str(last), providers="CPUExecutionProvider") == 1
        assert _value(server, "vae_model_info", name="m", version="1", providers="CPUExecutionProvider") == 0
        assert log.count(f"model m version {last + 1} refused") == 1 and "corrupted after export" in log
        print(f"\n{SWAPS} swaps + 1 refused version in {took:.1f} s: {sum(load.versions.values())} answers, "
              f"0 failed, 0 mixed; by version {dict(sorted(load.versions.items(), key=lambda kv: int(kv[0])))}")
    finally:
        assert server.stop() == 0, server.log()


def _rss_bytes(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


def test_memory_during_a_swap_is_the_old_version_plus_the_new_one_and_unloaded_versions_free_theirs(
        tmp_path: Path) -> None:
    """Explicit mode, so that one version's cost is measured in the same process (RSS before and after the
    first load); each later load of the model is a swap to its newest version, the same path as a poll's."""
    hidden = 1536  # two (1536 x 1536) float32 layers per graph: ~19 MB of weights per version
    repo = tmp_path / "repo"
    publish_version(repo, "m", 1, hidden=hidden)
    server = _start(repo, tmp_path, "--model-control", "explicit")
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_bytes(server.pid))
            time.sleep(0.002)

    try:
        with grpc.insecure_channel(server.target) as ch:
            oip = oip_grpc.GRPCInferenceServiceStub(ch)
            time.sleep(0.3)
            empty = _rss_bytes(server.pid)
            sampler = threading.Thread(target=sample)
            sampler.start()
            oip.RepositoryModelLoad(oip_pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
            time.sleep(0.3)
            one = _rss_bytes(server.pid)
            first_load_peak = max(samples)
            samples.clear()
            swaps = 6
            for v in range(2, swaps + 2):
                publish_version(repo, "m", v, hidden=hidden)
                oip.RepositoryModelLoad(oip_pb.RepositoryModelLoadRequest(model_name="m"), timeout=60)
            done.set()
            sampler.join()
            time.sleep(0.3)
            end = _rss_bytes(server.pid)
        peak, cost, loading, mib = max(samples), one - empty, first_load_peak - empty, 1 << 20
        assert _value(server, "vae_model_unloads_total", name="m") == swaps
        print(f"\nRSS: no model {empty / mib:.1f} MiB; one version {one / mib:.1f} MiB (a version holds "
              f"{cost / mib:.1f} MiB; loading it peaked at +{loading / mib:.1f} MiB); peak during {swaps} swaps "
              f"{peak / mib:.1f} MiB (+{(peak - empty) / mib:.1f} = old version + {(peak - one) / mib:.1f}); after "
              f"{end / mib:.1f} MiB (+{(end - empty) / mib:.1f})")
        # A swap holds the old version and the new one (plus what parsing the new one's files takes while it
        # loads: 1.4-1.5 versions measured), never three versions; and after the swaps one version again (six
        # kept would be six more). 2.5 x cost failed once in a clean-clone run at 2.53 x: the bound is three.
        assert peak - empty < 2.9 * cost, (empty, one, first_load_peak, peak)
        assert end - empty < 1.5 * cost, (empty, one, end)
    finally:
        done.set()
        assert server.stop() == 0, server.log()


@pytest.mark.usefixtures("grpc_frontend")
def test_explicit_unload_and_load_under_64_clients_answer_only_not_found_or_unavailable_while_unloaded(
        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "m", 1)
    publish_version(repo, "other", 1, offset=7)
    server = _start(repo, tmp_path, "--model-control", "explicit", "--load-model", "m")
    unloaded = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE})

    async def drive() -> None:
        async with grpc.aio.insecure_channel(server.target) as ch:
            oip = oip_grpc.GRPCInferenceServiceStub(ch)
            index = await oip.RepositoryIndex(oip_pb.RepositoryIndexRequest())
            assert [(m.name, m.version, m.state) for m in index.models] == [("m", "1", "READY"),
                                                                             ("other", "1", "UNAVAILABLE")]
            await oip.RepositoryModelUnload(oip_pb.RepositoryModelUnloadRequest(model_name="m"))
            assert not (await oip.ModelReady(oip_pb.ModelReadyRequest(name="m.encoder"))).ready
            await asyncio.sleep(0.3)
            await oip.RepositoryModelLoad(oip_pb.RepositoryModelLoadRequest(model_name="m"))
            assert (await oip.ModelReady(oip_pb.ModelReadyRequest(name="m.encoder", version="1"))).ready
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await oip.RepositoryModelLoad(oip_pb.RepositoryModelLoadRequest(model_name="nope"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "['m', 'other']" in (e.value.details() or "")
            publish_version(repo, "m", 2, corrupt=True)  # a reload that fails: said so, version 1 keeps serving
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await oip.RepositoryModelLoad(oip_pb.RepositoryModelLoadRequest(model_name="m"))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "version 2:" in (e.value.details() or "")
            assert (await oip.ModelReady(oip_pb.ModelReadyRequest(name="m.encoder", version="1"))).ready
            await asyncio.sleep(0.3)

    try:
        load = asyncio.run(_under_load(server, 1, drive, unloaded))
        codes = Counter(code for code, _ in load.failures)
        assert set(codes) <= {c.name for c in unloaded}, load.failures[:5]
        assert codes, "no request arrived while the model was unloaded"
        assert any("'m'" in m or "m.encoder" in m for _, m in load.failures), load.failures[:3]
        assert load.mixed == [] and load.versions["1"] > 0
        assert _value(server, "vae_model_unloads_total", name="m") == 1
        assert _value(server, "vae_model_loads_total", name="m") == 2
        print(f"\nexplicit unload + load: {sum(load.versions.values())} answers, while unloaded {dict(codes)}")
    finally:
        assert server.stop() == 0, server.log()


TRITONCLIENT_SCRIPT = """
import json, sys
import tritonclient.grpc as g, tritonclient.http as h
grpc_target, http_target = sys.argv[1], sys.argv[2]
out = {}
for kind, client in (("grpc", g.InferenceServerClient(grpc_target)), ("http", h.InferenceServerClient(http_target))):
    index = client.get_model_repository_index(**({"as_json": True} if kind == "grpc" else {}))
    index = index.get("models", []) if kind == "grpc" else index
    client.unload_model("m")
    ready_unloaded = client.is_model_ready("m.encoder")
    client.load_model("other")
    client.load_model("m")
    out[kind] = {"index": [(m["name"], m.get("version", ""), m["state"]) for m in index],
                 "ready_unloaded": ready_unloaded, "ready": client.is_model_ready("m.encoder", "1"),
                 "other": client.is_model_ready("other.decoder")}
    client.unload_model("other")
print(json.dumps(out))
"""


def test_tritonclient_repository_calls_index_load_and_unload_over_grpc_and_http(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "m", 1)
    publish_version(repo, "other", 1, offset=7)
    server = _start(repo, tmp_path, "--model-control", "explicit", "--load-model", "m")
    try:
        # A process of its own: tritonclient's protobuf package `inference` cannot share one with ours.
        proc = subprocess.run([sys.executable, "-c", TRITONCLIENT_SCRIPT, server.target, f"localhost:{server.http_port}"],
                              cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr + server.log()[-2000:]
        got = json.loads(proc.stdout)
        for kind in ("grpc", "http"):
            assert got[kind]["index"][0] == ["m", "1", "READY"], got
            assert got[kind]["ready_unloaded"] is False and got[kind]["ready"] is True and got[kind]["other"] is True
        assert _value(server, "vae_model_unloads_total", name="other") == 2
    finally:
        assert server.stop() == 0, server.log()


def _encode_mu(stub: pb_grpc.VaeServiceStub, **names: str) -> float:
    r = stub.Encode(pb.EncodeRequest(x=to_tensor(ZERO), **names), timeout=10)
    return float(np.frombuffer(r.mu.data, np.float32)[0])


@pytest.mark.usefixtures("grpc_frontend")
def test_models_and_versions_are_named_on_both_services_and_unknown_ones_are_not_found_naming_what_exists(
        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "a", 1)
    publish_version(repo, "a", 2)
    publish_version(repo, "b", 1, offset=7)
    server = _start(repo, tmp_path, "--version-policy", "all")
    infer = oip_pb.ModelInferRequest(raw_input_contents=[ZERO.tobytes()], inputs=[
        oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, EXAMPLE_DIM])])
    try:
        with grpc.insecure_channel(server.target) as ch:
            oip, vae = oip_grpc.GRPCInferenceServiceStub(ch), pb_grpc.VaeServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            for name, version, mu in (("a.encoder", "", 2.0), ("a.encoder", "2", 2.0), ("a.encoder", "1", 1.0),
                                      ("b.encoder", "", 7.0)):
                infer.model_name, infer.model_version = name, version
                r = oip.ModelInfer(infer, timeout=10)
                assert (r.model_name, r.model_version) == (name, version or "2" if name[0] == "a" else "1")
                assert np.frombuffer(r.raw_output_contents[0], np.float32).tolist() == [mu, mu]
            assert (_encode_mu(vae, model="a"), _encode_mu(vae, model="a", version="1"), _encode_mu(vae, model="b")) \
                == (2.0, 1.0, 7.0)
            assert list(oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="a.decoder")).versions) == ["1", "2"]
            assert oip.ModelReady(oip_pb.ModelReadyRequest(name="a.encoder", version="1")).ready
            assert not oip.ModelReady(oip_pb.ModelReadyRequest(name="a.encoder", version="3")).ready
            for call, message in (
                    (lambda: oip.ModelInfer(oip_pb.ModelInferRequest(model_name="encoder"), timeout=10),
                     ("model_name: expected one of ['a.decoder', 'a.encoder', 'a.score', 'b.decoder', 'b.encoder', "
                      "'b.score'], got 'encoder'")),
                    (lambda: oip.ModelInfer(oip_pb.ModelInferRequest(model_name="a.encoder", model_version="3"),
                                            timeout=10), "model_version: 'a.encoder' has versions ['1', '2'] ready"),
                    (lambda: _encode_mu(vae), "model: expected one of ['a', 'b'], got ''"),
                    (lambda: _encode_mu(vae, model="b", version="2"), "version: 'b' has versions ['1'] ready, got '2'"),
                    (lambda: oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="c.encoder")), "got 'c.encoder'")):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and message in (e.value.details() or ""), \
                    e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                oip.RepositoryIndex(oip_pb.RepositoryIndexRequest())
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--model-control none" in (e.value.details() or "")
            assert health.Check(health_pb2.HealthCheckRequest(service="a")).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:  # a bad shape: counted against the version it named
                oip.ModelInfer(oip_pb.ModelInferRequest(model_name="a.encoder", model_version="1", raw_input_contents=[
                    b"\0" * 12], inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                                                   shape=[1, 3])]), timeout=10)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with VaeClient(server.target, model="a", version="1") as client:
            info = client.info()
            assert (info["name"], info["version"], info["manifest"]["training"]["tiny_export"]["offset"]) == ("a", "1", 1.0)
            assert client.encode(ZERO)[0].tolist() == [[1.0, 1.0]]
        base = f"http://localhost:{server.http_port}/v2"
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, EXAMPLE_DIM], "datatype": "FP32",
                                       "data": [0.0] * EXAMPLE_DIM}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{base}/models/a.encoder/versions/1/infer", body)) as r:
            answer = json.loads(r.read())
        assert answer["model_version"] == "1" and answer["outputs"][0]["data"] == [1.0, 1.0]
        for path, status, message in ((f"{base}/models/a.encoder/versions/9/infer", 404, "has versions ['1', '2']"),
                                      (f"{base}/repository/index", 404, "repository extension is off")):
            with pytest.raises(urllib.error.HTTPError) as h:
                urllib.request.urlopen(urllib.request.Request(path, body))
            assert h.value.code == status and message in h.value.read().decode()
        assert _value(server, "vae_rows_total", model="a.encoder", version="1") >= 2
        assert _value(server, "vae_rejections_total", model="a.encoder", version="1", reason="invalid") == 1
        assert _value(server, "vae_rejections_total", model="a.encoder", version="2", reason="invalid") == 0
        assert _value(server, "vae_model_info", name="a", version="2", providers="CPUExecutionProvider") == 1
    finally:
        assert server.stop() == 0, server.log()


def test_with_two_workers_each_polls_and_swaps_and_explicit_mode_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    publish_version(repo, "m", 1)
    refused = start_failure(repo, "--model-repository", str(repo), "--model-control", "explicit", "--workers", "2")
    assert refused.returncode != 0 and "model-control: expected poll or none with --workers other than 1" in \
        refused.stdout + refused.stderr
    server = _start(repo, tmp_path, "--model-control", "poll", "--repository-poll-s", POLL_S, "--workers", "2")
    try:
        publish_version(repo, "m", 2)
        wait_until(lambda: _value(server, "vae_model_unloads_total", name="m") >= 2, 30, "both workers to swap")
        seen = set()
        for _ in range(8):  # a channel is one connection, on one worker: new channels reach both
            with grpc.insecure_channel(server.target) as ch:
                seen.add(_encode_mu(pb_grpc.VaeServiceStub(ch)))
        assert seen == {2.0}
        assert _value(server, "vae_model_info", name="m", version="1", providers="CPUExecutionProvider") == 0
    finally:
        assert server.stop() == 0, server.log()


DESCRIPTOR_SCRIPT = """
import json, sys
from importlib import import_module
pb = import_module(sys.argv[1])
out = {}
def walk(d):
    out[d.full_name] = sorted((f.name, f.number, f.type, f.label) for f in d.fields)
    for n in d.nested_types:
        walk(n)
for name in sys.argv[2:]:
    walk(getattr(pb, name).DESCRIPTOR)
svc = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
out["rpcs"] = sorted((m.name, m.input_type.full_name, m.output_type.full_name) for m in svc.methods
                     if m.name.startswith("Repository"))
print(json.dumps(out))
"""
REPOSITORY_MESSAGES = ("RepositoryIndexRequest", "RepositoryIndexResponse", "RepositoryModelLoadRequest",
                       "RepositoryModelLoadResponse", "RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse",
                       "ModelRepositoryParameter")


def test_the_repository_messages_and_rpcs_are_tritonclients_field_for_field() -> None:
    def dump(module: str) -> object:
        # Separate processes: the two `inference` packages cannot share one descriptor pool.
        proc = subprocess.run([sys.executable, "-c", DESCRIPTOR_SCRIPT, module, *REPOSITORY_MESSAGES], cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=True)
        return json.loads(proc.stdout)

    ours, theirs = dump("serving._proto.inference.grpc_service_pb2"), dump("tritonclient.grpc.service_pb2")
    assert ours == theirs
    assert len(ours["rpcs"]) == 3  # type: ignore[index]
