"""The run: closed loop (C requests always in flight) or open loop (a fixed schedule), and its result.

Open loop measures latency from each request's *scheduled* send time, so a stalled server is not
hidden by the generator slowing down (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import numpy as np

from loadgen.procstat import (
    allowed_cpus,
    cpus_busy_s,
    proc_memory_mb,
    proc_runqueue_wait_s,
    proc_tree_cpu_s,
    scrape_counters,
)
from loadgen.requests import build_http_requests, build_requests
from loadgen.spec import RPCS, BenchSpec
from loadgen.streams import stream_worker

BOTTLENECK_CORES = 0.85  # generator event-loop thread this busy (of one core) => it is the limit
Call = Callable[..., Awaitable[Any]]


class CallFailed(Exception):
    """An HTTP answer other than 200, or a transport failure: `code` is what the result counts."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _State:
    t_start: int = 0          # perf_counter_ns at the end of warm-up
    t_end: int = 0            # perf_counter_ns at the end of the measured window
    stop: bool = False
    sent: int = 0
    max_requests: int = 0
    lat_ns: list[int] = field(default_factory=list)   # completions inside the window
    errors: Counter[str] = field(default_factory=Counter)
    inflight: int = 0
    dropped: int = 0          # open loop: not sent because --max-inflight were outstanding
    max_lag_ns: int = 0       # open loop: worst lateness of a send against its schedule
    late: Counter[str] = field(default_factory=Counter)  # started in the window, answered after it
    stuck: int = 0            # started in the window, took longer than the window (or never answered)


