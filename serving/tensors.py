"""vae.v1.Tensor <-> numpy: shape plus raw little-endian float32 bytes. Shared by server, client and bench.

Imports only numpy and the generated messages, so the client and the load generator stay light.
"""

from __future__ import annotations

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
