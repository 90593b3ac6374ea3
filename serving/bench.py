"""Load generator for a local vae-serve server: closed or open loop, pre-serialised requests, asyncio.

    python -m serving.bench --ready-file ready.json --rpc encode --concurrency 64 --rows 1 --duration-s 5
    python -m serving.bench --target 127.0.0.1:50051 --server-pid 1234 --rpc sample --rate 2000
    python -m serving.bench --null-server --ready-file null.json   # a do-nothing server (the ceiling)
    python -m serving.bench --null-server --proto --ready-file n.json  # ... that only does Encode's protobuf

Closed loop: `--concurrency C` requests always in flight, each worker sending its next request when the
previous one answers. Open loop: `--rate R` requests/s offered on a fixed schedule whatever the server
does; latency is measured from each request's *scheduled* send time, so a stalled server is not hidden
by the generator slowing down (no coordinated omission).

Low overhead by construction: requests are serialised once before the run (`--distinct` different
inputs, used round-robin) and sent through a generic unary-unary method of a `grpc.aio` channel with
identity serialisers; responses stay undecoded bytes. The event loop is asyncio's own by default
(`--loop uvloop` to compare; measured here, the generator's CPU per request was the same on both).
Its own ceiling, measured against `--null-server` (a grpc.aio server that answers every method with
an empty message), is in BENCHMARKS.md.

Reported (a table, then one JSON line, the last line on stdout): requests/s, rows/s, latency
p50/p90/p99/max, errors by status code; for a local server PID (`--server-pid`, or the ready file's),
its CPU seconds per request and per row over the measured window (from /proc/PID/stat) and its memory
(PSS from /proc/PID/smaps_rollup); the generator's own CPU use, with `generator.bottleneck` true when
its event-loop thread was busy enough (>= 85% of a core) to be the limit, or an open loop fell behind.

Bounded: `--duration-s` <= 600, `--warmup-s` <= 60, at most `--max-requests` sent. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import socket
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.config import write_ready_file
from serving.tensors import F32, to_tensor

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
MAX_DURATION_S = 600.0
MAX_WARMUP_S = 60.0
BOTTLENECK_CORES = 0.85  # generator event-loop thread this busy (of one core) => it is the limit
CLK_TCK = os.sysconf("SC_CLK_TCK")
Call = Callable[..., Awaitable[bytes]]


class BenchError(Exception):
    """A bad target, flag or server; the message says which."""


# -- target and server process -------------------------------------------------------------------

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


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of every thread of `pid` so far (/proc/PID/stat, clock-tick grained)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; comm may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def proc_runqueue_wait_s(pid: int) -> float:
    """Seconds the threads of `pid` have spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat).

    Large values mean other work took the CPU this process is pinned to: its wall-clock figures are low.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just exited
            continue
    return total * 1e-9


def allowed_cpus(pid: int) -> list[int]:
    """The CPUs `pid` may run on (its affinity, e.g. [0] under `taskset -c 0`)."""
    return sorted(os.sched_getaffinity(pid))


def cpus_busy_s(cpus: list[int]) -> float:
    """Busy seconds (all but idle and iowait) of the given CPUs so far, all processes (/proc/stat)."""
    total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *vals = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in vals]
            total += sum(ticks) - ticks[3] - ticks[4]  # idle, iowait
    return total / CLK_TCK


def proc_memory_mb(pid: int) -> dict[str, float]:
    """{"pss_mb", "rss_mb"} of `pid` from /proc/PID/smaps_rollup (PSS shares shared pages fairly)."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Pss", "Rss"):
            out[key.lower() + "_mb"] = int(rest.split()[0]) / 1024
    return out


def scrape_counters(metrics_port: int, names: tuple[str, ...] = ("vae_batches_total", "vae_rows_total"),
                    ) -> dict[str, float]:
    """{"name{labels}": value} for the named counters on the server's /metrics; {} if unreachable."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(names):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# -- requests --------------------------------------------------------------------------------------