async def _one(call: Call, req: Any, t0: int, timeout_s: float, st: _State) -> None:
    """Send one request; record its latency (from t0) and status if it completes inside the window."""
    code = "OK"
    st.inflight += 1
    try:
        await call(req, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    except CallFailed as e:
        code = e.code
    except asyncio.CancelledError:
        raise
    finally:
        st.inflight -= 1
    record(st, t0, code)


def record(st: _State, t0: int, code: str) -> None:
    """One answer of a request sent at t0 (perf_counter_ns): counted if it started in the window."""
    t1 = time.perf_counter_ns()
    if st.t_start <= t0 and t1 <= st.t_end:
        st.lat_ns.append(t1 - t0)
        if code != "OK":
            st.errors[code] += 1
    elif st.t_start <= t0 <= st.t_end:
        st.late[code] += 1
        if t1 - t0 > st.t_end - st.t_start:
            st.stuck += 1


async def _closed_worker(call: Call, reqs: list[Any], offset: int, timeout_s: float, st: _State) -> None:
    i, n = offset, len(reqs)
    while not st.stop and st.sent < st.max_requests:
        st.sent += 1
        await _one(call, reqs[i % n], time.perf_counter_ns(), timeout_s, st)
        i += 1


async def _open_scheduler(call: Call, reqs: list[Any], rate: float, max_inflight: int, timeout_s: float,
                          st: _State) -> set[asyncio.Task[None]]:
    interval = 1e9 / rate
    tasks: set[asyncio.Task[None]] = set()
    i, n = 0, len(reqs)
    t_next = float(time.perf_counter_ns())
    while not st.stop and st.sent < st.max_requests:
        now = time.perf_counter_ns()
        while t_next <= now and st.sent < st.max_requests:
            st.max_lag_ns = max(st.max_lag_ns, now - int(t_next)) if t_next >= st.t_start else st.max_lag_ns
            if st.inflight >= max_inflight:
                if st.t_start <= t_next:
                    st.dropped += 1
            else:
                st.sent += 1
                task = asyncio.ensure_future(_one(call, reqs[i % n], int(t_next), timeout_s, st))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            t_next += interval
        await asyncio.sleep(max(0.0, (t_next - time.perf_counter_ns()) * 1e-9))
    return tasks


async def run_bench(spec: BenchSpec, latencies_out: Path | None = None) -> dict[str, Any]:
    """Run one benchmark on the running event loop; the result dict (what the JSON line holds)."""
    reqs: list[Any]
    channels: list[grpc.aio.Channel] = []
    session: aiohttp.ClientSession | None = None
    if spec.http:
        reqs = build_http_requests(spec.rpc, spec.rows, spec.example_shape, spec.latent_dim, spec.distinct,
                                   input_names=spec.input_names)
        # HTTP/1.1: one request in flight per connection, so up to C keep-alive connections.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        calls: list[Call] = [_http_call(session, f"http://{spec.target}/v2/models/{spec.model}/infer")]
    else:
        reqs = build_requests(spec.rpc, spec.rows, spec.example_shape, spec.latent_dim, spec.distinct,
                              input_names=spec.input_names)
        options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
        channels = [grpc.aio.insecure_channel(spec.target, options=options) for _ in range(spec.channels)]
        calls = [ch.unary_unary(RPCS[spec.rpc][0], request_serializer=None,  # identity: bytes
                                response_deserializer=None) for ch in channels]
    st = _State(t_start=2**63 - 1, t_end=2**63 - 1, max_requests=spec.max_requests)
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), spec.timeout_s)
        t_begin = time.perf_counter_ns()
        st.t_start = t_begin + int(spec.warmup_s * 1e9)
        st.t_end = st.t_start + int(spec.duration_s * 1e9)
        workers: list[asyncio.Future[Any]]
        if spec.streams:
            # One deadline for the whole stream: the run, plus the per-request timeout for the last answers.
            stream_timeout = spec.warmup_s + spec.duration_s + spec.timeout_s + 5
            grpc_reqs = cast("list[bytes]", reqs)  # streams are gRPC: serialised messages
            workers = [asyncio.ensure_future(stream_worker(channels[k % len(channels)], spec.rpc, grpc_reqs,
                                                           k * spec.stream_inflight, spec.stream_inflight,
                                                           stream_timeout, st, record))
                       for k in range(spec.streams)]
        elif spec.rate is None:
            workers = [asyncio.ensure_future(_closed_worker(calls[k % len(calls)], reqs, k, spec.timeout_s, st))
                       for k in range(spec.concurrency)]
        else:
            workers = [asyncio.ensure_future(_open_scheduler(calls[0], reqs, spec.rate, spec.max_inflight,
                                                             spec.timeout_s, st))]
        # Snapshots run between sends; the /metrics scrape runs on a thread so the loop never stalls.
        await _sleep_until(st.t_start, workers)
        before = await _snapshot(spec)
        await _sleep_until(st.t_end, workers)
        after = await _snapshot(spec)
        window_ns = min(time.perf_counter_ns(), st.t_end) - st.t_start
        st.stop = True
        # Closed-loop workers finish their last call (each bounded by its deadline); open-loop
        # stragglers get the same bound, and whatever is still unanswered then counts as stuck.
        done_w, _ = await asyncio.wait(workers, timeout=spec.timeout_s + 5)
        pending = [t for w in done_w if isinstance(w.result(), set) for t in w.result()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=spec.timeout_s + 5)
            st.stuck += len(still)
        st.stuck += sum(1 for w in workers if not w.done())
    finally:
        for ch in channels:
            await ch.close()
        if session is not None:
            await session.close()
    lat = np.asarray(st.lat_ns, dtype=np.float64) * 1e-6  # ms
    if latencies_out is not None:
        np.save(latencies_out, lat)
    return _result(spec, st, lat, window_ns * 1e-9, before, after)


