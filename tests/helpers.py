"""Helpers shared by the test modules: waiting on a condition, inputs for a model, a run's metrics.

Import what you need: `from tests.helpers import wait_until, x_batch`. Fixtures live in conftest.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from serving.manifest import Manifest

T = TypeVar("T")


def wait_until(cond: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call `cond` every `interval` seconds until it returns something other than None or False, and return
    that; AssertionError naming `what` after `timeout` seconds. `cond` may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.005) -> Any:
    """`wait_until` for a test on an event loop: sleeps with asyncio.sleep; `cond` may be a coroutine."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if isinstance(got, Awaitable):
            got = await got
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def x_batch(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    """(n, *example_shape) float32 inputs in [0, 1): model-space data for any model of the manifest."""
    return np.random.default_rng(seed).random((n, *manifest.example_shape), dtype=np.float32)


def z_batch(manifest: Manifest, n: int, seed: int = 0) -> np.ndarray:
    """(n, latent_dim) float32 draws from the prior N(0, I)."""
    return np.random.default_rng(seed).standard_normal((n, manifest.latent_dim), dtype=np.float32)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of a run directory's metrics.jsonl (training.fit writes one per epoch)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def unread_bytes(local_port: int, remote_port: int) -> int | None:
    """Bytes the kernel holds for the TCP socket local_port <-> remote_port that its process has not read
    yet (rx_queue of /proc/net/tcp{,6}; Linux), or None when there is no such socket."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, remote, _, queues = line.split()[1:5]
            if int(local.rsplit(":", 1)[1], 16) == local_port and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                return int(queues.split(":")[1], 16)
    return None


def http_status(port: int, path: str, timeout: float = 10) -> int:
    """The status of GET 127.0.0.1:port/path (e.g. 503 from /v2/health/ready while a server drains)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()
