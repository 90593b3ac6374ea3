"""The gRPC server: `python -m serving --model-dir exported/ [flags]` (flags in serving/config.py).

Start-up: verify checksums, open and warm up both ONNX Runtime sessions, start the batchers, bind the
gRPC port (VaeService, the Open Inference Protocol, grpc.health.v1, reflection; optional TLS/mTLS) and
the HTTP port (`serving.http`: the Open Inference Protocol over REST, its health endpoints and Prometheus
`/metrics`; `--http-host`, optional TLS), set health SERVING, and write the ready file
`{"grpc_port", "http_port", "metrics_port", "pid"}`.

Shutdown, in the order Kubernetes needs: on SIGTERM, health (and OIP readiness) turn NOT_SERVING at
once (and `/v2/health/ready` answers 503) while the server keeps serving every RPC and HTTP request for
`--drain-delay-s`, so that load balancers and endpoint controllers stop sending; then health Watch
streams end, new RPCs and HTTP connections are refused, in-flight ones get `--grace-period-s` to
finish, the batchers stop and the process exits 0. SIGINT (Ctrl-C) skips the
drain delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from serving import oip, servicer
from serving.budget import InflightBudget
from serving.config import ServeConfig, write_ready_file
from serving.dataplane import DataPlane
from serving.errors import NotFound, StartupError, quote
from serving.http import HttpServer
from serving.metrics import REFRESH_S, Metrics
from serving.native import NativeFront
from serving.repository import Repository
from serving.rpc import Adapter, StreamCodec, add_reflection, add_service

logger = logging.getLogger(__name__)

HEALTH_NAMES: tuple[str, ...] = ("", servicer.SERVICE.full_name, oip.SERVICE.full_name)
# Concurrent RPCs a connection may open (HTTP/2 streams): bounds what idle or half-closed calls can pin.
MAX_CONCURRENT_STREAMS = 1024
GC_GEN0_THRESHOLD = 20_000
# Native front end: how long the port stays open after the fallback server stopped, for its last answers.
FALLBACK_LINGER_S = 0.1


class Health(health.aio.HealthServicer):
    """grpc.health.v1, registered like every other adapter (`serving.rpc.add_service`, and natively on the
    native front end): bodies that do not parse are INVALID_ARGUMENT, an unknown service NOT_FOUND. Watch
    streams end when the server stops taking RPCs: an open Watch must not hold the process for the whole
    grace period."""

    SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
    streams: ClassVar[dict[str, StreamCodec]] = {}

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics
        self._closing = asyncio.Event()
        self._models: set[str] = set()

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            raise NotFound(f"service: expected one of {sorted(self._server_status)}, "
                           f"got {quote(repr(request.service))}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            closing.cancel()

    def close_watches(self) -> None:
        self._closing.set()

    async def set_models(self, repo: Repository) -> None:
        """Each model's name: SERVING while a version of it is routed to, NOT_SERVING once unloaded."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        for name in set(repo.models) | set(self._models):
            if name not in HEALTH_NAMES:
                await self.set(name, serving if name in repo.models and repo.ready else not_serving)
        self._models = set(repo.models) | self._models


class GrpcFront(Protocol):
    """The gRPC port, whichever library serves it."""

    port: int

    async def stop(self, grace_s: float) -> None: ...


class GrpcioFront:
    """The gRPC port served by grpc.aio (`--grpc-frontend grpcio`, and with TLS)."""

    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server = server
        self.port = port

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)


class NativeWithFallback:
    """The gRPC port served by pygrpc-native (`serving.native`), with the grpcio server on a private Unix
    socket behind it for what it does not serve natively (streams, Health/Watch, reflection)."""

    def __init__(self, native: NativeFront, fallback: grpc.aio.Server, socket_dir: str) -> None:
        self.native = native
        self.fallback = fallback
        self.socket_dir = socket_dir
        self.port = native.port

    async def stop(self, grace_s: float) -> None:
        try:
            await asyncio.gather(self.native.drain(grace_s), self.fallback.stop(grace_s))
            # The fallback's last messages (a Watch's NOT_SERVING, a stream's trailers) are still passing
            # through the native front to their clients: closing it at once would cut them off.
            await asyncio.sleep(FALLBACK_LINGER_S)
            await self.native.close()
        finally:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


