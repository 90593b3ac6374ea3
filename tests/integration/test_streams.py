"""vae.v1 bidirectional streams (EncodeStream, DecodeStream, ReconstructStream) against the real server.

Each message is answered once, with its id, by the same path as the unary call: the same answers, the
same errors (as a per-message status, the stream going on), limits, metrics and shutdown. The Open
Inference Protocol stream (ModelStreamInfer) is tested with tritonclient in oip_tritonclient.py.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.client import StreamError, VaeClient, in_order
from serving.manifest import Manifest
from serving.tensors import to_tensor
from tests.conftest import run_module
from tests.helpers import http_status, wait_until
from tests.integration._server import ServerProcess, start_server

pytestmark = pytest.mark.usefixtures("grpc_frontend")  # every test on both gRPC front ends


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[VaeClient]:
    with VaeClient(server.target) as c:
        yield c


def xs(manifest: Manifest, n: int, rows: int = 1, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((rows, *manifest.example_shape), dtype=np.float32) for _ in range(n)]


def rss_bytes(pid: int) -> int:
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmRSS"))
    return int(line.split()[1]) * 1024


def test_every_encode_stream_message_gets_the_unary_answer_with_its_id(client: VaeClient,
                                                                       manifest: Manifest) -> None:
    inputs = xs(manifest, 200, rows=2)
    got = list(client.encode_stream(inputs, max_inflight=32))
    assert sorted(i for i, _ in got) == list(range(200))
    for i, (mu, var) in enumerate(in_order(got)):
        ref_mu, ref_var = client.encode(inputs[i])
        np.testing.assert_allclose(mu, ref_mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, ref_var, rtol=1e-5, atol=1e-6)


def test_decode_and_reconstruct_streams_match_their_unary_calls(client: VaeClient, manifest: Manifest) -> None:
    rng = np.random.default_rng(1)
    zs = [rng.standard_normal((3, manifest.latent_dim), dtype=np.float32) for _ in range(20)]
    for z, x in zip(zs, in_order(client.decode_stream(zs))):
        np.testing.assert_allclose(x, client.decode(z), rtol=1e-5, atol=1e-6)
    inputs = xs(manifest, 20, rows=3, seed=2)
    for x, r in zip(inputs, in_order(client.reconstruct_stream(inputs))):
        ref = client.reconstruct(x)
        np.testing.assert_allclose(r.x_hat, ref.x_hat, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.kl, ref.kl, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.recon_log_lik, ref.recon_log_lik, rtol=1e-4, atol=1e-4)


def test_an_invalid_message_gets_an_error_status_naming_the_field_and_the_stream_goes_on(
        server: ServerProcess, manifest: Manifest) -> None:
    good = to_tensor(xs(manifest, 1)[0])
    bad = pb.Tensor(shape=[1, manifest.example_size + 1], data=b"\0" * 4 * (manifest.example_size + 1))
    msgs = [pb.EncodeStreamRequest(id="a", request=pb.EncodeRequest(x=good)),
            pb.EncodeStreamRequest(id="b", request=pb.EncodeRequest(x=bad)),
            pb.EncodeStreamRequest(id="c", request=pb.EncodeRequest(x=good))]
    invalid0 = server.metric("vae_requests_total", method="EncodeStream", code="INVALID_ARGUMENT")
    with grpc.insecure_channel(server.target) as ch:
        call = pb_grpc.VaeServiceStub(ch).EncodeStream(iter(msgs), timeout=10)
        answers = {r.id: r for r in call}
        assert call.code() == grpc.StatusCode.OK
    assert set(answers) == {"a", "b", "c"}
    assert answers["b"].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "x: expected shape" in answers["b"].status.message and not answers["b"].HasField("response")
    assert not answers["a"].HasField("status") and answers["c"].response.mu.shape[0] == 1
    assert server.metric("vae_requests_total", method="EncodeStream", code="INVALID_ARGUMENT") == invalid0 + 1


def test_a_message_that_does_not_parse_is_an_invalid_argument_answer(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as ch:
        call = ch.stream_stream("/vae.v1.VaeService/DecodeStream")(iter([b"\xff\xff\xff"]), timeout=10)
        answers = [pb.DecodeStreamResponse.FromString(r) for r in call]
    assert len(answers) == 1 and answers[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "do not parse" in answers[0].status.message


def test_stream_messages_are_counted_apart_from_unary_calls_and_open_streams_are_a_gauge(
        server: ServerProcess, client: VaeClient, manifest: Manifest) -> None:
    ok0 = server.metric("vae_requests_total", method="EncodeStream", code="OK")
    unary0 = server.metric("vae_requests_total", method="Encode", code="OK")
    release = threading.Event()
    inputs = xs(manifest, 10)

    def slow_inputs() -> Iterator[np.ndarray]:
        yield from inputs
        release.wait(10)  # the stream stays open (the client has not half-closed) until released

    got: list[object] = []
    t = threading.Thread(target=lambda: got.extend(client.encode_stream(slow_inputs())))
    t.start()
    try:
        wait_until(lambda: server.metric("vae_requests_total", method="EncodeStream", code="OK") >= ok0 + 10, 10,
                   "the stream's answers to be counted", interval=0.05)
        assert server.metric("vae_open_streams", method="EncodeStream") == 1
    finally:
        release.set()
        t.join(10)
    assert len(got) == 10
    assert server.metric("vae_open_streams", method="EncodeStream") == 0
    assert server.metric("vae_requests_total", method="Encode", code="OK") == unary0
    assert server.metric("vae_request_duration_seconds_count", method="EncodeStream") >= 10


def test_the_streams_deadline_ends_it_with_deadline_exceeded(client: VaeClient, manifest: Manifest) -> None:
    inputs = xs(manifest, 3)
    ended = threading.Event()

    def then_wait() -> Iterator[np.ndarray]:
        yield from inputs
        ended.wait(30)  # the stream stays open (no half-close) until its deadline has ended it

    answers: list[object] = []
    try:
        with pytest.raises(grpc.RpcError) as e:
            answers.extend(client.encode_stream(then_wait(), timeout_s=1.0))
    finally:
        ended.set()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert len(answers) == 3  # what was sent in time was answered


def test_the_bytes_in_flight_budget_applies_per_message(exported_model_dir: Path, manifest: Manifest,
                                                        tmp_path: Path) -> None:
    # 200 rows: about 3 x 200 x 4 x example_size bytes reserved per message; the budget holds one.
    rows = 200
    one = 3 * 4 * rows * manifest.example_size
    s = start_server(exported_model_dir, tmp_path, "--max-batch-size", "1", "--max-inflight-bytes", str(one + one // 2),
                     "--metrics-port", "0")
    try:
        with VaeClient(s.target) as c:
            got = list(c.encode_stream(xs(manifest, 30, rows=rows), max_inflight=30))
        codes = [r.code.name if isinstance(r, StreamError) else "OK" for _, r in got]
        assert len(got) == 30 and set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
        refusal = next(r for _, r in got if isinstance(r, StreamError))
        assert "--max-inflight-bytes" in refusal.message
    finally:
        assert s.stop() == 0, s.log()


def test_a_client_that_writes_without_reading_holds_bounded_server_memory_and_others_are_served(
        exported_model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    limit = 16
    s = start_server(exported_model_dir, tmp_path, "--max-stream-inflight", str(limit))
    x = xs(manifest, 1, rows=64)[0]  # 16 KiB per message on the digits model
    msg = pb.EncodeStreamRequest(id="hog", request=pb.EncodeRequest(x=to_tensor(x)))
    sent = [0]  # messages the client has handed to gRPC so far
    total = 20_000  # 330 MB if the server read it all

    def flood() -> Iterator[pb.EncodeStreamRequest]:
        for _ in range(total):
            sent[0] += 1
            yield msg

    seen = [-1]

    def stalled() -> bool:
        """The client wrote at least `limit` messages and none since the last look, half a second ago."""
        before, seen[0] = seen[0], sent[0]
        return seen[0] >= limit and seen[0] == before

    try:
        rss0 = rss_bytes(s.pid)
        with grpc.insecure_channel(s.target) as ch:
            hog = pb_grpc.VaeServiceStub(ch).EncodeStream(flood(), timeout=60)  # never read
            wait_until(stalled, 30, "the client's writes to stall (HTTP/2 flow control)", interval=0.5)
            taken = sent[0]
            assert server_inflight(s) <= limit
            # Another client is still served at once, on its own connection and on a stream.
            with VaeClient(s.target, timeout_s=5) as other:
                t0 = time.monotonic()
                other.encode(x[:1])
                assert [i for i, _ in other.encode_stream([x[:1]] * 5)] and time.monotonic() - t0 < 5
            grown = rss_bytes(s.pid) - rss0
            hog.cancel()
        print(f"\n[flow control] client wrote {taken} of {total} messages before stalling; server RSS grew "
              f"{grown / 2**20:.1f} MiB")
        assert taken < total // 4
        assert grown < 64 * 2**20, f"server RSS grew {grown / 2**20:.0f} MiB"
    finally:
        assert s.stop() == 0, s.log()


def server_inflight(s: ServerProcess) -> float:
    return s.metric("vae_inflight_requests", method="EncodeStream")


def test_sigterm_with_an_open_stream_serves_it_through_the_drain_then_ends_it_and_exits_0(
        exported_model_dir: Path, manifest: Manifest, tmp_path: Path) -> None:
    s = start_server(exported_model_dir, tmp_path, "--drain-delay-s", "1", "--grace-period-s", "2")
    x = xs(manifest, 1)[0]
    feed: list[threading.Event] = [threading.Event() for _ in range(3)]
    done = threading.Event()
    answers: list[object] = []
    outcome: list[str] = []

    def messages() -> Iterator[np.ndarray]:
        for ev in feed:
            ev.wait(30)
            yield x
        done.wait(60)  # never half-closes: only the server's shutdown ends this stream

    def run() -> None:
        with VaeClient(s.target, timeout_s=60) as c:
            try:
                answers.extend(c.encode_stream(messages()))
                outcome.append("OK")
            except grpc.RpcError as e:
                outcome.append(e.code().name)  # type: ignore[attr-defined]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        feed[0].set()
        wait_until(lambda: len(answers) == 1, 10, "the first answer")
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: http_status(s.http_port, "/v2/health/ready") == 503, 10, "the drain to begin")
        feed[1].set()  # during the drain delay: still answered
        wait_until(lambda: len(answers) == 2, 10, "the answer sent during the drain delay")
        code = s.proc.wait(30)
        took = time.monotonic() - t0
        t.join(10)
    finally:
        feed[2].set()
        done.set()
        if s.proc.poll() is None:
            s.stop()
    assert code == 0, s.log()
    assert took < 1 + 2 + 5, f"exit took {took:.1f} s"
    assert outcome and outcome[0] in ("CANCELLED", "UNAVAILABLE"), outcome


def test_the_client_cli_streams_rows_and_gets_the_unary_answers(server: ServerProcess, client: VaeClient,
                                                                manifest: Manifest, tmp_path: Path) -> None:
    x = np.concatenate(xs(manifest, 7, seed=4))  # (7, *example_shape)
    np.save(tmp_path / "x.npy", x)

    def cli(*args: str) -> str:
        return run_module("serving.client", "--target", server.target, *args, timeout=60).stdout

    out = cli("--stream-rows", "2", "encode", "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "e.npz"))
    assert '"n": 7' in out
    mu, _ = client.encode(x)
    np.testing.assert_allclose(np.load(tmp_path / "e.npz")["mu"], mu, rtol=1e-5, atol=1e-6)
    assert '"n": 7' in cli("--stream-rows", "3", "decode", "--input", str(tmp_path / "e.npz"))
    assert '"n": 7' in cli("--stream-rows", "1", "reconstruct", "--input", str(tmp_path / "x.npy"))
