"""`--workers N`: several server processes on one port under a supervisor (serving/workers.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from loadgen.process import Samples
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.manifest import load_manifest
from serving.tensors import to_tensor
from serving.workers import MULTIPROC_ENV
from tests.helpers import wait_until
from tests.integration._server import ServerProcess, start_server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("grpc_frontend")]  # both gRPC front ends


def worker_pids(server: ServerProcess) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sorted(int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def worker_request_counts(pids: list[int], method: str = "Encode", code: str = "OK") -> dict[int, float]:
    """Each worker's own count of answered `method` RPCs: read from the counter file that worker writes in
    the multiprocess metrics directory (/metrics adds all workers' files up; this reads one at a time)."""
    counts: dict[int, float] = {}
    for pid in pids:
        environ = dict(item.split("=", 1) for item in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        one = Path(tempfile.mkdtemp(prefix=f"worker-{pid}-"))
        try:
            shutil.copy(Path(environ[MULTIPROC_ENV]) / f"counter_{pid}.db", one)
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(one))
            counts[pid] = registry.get_sample_value("vae_requests_total", {"method": method, "code": code}) or 0.0
        finally:
            shutil.rmtree(one)
    return counts


def encode_on_channels(target: str, x: np.ndarray, channels: int, calls: int) -> list[str]:
    """`calls` Encode calls spread over `channels` separate connections; their status codes."""
    async def go() -> list[str]:
        chans = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                 for _ in range(channels)]
        try:
            stubs = [pb_grpc.VaeServiceStub(ch) for ch in chans]
            req = pb.EncodeRequest(x=to_tensor(x))

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
    # Every worker answered some of the 8 connections: each one's own count, in its own file, is > 0.
    per_worker = worker_request_counts(pids)
    assert sum(per_worker.values()) == 400 and all(n > 0 for n in per_worker.values()), per_worker
    # /metrics on either worker is the whole server: the sum, and queue depth per worker (copied from the
    # workers' live gauges twice a second).
    def with_every_workers_queue() -> Samples | None:
        m = s.metrics()
        return m if {dict(k[1]).get("pid") for k in m if k[0] == "vae_queue_rows"} == {str(p) for p in pids} else None

    m = wait_until(with_every_workers_queue, 10, "every worker's vae_queue_rows", interval=0.1)
    assert m[("vae_requests_total", (("code", "OK"), ("method", "Encode")))] == 400
    assert m[("vae_worker_restarts_total", ())] == 0


def test_a_worker_that_dies_is_restarted_and_counted(two_workers: ServerProcess,
                                                     exported_model_dir: Path) -> None:
    s = two_workers
    victim = worker_pids(s)[0]
    os.kill(victim, signal.SIGKILL)
    def replaced() -> bool:
        pids = worker_pids(s)
        return len(pids) == 2 and victim not in pids and s.metric("vae_worker_restarts_total") == 1

    wait_until(replaced, 60, "a new worker in place of the killed one, counted", interval=0.2)
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
