"""The load generator (loadgen) against in-process gRPC servers, and the benchmark report logic."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from benchmarks.report import targets
from benchmarks.scenarios import summarize_profile
from loadgen.null_server import NullHandler
from loadgen.procstat import cpus_busy_s, proc_cpu_s, proc_memory_mb, proc_runqueue_wait_s
from loadgen.report import format_table
from loadgen.requests import build_http_requests, build_requests, model_info_from
from loadgen.run import _result, _State, run_bench
from loadgen.spec import BenchError, BenchSpec, check_loopback
from serving._proto.inference import grpc_service_pb2 as oip_pb
from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving.manifest import FileEntry, build_manifest


def _NullHandler(proto: bool = False, latent_dim: int = 20) -> NullHandler:
    return NullHandler(is_async=True, proto=proto, latent_dim=latent_dim)


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, fn: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> None:
        self._h = grpc.unary_unary_rpc_method_handler(fn)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return self._h


def bench_against(handler: grpc.GenericRpcHandler, **spec: Any) -> dict[str, Any]:
    """Start `handler` on an in-process grpc.aio server on port 0, run one benchmark against it."""

    async def go() -> dict[str, Any]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await run_bench(BenchSpec(target=f"127.0.0.1:{port}", **spec))
        finally:
            await server.stop(0)

    return asyncio.run(go())


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:1", "[::1]:8080", "127.3.4.5:9"])
def test_loopback_targets_are_accepted(target: str) -> None:
    host, port = check_loopback(target)
    assert port > 0 and host


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "192.0.2.7:80", "[2001:db8::1]:443"])
def test_non_loopback_targets_are_refused(target: str) -> None:
    with pytest.raises(BenchError, match="only loopback"):
        check_loopback(target)


def test_a_target_without_a_port_is_refused() -> None:
    with pytest.raises(BenchError, match="HOST:PORT"):
        check_loopback("localhost")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("duration_s", 601.0, "duration-s"), ("duration_s", 0.0, "duration-s"), ("warmup_s", 61.0, "warmup-s"),
    ("rate", 0.0, "rate"), ("rows", 0, "rows"), ("concurrency", 0, "concurrency"), ("rpc", "Nope", "rpc"),
    ("max_requests", 0, "max-requests")])
def test_a_spec_out_of_bounds_names_the_flag(field: str, value: Any, match: str) -> None:
    with pytest.raises(BenchError, match=match):
        BenchSpec(target="127.0.0.1:1", **{field: value})


def test_a_spec_for_a_remote_target_is_refused() -> None:
    with pytest.raises(BenchError, match="loopback"):
        BenchSpec(target="10.1.2.3:50051")


def test_encode_requests_are_distinct_and_carry_b_rows_of_float32() -> None:
    reqs = build_requests("encode", 3, (784,), 20, distinct=4)
    assert len(set(reqs)) == 4
    msg = pb.EncodeRequest.FromString(reqs[0])
    assert list(msg.x.shape) == [3, 784]
    x = np.frombuffer(msg.x.data, dtype="<f4")
    assert x.size == 3 * 784 and np.all((x >= 0) & (x < 1))


def test_decode_sample_and_reconstruct_requests_match_their_messages() -> None:
    assert list(pb.DecodeRequest.FromString(build_requests("decode", 5, (784,), 20, 1)[0]).z.shape) == [5, 20]
    assert pb.SampleRequest.FromString(build_requests("sample", 7, (784,), 20, 1)[0]).count == 7
    rec = pb.ReconstructRequest.FromString(build_requests("reconstruct", 2, (28, 28), 20, 1)[0])
    assert list(rec.x.shape) == [2, 28, 28] and len(rec.x.data) == 2 * 784 * 4


def test_oip_requests_are_raw_fp32_for_the_named_model() -> None:
    req = oip_pb.ModelInferRequest.FromString(build_requests("infer-encoder", 4, (784,), 20, 1)[0])
    assert req.model_name == "encoder" and req.inputs[0].name == "x" and req.inputs[0].datatype == "FP32"
    assert list(req.inputs[0].shape) == [4, 784] and len(req.raw_input_contents[0]) == 4 * 784 * 4
    dec = oip_pb.ModelInferRequest.FromString(build_requests("infer-decoder", 2, (784,), 20, 1)[0])
    assert dec.model_name == "decoder" and dec.inputs[0].name == "z" and list(dec.inputs[0].shape) == [2, 20]


def test_oip_requests_name_their_inputs_as_the_model_does() -> None:
    names = {"encoder": "pixels", "decoder": "code"}
    req = oip_pb.ModelInferRequest.FromString(build_requests("infer-decoder", 2, (784,), 20, 1, input_names=names)[0])
    assert req.inputs[0].name == "code"
    body, headers = build_http_requests("http-encoder", 1, (4,), 2, 1, input_names=names)[0]
    head = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    assert head["inputs"][0]["name"] == "pixels"


def test_the_input_names_come_from_the_servers_manifest_else_from_the_tensor_contract() -> None:
    files = {role: FileEntry(f"{role}.onnx", "0" * 64, 1) for role in ("encoder", "decoder")}
    manifest = build_manifest(name="m", files=files, example_shape=(4,), latent_dim=2, likelihood="bernoulli",
                              learned_variance=False, normalization={"kind": "scale", "offset": 0.0, "scale": 1.0},
                              opset=18, versions={}, training={}, parity={})
    info = pb.GetModelInfoResponse(example_shape=[4], latent_dim=2, manifest_json=json.dumps(manifest))
    model = model_info_from(info)
    assert model is not None and model.input_names == {"encoder": "x", "decoder": "z"}
    renamed = copy.deepcopy(manifest)
    renamed["encoder"]["inputs"][0]["name"] = "pixels"  # a manifest the contract refuses
    with pytest.raises(BenchError, match="manifest_json does not parse"):
        model_info_from(pb.GetModelInfoResponse(example_shape=[4], latent_dim=2, manifest_json=json.dumps(renamed)))
    no_manifest = model_info_from(pb.GetModelInfoResponse(example_shape=[4], latent_dim=2))
    assert no_manifest is not None and no_manifest.input_names == {"encoder": "x", "decoder": "z"}
    assert model_info_from(pb.GetModelInfoResponse()) is None  # a null server: shapes from the flags


def test_proc_readers_see_this_process_cpu_and_memory() -> None:
    c0 = proc_cpu_s(os.getpid())
    t_end = time.process_time() + 0.1
    while time.process_time() < t_end:
        pass
    assert proc_cpu_s(os.getpid()) - c0 >= 0.05
    mem = proc_memory_mb(os.getpid())
    assert 0 < mem["pss_mb"] <= mem["rss_mb"]


def test_closed_loop_against_a_do_nothing_server_reports_throughput_latency_and_cpu() -> None:
    r = bench_against(_NullHandler(), concurrency=4, duration_s=0.6, warmup_s=0.2, server_pid=os.getpid())
    assert r["loop"] == "closed" and r["requests"] > 50 and r["errors"] == {} and r["ok"] == r["requests"]
    lat = r["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["requests_per_s"] == pytest.approx(r["requests"] / r["duration_s"])
    assert r["server"]["cpu_us_per_request"] > 0 and r["server"]["pss_mb"] > 0
    assert 0 <= r["generator"]["cpu_cores"] and r["generator"]["event_loop"]
    assert "req/s" in format_table(r)


def test_open_loop_offers_the_requested_rate() -> None:
    r = bench_against(_NullHandler(), rate=200.0, duration_s=1.0, warmup_s=0.2)
    assert r["loop"] == "open" and r["offered_rps"] == 200.0 and r["generator"]["open_loop_dropped"] == 0
    # Every request scheduled in the window is sent (late ones catch up), whatever the machine's load:
    # answered inside the window or after it, they add up to the schedule's count.
    sent_in_window = r["requests"] + sum(r["answered_after_window"].values())
    assert abs(sent_in_window - 200 * r["duration_s"]) <= 2


def test_open_loop_measures_from_the_schedule_when_the_server_stalls() -> None:
    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.05)
        return b""

    # 100 req/s offered, each takes 50 ms: no queueing, so latency ~50 ms, never less.
    r = bench_against(_Handler(slow), rate=100.0, duration_s=0.6, warmup_s=0.1)
    assert r["latency_ms"]["p50"] >= 50


def test_the_request_cap_bounds_what_is_sent() -> None:
    r = bench_against(_NullHandler(), concurrency=2, duration_s=2.0, warmup_s=0.0, max_requests=10)
    assert r["requests"] <= 10


def test_errors_are_counted_by_status_code() -> None:
    async def full(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return b""

    r = bench_against(_Handler(full), concurrency=2, duration_s=0.4, warmup_s=0.1)
    assert r["requests"] > 0 and r["ok"] == 0 and r["rows_per_s"] == 0
    assert r["errors"] == {"RESOURCE_EXHAUSTED": r["requests"]}


@pytest.mark.parametrize(("gen_cpu_s", "bound"), [(0.9, True), (0.5, False)])
def test_a_generator_busy_for_most_of_a_core_is_flagged_as_the_bottleneck(gen_cpu_s: float, bound: bool) -> None:
    spec = BenchSpec(target="127.0.0.1:1", concurrency=1, duration_s=1.0)
    before = {"t": 10.0, "gen_cpu_s": 1.0, "gen_rq_s": 0.0}
    after = {"t": 11.0, "gen_cpu_s": 1.0 + gen_cpu_s, "gen_rq_s": 0.0}  # gen_cpu_s of CPU in 1 s of wall
    async def result() -> dict[str, Any]:  # _result names the running event loop
        return _result(spec, _State(), np.array([1.0, 2.0]), 1.0, before, after)

    r = asyncio.run(result())
    assert r["generator"]["bottleneck"] is bound
    assert ("GENERATOR-BOUND" in format_table(r)) is bound


def test_profile_summary_counts_own_and_total_samples(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("thread a;main;f;g 6\nthread a;main;f 2\nthread b;h 2\n")
    s = summarize_profile(raw)
    assert s["samples"] == 10
    assert dict(s["own"]) == {"g": 60.0, "f": 20.0, "h": 20.0}
    assert dict(s["total"])["f"] == 80.0 and dict(s["threads"])["thread a"] == 80.0


def _run(rps: float, p50: float, cpu: float, rows: float) -> dict[str, Any]:
    return {"requests_per_s": rps, "rows_per_s": rows, "latency_ms": {"p50": p50},
            "server": {"cpu_us_per_request": cpu, "cpu_us_per_row": cpu * rps / rows}}


def test_targets_pass_and_miss_by_the_issue_rules() -> None:
    runs = {"batching/encode/c1/b1": [_run(1000, 1.05, 500, 1000)], "mbs1/encode/c1/b1": [_run(1000, 1.0, 500, 1000)],
            "batching/encode/c64/b1": [_run(3000, 20, 200, 3000)], "mbs1/encode/c64/b1": [_run(1000, 60, 500, 1000)],
            "batching/encode/c8/b64": [_run(700, 10, 1400, 44800)]}  # 21.9 us CPU/row = 45,714 rows/CPU-s
    ceiling = {"1": 10000, "32": 50000, "64": 56000, "512": 54000}  # plateau (median of >= 32): 54,000
    res = {"serving": {"runs": runs}, "ort_ceiling": {"encoder": ceiling, "encoder_per_cpu_s": ceiling},
           "startup": {"median_pss_mb": 80.0, "median_start_s": 1.2, "start_to_serving_s": [1.2]}}
    result = {name: ok for name, _, _, ok, _ in targets(res)}
    assert list(result.values()) == [True, True, False, True, True, True, True]


def test_the_protobuf_only_server_answers_encode_with_a_response_of_the_right_size() -> None:
    async def go() -> tuple[int, dict[str, Any]]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_NullHandler(proto=True, latent_dim=20),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                reply = await ch.unary_unary("/vae.v1.VaeService/Encode")(build_requests("encode", 3, (784,), 20, 1)[0])
            size = len(pb.EncodeResponse.FromString(reply).mu.data)
            return size, await run_bench(BenchSpec(target=f"127.0.0.1:{port}", rows=3, concurrency=2,
                                                   duration_s=0.3, warmup_s=0.0))
        finally:
            await server.stop(0)

    size, r = asyncio.run(go())
    assert size == 3 * 20 * 4 and r["requests"] > 0 and r["errors"] == {}


def test_runqueue_wait_grows_when_two_busy_processes_share_one_cpu() -> None:
    cpu = str(min(os.sched_getaffinity(0)))
    spin = "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass\nimport sys; sys.stdin.read()"
    procs = [subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", spin], stdin=subprocess.PIPE)
             for _ in range(2)]
    try:
        time.sleep(0.8)  # both want the CPU for 0.3 s of CPU each: one waits while the other runs
        waited = [proc_runqueue_wait_s(p.pid) for p in procs]
    finally:
        for p in procs:
            p.communicate(b"", timeout=10)
    assert sum(waited) > 0.1, waited


def test_busy_time_of_this_process_cpus_covers_its_own_cpu_time() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    b0, c0 = cpus_busy_s(cpus), proc_cpu_s(os.getpid())
    t_end = time.process_time() + 0.2
    while time.process_time() < t_end:
        pass
    assert cpus_busy_s(cpus) - b0 >= 0.5 * (proc_cpu_s(os.getpid()) - c0) > 0


def test_reference_targets_are_ratios_to_the_systems_measured_in_the_same_run() -> None:
    from benchmarks.references.bench import markdown, naive_ratios
    from benchmarks.references.bench import targets as reference_targets

    def m(rps: float, rows: float, p50: float, gen: float = 0.5) -> dict[str, float]:
        return {"requests_per_s": rps, "rows_per_s": rows, "p50_ms": p50, "p99_ms": 2 * p50,
                "cpu0_us_per_request": 1e6 / rps, "generator_cores": gen}

    grid = {f"{model}/{k}": v for model in ("encoder", "decoder") for k, v in
            (("c64/b1", (3000, 3000, 20)), ("c8/b64", (700, 44800, 11)), ("c1/b1", (1000, 1000, 1.0)))}
    ours = {k: m(*v) for k, v in grid.items()}
    ours["encoder/c64/b1"]["generator_cores"] = 0.95  # the load generator was the bottleneck there
    ours |= {"vae.v1 encode/c64/b1": m(4000, 4000, 10), "vae.v1 decode/c64/b1": m(1000, 1000, 10)}
    naive = {k: m(v[0] / 1.2, v[1] / 1.2, v[2]) for k, v in grid.items()}  # we are 1.2x the naive server
    triton = {k: m(v[0] / 1.15, v[1], v[2] * 2) for k, v in grid.items()}  # Triton: 1.15x our CPU at C=64
    ref: dict[str, Any] = {"systems": ["vae-serve", "naive", "triton"], "triton_missing": False, "rounds": 1, "duration_s": 1.0,
           "scenarios": list(grid), "summary": {"vae-serve": ours, "naive": naive, "triton": triton},
           "commands": {"vae-serve": "x", "naive": "y", "triton": "z"}, "idle_pss_mb": {"vae-serve": 90.0}}
    got = {what: (round(r, 2), ok) for what, r, _, ok in reference_targets(ref) if r is not None}
    assert got["encoder c64 b1 req/s: vae-serve / Triton (load generator bound)"] == (1.15, True)  # needs 1.1x
    assert got["decoder c64 b1 req/s: vae-serve / Triton"] == (1.15, False)  # needs 1.2x
    assert got["encoder c64 b1 server CPU/request: vae-serve / Triton (at most)"] == (0.87, False)  # needs 0.6x
    assert got["decoder c8 b64 rows/s: vae-serve / Triton"] == (1.0, False)  # needs 1.15x
    assert got["decoder c1 b1 p50: vae-serve / Triton (at most)"] == (0.5, True)
    assert got["vae.v1 Encode c64 b1 server CPU/request: vae-serve / Triton ModelInfer (at most)"] == (0.65, False)
    assert got["idle PSS of vae-serve / 120 MB (at most)"] == (0.75, True)
    assert {w: ok for w, r, _, ok in naive_ratios(ref)}["encoder c64 b1 requests/s: vae-serve / naive"] is True
    del ref["summary"]["triton"]
    ref["systems"], ref["triton_missing"] = ["vae-serve", "naive"], True
    assert all(ok is None for what, _, _, ok in reference_targets(ref) if "Triton" in what)
    assert "Triton was not measured in this run" in markdown(ref)


def test_the_committed_results_render_to_the_committed_benchmarks_md() -> None:
    import json

    from benchmarks import plots, report

    res = json.loads((plots.RESULTS / "serving.json").read_text())
    assert report.markdown(res, plots.available(res)) == report.OUT.read_text()


def test_benchmarks_imports_run_one_way_and_nothing_imports_the_orchestrator() -> None:
    import ast
    import graphlib

    root = Path(__file__).resolve().parents[2]
    graph: dict[str, set[str]] = {}
    for path in (root / "benchmarks").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("benchmarks"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)  # `from benchmarks import workers`
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("benchmarks"))
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    assert not [m for m, deps in graph.items() if "benchmarks.run" in deps]
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on an import cycle


def test_reference_systems_take_turns_in_a_rotating_order_each_running_its_own_scenarios(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.references import turns

    started: list[str] = []

    class FakeServer:
        def __init__(self, cmd: list[str], name: str) -> None:
            started.append(name)
            self.ready_path = Path(name)

        def stop(self) -> int:
            return 0

    def fake_bench(ready: Path, rpc: str, c: int, b: int, duration_s: float, extra: list[str]) -> dict[str, Any]:
        return {"requests": 10, "duration_s": duration_s, "requests_per_s": 5.0, "rows_per_s": 5.0 * b,
                "latency_ms": {"p50": 1.0}, "errors": {}, "command": f"{ready} {rpc} {c} {b} {' '.join(extra)}"}

    monkeypatch.setattr(turns, "Server", FakeServer)
    monkeypatch.setattr(turns, "bench", fake_bench)
    plan = {"a": [turns.Scenario("x", "infer-encoder", 8, 1, ("--streams", "2"))],
            "b": [turns.Scenario("x", "infer-encoder", 8, 1), turns.Scenario("y", "infer-decoder", 1, 64)],
            "c": []}
    raw = turns.take_turns("test", "t", {n: [n] for n in plan}, plan, 3, 0.5)
    assert started == ["t-a", "t-b", "t-c", "t-b", "t-c", "t-a", "t-c", "t-a", "t-b"]
    assert {n: {k: len(v) for k, v in by.items()} for n, by in raw.items()} == {"a": {"x": 3}, "b": {"x": 3, "y": 3},
                                                                                "c": {}}
    assert raw["a"]["x"][0]["command"] == "t-a infer-encoder 8 1 --streams 2"
    assert raw["b"]["y"][0]["cpu0_us_per_request"] is None  # no server record: not measured
