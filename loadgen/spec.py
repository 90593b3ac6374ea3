"""One benchmark run's settings (BenchSpec), the RPCs the generator can load, and the loopback rule."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

VAE = "/vae.v1.VaeService/"
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
# --rpc name -> (gRPC method path, model the rows go through)
RPCS: dict[str, tuple[str, str]] = {
    "encode": (VAE + "Encode", "encoder"),
    "sample": (VAE + "Sample", "decoder"),
    "reconstruct": (VAE + "Reconstruct", "encoder"),
    "decode": (VAE + "Decode", "decoder"),
    "infer-encoder": (OIP_INFER, "encoder"),
    "infer-decoder": (OIP_INFER, "decoder"),
}
# --rpc name -> (model, binary tensors?): the Open Inference Protocol over HTTP/REST, POST
# /v2/models/{model}/infer (binary: the binary tensor extension, every output binary; else JSON).
HTTP_RPCS: dict[str, tuple[str, bool]] = {
    "http-encoder": ("encoder", True), "http-decoder": ("decoder", True),
    "http-json-encoder": ("encoder", False), "http-json-decoder": ("decoder", False),
}
ALL_RPCS: tuple[str, ...] = (*RPCS, *HTTP_RPCS)
MAX_DURATION_S = 600.0
MAX_WARMUP_S = 60.0


class BenchError(Exception):
    """A bad target, flag or server; the message says which."""


def check_loopback(target: str) -> tuple[str, int]:
    """host:port -> (host, port) if every address host resolves to is loopback; else BenchError."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d+)", target)
    if m is None:
        raise BenchError(f"target: expected HOST:PORT, got {target!r}")
    host, port = m.group(1), int(m.group(2))
    try:
        addrs = {str(a[4][0]) for a in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise BenchError(f"target: cannot resolve {host!r}: {e}") from e
    bad = sorted(a for a in addrs if not ipaddress.ip_address(str(a).split("%")[0]).is_loopback)
    if not addrs or bad:
        raise BenchError(f"target: only loopback servers may be loaded (this tool can saturate a "
                         f"machine); {host!r} resolves to {bad or 'nothing'}")
    return host, port


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark run. `concurrency` (closed loop) or `rate` (open loop, requests/s)."""

    target: str
    rpc: str = "encode"
    rows: int = 1
    concurrency: int = 1
    rate: float | None = None
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_requests: int = 2_000_000
    timeout_s: float = 10.0
    distinct: int = 16
    channels: int = 1
    max_inflight: int = 10_000
    streams: int = 0            # > 0: streaming mode, this many bidirectional streams
    stream_inflight: int = 1    # streaming mode: messages unanswered on each stream
    server_pid: int | None = None
    metrics_port: int | None = None
    example_shape: tuple[int, ...] = (784,)
    latent_dim: int = 20
    input_names: dict[str, str] | None = None  # model -> input tensor name; None: the tensor contract's

    def __post_init__(self) -> None:
        checks = [
            ("rpc", self.rpc in ALL_RPCS, f"one of {sorted(ALL_RPCS)}"),
            ("rows", self.rows >= 1, "an integer >= 1"),
            ("concurrency", self.concurrency >= 1, "an integer >= 1"),
            ("rate", self.rate is None or self.rate > 0, "a number > 0 (requests/s)"),
            ("duration_s", 0 < self.duration_s <= MAX_DURATION_S, f"0 < seconds <= {MAX_DURATION_S:g}"),
            ("warmup_s", 0 <= self.warmup_s <= MAX_WARMUP_S, f"0 <= seconds <= {MAX_WARMUP_S:g}"),
            ("max_requests", self.max_requests >= 1, "an integer >= 1"),
            ("channels", self.channels >= 1, "an integer >= 1"),
            ("distinct", self.distinct >= 1, "an integer >= 1"),
            ("streams", self.streams >= 0 and (self.streams == 0 or self.rpc != "sample"),
             "an integer >= 0 (0 = unary calls), and an RPC with a stream (not sample)"),
            ("streams", self.streams == 0 or self.rate is None, "no --rate with --streams (closed loop per stream)"),
            ("stream_inflight", self.stream_inflight >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise BenchError(f"{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")
        check_loopback(self.target)

    @property
    def http(self) -> bool:
        return self.rpc in HTTP_RPCS

    @property
    def model(self) -> str:
        """The model the rows go through."""
        return HTTP_RPCS[self.rpc][0] if self.http else RPCS[self.rpc][1]
