"""Do-nothing gRPC servers of every grpcio kind: the floor under any Python gRPC server, and the load
generator's own ceiling.

    python -m loadgen.null_server --kind aio-uvloop --ready-file null.json
    python -m loadgen.null_server --kind sync-4 --ready-file null.json
    python -m loadgen.null_server --kind aio-uvloop --proto --ready-file n.json   # Encode's protobuf only
    python -m loadgen.null_server --kind aio-uvloop --stream --ready-file n.json  # a do-nothing stream

Kinds:

    aio-asyncio   grpc.aio server on asyncio's default event loop
    aio-uvloop    grpc.aio server on uvloop (what `python -m serving` runs)
    sync-N        grpc.server (the thread-pool server) with N worker threads

Every unary method answers an empty message without decoding the request (no protobuf work at all).
With `--proto` it does the protobuf work of a real Encode and nothing else: it parses the request as an
EncodeRequest and answers an EncodeResponse of the right size (mu, var: (N, latent_dim) zeros).
With `--stream` (grpc.aio kinds) every bidirectional method is a do-nothing stream in the shape of
ModelStreamInfer: each message read is answered at once, in order, by a ModelStreamInferResponse that
carries only the request's id (parsed from the ModelInferRequest): the floor under a streamed message,
for `python -m loadgen --streams N`.
Runs on a loopback port until SIGTERM/SIGINT or `--stop-after-s`; the ready file says the port.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.config import write_ready_file
from serving.loop import loop_factory

ASYNC_KINDS: tuple[str, ...] = ("aio-asyncio", "aio-uvloop")


def check_kind(kind: str) -> None:
    ok = kind in ASYNC_KINDS or (kind.startswith("sync-") and kind[5:].isdigit() and int(kind[5:]) >= 1)
    if not ok:
        raise ValueError(f"kind: expected one of {', '.join(ASYNC_KINDS)} or sync-N (N >= 1), got {kind!r}")


class NullHandler(grpc.GenericRpcHandler):
    """Answers every unary method: b"" (no (de)serialisers), or with `proto` a sized EncodeResponse."""

    def __init__(self, is_async: bool, proto: bool = False, latent_dim: int = 20, stream: bool = False) -> None:
        self._stream = _null_stream() if stream else None
        def encode_response(request: pb.EncodeRequest) -> pb.EncodeResponse:
            n = request.x.shape[0] if request.x.shape else 0
            zeros = bytes(4 * n * latent_dim)
            return pb.EncodeResponse(mu=pb.Tensor(shape=(n, latent_dim), data=zeros),
                                     var=pb.Tensor(shape=(n, latent_dim), data=zeros))

        fn: Callable[..., Any]
        if is_async:
            async def answer_async(request: Any, context: Any) -> Any:
                return encode_response(request) if proto else b""
            fn = answer_async
        else:
            def answer(request: Any, context: Any) -> Any:
                return encode_response(request) if proto else b""
            fn = answer
        self._handler = (grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=pb.EncodeRequest.FromString,
            response_serializer=pb.EncodeResponse.SerializeToString) if proto
            else grpc.unary_unary_rpc_method_handler(fn))

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method  # type: ignore[attr-defined]
        if self._stream is not None and method.endswith(("Stream", "StreamInfer")):
            return self._stream
        return self._handler


def _null_stream() -> grpc.RpcMethodHandler:
    """A grpc.aio stream handler answering each ModelInferRequest with only its id, as ModelStreamInfer does."""
    from serving._proto.inference import grpc_service_pb2 as oip_pb

    parse, answer = oip_pb.ModelInferRequest.FromString, oip_pb.ModelStreamInferResponse

    async def echo(request_iterator: Any, context: Any) -> None:
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            rid = parse(data).id
            await context.write(answer(infer_response=oip_pb.ModelInferResponse(id=rid)).SerializeToString())

    return grpc.stream_stream_rpc_method_handler(echo)


async def serve_async(ready_file: Path | None, stop_after_s: float = 3600.0, proto: bool = False,
                      port: int = 0, stream: bool = False) -> None:
    """A grpc.aio do-nothing server on the running loop, until SIGTERM/SIGINT or `stop_after_s`."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((NullHandler(is_async=True, proto=proto, stream=stream),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready_file is not None:
        write_ready_file(ready_file, bound, -1)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), stop_after_s)
    except TimeoutError:
        pass
    await server.stop(0)


def serve_sync(workers: int, ready_file: Path | None, stop_after_s: float = 3600.0, proto: bool = False,
               port: int = 0) -> None:
    """A thread-pool do-nothing server with `workers` threads, until SIGTERM/SIGINT or `stop_after_s`."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((NullHandler(is_async=False, proto=proto),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready_file is not None:
        write_ready_file(ready_file, bound, -1)
    stop.wait(stop_after_s)
    server.stop(0)


def serve(kind: str, ready_file: Path | None, stop_after_s: float = 3600.0, proto: bool = False,
          port: int = 0, stream: bool = False) -> None:
    """Run a do-nothing server of `kind` (see the module docstring)."""
    check_kind(kind)
    if stream and kind.startswith("sync-"):
        raise ValueError("stream: only with the grpc.aio kinds")
    if kind.startswith("sync-"):
        serve_sync(int(kind[5:]), ready_file, stop_after_s, proto, port)
        return
    with asyncio.Runner(loop_factory=loop_factory(kind.split("-", 1)[1])) as runner:
        runner.run(serve_async(ready_file, stop_after_s, proto, port, stream))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.null_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kind", default="aio-uvloop", help="aio-asyncio, aio-uvloop or sync-N")
    p.add_argument("--proto", action="store_true", help="parse each request as EncodeRequest, answer a sized "
                                                        "EncodeResponse")
    p.add_argument("--stream", action="store_true", help="also serve do-nothing bidirectional streams "
                                                         "(ModelStreamInfer-shaped answers; aio kinds)")
    p.add_argument("--port", type=int, default=0, help="loopback port (0 = any free)")
    p.add_argument("--ready-file", type=Path, help="write {grpc_port, metrics_port: -1, pid} here once listening")
    p.add_argument("--stop-after-s", type=float, default=3600.0, help="exit after this long")
    args = p.parse_args(argv)
    try:
        serve(args.kind, args.ready_file, args.stop_after_s, args.proto, args.port, args.stream)
    except ValueError as e:
        sys.stderr.write(f"python -m loadgen.null_server: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