def _http_call(session: aiohttp.ClientSession, url: str) -> Call:
    async def call(req: tuple[bytes, dict[str, str]], timeout: float) -> bytes:
        body, headers = req
        try:
            async with session.post(url, data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                data = await r.read()
                if r.status != 200:
                    raise CallFailed(f"HTTP_{r.status}")
                return data
        except TimeoutError:
            raise CallFailed("TIMEOUT") from None
        except aiohttp.ClientError as e:
            raise CallFailed(type(e).__name__) from None

    return call


async def _sleep_until(t_ns: int, workers: list[asyncio.Future[Any]]) -> None:
    """Sleep until perf_counter_ns reaches t_ns, or every worker has finished (request cap)."""
    while time.perf_counter_ns() < t_ns and not all(w.done() for w in workers):
        await asyncio.sleep(min(0.05, max(0.0, (t_ns - time.perf_counter_ns()) * 1e-9)))


async def _snapshot(spec: BenchSpec) -> dict[str, Any]:
    snap: dict[str, Any] = {"t": time.perf_counter(), "gen_cpu_s": time.process_time(),
                            "gen_rq_s": proc_runqueue_wait_s(os.getpid())}
    if spec.server_pid is not None:
        snap["srv_cpu_s"] = proc_tree_cpu_s(spec.server_pid)
        snap["srv_rq_s"] = proc_runqueue_wait_s(spec.server_pid)
        snap["srv_cpus_busy_s"] = cpus_busy_s(allowed_cpus(spec.server_pid))
    if spec.metrics_port is not None and spec.metrics_port > 0:
        snap["counters"] = await asyncio.to_thread(scrape_counters, spec.metrics_port)
    return snap


def _result(spec: BenchSpec, st: _State, lat: np.ndarray, window_s: float, before: dict[str, Any],
            after: dict[str, Any]) -> dict[str, Any]:
    done = len(lat)
    n_err = sum(st.errors.values())
    ok = done - n_err
    pct = (lambda q: float(np.percentile(lat, q))) if done else (lambda q: float("nan"))
    wall = after["t"] - before["t"]
    gen_cores = (after["gen_cpu_s"] - before["gen_cpu_s"]) / wall
    lag_ms = st.max_lag_ns * 1e-6
    open_behind = spec.rate is not None and (st.dropped > 0 or lag_ms > 50.0)
    res: dict[str, Any] = {
        "rpc": spec.rpc, "loop": "stream" if spec.streams else "open" if spec.rate is not None else "closed",
        "concurrency": (spec.streams * spec.stream_inflight if spec.streams
                        else None if spec.rate is not None else spec.concurrency),
        "streams": spec.streams or None, "stream_inflight": spec.stream_inflight if spec.streams else None,
        "offered_rps": spec.rate, "rows_per_request": spec.rows, "target": spec.target,
        "duration_s": round(window_s, 3), "warmup_s": spec.warmup_s,
        "requests": done, "ok": ok, "errors": dict(st.errors),
        "answered_after_window": dict(st.late), "stuck": st.stuck,
        "requests_per_s": done / window_s, "rows_per_s": ok * spec.rows / window_s,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": float(lat.max()) if done else None,
                       "mean": float(lat.mean()) if done else None},
        "generator": {"cpu_cores": gen_cores, "cpus_allowed": len(os.sched_getaffinity(0)),
                      "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
                      "runqueue_wait_s": round(after["gen_rq_s"] - before["gen_rq_s"], 4),
                      "bottleneck": bool(gen_cores >= BOTTLENECK_CORES or open_behind),
                      "open_loop_dropped": st.dropped if spec.rate is not None else None,
                      "open_loop_max_lag_ms": round(lag_ms, 3) if spec.rate is not None else None},
    }
    if spec.server_pid is not None:
        cpu = after["srv_cpu_s"] - before["srv_cpu_s"]
        cpus = allowed_cpus(spec.server_pid)
        busy = after["srv_cpus_busy_s"] - before["srv_cpus_busy_s"]
        res["server"] = {"pid": spec.server_pid, "cpu_s": cpu, "cpu_cores": cpu / wall,
                         "runqueue_wait_s": round(after["srv_rq_s"] - before["srv_rq_s"], 4),
                         # Other processes' CPU time on the server's CPUs (meaningful when it is pinned,
                         # e.g. taskset -c 0): what the server could not use. The generator's own share
                         # is included when both share CPUs.
                         "cpus": cpus, "other_work_cores": max(0.0, (busy - cpu) / wall),
                         "cpu_us_per_request": 1e6 * cpu / done if done else None,
                         "cpu_us_per_row": 1e6 * cpu / (done * spec.rows) if done else None,
                         **proc_memory_mb(spec.server_pid)}
    c0, c1 = before.get("counters"), after.get("counters")
    if c0 and c1:
        model = spec.model
        key_b, key_r = (f'vae_batches_total{{model="{model}"}}', f'vae_rows_total{{model="{model}"}}')
        batches, rows = c1.get(key_b, 0) - c0.get(key_b, 0), c1.get(key_r, 0) - c0.get(key_r, 0)
        res["server_batches"] = {"model": model, "runs": batches, "rows": rows,
                                 "mean_rows_per_run": rows / batches if batches else None}
    return res
