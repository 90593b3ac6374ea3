"""Streaming mode of the load generator: N bidirectional streams, M messages in flight on each.

    python -m loadgen --ready-file ready.json --rpc infer-encoder --streams 64 --stream-inflight 1

Each stream is one call of the RPC's stream method (EncodeStream, DecodeStream, ReconstructStream, or
the Open Inference Protocol's ModelStreamInfer for infer-*) on the channels round-robin. A stream
keeps M messages unanswered: it writes the next as soon as one is answered (closed loop per stream).
Messages are the pre-serialised unary requests with only a per-message id added on the wire (no
re-serialisation); answers are parsed for their id (latency is from its write) and whether they
carry an error. The stream's deadline covers the whole run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.tensors import field_tag, length_delimited

VAE = "/vae.v1.VaeService/"
OIP_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
# --rpc name -> (stream method path, its response type); Sample has no stream.
STREAM_RPCS: dict[str, tuple[str, Any]] = {
    "encode": (VAE + "EncodeStream", pb.EncodeStreamResponse),
    "decode": (VAE + "DecodeStream", pb.DecodeStreamResponse),
    "reconstruct": (VAE + "ReconstructStream", pb.ReconstructStreamResponse),
    "infer-encoder": (OIP_STREAM, oip_pb.ModelStreamInferResponse),
    "infer-decoder": (OIP_STREAM, oip_pb.ModelStreamInferResponse),
}
_VAE_ID = field_tag(pb.EncodeStreamRequest.DESCRIPTOR.fields_by_name["id"].number)
_VAE_REQUEST = field_tag(pb.EncodeStreamRequest.DESCRIPTOR.fields_by_name["request"].number)
_OIP_ID = field_tag(oip_pb.ModelInferRequest.DESCRIPTOR.fields_by_name["id"].number)

Message = Callable[[bytes, str], bytes]   # (pre-serialised part, id) -> one stream message
Answer = Callable[[bytes], tuple[str, str]]  # one stream answer -> (id, "OK" or an error code name)


def stream_codec(rpc: str, reqs: list[bytes]) -> tuple[str, list[bytes], Message, Answer]:
    """The stream method, the requests prepared for it, and how to make a message and read an answer."""
    path, response_type = STREAM_RPCS[rpc]
    parse = response_type.FromString
    if path == OIP_STREAM:
        def answer_oip(data: bytes) -> tuple[str, str]:
            r = parse(data)
            return r.infer_response.id, "STREAM_ERROR" if r.error_message else "OK"

        # A ModelInferRequest with its id field appended: fields may come in any order on the wire.
        return path, reqs, lambda part, rid: part + length_delimited(_OIP_ID, rid.encode()), answer_oip

    def answer_vae(data: bytes) -> tuple[str, str]:
        r = parse(data)
        return r.id, grpc.StatusCode.OK.name if not r.HasField("status") else _CODE_NAMES.get(r.status.code, "UNKNOWN")

    wrapped = [length_delimited(_VAE_REQUEST, r) for r in reqs]  # the unary request inside the stream message
    return path, wrapped, lambda part, rid: length_delimited(_VAE_ID, rid.encode()) + part, answer_vae


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


async def stream_worker(channel: grpc.aio.Channel, rpc: str, reqs: list[bytes], offset: int, inflight: int,
                        timeout_s: float, st: Any, record: Callable[[Any, int, str], None]) -> None:
    """One stream with `inflight` messages unanswered until `st.stop`; `record(st, t_send_ns, code)` per answer."""
    path, parts, message, answer = stream_codec(rpc, reqs)
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)(timeout=timeout_s)
    sent_at: dict[str, int] = {}
    room = asyncio.Semaphore(inflight)

    async def reader() -> None:
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                return
            rid, code = answer(data)
            t0 = sent_at.pop(rid)
            st.inflight -= 1
            room.release()
            record(st, t0, code)

    reading = asyncio.ensure_future(reader())
    i, n = offset, len(parts)
    try:
        while not st.stop and st.sent < st.max_requests and not reading.done():
            await room.acquire()
            if st.stop or reading.done():
                break
            st.sent += 1
            st.inflight += 1
            rid = str(i)
            sent_at[rid] = time.perf_counter_ns()
            await call.write(message(parts[i % n], rid))
            i += 1
        await call.done_writing()
        await reading
    except grpc.aio.AioRpcError as e:
        for t0 in sent_at.values():
            record(st, t0, e.code().name)
        st.inflight -= len(sent_at)
    finally:
        reading.cancel()