def model_shapes(target: str, timeout_s: float = 10.0) -> tuple[tuple[int, ...], int] | None:
    """(example_shape, latent_dim) from GetModelInfo, or None when the server does not say (null server)."""
    with grpc.insecure_channel(target) as ch:
        try:
            info = ch.unary_unary(VAE + "GetModelInfo",
                                  request_serializer=pb.GetModelInfoRequest.SerializeToString,
                                  response_deserializer=pb.GetModelInfoResponse.FromString)(
                pb.GetModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise BenchError(f"target: {target} does not answer: {e.details()}") from e
            return None  # a server without GetModelInfo: shapes come from the flags
    if not info.example_shape:
        return None
    return tuple(int(s) for s in info.example_shape), int(info.latent_dim)


def build_requests(rpc: str, rows: int, example_shape: tuple[int, ...], latent_dim: int,
                   distinct: int = 16, seed: int = 0) -> list[bytes]:
    """`distinct` serialised requests of `rows` rows each, with different inputs (sent round-robin)."""
    rng = np.random.default_rng(seed)
    reqs: list[bytes] = []
    for _ in range(distinct):
        x = rng.random((rows, *example_shape), dtype=np.float32)   # (B, *example_shape), in [0, 1)
        z = rng.standard_normal((rows, latent_dim), dtype=np.float32)  # (B, d)
        msg: Any
        if rpc == "encode":
            msg = pb.EncodeRequest(x=to_tensor(x))
        elif rpc == "reconstruct":
            msg = pb.ReconstructRequest(x=to_tensor(x))
        elif rpc == "decode":
            msg = pb.DecodeRequest(z=to_tensor(z))
        elif rpc == "sample":
            msg = pb.SampleRequest(count=rows)  # the server draws the seed
        elif rpc in ("infer-encoder", "infer-decoder"):
            a, model, name = (x, "encoder", "x") if rpc == "infer-encoder" else (z, "decoder", "z")
            msg = oip_pb.ModelInferRequest(
                model_name=model, inputs=[oip_pb.ModelInferRequest.InferInputTensor(
                    name=name, datatype="FP32", shape=a.shape)],
                raw_input_contents=[a.astype(F32).tobytes()])
        else:
            raise BenchError(f"rpc: expected one of {sorted(RPCS)}, got {rpc!r}")
        reqs.append(msg.SerializeToString())
    return reqs


# -- the run -----------------------------------------------------------------------------------------

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


async def _one(call: Call, req: bytes, t0: int, timeout_s: float, st: _State) -> None:
    """Send one request; record its latency (from t0) and status if it completes inside the window."""
    code = "OK"
    st.inflight += 1
    try:
        await call(req, timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    except asyncio.CancelledError:
        raise
    finally:
        st.inflight -= 1
    t1 = time.perf_counter_ns()
    if st.t_start <= t0 and t1 <= st.t_end:
        st.lat_ns.append(t1 - t0)
        if code != "OK":
            st.errors[code] += 1
    elif st.t_start <= t0 <= st.t_end:
        st.late[code] += 1
        if t1 - t0 > st.t_end - st.t_start:
            st.stuck += 1


async def _closed_worker(call: Call, reqs: list[bytes], offset: int, timeout_s: float, st: _State) -> None:
    i, n = offset, len(reqs)
    while not st.stop and st.sent < st.max_requests:
        st.sent += 1
        await _one(call, reqs[i % n], time.perf_counter_ns(), timeout_s, st)
        i += 1


async def _open_scheduler(call: Call, reqs: list[bytes], rate: float, max_inflight: int, timeout_s: float,
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
    server_pid: int | None = None
    metrics_port: int | None = None
    example_shape: tuple[int, ...] = (784,)
    latent_dim: int = 20

    def __post_init__(self) -> None:
        checks = [
            ("rpc", self.rpc in RPCS, f"one of {sorted(RPCS)}"),
            ("rows", self.rows >= 1, "an integer >= 1"),
            ("concurrency", self.concurrency >= 1, "an integer >= 1"),
            ("rate", self.rate is None or self.rate > 0, "a number > 0 (requests/s)"),
            ("duration_s", 0 < self.duration_s <= MAX_DURATION_S, f"0 < seconds <= {MAX_DURATION_S:g}"),
            ("warmup_s", 0 <= self.warmup_s <= MAX_WARMUP_S, f"0 <= seconds <= {MAX_WARMUP_S:g}"),
            ("max_requests", self.max_requests >= 1, "an integer >= 1"),
            ("channels", self.channels >= 1, "an integer >= 1"),
            ("distinct", self.distinct >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise BenchError(f"{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")
        check_loopback(self.target)


async def run_bench(spec: BenchSpec, latencies_out: Path | None = None) -> dict[str, Any]:
    """Run one benchmark on the running event loop; the result dict (what the JSON line holds)."""
    reqs = build_requests(spec.rpc, spec.rows, spec.example_shape, spec.latent_dim, spec.distinct)
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
               ("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    channels = [grpc.aio.insecure_channel(spec.target, options=options) for _ in range(spec.channels)]
    calls: list[Call] = [ch.unary_unary(RPCS[spec.rpc][0], request_serializer=None,  # identity: bytes
                                        response_deserializer=None) for ch in channels]
    st = _State(t_start=2**63 - 1, t_end=2**63 - 1, max_requests=spec.max_requests)
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), spec.timeout_s)
        t_begin = time.perf_counter_ns()
        st.t_start = t_begin + int(spec.warmup_s * 1e9)
        st.t_end = st.t_start + int(spec.duration_s * 1e9)
        workers: list[asyncio.Future[Any]]
        if spec.rate is None:
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
    lat = np.asarray(st.lat_ns, dtype=np.float64) * 1e-6  # ms
    if latencies_out is not None:
        np.save(latencies_out, lat)
    return _result(spec, st, lat, window_ns * 1e-9, before, after)


async def _sleep_until(t_ns: int, workers: list[asyncio.Future[Any]]) -> None:
    """Sleep until perf_counter_ns reaches t_ns, or every worker has finished (request cap)."""
    while time.perf_counter_ns() < t_ns and not all(w.done() for w in workers):
        await asyncio.sleep(min(0.05, max(0.0, (t_ns - time.perf_counter_ns()) * 1e-9)))


async def _snapshot(spec: BenchSpec) -> dict[str, Any]:
    snap: dict[str, Any] = {"t": time.perf_counter(), "gen_cpu_s": time.process_time(),
                            "gen_rq_s": proc_runqueue_wait_s(os.getpid())}
    if spec.server_pid is not None:
        snap["srv_cpu_s"] = proc_cpu_s(spec.server_pid)
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
        "rpc": spec.rpc, "loop": "open" if spec.rate is not None else "closed",
        "concurrency": None if spec.rate is not None else spec.concurrency,
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
        model = RPCS[spec.rpc][1]
        key_b, key_r = (f'vae_batches_total{{model="{model}"}}', f'vae_rows_total{{model="{model}"}}')
        batches, rows = c1.get(key_b, 0) - c0.get(key_b, 0), c1.get(key_r, 0) - c0.get(key_r, 0)
        res["server_batches"] = {"model": model, "runs": batches, "rows": rows,
                                 "mean_rows_per_run": rows / batches if batches else None}
    return res


# -- the do-nothing server (the generator's ceiling) ----------------------------------------------

class _NullHandler(grpc.GenericRpcHandler):
    """Answers every unary method with an empty message, without decoding the request.

    With `proto=True` it does the protobuf work of a real Encode and nothing else: it parses the request
    as an EncodeRequest and answers an EncodeResponse of the right size (mu, var: (N, latent_dim) zeros),
    the floor under any Python gRPC Encode server.
    """

    def __init__(self, proto: bool = False, latent_dim: int = 20) -> None:
        async def nothing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b""

        async def protobuf_only(request: pb.EncodeRequest, context: grpc.aio.ServicerContext) -> pb.EncodeResponse:
            n = request.x.shape[0] if request.x.shape else 0
            zeros = bytes(4 * n * latent_dim)
            return pb.EncodeResponse(mu=pb.Tensor(shape=(n, latent_dim), data=zeros),
                                     var=pb.Tensor(shape=(n, latent_dim), data=zeros))

        self._handler = (grpc.unary_unary_rpc_method_handler(
            protobuf_only, request_deserializer=pb.EncodeRequest.FromString,
            response_serializer=pb.EncodeResponse.SerializeToString) if proto
            else grpc.unary_unary_rpc_method_handler(nothing))  # no (de)serialisers: bytes

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._handler


async def serve_null(host: str, port: int, ready_file: Path | None, stop_after_s: float = 3600.0,
                     proto: bool = False) -> None:
    """A grpc.aio server that does nothing, until SIGTERM/SIGINT or `stop_after_s`."""
    import signal

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_NullHandler(proto),))
    bound = server.add_insecure_port(f"{host}:{port}")
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


# -- CLI -------------------------------------------------------------------------------------------------

def format_table(r: dict[str, Any]) -> str:
    """The human-readable table of one result."""
    lat = r["latency_ms"]
    load = f"C={r['concurrency']}" if r["loop"] == "closed" else f"{r['offered_rps']:g} req/s offered"
    rows = [
        ("run", (f"{r['rpc']} {r['loop']} loop {load}, B={r['rows_per_request']}, {r['duration_s']:.1f} s "
                f"after {r['warmup_s']:g} s warm-up")),
        ("requests", f"{r['requests']} ({r['ok']} OK; errors {r['errors'] or 'none'})"
                     + (f"  ** {r['stuck']} took longer than the whole window or never answered **"
                        if r["stuck"] else "")),
        ("throughput", f"{r['requests_per_s']:,.0f} req/s, {r['rows_per_s']:,.0f} rows/s"),
        ("latency ms", "  ".join(f"{k} {v:.3f}" for k, v in lat.items() if v is not None)),
    ]
    if "server" in r:
        s = r["server"]
        per_req = f"{s['cpu_us_per_request']:.0f}" if s["cpu_us_per_request"] is not None else "-"
        per_row = f"{s['cpu_us_per_row']:.1f}" if s["cpu_us_per_row"] is not None else "-"
        rows.append(("server", (f"pid {s['pid']}: {s['cpu_cores']:.2f} cores, {per_req} us CPU/request, "
                                f"{per_row} us CPU/row, PSS {s.get('pss_mb', 0):.1f} MB; other processes "
                                f"used {s['other_work_cores']:.2f} of its CPUs {s['cpus']}")))
    if "server_batches" in r:
        b = r["server_batches"]
        mean = f"{b['mean_rows_per_run']:.1f}" if b["mean_rows_per_run"] else "-"
        rows.append(("server batches", f"{b['runs']:.0f} {b['model']} runs, {mean} rows/run"))
    g = r["generator"]
    rows.append(("generator", f"{g['cpu_cores']:.2f} cores of {g['cpus_allowed']} allowed ({g['event_loop']}), "
                              f"waited {g['runqueue_wait_s']:.2f} s for a CPU"
                 + ("  ** GENERATOR-BOUND: the result is a lower bound on the server **" if g["bottleneck"] else "")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", help="HOST:PORT of a loopback server (or use --ready-file)")
    p.add_argument("--ready-file", type=Path,
                   help="server's ready file {grpc_port, metrics_port, pid}: gives target, PID and metrics port;"
                        " with --null-server, where the null server writes its own")
    p.add_argument("--server-pid", type=int, help="local server PID for CPU and memory (default: ready file's)")
    p.add_argument("--rpc", default="encode", choices=sorted(RPCS), help="RPC to load")
    p.add_argument("--rows", type=int, default=1, help="rows per request B (Sample: count)")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="closed loop: requests in flight")
    p.add_argument("--rate", type=float, help="open loop: offered requests/s (instead of --concurrency)")
    p.add_argument("--duration-s", type=float, default=5.0, help=f"measured window (<= {MAX_DURATION_S:g})")
    p.add_argument("--warmup-s", type=float, default=1.0, help="load before the window, not measured")
    p.add_argument("--max-requests", type=int, default=2_000_000, help="stop after sending this many")
    p.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each RPC")
    p.add_argument("--distinct", type=int, default=16, help="different pre-serialised requests, round-robin")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (TCP connections) to spread over")
    p.add_argument("--max-inflight", type=int, default=10_000, help="open loop: cap on outstanding requests")
    p.add_argument("--example-shape", type=int, nargs="+", default=[784],
                   help="example shape when the server does not report one (null server)")
    p.add_argument("--latent-dim", type=int, default=20, help="latent dim when the server does not report one")
    p.add_argument("--loop", choices=("asyncio", "uvloop"),
                   help="event loop (default: asyncio for the generator; uvloop for --null-server, as the "
                        "real server uses it when installed)")
    p.add_argument("--latencies-out", type=Path, help="also save the window's latencies (ms) as .npy")
    p.add_argument("--null-server", action="store_true", help="run the do-nothing server instead")
    p.add_argument("--proto", action="store_true",
                   help="--null-server: parse each request as EncodeRequest, answer a sized EncodeResponse")
    p.add_argument("--port", type=int, default=0, help="--null-server: port (0 = any free)")
    p.add_argument("--stop-after-s", type=float, default=3600.0, help="--null-server: exit after this long")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.null_server:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop or "uvloop")) as runner:
            runner.run(serve_null("127.0.0.1", args.port, args.ready_file, args.stop_after_s, args.proto))
        return 0
    try:
        target, pid, metrics_port = args.target, args.server_pid, None
        if args.ready_file is not None:
            info = json.loads(args.ready_file.read_text())
            target = target or f"127.0.0.1:{info['grpc_port']}"
            pid = pid if pid is not None else int(info["pid"])
            metrics_port = int(info.get("metrics_port", -1))
        if target is None:
            raise BenchError("target: give --target HOST:PORT or --ready-file")
        if pid is not None and not Path(f"/proc/{pid}/stat").exists():
            raise BenchError(f"server-pid: no local process {pid}")
        check_loopback(target)
        shapes = model_shapes(target, args.timeout_s)
        example_shape, latent_dim = shapes or (tuple(args.example_shape), args.latent_dim)
        spec = BenchSpec(target=target, rpc=args.rpc, rows=args.rows, concurrency=args.concurrency,
                         rate=args.rate, duration_s=args.duration_s, warmup_s=args.warmup_s,
                         max_requests=args.max_requests, timeout_s=args.timeout_s, distinct=args.distinct,
                         channels=args.channels, max_inflight=args.max_inflight, server_pid=pid,
                         metrics_port=metrics_port, example_shape=example_shape, latent_dim=latent_dim)
        with asyncio.Runner(loop_factory=_loop_factory(args.loop or "asyncio")) as runner:
            result = runner.run(run_bench(spec, args.latencies_out))
    except (BenchError, grpc.RpcError, OSError) as e:
        sys.stderr.write(f"python -m serving.bench: {e}\n")
        return 2
    print(format_table(result))
    print(json.dumps(result, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
