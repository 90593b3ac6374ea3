"""`--workers N`: several server processes on one port under a supervisor (serving/workers.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.manifest import load_manifest
from tests.integration._server import ServerProcess, start_server

pytestmark = pytest.mark.slow


def worker_pids(server: ServerProcess) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def encode_on_channels(target: str, x: np.ndarray, channels: int, calls: int) -> list[str]:
    """`calls` Encode calls spread over `channels` separate connections; their status codes."""
    async def go() -> list[str]:
        chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(channels)]
        try:
            stubs = [pb_grpc.VaeServiceStub(ch) for ch in chans]
            req = pb.EncodeRequest(x=pb.Tensor(shape=x.shape, data=x.astype("<f4").tobytes()))

            async def one(i: int) -> str:
                try:
                    await stubs[i % channels].Encode(req, timeout=20)
                    return "OK"
                except grpc.aio.AioRpcError as e:
                    return e.code().name

            return list(await asyncio.gather(*(one(i) for i in range(calls))))
        finally:
            for ch in chans:
                await ch.close()

    return asyncio.run(go())


@pytest.fixture
def two_workers(exported_model_dir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    s = start_server(exported_model_dir, tmp_path, "--workers", "2", timeout=120)
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_two_workers_share_the_ports_and_one_metrics_endpoint_counts_both(
        two_workers: ServerProcess, exported_model_dir: Path) -> None:
    s = two_workers
    pids = worker_pids(s)
    assert len(pids) == 2
    x = np.random.default_rng(0).random((1, *load_manifest(exported_model_dir).example_shape), dtype=np.float32)
    codes = encode_on_channels(s.target, x, channels=8, calls=400)
    assert codes == ["OK"] * 400
    time.sleep(1.0)  # the workers' live gauges are copied twice a second
    m = s.metrics()
    assert m[("vae_requests_total", (("code", "OK"), ("method", "Encode")))] == 400
    queue_pids = {dict(k[1]).get("pid") for k in m if k[0] == "vae_queue_rows"}
    assert queue_pids == {str(p) for p in pids}  # queue depth per worker
    served = {dict(k[1])["pid"] for k, v in m.items() if k[0] == "vae_queue_rows"}
    assert len(served) == 2
    # Every worker answered some of the 8 connections: its own request count is in its own files.
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    assert m[("vae_worker_restarts_total", ())] == 0


def test_a_worker_that_dies_is_restarted_and_counted(two_workers: ServerProcess,
                                                     exported_model_dir: Path) -> None:
    s = two_workers
    victim = worker_pids(s)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = worker_pids(s)
        if len(pids) == 2 and victim not in pids and s.metric("vae_worker_restarts_total") == 1:
            break
        time.sleep(0.2)
    assert len(worker_pids(s)) == 2 and victim not in worker_pids(s)
    assert s.metric("vae_worker_restarts_total") == 1
    x = np.zeros((1, *load_manifest(exported_model_dir).example_shape), dtype=np.float32)
    assert encode_on_channels(s.target, x, channels=8, calls=64) == ["OK"] * 64
    assert s.proc.poll() is None
    assert "worker 0 died" in s.log_path.read_text() or "worker 1 died" in s.log_path.read_text()


def test_sigterm_drains_every_worker_under_load_and_exits_0(exported_model_dir: Path, tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--workers", "2", "--drain-delay-s", "1", timeout=120)
    x = np.zeros((1, *load_manifest(exported_model_dir).example_shape), dtype=np.float32)
    assert encode_on_channels(s.target, x, channels=4, calls=16) == ["OK"] * 16
    pids = worker_pids(s)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    # During the drain delay every worker still answers (new connections land on either one).
    assert encode_on_channels(s.target, x, channels=8, calls=64) == ["OK"] * 64
    assert s.proc.wait(60) == 0
    assert time.monotonic() - t0 >= 1.0
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    log = s.log_path.read_text()
    assert log.count("stopped") >= 2, log[-2000:]


def test_a_worker_that_cannot_start_fails_the_server(exported_model_dir: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(exported_model_dir, bad)
    manifest = json.loads((bad / "model.json").read_text())
    (bad / manifest["files"]["decoder"]["path"]).write_bytes(b"not onnx")
    out = subprocess.run([sys.executable, "-m", "serving", "--model-dir", str(bad), "--host", "127.0.0.1", "--port",
                          "0", "--http-port", "0", "--providers", "cpu", "--workers", "2"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and "cannot start" in out.stderr and "the manifest expects" in out.stderr
    assert "Traceback" not in out.stderr
