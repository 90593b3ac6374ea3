"""The HTTP port (`--http-port`): the Open Inference Protocol over REST, its health endpoints and
Prometheus `/metrics`, served by aiohttp on the event loop the gRPC server runs (no thread per connection).

    GET  /v2                                         server metadata
    GET  /v2/health/live                             200 {"live": true}
    GET  /v2/health/ready                            200 {"ready": true}, 503 {"ready": false} while
                                                     starting or draining
    GET  /v2/models/{model}[/versions/{v}]           model metadata (the manifest's tensors)
    GET  /v2/models/{model}[/versions/{v}]/ready     200 / 503, as above
    POST /v2/models/{model}[/versions/{v}]/infer     inference: JSON tensors, or the binary tensor extension
    POST /v2/repository/index                        the repository extension (Triton's), on only with
    POST /v2/repository/models/{model}/load          --model-control explicit (else 404 saying so):
    POST /v2/repository/models/{model}/unload        index [{name, version, state, reason}], load, unload
    GET  /metrics                                    Prometheus exposition (text format)

`HEAD` is answered wherever `GET` is. Requests go through the same data plane as gRPC (`serving.dataplane`:
model, input and output checks, the batchers, the budget) and request wrapper (`serving.scope`; metrics
`vae_requests_total{method="http/ModelInfer", code}` with the answer's gRPC code). Errors are
`{"error": "..."}` with the status of `serving.errors.STATUS_TABLE` (400 bad request, 503 + Retry-After
when full or draining, 504 deadline); this layer adds 404 (unknown path), 405 (method), 408 (body not
sent within --http-read-timeout-s) and 413 (body over --max-message-bytes).

Binary tensor extension (as Triton and KServe define it): the header `Inference-Header-Content-Length: L`
says the body's first L bytes are the JSON request and the rest are the inputs' raw little-endian bytes,
in input order, each input saying its size in `parameters.binary_data_size`. An output asked for with
`parameters.binary_data: true` (or every output, with the request's `parameters.binary_data_output`)
comes back the same way after the JSON response, which then carries `binary_data_size` for it.

Deadlines: `parameters.timeout` (microseconds, as tritonclient sends it) or the header `Timeout-Ms`; a
request still queued when it passes gets 504. JSON bodies over `JSON_INLINE_BYTES` are parsed (answers of
over `JSON_INLINE_FLOATS` values written) in a worker process (`serving.jsoncodec`).
A client gets --http-read-timeout-s to send a request's head (aiohttp's keep-alive timer, which also
closes idle connections) and the same again for its body.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from serving.budget import REQUEST_COPIES, current_lease
from serving.dataplane import FP32, DataPlane
from serving.detector import OIP_MODEL
from serving.errors import GRPC_BY_HTTP, InvalidInput, ResponseTooLarge, ShuttingDown, quote
from serving.jsoncodec import JsonPool, Problem, encode_response, field, parse_request, shown, timeout_of
from serving.scope import RequestScope
from serving.tensors import F32

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "Timeout-Ms"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
# JSON bodies larger than this are parsed in the worker process (a few ms inline at most), and answers
# of more float32 values than JSON_INLINE_FLOATS are written there.
JSON_INLINE_BYTES = 256 * 1024
JSON_INLINE_FLOATS = 256 * 1024
# A JSON body's memory: its bytes, the Python floats it parses to (32 bytes for each ~10 characters) and
# the float32 array; reserved on the bytes-in-flight budget as this many times the body.
JSON_REQUEST_COPIES = 6
# At the end of a shutdown, what a connection's last answer gets to go out before it is closed.
SHUTDOWN_LINGER_S = 1.0
# Shutdown closes the port once no request has arrived for this long (nothing in flight either).
QUIET_S = 0.2

Handler = Callable[[web.BaseRequest, list[str]], Awaitable[web.Response]]


class HttpError(Exception):
    """An answer this layer gives itself (routing, body limits): status and message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status,
                        content_type=JSON_TYPE, headers=headers)


