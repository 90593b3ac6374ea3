"""vae.v1.Tensor <-> numpy: shape plus raw little-endian float32 bytes. Shared by server, client and bench.

Imports only numpy and the generated messages, so the client and the load generator stay light.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serving._proto.vae.v1 import vae_service_pb2 as pb

F32 = np.dtype("<f4")  # little-endian float32, the only dtype on the wire


def to_tensor(a: np.ndarray) -> pb.Tensor:
    """numpy array (any shape) -> Tensor of little-endian float32 bytes."""
    a = np.ascontiguousarray(a, dtype=F32)
    return pb.Tensor(shape=a.shape, data=a.tobytes())


def from_tensor(t: pb.Tensor) -> np.ndarray:
    """Tensor -> float32 numpy array (read-only view of the message bytes, no copy)."""
    return np.frombuffer(t.data, dtype=F32).reshape(tuple(t.shape))


# Open Inference Protocol typed contents: `InferTensorContents.fp32_contents` (field 6) is a packed
# repeated float, so on the wire it is one length-delimited record whose payload is exactly the
# little-endian float32 bytes. Going through the wire form keeps every element in C (upb): turning the
# repeated field into a Python list and back costs about 1 s per million values on the event loop.
_FP32_FIELD = 6
_FP32_TAG = (_FP32_FIELD << 3) | 2  # wire type 2: length-delimited (packed)


def varint(n: int) -> bytes:
    """`n` (>= 0) as a protobuf varint."""
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def fp32_contents_bytes(contents: Any) -> bytes | None:
    """The float32 bytes of an InferTensorContents holding fp32_contents only; None if it holds another
    typed field too (the caller names that as the error)."""
    wire = contents.SerializeToString()
    if not wire:
        return b""
    if wire[0] != _FP32_TAG:
        return None
    length, shift, i = 0, 0, 1
    while True:  # the varint length after the tag
        b = wire[i]
        length |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            break
        shift += 7
    if i + length != len(wire):
        return None
    return wire[i:]
