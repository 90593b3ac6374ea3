"""A local server process started on port 0, known through its ready file: for tests and benchmarks.

    s = LocalServer.start([sys.executable, "-m", "serving", "--model-dir", "exported", ...], workdir)
    s.target, s.metric("vae_requests_total", method="Encode", code="OK"); s.stop()

The command gets `--ready-file WORKDIR/NAME.ready.json` appended; `start` waits for that file (written
atomically by the server once SERVING) and raises `ServerStartError` with the log's tail if the process
exits or the timeout passes first. VAE_SERVE_* variables of the caller's environment are not passed on,
so only the command line configures the server.
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

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def serving_cmd(model_dir: Path, *flags: str) -> list[str]:
    """`python -m serving` on loopback port 0 with HTTP (REST, metrics) on port 0, on CPU, without a drain delay
    (whoever exercises the drain passes its own `--drain-delay-s`: argparse takes the last one)."""
    return [sys.executable, "-m", "serving", "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--port", "0", "--http-port", "0", "--providers", "cpu", "--drain-delay-s", "0", *flags]


class ServerStartError(RuntimeError):
    """The server exited, or was not SERVING in time; the message holds its log's tail."""


@dataclass
class LocalServer:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path
    ready_path: Path
    start_s: float  # from the Popen to the ready file
    server_pid: int  # the ready file's pid: the command's own, or the server a launcher started
    http_port: int = -1  # the REST API's port (vae-serve: the same as metrics_port; -1: none)

    @classmethod
    def start(cls, cmd: list[str], workdir: Path, name: str = "server", timeout_s: float = 120.0,
              cwd: Path | None = None) -> LocalServer:
        workdir.mkdir(parents=True, exist_ok=True)
        ready, log_path = workdir / f"{name}.ready.json", workdir / f"{name}.log"
        ready.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_SERVE_")}
        t0 = time.perf_counter()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([*cmd, "--ready-file", str(ready)], cwd=cwd, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
        while not ready.exists():
            if proc.poll() is not None:
                raise ServerStartError(f"{name} exited {proc.returncode} before SERVING:\n"
                                       f"{log_path.read_text(errors='replace')[-4000:]}")
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                raise ServerStartError(f"{name} not SERVING within {timeout_s:g} s:\n"
                                       f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.005)
        start_s = time.perf_counter() - t0
        info = json.loads(ready.read_text())
        # A launcher (benchmarks/references/triton.py) names the server process it started as `pid`.
        if info.get("launcher_pid", info["pid"]) != proc.pid:
            proc.kill()
            raise ServerStartError(f"{name}: the ready file names pid {info['pid']}, not {proc.pid}")
        return cls(proc, int(info["grpc_port"]), int(info.get("metrics_port", -1)), log_path, ready, start_s,
                   int(info["pid"]), int(info.get("http_port", -1)))

    @property
    def pid(self) -> int:
        """The serving process (what CPU and memory are read of)."""
        return self.server_pid

    @property
    def target(self) -> str:
        return f"localhost:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()  # type: ignore[no-any-return]

    def metrics(self) -> Samples:
        """Every sample on /metrics, keyed by (name, sorted labels)."""
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(self.metrics_text()) for s in fam.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal the server and wait for its exit code (killed after `timeout_s`, which raises)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
