"""`--workers N`: N server processes on the same ports (SO_REUSEPORT), under one supervisor.

    python -m serving --model-dir exported/ --workers 4        # 0 = one per available CPU

The process started (`python -m serving`, PID 1 in a container) becomes the supervisor: it holds the
ports (for port 0 it picks them, bound with SO_REUSEPORT, so every worker binds the same ones), starts N
workers (spawned interpreters, each a whole server: its own ONNX Runtime sessions, batchers, gRPC and
HTTP listeners, the pattern of grpcio's multiprocessing example) and supervises them:

- Start: a worker loads and warms up, listens, and reports ready; only when every worker has, the
  supervisor tells them all to turn SERVING and writes the ready file (its own pid). A worker that fails
  to start fails the server (exit 1).
- A worker that dies is restarted and counted (`vae_worker_restarts_total`); more than
  `MAX_RESTARTS` deaths within `RESTART_WINDOW_S` take the whole server down with exit 1, so a crash
  loop is never a silent half-capacity server (Kubernetes then restarts the pod).
- SIGTERM (SIGINT) is passed to every worker, which drains as a single server does (--drain-delay-s,
  --grace-period-s); the supervisor exits 0 only if every worker did.
- Metrics: the workers write prometheus-client's multiprocess files into a private directory
  (PROMETHEUS_MULTIPROC_DIR), so `/metrics` on any worker is the whole server (serving.metrics).

The kernel spreads *connections* over the workers, and an HTTP/2 connection stays on the worker that
accepted it: one gRPC channel uses one worker. Clients spread load by opening several channels (the
load generator's --channels), and a Kubernetes Service spreads connections across pods.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any

from serving.config import MULTIPROC_ENV, ServeConfig, write_ready_file

logger = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 300.0
READY, GO = "ready", "go"


def worker_count(config: ServeConfig) -> int:
    return config.workers if config.workers > 0 else len(os.sched_getaffinity(0))


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """A socket bound (not listening) with SO_REUSEPORT on `port` (0: a free one): it holds the port for
    the workers, which bind it too; the kernel only hands connections to listening sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    return s, int(s.getsockname()[1])


