"""The gRPC server: `python -m serving --model-dir exported/ [flags]` (flags in serving/config.py).

Start-up: verify checksums, open and warm up both ONNX Runtime sessions, start the batchers, bind the
gRPC port (VaeService, the Open Inference Protocol, grpc.health.v1, reflection; optional TLS/mTLS) and
the Prometheus port, set health SERVING, and write the ready file `{"grpc_port", "metrics_port", "pid"}`.

Shutdown on SIGTERM/SIGINT: health NOT_SERVING at once, new RPCs refused, in-flight RPCs get
`--grace-period-s` to finish, then the batchers stop and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.inference import grpc_service_pb2_grpc as oip_grpc
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.config import ServeConfig, write_ready_file
from serving.core import VaeCore
from serving.metrics import Metrics
from serving.oip import OipServicer
from serving.runtime import load_model
from serving.servicer import VaeServicer

logger = logging.getLogger(__name__)

VAE_SERVICE = pb.DESCRIPTOR.services_by_name["VaeService"].full_name
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_NAMES: tuple[str, ...] = ("", VAE_SERVICE, OIP_SERVICE)


@dataclass
class RunningServer:
    """A started server; `stop` drains it. Handy for in-process use and tests."""

    config: ServeConfig
    server: grpc.aio.Server
    core: VaeCore
    metrics: Metrics
    health: Any
    grpc_port: int
    metrics_port: int
    _httpd: Any = None
    _stopped: bool = field(default=False)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new RPCs, let in-flight ones finish within the grace period, stop."""
        if self._stopped:
            return
        self._stopped = True
        self.core.ready = False  # OIP ServerReady/ModelReady turn false with health, not after the drain
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s if grace_s is None else grace_s
        logger.info("shutting down: NOT_SERVING, draining in-flight RPCs for up to %.1f s", grace)
        await self.server.stop(grace)
        await self.core.close()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        logger.info("stopped")


def _credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


async def start(config: ServeConfig) -> RunningServer:
    """Load, warm up and start everything; health is SERVING when this returns."""
    t0 = time.perf_counter()
    model = load_model(config.model_dir, config.providers, config.intra_op_threads, config.max_batch_size)
    metrics = Metrics()
    metrics.set_model_info(model.manifest.name, model.manifest.version, model.providers)
    core = VaeCore(model, config, metrics)
    core.start()
    server: grpc.aio.Server | None = None
    httpd: Any = None
    try:

        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        pb_grpc.add_VaeServiceServicer_to_server(VaeServicer(core, metrics), server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(core, metrics), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*HEALTH_NAMES[1:], health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        creds = _credentials(config)
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"port: cannot bind {address}")
        httpd, metrics_port = None, -1
        if config.metrics_port >= 0:
            httpd, _ = start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
            metrics_port = int(httpd.server_port)
        await server.start()
        core.ready = True  # gates the OIP ServerReady/ModelReady answers; set before health says SERVING
        for name in HEALTH_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        running = RunningServer(config, server, core, metrics, health_servicer, port, metrics_port, httpd)
    except BaseException:
        # A failed start (port in use, TLS files unreadable, ...) must not leave runner threads,
        # wake-up pipes or a half-started server behind.
        if server is not None:
            await server.stop(0)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        await core.close()
        raise
    logger.info("SERVING on %s (grpc port %d, metrics port %d%s) in %.0f ms", config.host, port, metrics_port,
                ", TLS" + (" + client auth" if config.tls_client_ca else "") if creds else "",
                1e3 * (time.perf_counter() - t0))
    return running


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process exit code (0 on a clean shutdown)."""
    running = await start(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.ready_file is not None:
        write_ready_file(config.ready_file, running.grpc_port, running.metrics_port)
    await stop.wait()
    logger.info("signal received")
    await running.stop()
    return 0