class HttpServer:
    """The HTTP port of one server: `start` binds, `close` stops taking connections, `shutdown` drains."""

    def __init__(self, plane: DataPlane, registry: CollectorRegistry,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.repo = plane.repo
        self.oip = plane.oip
        self.metrics = metrics = plane.metrics
        self.registry = registry
        self.config = plane.config
        self.budget = plane.budget
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port  # --workers: every worker listens on the port (SO_REUSEPORT)
        self.max_body = plane.config.max_message_bytes
        self._web: web.Server | None = None
        self._json = JsonPool()
        self.closing = False  # after the drain delay: new requests get 503 and their connection closes
        self._inflight = 0
        self._idle = asyncio.Event()
        self._last_request = 0.0
        self._server: asyncio.AbstractServer | None = None
        m = metrics.method_metrics
        self._mm = {name: m("http/" + name) for name in (
            "ServerMetadata", "ServerLive", "ServerReady", "ModelMetadata", "ModelReady", "ModelInfer",
            "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")}
        self._server_metadata = orjson.dumps(self.oip.server_metadata)

    async def start(self) -> int:
        """Bind and listen; the port bound (for port 0)."""
        timeout = self.config.http_read_timeout_s
        self._web = web.Server(self._handle, access_log=None, keepalive_timeout=timeout,
                               max_field_size=8190, max_line_size=8190)
        host = self.config.http_host or self.config.host
        self._server = await asyncio.get_running_loop().create_server(
            self._web, host, self.config.http_port, ssl=self.ssl_context, reuse_address=True,
            reuse_port=self.reuse_port or None)
        return int(self._server.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    async def shutdown(self, grace_s: float) -> None:
        """After the drain delay: new requests get 503 (ShuttingDown, Retry-After) and their connection
        closes, while requests in flight get up to `grace_s` to finish; then the port closes. (Closing
        the port first would reset connections the kernel had already accepted for it.)"""
        self.closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + grace_s
        # Until nothing is in flight and no request has come for QUIET_S (clients told Retry-After have
        # gone), or the grace period is over.
        while loop.time() < end and (self._inflight or loop.time() - self._last_request < QUIET_S):
            try:
                await asyncio.wait_for(self._idle.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                break
            await asyncio.sleep(max(0.0, min(end, self._last_request + QUIET_S) - loop.time()))
        if self._inflight:
            logger.warning("HTTP: %d requests still in flight after the %.1f s grace period", self._inflight, grace_s)
        self.stop_listening()
        if self._web is not None:
            await self._web.shutdown(SHUTDOWN_LINGER_S)
            self._web = None
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._json.close()

    # -- routing --------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        path = request.path
        if path == "/metrics":
            if request.method not in ("GET", "HEAD"):
                return _json({"error": "/metrics: expected GET"}, 405, {"Allow": "GET, HEAD"})
            body = generate_latest(self.registry)
            return web.Response(body=b"" if request.method == "HEAD" else body,
                                headers={"Content-Type": CONTENT_TYPE_LATEST})
        parts = path.split("/")
        route = self._route(parts)
        if route is None:
            return _json({"error": f"{quote(path)}: not found; the REST API is under /v2 (see /v2/models/"
                                   f"{{{'|'.join(sorted(self.repo.oip_names()))}}}), metrics under /metrics"}, 404)
        name, method, handler = route
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            allow = "GET, HEAD" if method == "GET" else method
            return _json({"error": f"{quote(path)}: expected {method}, got {quote(request.method)}"}, 405,
                         {"Allow": allow})
        scope = RequestScope(self._mm[name], self.budget)
        token = current_lease.set(scope.lease)
        self._inflight += 1
        self._idle.clear()
        self._last_request = asyncio.get_running_loop().time()
        try:
            if self.closing and name == "ModelInfer":
                raise ShuttingDown("the server is shutting down; send to another replica")
            response = await handler(request, parts)
            scope.ok()
        except HttpError as e:
            scope.end_with(GRPC_BY_HTTP.get(e.status, GRPC_BY_HTTP[400]).name)
            response = _json({"error": str(e)}, e.status, e.headers)
        except Exception as e:  # noqa: BLE001  # every error becomes its status (500 if unexpected, logged)
            status, message = scope.failed(e, self.metrics)
            headers = {"Retry-After": str(status.retry_after_s)} if status.retry_after_s else None
            response = _json({"error": message}, status.http, headers)
        finally:
            scope.lease.release()  # (ended scopes released it already; a second release gives back nothing)
            current_lease.reset(token)
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        if request.method == "HEAD":
            response.body = b""
        if self.closing:
            response.force_close()
        return response

    def _route(self, parts: list[str]) -> tuple[str, str, Handler] | None:
        """(metrics name, HTTP method, handler) for a path split on "/", or None (404)."""
        if len(parts) < 2 or parts[0] != "" or parts[1] != "v2":
            return None
        rest = parts[2:]
        if not rest or rest == [""]:
            return "ServerMetadata", "GET", self._server_meta
        if rest == ["health", "live"]:
            return "ServerLive", "GET", self._live
        if rest == ["health", "ready"]:
            return "ServerReady", "GET", self._ready
        if rest == ["repository", "index"]:
            return "RepositoryIndex", "POST", self._repository_index
        if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[2] and rest[3] in ("load", "unload"):
            return ("RepositoryModelLoad", "POST", self._load) if rest[3] == "load" else \
                ("RepositoryModelUnload", "POST", self._unload)
        if rest[0] != "models" or len(rest) < 2 or not rest[1]:
            return None
        tail = rest[2:]
        if len(tail) >= 2 and tail[0] == "versions":
            tail = tail[2:]
        if not tail:
            return "ModelMetadata", "GET", self._model_meta
        if tail == ["ready"]:
            return "ModelReady", "GET", self._model_ready
        if tail == ["infer"]:
            return "ModelInfer", "POST", self._infer
        return None

    @staticmethod
    def _model_version(parts: list[str]) -> tuple[str, str]:
        # parts: ["", "v2", "models", name, ("versions", v,)? ...]
        name = parts[3]
        version = parts[5] if len(parts) > 5 and parts[4] == "versions" else ""
        return name, version

    # -- endpoints ------------------------------------------------------------------------------

    async def _server_meta(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        return web.Response(body=self._server_metadata, content_type=JSON_TYPE)

    async def _live(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        return _json({"live": True})

    async def _ready(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        ready = self.repo.ready
        return _json({"ready": ready}, 200 if ready else 503)

    async def _model_meta(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        name, version = self._model_version(parts)
        return web.Response(body=orjson.dumps(self.oip.metadata(name, version)), content_type=JSON_TYPE)

    # -- the repository extension (on only with --model-control explicit; else 404 saying so) ----------

    async def _repository_body(self, request: web.BaseRequest) -> dict[str, Any]:
        if not request.can_read_body:  # tritonclient's index request has an empty body
            return {}
        body = await self._read_body(request, REQUEST_COPIES)
        if not body.strip():
            return {}
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            raise InvalidInput("body", "a JSON object (or nothing)", f"{len(body)} bytes that are not one")
        return req

    async def _repository_index(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        req = await self._repository_body(request)
        ready = field(req, "ready", bool, "ready", "true or false", None, False)
        name = field(req, "repository_name", str, "repository_name", "a string", None, "")
        return _json(self.oip.repository_index(name, ready))

    async def _load(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        req = await self._repository_body(request)
        await self.oip.load("", parts[4], field(req, "parameters", dict, "parameters", "an object", None, {}))
        return web.Response(status=200)  # Triton's answer: 200, empty body

    async def _unload(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        req = await self._repository_body(request)
        await self.oip.unload("", parts[4], field(req, "parameters", dict, "parameters", "an object", None, {}))
        return web.Response(status=200)

    async def _model_ready(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        name, version = self._model_version(parts)
        ready = self.oip.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def _read_body(self, request: web.BaseRequest, copies: int) -> bytes:
        """The whole body, within --max-message-bytes and --http-read-timeout-s, reserved on the budget."""
        limit = self.max_body
        n = request.content_length
        if n is not None and n > limit:
            raise HttpError(413, f"body: {n:,} bytes, over --max-message-bytes {limit:,}")
        lease = current_lease.get()
        assert lease is not None
        if n is not None:
            lease.reserve(copies * n, "body")
        if request.headers.get("Expect", "").lower() == "100-continue":  # curl, for bodies over 1 KiB
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            async with asyncio.timeout(self.config.http_read_timeout_s):
                if n is not None and "Content-Encoding" not in request.headers:
                    return await request.content.readexactly(n)
                chunks, total = [], 0
                async for chunk in request.content.iter_any():  # chunked or compressed: counted as it comes
                    total += len(chunk)
                    if total > limit:
                        raise HttpError(413, f"body: over --max-message-bytes {limit:,} (counted after "
                                             f"any Content-Encoding is undone)")
                    if n is None or total > n:  # no length given, or inflating past it: reserve as it grows
                        lease.reserve(copies * len(chunk), "body")
                    chunks.append(chunk)
                return b"".join(chunks)
        except TimeoutError:
            raise HttpError(408, f"body: not received within --http-read-timeout-s "
                                 f"{self.config.http_read_timeout_s:g}") from None
        except asyncio.IncompleteReadError as e:
            raise HttpError(400, f"body: expected {n:,} bytes (Content-Length), got {len(e.partial):,}") from None

    async def _infer(self, request: web.BaseRequest, parts: list[str]) -> web.Response:
        name, version = self._model_version(parts)
        oip = self.oip
        v, graph, spec = oip.model(name, version)
        header_len_raw = request.headers.get(HEADER_LENGTH)
        body = await self._read_body(request, REQUEST_COPIES if header_len_raw is not None else JSON_REQUEST_COPIES)
        if header_len_raw is not None:
            try:
                header_len = int(header_len_raw)
            except ValueError:
                header_len = -1
            if not 0 <= header_len <= len(body):
                raise InvalidInput(HEADER_LENGTH, f"an integer from 0 to the body's {len(body)} bytes",
                                   quote(repr(header_len_raw)), name)
        else:
            header_len = len(body)
        head = body if header_len == len(body) else body[:header_len]
        loop = asyncio.get_running_loop()
        parsed = (await loop.run_in_executor(self._json.executor(), parse_request, head, header_len_raw is not None)
                  if header_len > JSON_INLINE_BYTES else parse_request(head, header_len_raw is not None))
        if isinstance(parsed, Problem):
            raise InvalidInput(parsed.field, parsed.expected, parsed.got, name)
        req = parsed
        params = field(req, "parameters", dict, "parameters", "an object", name, {})
        inputs = field(req, "inputs", list, "inputs", "a list of input tensors", name, required=True)
        if not all(isinstance(t, dict) for t in inputs):
            raise InvalidInput("inputs", "a list of objects (name, shape, datatype, data)", "other values", name)
        names = [str(t.get("name")) for t in inputs]
        want = oip.check_input(name, spec, names, str(inputs[0].get("datatype")) if inputs else "")
        t = inputs[0]
        where = f"inputs[{want.name!r}]"
        shape = field(t, "shape", list, where + ".shape", "a list of integers", name, required=True)
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(where + ".shape", "a list of integers", shown(shape), name)
        tparams = field(t, "parameters", dict, where + ".parameters", "an object", name, {})
        binary_size = field(tparams, "binary_data_size", int, where + ".parameters.binary_data_size",
                             "an integer (bytes)", name)
        binary = memoryview(body)[header_len:]
        if binary_size is not None:
            if "_data" in t or "_problem" in t or "data" in t:
                raise InvalidInput(where + ".data", "no data when parameters.binary_data_size is given", "both", name)
            if binary_size != len(binary):
                raise InvalidInput(where + ".parameters.binary_data_size",
                                   f"the {len(binary)} binary bytes after the JSON header", str(binary_size), name)
            data: bytes | memoryview = binary
        else:
            if len(binary):
                raise InvalidInput(HEADER_LENGTH, "no bytes after the JSON header unless an input has "
                                   "parameters.binary_data_size", f"{len(binary)} bytes", name)
            if "_problem" in t:
                p = t["_problem"]
                raise InvalidInput(p.field, p.expected, p.got, name)
            if "_data" not in t:
                got = type(t["data"]).__name__ if "data" in t else "nothing"
                raise InvalidInput(where + ".data", "the tensor's values as a list of numbers (or "
                                   "parameters.binary_data_size)", got, name)
            data = t["_data"]
        outputs = field(req, "outputs", list, "outputs", "a list of {name, parameters}", name, [])
        if not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
            raise InvalidInput("outputs", "a list of objects with a name", shown(outputs), name)
        requested = [o["name"] for o in outputs]
        if graph == OIP_MODEL:
            wanted = oip.outputs(v, graph, name, requested)
        else:
            work, wanted = oip.infer_work(v, graph, name, where, shape, data, requested)
        all_binary = field(params, "binary_data_output", bool, "parameters.binary_data_output", "true or false",
                            name, False)
        as_binary = {n: all_binary for n in wanted}
        for o in outputs:
            op = field(o, "parameters", dict, f"outputs[{o['name']!r}].parameters", "an object", name, {})
            as_binary[o["name"]] = field(op, "binary_data", bool, f"outputs[{o['name']!r}].parameters.binary_data",
                                          "true or false", name, all_binary)
        deadline = self._deadline(request, params, name)
        if graph == OIP_MODEL:
            scored, result = await oip.score(v, name, where, shape, data, requested, params, deadline)
            del body, head, binary, data
            return await self._answer(req, name, v.label, wanted, as_binary, dict(scored),
                                      oip.score_parameters(result))
        del body, head, binary, data
        results = await work.run(deadline)
        return await self._answer(req, name, v.label, wanted, as_binary, results)

    def _deadline(self, request: web.BaseRequest, params: dict[str, Any], model: str) -> float | None:
        timeout_s = timeout_of(params, request.headers.get(TIMEOUT_HEADER), TIMEOUT_HEADER, model)
        return None if timeout_s is None else time.monotonic() + timeout_s  # the batcher's clock

    async def _answer(self, req: dict[str, Any], model: str, version: str, wanted: list[str],
                      as_binary: dict[str, bool], results: dict[str, np.ndarray],
                      parameters: dict[str, Any] | None = None) -> web.Response:
        out_meta: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        json_floats = 0
        for n in wanted:
            a = np.ascontiguousarray(results[n], dtype=F32)
            meta: dict[str, Any] = {"name": n, "datatype": FP32, "shape": list(a.shape)}
            if as_binary[n]:
                blob = a.tobytes()
                meta["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                meta["data"] = a
                json_floats += a.size
            out_meta.append(meta)
        resp: dict[str, Any] = {"model_name": model, "model_version": version}
        if isinstance(req.get("id"), str) and req["id"]:
            resp["id"] = req["id"]
        if parameters is not None:
            resp["parameters"] = parameters
        resp["outputs"] = out_meta
        if json_floats > JSON_INLINE_FLOATS:
            head = await asyncio.get_running_loop().run_in_executor(self._json.executor(), encode_response, resp)
        else:
            head = encode_response(resp)
        size = len(head) + sum(len(b) for b in blobs)
        if size > self.max_body:
            raise ResponseTooLarge(f"response: {size:,} bytes, over --max-message-bytes {self.max_body:,}; ask for "
                                   f"fewer rows" + (", or binary outputs" if json_floats else ""))
        if not blobs:
            return web.Response(body=head, content_type=JSON_TYPE)
        return web.Response(body=b"".join((head, *blobs)), content_type=BINARY_TYPE,
                            headers={HEADER_LENGTH: str(len(head))})