def _worker_main(config: ServeConfig, index: int, conn: multiprocessing.connection.Connection) -> None:
    """One worker: a whole server on the shared ports; SERVING when the supervisor says every worker is."""
    import asyncio

    logging.basicConfig(level=config.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    from serving.loop import loop_factory
    from serving.server import serve

    async def gate() -> None:
        conn.send(READY)
        loop = asyncio.get_running_loop()
        message = await loop.run_in_executor(None, conn.recv)
        if message != GO:
            raise RuntimeError(f"worker {index}: expected {GO!r} from the supervisor, got {message!r}")

    from serving.errors import StartupError

    log = logging.getLogger("serving")
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            code = runner.run(serve(config, reuse_port=True, serving_gate=gate))
    except (StartupError, OSError) as e:
        log.error("cannot start: %s", e)
        code = 1
    except Exception:
        log.exception("worker %d failed", index)
        code = 1
    sys.exit(code)


class Supervisor:
    """Starts, watches and stops the workers of one server."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.n = worker_count(config)
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple[SpawnProcess, multiprocessing.connection.Connection]] = {}
        self.deaths: list[float] = []
        self.signal: signal.Signals | None = None
        self._metric_dir = Path(tempfile.mkdtemp(prefix="vae-serve-metrics-"))
        self._restarts: Any = None

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        os.environ[MULTIPROC_ENV] = str(self._metric_dir)  # before prometheus_client loads, here and in workers
        from prometheus_client import CollectorRegistry, Counter

        self._restarts = Counter("worker_restarts_total", "worker processes that died and were restarted "
                                 "(--workers)", namespace="vae", registry=CollectorRegistry())
        c = self.config
        held = [_reserve(c.host, c.port)]
        if c.http_port >= 0:
            held.append(_reserve(c.http_host or c.host, c.http_port))
        try:
            ports = [p for _, p in held]
            worker_config = dataclasses.replace(c, port=ports[0], http_port=ports[1] if len(ports) > 1 else -1,
                                                ready_file=None, workers=1)
            self.worker_config = worker_config
            logger.info("starting %d workers on ports %s", self.n, ports)
            for i in range(self.n):
                self._spawn(i)
            if not self._wait_ready(list(self.procs)):
                return self._stop_all(1)
            for _, conn in self.procs.values():
                conn.send(GO)
            if c.ready_file is not None:
                write_ready_file(c.ready_file, worker_config.port, worker_config.http_port)
            logger.info("SERVING with %d workers", self.n)
            return self._watch()
        finally:
            for s, _ in held:
                s.close()
            shutil.rmtree(self._metric_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def _spawn(self, index: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(target=_worker_main, args=(self.worker_config, index, child), name=f"worker-{index}",
                             daemon=False)
        p.start()
        child.close()
        self.procs[index] = (p, parent)

    def _wait_ready(self, indices: list[int]) -> bool:
        """Until each of `indices` reported ready; False if one died first, a signal came, or the time ran out."""
        pending = set(indices)
        end = time.monotonic() + START_TIMEOUT_S
        while pending:
            if self.signal is not None or time.monotonic() > end:
                return False
            for i in list(pending):
                p, conn = self.procs[i]
                if conn.poll():
                    try:
                        ok = conn.recv() == READY
                    except EOFError:
                        ok = False
                    if not ok:
                        p.join(5)
                        logger.error("worker %d exited with %s before it was ready", i, p.exitcode)
                        return False
                    pending.discard(i)
                elif not p.is_alive():
                    logger.error("worker %d exited with %s before it was ready", i, p.exitcode)
                    return False
            time.sleep(0.02)
        return True

    def _watch(self) -> int:
        while self.signal is None:
            sentinels = {p.sentinel: i for i, (p, _) in self.procs.items()}
            for s in multiprocessing.connection.wait(list(sentinels), timeout=0.2):
                i = sentinels[s]  # type: ignore[index]
                if self.signal is not None:
                    break
                p, conn = self.procs[i]
                p.join()
                conn.close()
                from prometheus_client import multiprocess

                multiprocess.mark_process_dead(p.pid)
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
                if len(self.deaths) > MAX_RESTARTS:
                    logger.error("worker %d died (exit %s); %d deaths in %.0f s: stopping the server", i, p.exitcode,
                                 len(self.deaths), RESTART_WINDOW_S)
                    return self._stop_all(1)
                logger.error("worker %d died (exit %s); restarting it", i, p.exitcode)
                self._restarts.inc()
                self._spawn(i)
                if not self._wait_ready([i]):
                    logger.error("worker %d did not come back", i)
                    return self._stop_all(1)
                self.procs[i][1].send(GO)
        logger.info("%s received: stopping %d workers", self.signal.name, len(self.procs))
        return self._stop_all(0, self.signal)

    def _stop_all(self, code: int, sig: signal.Signals = signal.SIGTERM) -> int:
        """Signal every worker and wait for them (drain delay + grace period + a margin); the exit code."""
        for p, _ in self.procs.values():
            if p.is_alive():
                os.kill(p.pid, sig)  # type: ignore[arg-type]
        c = self.config
        end = time.monotonic() + c.drain_delay_s + c.grace_period_s + 15.0
        worst = code
        for i, (p, _) in self.procs.items():
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                logger.error("worker %d did not stop in time; killing it", i)
                p.kill()
                p.join()
                worst = worst or 1
            elif p.exitcode != 0:
                logger.error("worker %d exited with %s", i, p.exitcode)
                worst = worst or 1
        return worst


def supervise(config: ServeConfig) -> int:
    return Supervisor(config).run()
