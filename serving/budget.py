"""The bytes-in-flight budget (`--max-inflight-bytes`): what bounds the server's memory under load.

A request's memory is a few copies of its request bytes (grpcio's buffer, the parsed message, the
tensor it decodes to) and of its response (the outputs, their reassembly, the serialised answer):
measured here, one 16,384 x 784 Reconstruct (51 MB in, 51 MB out, 105 MB of decoder outputs) peaked
at 458 MB over the idle server, a 16,384-row Decode (51 MB out, 51 MB of logits it does not return) at
261 MB. Each RPC therefore reserves `REQUEST_COPIES` x its request bytes when it arrives
(`serving.rpc`) and `RESPONSE_COPIES` x the bytes of every output it makes (returned or not) once the
core knows them (`VaeCore.check_response_size`), and gives both back when it ends. A reservation
that would pass the budget is refused at once with MemoryBusy (RESOURCE_EXHAUSTED): nothing is decoded
or computed for it. One RPC larger than the whole budget is still admitted when nothing else is in
flight, so every request the other limits allow can run.

What the budget does not bound (the true worst case): bytes the transport holds before a request reaches
Python. Neither gRPC front end can refuse a message at its length prefix or hold its sender back: the
native front end (pygrpc-native 0.5.0 has no receive limit) receives a message whole in Rust and hands
Python a copy, so a message of S bytes costs about 2 S until it is refused (over --max-message-bytes:
RESOURCE_EXHAUSTED before it is parsed) and freed; grpcio (grpc-core checks the size once the message is
whole) costs about S. So the server's memory is at most the idle process, plus --max-inflight-bytes (and
one admitted request over it), plus the messages being received at that moment at 1-2x their size, and
nothing in the server bounds the last term: a client may send a 1 GiB message (measured in BENCHMARKS.md,
"Requests far over --max-message-bytes": `python -m benchmarks.oversize`). A deployment bounds it at the
proxy in front, which caps each request near --max-message-bytes (deploy/README.md, "Request size"), and
by the proxy's connection and stream limits. The HTTP port refuses a body over --max-message-bytes by its
Content-Length before reading it, and counts chunked bodies as they arrive.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol

from serving.errors import MemoryBusy

REQUEST_COPIES = 3
RESPONSE_COPIES = 3


class Pinned(Protocol):
    """Something a request keeps in use until it ends (a model version: `serving.repository`)."""

    def unpin(self) -> None: ...


class Lease:
    """The bytes one RPC holds, and the model versions it uses; released together when it ends."""

    __slots__ = ("budget", "held", "pins")

    def __init__(self, budget: InflightBudget) -> None:
        self.budget = budget
        self.held = 0
        self.pins: list[Pinned] | None = None

    def pin(self, item: Pinned) -> None:
        """Keep `item` in use until this lease is released (the caller has counted it in)."""
        if self.pins is None:
            self.pins = [item]
        else:
            self.pins.append(item)

    def reserve(self, nbytes: int, what: str) -> None:
        self.budget.take(nbytes, what, alone=self.held == self.budget.used)
        self.held += nbytes

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0
        pins = self.pins
        if pins is not None:
            self.pins = None
            for item in pins:
                item.unpin()


class InflightBudget:
    """Bytes of request and response data in flight, over every RPC (event loop only: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0 = no limit
        self.used = 0

    def take(self, nbytes: int, what: str, alone: bool = False) -> None:
        if self.limit and self.used + nbytes > self.limit and not alone:
            raise MemoryBusy(f"{what}: {nbytes:,} more bytes in flight would pass --max-inflight-bytes "
                             f"{self.limit:,} ({self.used:,} in use); retry later")
        self.used += nbytes

    def lease(self) -> Lease:
        return Lease(self)


# The lease of the RPC being handled: set by serving.rpc for the handler's task, read by the core.
current_lease: ContextVar[Lease | None] = ContextVar("current_lease", default=None)
