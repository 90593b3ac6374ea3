"""Peak memory under the largest requests the shipped flags allow stays under the Deployment's limit.

The server runs with the settings the Kubernetes base ships (`deploy/k8s/base/server.env` over the
ServeConfig defaults) on an MNIST-shaped model (784 inputs, the issue's case), and 16 clients at once
send the largest Reconstruct, Decode, Encode and Sample that `--max-message-bytes` lets through, twice
over, retrying when told to (RESOURCE_EXHAUSTED). Its peak resident set (VmHWM) must stay under
`resources.limits.memory` of the Deployment, and every request must be answered in the end.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.config import ServeConfig
from serving.manifest import load_manifest
from serving.tensors import to_tensor
from tests.conftest import REPO, run_module
from tests.integration._server import start_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("grpc_frontend")]  # both gRPC front ends
BASE = REPO / "deploy" / "k8s" / "base"
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
# Set by the environment of a pod, not flags a test can pass here.
NOT_FLAGS = {"VAE_SERVE_MODEL_DIR", "VAE_SERVE_HOST", "VAE_SERVE_PORT", "VAE_SERVE_METRICS_PORT",
             "VAE_SERVE_METRICS_HOST", "VAE_SERVE_PROVIDERS"}


def shipped_flags() -> list[str]:
    flags = []
    for line in (BASE / "server.env").read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#") and key not in NOT_FLAGS:
            flags += ["--" + key.removeprefix("VAE_SERVE_").lower().replace("_", "-"), value]
    return flags


def memory_limit_bytes() -> int:
    dep = yaml.safe_load((BASE / "deployment.yaml").read_text())
    c = next(c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "server")
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", c["resources"]["limits"]["memory"])
    assert m, c["resources"]["limits"]
    return int(m.group(1)) * UNITS[m.group(2)]


def peak_rss_bytes(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


@pytest.fixture
def mnist_export(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("mnist784")
    run_module("training.fit", "--data", f"mnist:{mnist_dir}", "--hidden", "64", "--latent-dim", "20",
               "--epochs", "1", "--no-progress", "--log-level", "WARNING", "--out", str(d / "run"))
    run_module("training.export", "--run", str(d / "run"), "--out", str(d / "exported"))
    return d / "exported"


def test_the_worst_request_mix_of_the_shipped_flags_stays_under_the_memory_limit(mnist_export: Path,
                                                                                   tmp_path: Path) -> None:
    flags = shipped_flags()
    config = ServeConfig.from_args(["--model-dir", str(mnist_export), *flags], env={})
    m = load_manifest(mnist_export)
    x_size, d = m.example_size, m.latent_dim
    room = config.max_message_bytes - 8192  # framing
    rows = {"Reconstruct": room // (4 * (x_size + 2)), "Encode": room // (4 * x_size),
            "Decode": room // (4 * x_size), "Sample": min(config.max_sample_count, room // (4 * (x_size + d)))}
    rows = {k: min(v, config.max_queue_rows) for k, v in rows.items()}
    rng = np.random.default_rng(0)

    requests = {
        "Reconstruct": pb.ReconstructRequest(x=to_tensor(rng.random((rows["Reconstruct"], *m.example_shape)))),
        "Encode": pb.EncodeRequest(x=to_tensor(rng.random((rows["Encode"], *m.example_shape)))),
        "Decode": pb.DecodeRequest(z=to_tensor(rng.standard_normal((rows["Decode"], d)))),
        "Sample": pb.SampleRequest(count=rows["Sample"], return_z=True),
    }
    s = start_server(mnist_export, tmp_path, *flags)
    codes: list[str] = []
    try:
        def client(i: int) -> None:
            opts = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
            with grpc.insecure_channel(s.target, options=opts) as ch:
                stub = pb_grpc.VaeServiceStub(ch)
                for r in range(2):
                    method = list(requests)[(i + r) % 4]
                    for attempt in range(200):  # a refusal says "retry later": clients back off and retry
                        try:
                            getattr(stub, method)(requests[method], timeout=120)
                            codes.append("OK")
                            break
                        except grpc.RpcError as e:
                            codes.append(e.code().name)
                            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                                break
                            time.sleep(0.05 * (1 + attempt % 4))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        peak = peak_rss_bytes(s.pid)
    finally:
        assert s.stop() == 0, s.log()
    limit = memory_limit_bytes()
    print(f"\n[memory] peak RSS {peak / 2**20:.0f} MiB under 16 clients' largest requests (limit "
          f"{limit / 2**20:.0f} MiB); answers: {codes.count('OK')} OK, {codes.count('RESOURCE_EXHAUSTED')} refused")
    assert peak < limit, f"peak RSS {peak / 2**20:.0f} MiB over the Deployment's limit {limit / 2**20:.0f} MiB"
    # The server refused what would not fit at the time, served every request in the end, failed none.
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes.count("OK") == 32, codes
