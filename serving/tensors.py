"""vae.v1.Tensor <-> numpy: shape plus raw little-endian float32 bytes; and the protobuf wire helpers
(varints, length-delimited fields, OIP fp32_contents, splitting a bytes field out without a copy). Shared
by server, client and bench.

Imports only numpy and the generated messages, so the client and the load generator stay light.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def field_tag(number: int) -> bytes:
    """The wire tag of length-delimited field `number` (a message, string or bytes field)."""
    return varint((number << 3) | 2)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    """One length-delimited protobuf field on the wire: `tag` (from `field_tag`), length, payload.

    Lets a stream answer wrap an already serialised response without parsing it back into a message
    (concatenated fields are a valid message in protobuf's wire format). Costs one copy of `payload`.
    """
    return tag + varint(len(payload)) + payload


FP32_CONTENTS_TAG = field_tag(_FP32_FIELD)  # InferTensorContents.fp32_contents, packed (wire type 2)


def fp32_contents_bytes(contents: Any) -> bytes | None:
    """The float32 bytes of an InferTensorContents holding fp32_contents only; None if it holds another
    typed field too (the caller names that as the error)."""
    wire = contents.SerializeToString()
    if not wire:
        return b""
    if wire[:1] != FP32_CONTENTS_TAG:
        return None
    length, i = _read_varint(memoryview(wire), 1)  # the payload's length, after the tag
    if i + length != len(wire):
        return None
    return wire[i:]


def _read_varint(data: memoryview, i: int) -> tuple[int, int]:
    """The varint at data[i:] and the index after it; IndexError or ValueError when it is cut or too long."""
    value = shift = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def split_bytes_field(data: bytes, number: int) -> tuple[bytes, list[memoryview]] | None:
    """Take the top-level length-delimited field `number` out of a serialised message without copying it.

    Returns (the message's other fields, still a valid serialisation of the same message type; the
    field's values as views into `data`, in order), or None when the top level is anything but plain
    varint, fixed and length-delimited fields that end exactly at the end of `data` (the caller then
    parses the whole message, which reports what is wrong with it). Parsing a message copies every
    bytes field, and reading one from the parsed message copies it again: for a large tensor in
    `raw_input_contents` those two copies cost more than the rest of the request.
    """
    view = memoryview(data)
    keep: list[memoryview] = []
    values: list[memoryview] = []
    i, n, start = 0, len(view), 0
    try:
        while i < n:
            field_start = i
            key, i = _read_varint(view, i)
            wire = key & 7
            if wire == 0:
                _, i = _read_varint(view, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _read_varint(view, i)
                if key >> 3 == number:
                    if i + length > n:
                        return None
                    keep.append(view[start:field_start])
                    values.append(view[i:i + length])
                    start = i + length
                i += length
            else:
                return None  # groups: leave them to protobuf
            if i > n:
                return None
    except (IndexError, ValueError):
        return None
    keep.append(view[start:])
    return b"".join(keep), values


def all_finite(flat: np.ndarray) -> bool:
    """Whether every value of a 1-D float array is finite. A finite sum of squares proves it at the cost
    of one pass (a BLAS dot product: a third of `sum`'s cost on a single row); only a non-finite one, which
    may also be an overflow of large finite values, needs the element-wise check."""
    return math.isfinite(float(flat.dot(flat))) or bool(np.isfinite(flat).all())


def nonfinite_rows(outs: Sequence[np.ndarray]) -> np.ndarray | None:
    """Rows (first axis) where some array of `outs` is NaN or Inf, as a bool mask; None when all are finite
    (the batcher's check of a run's outputs: extreme finite inputs can overflow a model)."""
    if all(all_finite(o.reshape(-1)) for o in outs):
        return None
    bad = np.zeros(outs[0].shape[0], dtype=bool)
    for o in outs:
        bad |= ~np.isfinite(o.reshape(o.shape[0], -1)).all(axis=1)
    return bad if bad.any() else None
