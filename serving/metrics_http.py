"""The Prometheus endpoint: `GET /metrics` on its own port, served on the server's event loop.

No thread per connection (prometheus-client's `start_http_server` keeps one per idle client and
answers every path): one asyncio server that answers `GET /metrics` (and `HEAD`) with the registry's
exposition, 404 for any other path, 405 for other methods, 400 for what does not parse as HTTP/1.x.
Each connection carries one request and closes; a client that has not sent its request head within
`HEADER_TIMEOUT_S`, or sends more than `MAX_HEADER_BYTES` of it, is dropped. Optional TLS (and client
certificates) with the gRPC port's files (`--metrics-tls`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

logger = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
MAX_HEADER_BYTES = 8192
PATH = "/metrics"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head: bool = False) -> bytes:
    headers = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n")
    return headers.encode("ascii") + (b"" if head else body)


class MetricsServer:
    """`GET /metrics` for one registry; `start` binds, `close` stops."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind and listen; the port bound (for port 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.ssl_context,
                                                  limit=MAX_HEADER_BYTES)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return  # gone, too slow or too long: nothing worth answering
            writer.write(self._answer(head))
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _response("400 Bad Request", b"expected an HTTP/1.x request line\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != PATH.encode():
            return _response("404 Not Found", b"only /metrics is served here\n")
        if method not in (b"GET", b"HEAD"):
            return _response("405 Method Not Allowed", b"GET /metrics\n")
        return _response("200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST, head=method == b"HEAD")
