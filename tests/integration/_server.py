"""Start the real server (`python -m serving`) on port 0 in a subprocess, and read its metrics.

A subprocess keeps the server's protobuf descriptors (package `inference`) away from tritonclient's,
which the OIP tests load into the test process, and lets tests send it real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"localhost:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        text = urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=10).read()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text.decode()) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


def start_server(model_dir: Path, workdir: Path, *flags: str, timeout: float = 60) -> ServerProcess:
    """Start `python -m serving` on port 0 and wait for its ready file; fail the test with its log."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready, log_path = workdir / "ready.json", workdir / "server.log"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", "--metrics-port", "0", "--ready-file", str(ready), "--providers", "cpu", *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_SERVE_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    t_end = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode} before SERVING:\n{log_path.read_text()}")
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail(f"server not SERVING within {timeout} s:\n{log_path.read_text()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return ServerProcess(proc, int(info["grpc_port"]), int(info["metrics_port"]), log_path)
