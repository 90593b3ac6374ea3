"""The serving image built from deploy/Dockerfile and run with podman, as a platform team would: `make image-test`.

    bash scripts/ensure_system_tools.sh podman buildah runc catatonit mmdebstrap
    .venv/bin/python -m pytest -q -s tests/integration/image_checks.py

Not collected by `make test` (the name does not start with `test_`): it builds an image (minutes cold).
1. build vae-serve:cpu with scripts/build_image.sh (no registry: mmdebstrap base substitutes, host wheelhouse);
2. run it --read-only --user 65532 --cap-drop ALL, the digits export mounted read-only at /models, gRPC and
   metrics published on 127.0.0.1 (host ports chosen by podman);
3. from the host: health SERVING, every vae.v1 RPC and an OIP ModelInfer (tritonclient) equal to ONNX Runtime
   run on the host, /metrics scrapes;
4. `podman stop` (SIGTERM) under load: every request sent before the stop, or during the first half of
   the drain delay, completes OK; later ones OK or refused (UNAVAILABLE, CANCELLED), exit code 0;
5. a tampered model: the container exits non-zero with the checksum message; a model baked in
   (MODEL_DIR) serves without a mount;
6. `podman kube play` of the rendered CPU overlay's Deployment + ConfigMap: Running, each probe's gRPC health
   check passes from the host, an RPC through the published port answers, `kube down` removes it.
This module must not import serving._proto.inference (tritonclient registers the same protobuf package).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.client import VaeClient
from serving.config import ServeConfig
from serving.manifest import load_manifest
from tests.conftest import REPO
from tests.helpers import wait_until

IMAGE = os.environ.get("VAE_IMAGE_TAG", "vae-serve:cpu")
CONTAINERS_CONF = os.environ.get("CONTAINERS_CONF", str(REPO / "scripts" / "podman" / "containers.conf"))
# What the Deployment's securityContext asks for, as podman flags.
HARDENED = ["--read-only", "--user", "65532:65532", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
SERVING = health_pb2.HealthCheckResponse.SERVING

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason=(
    "podman is not installed: as root, `bash scripts/ensure_system_tools.sh podman buildah runc catatonit "
    "mmdebstrap` installs it with apt-get (make image-test does)"))


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF})
    if check and proc.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def health(target: str, service: str = "", timeout: float = 2) -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service),
                                                    timeout=timeout).status


def wait_serving(target: str, alive: Callable[[], bool], timeout: float = 60) -> float:
    """Poll grpc.health.v1 until SERVING; seconds waited. `alive()` False = the container died: fail."""
    def serving() -> bool:
        try:
            if health(target, "vae.v1.VaeService", timeout=1) == SERVING:
                return True
        except grpc.RpcError:
            pass
        assert alive(), "the container exited before SERVING"
        return False

    t0 = time.monotonic()
    wait_until(serving, timeout, f"{target} to be SERVING", interval=0.05)
    return time.monotonic() - t0


@dataclass
class Container:
    name: str
    grpc_port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def running(self) -> bool:
        return podman("inspect", "--format", "{{.State.Running}}", self.name, check=False).stdout.strip() == "true"

    def exit_code(self) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip())

    def logs(self) -> str:
        p = podman("logs", self.name, check=False)
        return p.stdout + p.stderr


@pytest.fixture(scope="module")
def image() -> str:
    """Step 1: build the image (output streamed; warm runs reuse podman's layer cache and the base images)."""
    t0 = time.monotonic()
    build("cpu", IMAGE_TAG=IMAGE)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
    smoke = podman("run", "--rm", "--entrypoint", "/usr/bin/python3", IMAGE, "-c", "pass", check=False)
    if smoke.returncode != 0 and "OCI" in smoke.stderr:  # the runtime itself, not the image, failed
        pytest.skip(f"the image built, but podman cannot start containers on this machine: {smoke.stderr.strip()}")
    assert smoke.returncode == 0, smoke.stderr
    print(f"\n[image] {IMAGE}: {size / 1e6:.0f} MB, built in {time.monotonic() - t0:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def models(exported_model_dir: Path) -> Iterator[Path]:
    """The digits export in a directory uid 65532 can read (pytest's temporary directories are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="vae-image-models-"))
    d.chmod(0o755)
    shutil.copytree(exported_model_dir, d / "exported")
    for p in [d / "exported", *(d / "exported").iterdir()]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield d / "exported"
    shutil.rmtree(d)


def build(target: str, **env: str) -> None:
    proc = subprocess.run(["bash", "scripts/build_image.sh", target], cwd=REPO, timeout=1500, check=False,
                          env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF, **env})
    assert proc.returncode == 0, f"scripts/build_image.sh {target} failed (its output is above)"


def run_container(image: str, model_dir: Path | None, name: str) -> Iterator[Container]:
    """Start `image` hardened, with `model_dir` mounted read-only at /models (None: the image's own /models)."""
    podman("rm", "-f", name, check=False)
    t0 = time.monotonic()
    mount = ["-v", f"{model_dir}:/models:ro"] if model_dir else []
    podman("run", "-d", "--name", name, *HARDENED, *mount, "-p", "127.0.0.1::50051", "-p", "127.0.0.1::8080", image)
    ports = {line.split("/")[0]: int(line.rsplit(":", 1)[1])
             for line in podman("port", name).stdout.splitlines() if "->" in line}
    c = Container(name, ports["50051"], ports["8080"])
    try:
        wait_serving(c.target, c.running)
        print(f"\n[image] {name}: podman run -> SERVING in {time.monotonic() - t0:.2f} s; server log: "
              + next((ln for ln in c.logs().splitlines() if "SERVING on" in ln), "?"))
        yield c
    finally:
        if c.running():
            podman("stop", "-t", "30", name, timeout=60, check=False)
        podman("rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def container(image: str, models: Path) -> Iterator[Container]:
    yield from run_container(image, models, "vae-image-test")


class Reference:
    """ONNX Runtime on the host, on the same files: what every answer is compared with."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest = load_manifest(model_dir)
        self.sessions = {r: ort.InferenceSession(str(model_dir / f"{r}.onnx"), providers=["CPUExecutionProvider"])
                         for r in ("encoder", "decoder")}

    def run(self, role: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        s = self.sessions[role]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))

    def x(self, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).random((n, *self.manifest.example_shape), dtype=np.float32)


@pytest.fixture(scope="module")
def ref(models: Path) -> Reference:
    return Reference(models)


def test_the_image_holds_the_serving_package_only_and_runs_as_65532(image: str) -> None:
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == "65532:65532"
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
             "('serving', 'onnxruntime', 'grpc', 'torch', 'training', 'onnx')}))")
    out = podman("run", "--rm", *HARDENED, "--entrypoint", "/usr/bin/python3", image, "-c", probe).stdout
    assert json.loads(out) == {"serving": True, "onnxruntime": True, "grpc": True,
                               "torch": False, "training": False, "onnx": False}


def test_health_is_serving_for_every_service_name(container: Container) -> None:
    for name in ("", "vae.v1.VaeService", "inference.GRPCInferenceService"):
        assert health(container.target, name) == SERVING, name


def test_every_vae_rpc_answers_as_onnx_runtime_on_the_host(container: Container, ref: Reference) -> None:
    x = ref.x(8)
    with VaeClient(container.target) as c:
        info = c.info()
        assert info["version"] == ref.manifest.version and info["providers"] == ["CPUExecutionProvider"]
        mu, var = c.encode(x)
        enc = ref.run("encoder", x=x)
        np.testing.assert_allclose(mu, enc["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, enc["var"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c.decode(enc["mu"]), ref.run("decoder", z=enc["mu"])["x_mean"],
                                   rtol=1e-5, atol=1e-6)
        s = c.sample(16, seed=7, return_z=True)
        assert s.seed == 7 and s.z is not None
        np.testing.assert_allclose(s.x, ref.run("decoder", z=s.z)["x_mean"], rtol=1e-5, atol=1e-6)
        r = c.reconstruct(x)
        np.testing.assert_allclose(r.x_hat, ref.run("decoder", z=enc["mu"])["x_mean"], rtol=1e-5, atol=1e-6)
        assert r.kl.shape == (8,) and np.all(r.kl >= 0)


def test_oip_model_infer_through_tritonclient_answers_as_onnx_runtime(container: Container, ref: Reference) -> None:
    x = ref.x(5, seed=1)
    client = tc.InferenceServerClient(url=container.target)
    try:
        assert client.is_server_ready() and client.is_model_ready("encoder")
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("encoder", [inp], outputs=[tc.InferRequestedOutput("mu")])
        np.testing.assert_allclose(result.as_numpy("mu"), ref.run("encoder", x=x)["mu"], rtol=1e-5, atol=1e-6)
    finally:
        client.close()


def test_rest_infer_through_the_published_http_port_matches_onnx_runtime(container: Container,
                                                                         ref: Reference) -> None:
    import tritonclient.http as th

    x = ref.x(2, seed=1)
    client = th.InferenceServerClient(f"127.0.0.1:{container.metrics_port}")
    try:
        assert client.is_server_ready()
        for binary in (True, False):
            inp = th.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            result = client.infer("encoder", [inp], outputs=[th.InferRequestedOutput("mu", binary_data=binary)])
            np.testing.assert_allclose(result.as_numpy("mu"), ref.run("encoder", x=x)["mu"], rtol=1e-5, atol=1e-6)
    finally:
        client.close()


def test_metrics_scrape_through_the_published_port(container: Container) -> None:
    with VaeClient(container.target) as c:
        c.info()
    text = urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=10).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("vae_requests_total", (("code", "OK"), ("method", "GetModelInfo")))] >= 1
    assert any(name == "vae_model_info" for name, _ in samples)


def test_podman_stop_under_load_drains_in_flight_requests_and_exits_0(image: str, models: Path,
                                                                      ref: Reference) -> None:
    gen = run_container(image, models, "vae-image-drain")
    c = next(gen)
    x = ref.x(1024)
    calls: list[tuple[float, float, grpc.StatusCode]] = []  # (sent, answered, code)
    lock, t_stop = threading.Lock(), [float("inf")]

    def load() -> None:
        with VaeClient(c.target, timeout_s=30) as client:
            while True:
                t0 = time.monotonic()
                try:
                    client.encode(x)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with lock:
                    calls.append((t0, time.monotonic(), code))
                if code != grpc.StatusCode.OK or t0 > t_stop[0] + 30:
                    return

    threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    t_stop[0] = time.monotonic()
    stop = podman("stop", "-t", "30", c.name, timeout=60)  # SIGTERM; SIGKILL only after 30 s
    for t in threads:
        t.join(40)
    exit_code, log = c.exit_code(), c.logs()
    try:
        next(gen)
    except StopIteration:
        pass
    before = [k for k in calls if k[0] < t_stop[0]]
    in_flight = [k for k in before if k[1] > t_stop[0]]
    bad_before = [k for k in before if k[2] != grpc.StatusCode.OK]
    # The server keeps serving for its drain delay after SIGTERM (health NOT_SERVING meanwhile): what is
    # sent in its first half must be OK. After the drain a refusal is UNAVAILABLE, or CANCELLED for a call
    # grpcio had received but not yet handed to the server when it stopped taking RPCs (its shutdown).
    drain_s = ServeConfig().drain_delay_s
    refused = (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    bad_during = [k for k in calls if t_stop[0] <= k[0] < t_stop[0] + drain_s / 2 and k[2] != grpc.StatusCode.OK]
    bad_after = [k for k in calls if k[0] >= t_stop[0] + drain_s / 2 and k[2] not in refused]
    after = [k[2].name for k in calls if k[0] >= t_stop[0]]
    print(f"\n[image] drain: {len(before)} calls sent before podman stop ({len(in_flight)} in flight at the "
          f"stop), after it {after.count('OK')} OK + {after.count('UNAVAILABLE')} UNAVAILABLE; exit code {exit_code}")
    assert in_flight, "no request was in flight when podman stop ran: the load did not overlap the stop"
    assert not bad_before, f"requests sent before the stop did not complete OK: {bad_before[:5]}\n{log}"
    assert not bad_during, f"requests sent during the drain delay failed: {bad_during[:5]}\n{log}"
    assert not bad_after, f"requests after the drain failed with more than a refusal: {bad_after[:5]}"
    assert exit_code == 0, f"container exited {exit_code} after SIGTERM ({stop.stderr})\n{log}"


def test_a_tampered_model_makes_the_container_exit_non_zero_with_the_checksum_message(
        image: str, models: Path, tmp_path: Path) -> None:
    bad = Path(tempfile.mkdtemp(prefix="vae-image-tampered-"))
    try:
        shutil.copytree(models, bad / "m")
        onnx = bad / "m" / "decoder.onnx"
        data = bytearray(onnx.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the sha256 can tell
        onnx.write_bytes(bytes(data))
        for p in [bad, bad / "m", *(bad / "m").iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        proc = podman("run", "--rm", *HARDENED, "-v", f"{bad / 'm'}:/models:ro", image, timeout=120, check=False)
    finally:
        shutil.rmtree(bad)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "decoder" in out and "sha256" in out and "modified or corrupted" in out, out


def test_an_image_with_the_model_baked_in_serves_it_without_a_mount(image: str, models: Path) -> None:
    tag = "vae-serve:cpu-image-test-baked"
    build("cpu", MODEL_DIR=str(models), IMAGE_TAG=tag)
    try:
        for c in run_container(tag, None, "vae-image-baked"):
            with VaeClient(c.target) as client:
                assert client.info()["version"] == load_manifest(models).version
    finally:
        podman("rmi", tag, check=False)


def _free_port() -> int:
    # podman 4.3 `kube play` has no --publish and hostPort cannot be 0, so the host ports are chosen here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kube_play_runs_the_cpu_overlay_deployment_probes_pass_and_kube_down_removes_it(
        image: str, models: Path, tmp_path: Path) -> None:
    render = subprocess.run([sys.executable, "deploy/k8s/render.py", "deploy/k8s/overlays/cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    docs = [d for d in yaml.safe_load_all(render.stdout) if d and d["kind"] in ("Deployment", "ConfigMap")]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = dep["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    # The only changes to the rendered objects: the local image, host ports on 127.0.0.1, the model from a
    # hostPath, a unique name for the /tmp emptyDir (podman makes it a named volume).
    server["image"] = f"localhost/{image}"
    host_port = {}
    for p in server["ports"]:
        p["hostIP"], p["hostPort"] = "127.0.0.1", _free_port()
        host_port[p["containerPort"]] = p["hostPort"]
    pod["volumes"].append({"name": "models", "hostPath": {"path": str(models), "type": "Directory"}})
    server["volumeMounts"].append({"name": "models", "mountPath": "/models", "readOnly": True})
    tmp_volume = f"vae-image-test-tmp-{os.getpid()}"
    for v in (*pod["volumes"], *server["volumeMounts"]):
        if v["name"] == "tmp":
            v["name"] = tmp_volume
    for d in docs:
        d["metadata"].pop("namespace", None)
    manifest = tmp_path / "kube.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    pod_name, ctr = f"{dep['metadata']['name']}-pod-0", f"{dep['metadata']['name']}-pod-0-server"
    podman("kube", "down", str(manifest), check=False)
    podman("kube", "play", str(manifest))
    try:
        c = Container(ctr, host_port[50051], host_port[8080])
        waited = wait_serving(c.target, c.running, timeout=180)
        assert podman("pod", "inspect", "--format", "{{.State}}", pod_name).stdout.strip() == "Running"
        hc = podman("inspect", "--format", "{{json .Config.Healthcheck}}", ctr).stdout.strip()
        print(f"\n[image] kube play: SERVING after {waited:.2f} s; podman's healthcheck from the probes: {hc}")
        # Each probe's check, run from the host through the published port (podman 4.3 drops gRPC probes).
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = server[kind]["grpc"]
            assert health(f"127.0.0.1:{host_port[probe['port']]}", probe.get("service", "")) == SERVING, kind
        env = podman("inspect", "--format", "{{range .Config.Env}}{{println .}}{{end}}", ctr).stdout.split()
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
        assert {f"{k}={v}" for k, v in cm["data"].items()} <= set(env), "the ConfigMap's env did not reach the pod"
        with VaeClient(c.target) as client:
            assert client.info()["version"] == load_manifest(models).version
    finally:
        down = podman("kube", "down", str(manifest), timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    assert podman("pod", "exists", pod_name, check=False).returncode == 1, "kube down left the pod"
    assert podman("container", "exists", ctr, check=False).returncode == 1, "kube down left the container"
    assert podman("volume", "exists", tmp_volume, check=False).returncode == 1, "kube down left the /tmp volume"
