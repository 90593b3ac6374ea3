"""A real Prometheus (Debian binary) scrapes a real `python -m serving`; its HTTP API must see the traffic.

Ports: the server binds port 0 and reports its ports in --ready-file. Prometheus has no ready file, and
`--web.listen-address` officially wants a fixed port; but it hands the address to Go's net.Listen, so
`127.0.0.1:0` gets a kernel-chosen free port, which Prometheus logs as
`msg="Listening on" address=127.0.0.1:PORT`. We read the port from that line (and, if a future
version stops logging it, from /proc/PID/net/tcp via the process's socket inodes). No port is ever
guessed or probed, so parallel runs cannot collide.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from tests.helpers import wait_until
from tests.integration._server import ServerProcess

POLL_S = 15.0
T = TypeVar("T")

pytestmark = [
    pytest.mark.usefixtures("grpc_frontend"),
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus missing: apt-get install prometheus (scripts/ensure_system_tools.sh)"),
]
# The default front end only: Prometheus scraping /metrics on the HTTP port (both front ends fill the same metrics: test_server).
GRPC_FRONTENDS = ("native",)


def _poll(what: str, fn: Callable[[], T | None], timeout_s: float = POLL_S) -> T:
    """fn() until it returns something other than None (Prometheus answers within its scrape interval)."""
    return wait_until(fn, timeout_s, what, interval=0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, from /proc (its socket inodes against the LISTEN table)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
        rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    except OSError:
        return None
    for fd in fds:
        try:  # an fd can close between listdir and readlink
            m = re.match(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            inodes.add(m.group(1))
    ports = [int(r[1].rsplit(":", 1)[1], 16) for r in rows if r[3] == "0A" and r[9] in inodes]
    return ports[0] if len(ports) == 1 else None


class Prometheus:
    """A Prometheus process with its own config and data dir, and a tiny client for /api/v1/query."""

    def __init__(self, scrape_target: str, workdir: Path) -> None:
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: vae-serve\n    scrape_timeout: 1s\n"
            f"    static_configs:\n      - targets: ['{scrape_target}']\n")
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             "--web.listen-address=127.0.0.1:0", "--storage.tsdb.retention.time=1h", "--log.level=info"],
            cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{_poll('Prometheus to listen', self._port, timeout_s=30)}"
        _poll("Prometheus /-/ready", self._ready, timeout_s=30)

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log_path.read_text()}")
        m = re.search(r'msg="Listening on" address=127\.0\.0\.1:(\d+)', self.log_path.read_text())
        return int(m.group(1)) if m else _listening_port(self.proc.pid)

    def _ready(self) -> bool | None:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return True if r.status == 200 else None
        except OSError:
            return None

    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a one-sample query, or None when it has no sample (yet)."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: expected one series, got {result}"
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        _stop(self.proc)
        self._log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Callable[[ServerProcess], Prometheus]]:
    started: list[Prometheus] = []

    def start(server: ServerProcess) -> Prometheus:
        started.append(Prometheus(f"127.0.0.1:{server.metrics_port}", tmp_path))
        return started[-1]
    yield start
    for p in started:
        p.close()


def test_prometheus_sees_request_counts_latency_quantiles_and_batch_sizes(
        server: ServerProcess, prometheus_for: Callable[[ServerProcess], Prometheus]) -> None:
    from serving.client import VaeClient
    from serving.metrics import LATENCY_BUCKETS_S

    ok_encodes = 'sum(vae_requests_total{job="vae-serve",method="Encode",code="OK"})'
    batch_rows = 'sum(vae_batch_size_rows_sum{job="vae-serve",model="encoder"})'
    batch_runs = 'sum(vae_batch_size_rows_count{job="vae-serve",model="encoder"})'
    rng = np.random.default_rng(0)
    with VaeClient(server.target) as client:
        (dim,) = client.info()["example_shape"]  # digits: 64 pixels
        # One Encode before the first scrape, so every series exists from Prometheus' first sample and
        # rate()/increase() over the traffic below see all of it.
        client.encode(rng.random((1, dim), dtype=np.float32))
        prom = prometheus_for(server)
        _poll("the first scrape", lambda: prom.scalar(ok_encodes))
        assert prom.scalar('up{job="vae-serve"}') == 1.0
        rows0, runs0 = prom.scalar(batch_rows), prom.scalar(batch_runs)
        assert rows0 is not None and runs0 is not None

        # 64 concurrent single-row requests plus 16 of 8 rows: 80 requests, 192 rows.
        inputs = [rng.random((1, dim), dtype=np.float32) for _ in range(64)]
        inputs += [rng.random((8, dim), dtype=np.float32) for _ in range(16)]

        def timed_encode(x: np.ndarray) -> float:
            t0 = time.perf_counter()
            client.encode(x)
            return time.perf_counter() - t0
        with ThreadPoolExecutor(max_workers=32) as pool:
            client_latencies = list(pool.map(timed_encode, inputs))

    _poll("Prometheus to count all 81 Encode requests", lambda: True if prom.scalar(ok_encodes) == 81 else None)

    # p99 over the traffic, aggregated like the alert does; it lies at or below the bucket bound that
    # covers the slowest call the client saw (server time <= client time).
    p99 = _poll("a finite p99", lambda: (
        v if (v := prom.scalar('histogram_quantile(0.99, sum by (le) (rate('
                               'vae_request_duration_seconds_bucket{job="vae-serve",method="Encode"}[1m])))'))
        is not None and math.isfinite(v) else None))
    bound = min((b for b in LATENCY_BUCKETS_S if b >= max(client_latencies)), default=math.inf)
    assert 0 < p99 <= bound, (p99, bound, max(client_latencies))

    # Every row went through exactly one ONNX Runtime run; concurrent requests were merged.
    _poll("the batch-size histogram to count 192 rows",
          lambda: True if prom.scalar(batch_rows) == rows0 + 192 else None)
    runs = prom.scalar(batch_runs) - runs0  # type: ignore[operator]
    assert 1 <= runs < 80, f"{runs} encoder runs for 80 concurrent requests: nothing was batched"
    largest = prom.scalar('histogram_quantile(1, sum by (le) (increase('
                          'vae_batch_size_rows_bucket{job="vae-serve",model="encoder"}[1m])))')
    assert largest is not None and largest > 1