@dataclass
class RunningServer:
    """A started server; `stop` drains it. Handy for in-process use and tests."""

    config: ServeConfig
    front: GrpcFront
    repo: Repository
    metrics: Metrics
    health: Health
    grpc_port: int
    http_port: int
    http_server: HttpServer | None = None
    refresher: asyncio.Task[None] | None = None
    _stopped: bool = field(default=False)

    async def stop(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """NOT_SERVING; keep serving for the drain delay; refuse new RPCs, let in-flight ones finish
        within the grace period; stop."""
        if self._stopped:
            return
        self._stopped = True
        self.repo.ready = False  # OIP ServerReady/ModelReady turn false with health, not after the drain
        await self.health.enter_graceful_shutdown()
        drain = self.config.drain_delay_s if drain_delay_s is None else drain_delay_s
        if drain > 0:
            logger.info("shutting down: NOT_SERVING; still serving for the %.1f s drain delay", drain)
            await asyncio.sleep(drain)
        grace = self.config.grace_period_s if grace_s is None else grace_s
        logger.info("shutting down: refusing new RPCs, draining in-flight RPCs for up to %.1f s", grace)
        self.health.close_watches()
        if self.http_server is not None:
            await asyncio.gather(self.front.stop(grace), self.http_server.shutdown(grace))
        else:
            await self.front.stop(grace)
        await self.repo.close()
        if self.refresher is not None:
            self.refresher.cancel()
            self.metrics.refresh()
        logger.info("stopped")


_background: set[asyncio.Future[None]] = set()


def _detach(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` on the loop without awaiting it (kept referenced until it ends)."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


def _tls_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The TLS material checked by OpenSSL before gRPC sees it: a key that does not match its certificate
    or a file that is not PEM gets one clear line (grpcio would only say "Failed to bind")."""
    if not config.tls:
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as e:
        raise StartupError(f"tls-cert/tls-key: expected a PEM certificate chain and its matching private key, "
                           f"got {config.tls_cert} and {config.tls_key} ({e.reason or e})") from e
    if config.tls_client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=config.tls_client_ca)
        except ssl.SSLError as e:
            raise StartupError(f"tls-client-ca: expected PEM CA certificates, got {config.tls_client_ca} "
                               f"({e.reason or e})") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if not config.tls:
        return None
    assert config.tls_cert is not None and config.tls_key is not None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


async def _refresh_metrics(metrics: Metrics) -> None:
    while True:
        metrics.refresh()
        await asyncio.sleep(REFRESH_S)


async def start(config: ServeConfig, reuse_port: bool = False,
                serving_gate: Callable[[], Awaitable[None]] | None = None) -> RunningServer:
    """Load, warm up and start everything; health is SERVING when this returns.

    Under --workers (serving.workers) each worker binds the same ports (`reuse_port`: SO_REUSEPORT)
    and awaits `serving_gate` (the supervisor's word that every worker is warm) before SERVING."""
    t0 = time.perf_counter()
    tls = _tls_context(config)  # before the model: a bad certificate fails fast
    metrics = Metrics(versioned=config.model_repository is not None,
                      models=("encoder", "decoder") if config.model_repository is None else ())
    repo = Repository(config, metrics)
    front: GrpcFront | None = None
    http_server: HttpServer | None = None
    try:
        await repo.start()
        plane = DataPlane(repo, metrics, InflightBudget(config.max_inflight_bytes))
        health_servicer = Health(metrics)
        services: list[tuple[ServiceDescriptor, Adapter]] = [
            (servicer.SERVICE, servicer.VaeServicer(plane)), (oip.SERVICE, oip.OipServicer(plane)),
            (Health.SERVICE, health_servicer)]
        front = await _grpc_front(config, plane, services, reuse_port)
        http_port = -1
        if config.http_port >= 0:
            http_server = HttpServer(plane, metrics.exposition_registry, tls if config.http_tls else None,
                                     reuse_port=reuse_port)
            http_port = await http_server.start()
        if serving_gate is not None:
            await serving_gate()
        repo.ready = True  # gates the OIP ServerReady/ModelReady answers; set before health says SERVING
        for name in HEALTH_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if not repo.legacy:  # one health name per model: SERVING while a version of it is routed to
            repo.on_change.append(lambda: _detach(health_servicer.set_models(repo)))
            await health_servicer.set_models(repo)
        refresher = asyncio.ensure_future(_refresh_metrics(metrics)) if metrics.multiprocess else None
        running = RunningServer(config, front, repo, metrics, health_servicer, front.port, http_port, http_server,
                                refresher)
    except BaseException:
        # A failed start (port in use, TLS files unreadable, ...) must not leave runner threads,
        # wake-up pipes or a half-started server behind.
        if front is not None:
            await front.stop(0)
        if http_server is not None:
            await http_server.shutdown(0)
        await repo.close()
        raise
    logger.info("SERVING on %s (grpc port %d, %s front end%s; http port %d) in %.0f ms", config.host, front.port,
                config.frontend, ", TLS" + (" + client auth" if config.tls_client_ca else "") if config.tls else "",
                http_port, 1e3 * (time.perf_counter() - t0))
    return running


def _grpc_server(config: ServeConfig, plane: DataPlane, services: list[tuple[ServiceDescriptor, Adapter]],
                 reuse_port: bool) -> grpc.aio.Server:
    """A grpc.aio server with every service (the grpcio front end, or the native one's fallback)."""
    options: list[tuple[str, int]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if config.max_connection_age_s > 0:
        # grpc.aio never answers a unary call whose client half-closes without sending a message
        # (its handler returns without a status); only the connection's end frees such calls.
        options += [("grpc.max_connection_age_ms", int(1e3 * config.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", int(1e3 * config.grace_period_s))]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=config.max_concurrent_rpcs or None)
    for service, adapter in services:
        add_service(server, service, adapter, config.max_message_bytes, plane.budget, config.max_stream_inflight)
    add_reflection(server, (*(service.full_name for service, _ in services), reflection.SERVICE_NAME))
    return server


async def _grpc_front(config: ServeConfig, plane: DataPlane, services: list[tuple[ServiceDescriptor, Adapter]],
                      reuse_port: bool) -> GrpcFront:
    """Bind and start the gRPC port with the configured front end."""
    address = f"{config.host}:{config.port}"
    if config.frontend == "grpcio":
        if config.tls and config.grpc_frontend == "auto":
            logger.info("TLS: the gRPC port uses the grpcio front end (pygrpc-native 0.5.0 has no TLS)")
        server = _grpc_server(config, plane, services, reuse_port)
        creds = _credentials(config)
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"port: cannot bind {address}")
        await server.start()
        return GrpcioFront(server, port)
    # The fallback gets no connection age: its only client is the native front, in this process.
    fallback = _grpc_server(dataclasses.replace(config, max_connection_age_s=0), plane, services, False)
    socket_dir = tempfile.mkdtemp(prefix="vae-serve-grpc-")
    path = os.path.join(socket_dir, "fallback.sock")
    try:
        fallback.add_insecure_port(f"unix:{path}")
        await fallback.start()
        try:
            native = NativeFront(plane, services, MAX_CONCURRENT_STREAMS, reuse_port)
        except OSError as e:
            raise OSError(f"port: cannot bind {address} ({e})") from e
        native.set_fallback(path)
        native.start()
    except BaseException:
        await fallback.stop(0)
        shutil.rmtree(socket_dir, ignore_errors=True)
        raise
    return NativeWithFallback(native, fallback, socket_dir)


async def serve(config: ServeConfig, reuse_port: bool = False,
                serving_gate: Callable[[], Awaitable[None]] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process exit code (0 on a clean shutdown)."""
    running = await start(config, reuse_port, serving_gate)
    # What start-up made (sessions, descriptors, modules) lives as long as the process: keep the cyclic
    # collector off it, and let it run after GC_GEN0_THRESHOLD allocations instead of 700. A call
    # allocates dozens of short-lived objects, none of them in cycles; with the default threshold the
    # collector took ~4% of the server's CPU at C = 64 (perf), rescanning what start-up made each time.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    stop = asyncio.Event()
    received: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if config.ready_file is not None:
        write_ready_file(config.ready_file, running.grpc_port, running.http_port)
    await stop.wait()
    logger.info("%s received", received[0].name)
    await running.stop(drain_delay_s=0.0 if received[0] == signal.SIGINT else None)
    return 0
