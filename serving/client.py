"""A typed numpy client for vae.v1.VaeService, and its CLI.

    python -m serving.client --target localhost:50051 info
    python -m serving.client --target localhost:50051 encode --input x.npy [--output enc.npz]
    python -m serving.client --target localhost:50051 sample --count 64 --seed 0 --png samples.png
    python -m serving.client --target localhost:50051 reconstruct --input x.npy --png recon.png
    python -m serving.client --target localhost:50051 decode --input z.npy [--png decoded.png]
    python -m serving.client --target localhost:50051 encode --input x.npy --stream-rows 1
    python -m serving.client --target localhost:50051 score --input x.npy [--k 16] [--quantile 0.99] --png top.png

`--stream-rows N` (encode, decode, reconstruct) sends the input as N-row messages on one bidirectional
stream (EncodeStream, ...) instead of one unary call; in Python, `VaeClient.encode_stream(xs)` and its
siblings yield `(index, result)` as answers arrive, in any order, a `StreamError` for a message that
failed (the stream goes on).

Arrays are in model space (see the manifest's `normalization`). PNG grids need Pillow; no torch and no
matplotlib here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from serving._proto.vae.v1 import vae_service_pb2 as pb
from serving._proto.vae.v1 import vae_service_pb2_grpc as pb_grpc
from serving.scoreview import save_heatmaps, score_table, summary
from serving.tensors import F32, from_tensor, to_tensor


@dataclass(frozen=True)
class Sampled:
    x: np.ndarray          # (count, *example_shape)
    z: np.ndarray | None   # (count, d) when asked for
    seed: int


@dataclass(frozen=True)
class Reconstructed:
    x_hat: np.ndarray          # (N, *example_shape)
    recon_log_lik: np.ndarray  # (N,)
    kl: np.ndarray             # (N,)
    seed: int

    @property
    def neg_elbo(self) -> np.ndarray:
        """-ELBO per example: an anomaly score (higher = less like the training data)."""
        return self.kl - self.recon_log_lik


@dataclass(frozen=True)
class Scored:
    """Score's answer (serving.detector.ScoreResult, over the wire)."""

    score: np.ndarray                  # (N,) the `kind` score, nats
    nll: np.ndarray                    # (N,) importance-weighted -log p(x), nats
    percentile: np.ndarray | None      # (N,) in [0, 100]; None when not calibrated
    is_outlier: np.ndarray | None      # (N,) bool; None when not calibrated
    threshold: float                   # NaN when not calibrated
    feature_scores: np.ndarray | None  # (N, *example_shape), when asked
    k: int
    seed: int
    kind: str
    quantile: float
    calibration: str


@dataclass(frozen=True)
class StreamError:
    """A stream message the server answered with an error (the unary call would have had this status)."""

    code: grpc.StatusCode
    message: str


_CODES = {c.value[0]: c for c in grpc.StatusCode}
Encoded = tuple[np.ndarray, np.ndarray]  # mu (N, d), var (N, d)


class VaeClient:
    """Blocking client; every call takes an optional timeout in seconds (a gRPC deadline)."""

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = 30.0, max_message_bytes: int = 64 * 1024 * 1024,
                 model: str = "", version: str = "") -> None:
        """`model`, `version`: which model of a model repository every call goes to (empty: the only
        model loaded, its newest version)."""
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
        self.stub = pb_grpc.VaeServiceStub(self.channel)
        self.timeout_s = timeout_s
        self.model, self.version = model, version

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """Model facts: shapes, latent_dim, likelihood, version, providers, batching settings."""
        resp = self.stub.GetModelInfo(pb.GetModelInfoRequest(model=self.model, version=self.version), timeout=self.timeout_s)
        d = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        d.pop("manifest_json", None)
        for k in ("latent_dim", "max_batch_size", "max_queue_delay_us", "max_queue_rows", "max_sample_count"):
            d[k] = int(d[k])
        d["example_shape"] = [int(s) for s in d["example_shape"]]
        d["manifest"] = json.loads(resp.manifest_json) if resp.manifest_json else {}
        return d

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x (N, *example_shape) -> mu (N, d), var (N, d)."""
        r = self.stub.Encode(pb.EncodeRequest(x=to_tensor(x), model=self.model, version=self.version), timeout=self.timeout_s)
        return from_tensor(r.mu), from_tensor(r.var)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """z (N, d) -> x_mean (N, *example_shape)."""
        return from_tensor(self.stub.Decode(pb.DecodeRequest(z=to_tensor(z), model=self.model, version=self.version), timeout=self.timeout_s).x)

    def sample(self, count: int, seed: int | None = None, temperature: float | None = None,
               return_z: bool = False) -> Sampled:
        """count samples of x from z ~ N(0, temperature^2 I); the same seed gives the same samples."""
        req = pb.SampleRequest(count=count, seed=seed, temperature=temperature, return_z=return_z,
                               model=self.model, version=self.version)
        r = self.stub.Sample(req, timeout=self.timeout_s)
        return Sampled(x=from_tensor(r.x), z=from_tensor(r.z) if return_z else None, seed=r.seed)

    def reconstruct(self, x: np.ndarray, use_mean: bool = True, seed: int | None = None) -> Reconstructed:
        """x (N, *example_shape) -> x_hat and per-example ELBO terms."""
        req = pb.ReconstructRequest(x=to_tensor(x), use_mean=use_mean, seed=seed, model=self.model,
                                    version=self.version)
        r = self.stub.Reconstruct(req, timeout=self.timeout_s)
        return Reconstructed(x_hat=from_tensor(r.x_hat), recon_log_lik=from_tensor(r.recon_log_lik),
                             kl=from_tensor(r.kl), seed=r.seed)

    def score(self, x: np.ndarray, k: int | None = None, seed: int | None = None, quantile: float | None = None,
              kind: str = "", want_feature_scores: bool = False) -> Scored:
        """x (N, *example_shape) -> anomaly scores (server defaults for what is None or empty)."""
        req = pb.ScoreRequest(x=to_tensor(x), k=k, seed=seed, quantile=quantile, kind=kind,
                              want_feature_scores=want_feature_scores, model=self.model, version=self.version)
        return _scored(self.stub.Score(req, timeout=self.timeout_s))

    def score_stream(self, xs: Iterable[np.ndarray], seed: int | None = None, k: int | None = None,
                     max_inflight: int = 64, timeout_s: float | None = None
                     ) -> Iterator[tuple[int, Scored | StreamError]]:
        """Each x (N_i, *example_shape) as one ScoreStream message -> (i, Scored or StreamError), as answers
        arrive."""
        return self._stream("ScoreStream", pb.ScoreStreamRequest,
                            lambda x: pb.ScoreRequest(x=to_tensor(x), seed=seed, k=k, model=self.model,
                                                      version=self.version), _scored, xs, max_inflight,
                            timeout_s)

    # -- streams: many messages, one call ------------------------------------------------------------

    def encode_stream(self, xs: Iterable[np.ndarray], max_inflight: int = 64, timeout_s: float | None = None
                      ) -> Iterator[tuple[int, Encoded | StreamError]]:
        """Each x (N_i, *example_shape) of `xs` as one EncodeStream message -> (i, (mu, var) or StreamError),
        as the answers arrive (in any order); at most `max_inflight` messages unanswered at once.
        `timeout_s` is the whole stream's deadline (default: the client's)."""
        return self._stream("EncodeStream", pb.EncodeStreamRequest,
                            lambda x: pb.EncodeRequest(x=to_tensor(x), model=self.model, version=self.version),
                            lambda r: (from_tensor(r.mu), from_tensor(r.var)), xs, max_inflight, timeout_s)

    def decode_stream(self, zs: Iterable[np.ndarray], max_inflight: int = 64, timeout_s: float | None = None
                      ) -> Iterator[tuple[int, np.ndarray | StreamError]]:
        """Each z (N_i, d) as one DecodeStream message -> (i, x_mean or StreamError), as answers arrive."""
        return self._stream("DecodeStream", pb.DecodeStreamRequest, lambda z: pb.DecodeRequest(z=to_tensor(z), model=self.model, version=self.version),
                            lambda r: from_tensor(r.x), zs, max_inflight, timeout_s)

    def reconstruct_stream(self, xs: Iterable[np.ndarray], max_inflight: int = 64, timeout_s: float | None = None
                           ) -> Iterator[tuple[int, Reconstructed | StreamError]]:
        """Each x (N_i, *example_shape) as one ReconstructStream message (z = mu) -> (i, Reconstructed or
        StreamError), as answers arrive."""
        return self._stream("ReconstructStream", pb.ReconstructStreamRequest,
                            lambda x: pb.ReconstructRequest(x=to_tensor(x), model=self.model, version=self.version),
                            lambda r: Reconstructed(x_hat=from_tensor(r.x_hat), recon_log_lik=from_tensor(r.recon_log_lik),
                                                    kl=from_tensor(r.kl), seed=r.seed),
                            xs, max_inflight, timeout_s)

    def _stream(self, rpc: str, wrapper: Any, make: Callable[[np.ndarray], Any], unpack: Callable[[Any], Any],
                inputs: Iterable[np.ndarray], max_inflight: int, timeout_s: float | None) -> Iterator[tuple[int, Any]]:
        """The message ids are the inputs' indices; a semaphore keeps `max_inflight` unanswered at most."""
        slots = threading.Semaphore(max_inflight)
        ended = threading.Event()

        def requests() -> Iterator[Any]:
            for i, a in enumerate(inputs):
                while not slots.acquire(timeout=0.1):
                    if ended.is_set():
                        return
                yield wrapper(id=str(i), request=make(a))

        call = getattr(self.stub, rpc)(requests(), timeout=self.timeout_s if timeout_s is None else timeout_s)
        try:
            for r in call:
                slots.release()
                if r.HasField("status"):
                    yield int(r.id), StreamError(_CODES.get(r.status.code, grpc.StatusCode.UNKNOWN), r.status.message)
                else:
                    yield int(r.id), unpack(r.response)
        finally:
            ended.set()
            call.cancel()


def _scored(r: pb.ScoreResponse) -> Scored:
    return Scored(score=from_tensor(r.score), nll=from_tensor(r.nll),
                  percentile=from_tensor(r.percentile) if r.calibrated else None,
                  is_outlier=np.array(r.is_outlier, dtype=bool) if r.calibrated else None, threshold=r.threshold,
                  feature_scores=from_tensor(r.feature_scores) if r.HasField("feature_scores") else None,
                  k=r.k, seed=r.seed, kind=r.kind, quantile=r.quantile, calibration=r.calibration)


def in_order(answers: Iterable[tuple[int, Any]]) -> list[Any]:
    """Stream answers (index, result) sorted back into input order; raises on the first StreamError."""
    got = sorted(answers, key=lambda a: a[0])
    for i, r in got:
        if isinstance(r, StreamError):
            raise StreamFailed(i, r)
    return [r for _, r in got]


class StreamFailed(Exception):
    """A stream message failed; `index` says which input, `error` why."""

    def __init__(self, index: int, error: StreamError) -> None:
        super().__init__(f"message {index}: {error.code.name}: {error.message}")
        self.index = index
        self.error = error


def _chunks(a: np.ndarray, rows: int) -> list[np.ndarray]:
    return [a[i:i + rows] for i in range(0, a.shape[0], rows)]


# -- PNG grids ------------------------------------------------------------------------------------

def image_layout(example_shape: Sequence[int]) -> tuple[int, int, int] | None:
    """(C, H, W) to draw examples as images, or None when they are not images."""
    s = tuple(example_shape)
    if len(s) == 3 and s[0] in (1, 3):
        return s[0], s[1], s[2]
    if len(s) == 2:
        return 1, s[0], s[1]
    if len(s) == 1 and math.isqrt(s[0]) ** 2 == s[0]:  # flattened square images (digits: 64 = 8x8)
        return 1, math.isqrt(s[0]), math.isqrt(s[0])
    return None


def to_raw(x: np.ndarray, normalization: dict[str, Any]) -> np.ndarray:
    """Model space -> raw data space: x_raw = x_model * scale + offset."""
    n = x.shape[0]
    scale = np.asarray(normalization.get("scale", 1.0), dtype=np.float64)
    offset = np.asarray(normalization.get("offset", 0.0), dtype=np.float64)
    return (x.reshape(n, -1) * scale + offset).reshape(x.shape)


def save_grid(x: np.ndarray, example_shape: Sequence[int], path: Path, ncols: int | None = None,
              upscale: int = 4) -> None:
    """Write examples x (N, *example_shape) as a PNG grid, each image min-max scaled to 0..255."""
    from PIL import Image  # only the CLI needs Pillow

    layout = image_layout(example_shape)
    if layout is None:
        raise ValueError(f"examples of shape {tuple(example_shape)} are not images")
    c, h, w = layout
    n = x.shape[0]
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    imgs = x.reshape(n, c, h, w).astype(np.float64)
    lo, hi = imgs.min(), imgs.max()
    imgs = (imgs - lo) / (hi - lo) if hi > lo else np.zeros_like(imgs)
    grid = np.ones((c, nrows * (h + 1) + 1, ncols * (w + 1) + 1))
    for i in range(n):
        r, k = divmod(i, ncols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = imgs[i]
    pixels = (grid * 255).round().astype(np.uint8).transpose(1, 2, 0)
    img = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    img = img.resize((img.width * upscale, img.height * upscale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


# -- CLI ------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="localhost:50051", help="server host:port (default %(default)s)")
    p.add_argument("--timeout-s", type=float, default=30.0, help="deadline per call (default %(default)s)")
    p.add_argument("--model", default="", help="model of a model repository (default: the only one loaded)")
    p.add_argument("--version", default="", help="its version (default: the newest ready one)")
    p.add_argument("--stream-rows", type=int, default=0,
                   help="encode/decode/reconstruct: send the input as messages of this many rows on one "
                        "bidirectional stream (0 = one unary call; default %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print the model facts as JSON")
    e = sub.add_parser("encode", help="encode examples from a .npy file (N, *example_shape)")
    e.add_argument("--input", type=Path, required=True, help=".npy of examples in model space")
    e.add_argument("--output", type=Path, help="write mu and var to this .npz")
    s = sub.add_parser("sample", help="draw samples; write a PNG grid for image models")
    s.add_argument("--count", type=int, default=64, help="how many (default %(default)s)")
    s.add_argument("--seed", type=int, help="seed (default: the server picks one and returns it)")
    s.add_argument("--temperature", type=float, default=1.0, help="z scale (default %(default)s)")
    s.add_argument("--png", type=Path, help="write the samples as a PNG grid here")
    s.add_argument("--output", type=Path, help="write the samples to this .npy")
    r = sub.add_parser("reconstruct", help="reconstruct examples; PNG of inputs over reconstructions")
    r.add_argument("--input", type=Path, required=True, help=".npy of examples in model space")
    r.add_argument("--sample-z", action="store_true", help="decode a sampled z instead of z = mu")
    r.add_argument("--seed", type=int, help="seed of the sampled z")
    r.add_argument("--png", type=Path, help="write inputs (top rows) and reconstructions (bottom) here")
    d = sub.add_parser("decode", help="decode latent vectors from a .npy file (N, d)")
    d.add_argument("--input", type=Path, required=True,
                   help=".npy of z (N, latent_dim), or an .npz from `encode --output` (decodes its mu)")
    d.add_argument("--png", type=Path, help="write the decoded examples as a PNG grid here")
    c = sub.add_parser("score", help="anomaly scores of examples: a table, and a PNG of the most anomalous")
    c.add_argument("--input", type=Path, required=True, help=".npy of examples in model space")
    c.add_argument("--k", type=int, help="importance samples per example (default: the calibrated k)")
    c.add_argument("--seed", type=int, help="seed of eps (default: the server picks one and returns it)")
    c.add_argument("--quantile", type=float, help="flag scores over this calibration quantile (default: the "
                                                  "server's --outlier-quantile)")
    c.add_argument("--kind", default="", help="nll or feature-z (default: the server's default)")
    c.add_argument("--png", type=Path, help="image models: write the most anomalous inputs over their "
                                            "per-feature heat maps here")
    c.add_argument("--top", type=int, default=8, help="inputs in the PNG (default %(default)s)")
    return p


def _load_z(path: Path) -> np.ndarray:
    """z (N, d) from a .npy, or the `z` / `mu` array of an .npz (what `encode --output` writes)."""
    data = np.load(path)
    if isinstance(data, np.lib.npyio.NpzFile):
        key = "z" if "z" in data.files else "mu"
        if key not in data.files:
            raise SystemExit(f"--input: expected an .npz with 'z' or 'mu', got keys {data.files}")
        return np.asarray(data[key], dtype=F32)
    return np.asarray(data, dtype=F32)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    with VaeClient(args.target, timeout_s=args.timeout_s, model=args.model, version=args.version) as client:
        try:
            if args.command == "info":
                out.write(json.dumps({k: v for k, v in client.info().items() if k != "manifest"}, indent=2) + "\n")
            elif args.command == "encode":
                x = np.load(args.input).astype(F32)
                if args.stream_rows:
                    parts = in_order(client.encode_stream(_chunks(x, args.stream_rows), timeout_s=None))
                    mu, var = np.concatenate([m for m, _ in parts]), np.concatenate([v for _, v in parts])
                else:
                    mu, var = client.encode(x)
                if args.output:
                    np.savez(args.output, mu=mu, var=var)
                out.write(json.dumps({"n": int(mu.shape[0]), "mu[0]": mu[0].round(4).tolist(),
                                      "var[0]": var[0].round(4).tolist()}) + "\n")
            elif args.command == "sample":
                info = client.info()
                s = client.sample(args.count, seed=args.seed, temperature=args.temperature)
                if args.output:
                    np.save(args.output, s.x)
                if args.png:
                    save_grid(to_raw(s.x, info["manifest"].get("normalization", {})), info["example_shape"],
                              args.png)
                out.write(json.dumps({"count": int(s.x.shape[0]), "seed": s.seed,
                                      "png": str(args.png) if args.png else None}) + "\n")
            elif args.command == "reconstruct":
                info = client.info()
                x = np.load(args.input).astype(F32)
                if args.stream_rows and not args.sample_z:
                    recs = in_order(client.reconstruct_stream(_chunks(x, args.stream_rows), timeout_s=None))
                    rec = Reconstructed(x_hat=np.concatenate([r.x_hat for r in recs]),
                                        recon_log_lik=np.concatenate([r.recon_log_lik for r in recs]),
                                        kl=np.concatenate([r.kl for r in recs]), seed=0)
                else:
                    rec = client.reconstruct(x, use_mean=not args.sample_z, seed=args.seed)
                if args.png:
                    norm = info["manifest"].get("normalization", {})
                    n = x.shape[0]
                    both = np.concatenate([to_raw(x, norm), to_raw(rec.x_hat, norm)])
                    save_grid(both, info["example_shape"], args.png, ncols=min(n, 16) if n > 16 else n)
                out.write(json.dumps({"n": int(x.shape[0]),
                                      "recon_log_lik_mean": float(rec.recon_log_lik.mean()),
                                      "kl_mean": float(rec.kl.mean()),
                                      "neg_elbo": rec.neg_elbo.round(3).tolist()[:16],
                                      "png": str(args.png) if args.png else None}) + "\n")
            elif args.command == "decode":
                info = client.info()
                z = _load_z(args.input)
                if args.stream_rows:
                    x = np.concatenate(in_order(client.decode_stream(_chunks(z, args.stream_rows), timeout_s=None)))
                else:
                    x = client.decode(z)
                if args.png:
                    save_grid(to_raw(x, info["manifest"].get("normalization", {})), info["example_shape"],
                              args.png)
                out.write(json.dumps({"n": int(x.shape[0]), "png": str(args.png) if args.png else None}) + "\n")
            elif args.command == "score":
                _score(client, args, out)
        except grpc.RpcError as e:
            sys.stderr.write(f"{args.command}: {e.code().name}: {e.details()}\n")
            return 1
        except StreamFailed as e:
            sys.stderr.write(f"{args.command}: {e}\n")
            return 1
    return 0


def _score(client: VaeClient, args: argparse.Namespace, out: Any) -> None:
    x = np.load(args.input).astype(F32)
    info = client.info() if args.png else None
    layout = image_layout(info["example_shape"]) if info is not None else None
    if info is not None and layout is None:
        raise SystemExit(f"--png: examples of shape {tuple(info['example_shape'])} are not images")
    r = client.score(x, k=args.k, seed=args.seed, quantile=args.quantile, kind=args.kind,
                     want_feature_scores=args.png is not None)
    out.write(score_table(r.score, r.nll, r.percentile, r.is_outlier, r.kind) + "\n")
    shown = None
    if info is not None and layout is not None and r.feature_scores is not None:
        raw = to_raw(x, info["manifest"].get("normalization", {}))
        shown = save_heatmaps(raw, r.feature_scores, r.score, layout, args.png, top=args.top)
    flagged = int(r.is_outlier.sum()) if r.is_outlier is not None else None
    out.write(json.dumps(summary(int(x.shape[0]), r.kind, r.k, r.seed, r.quantile, r.threshold, r.calibration,
                                 flagged, shown, args.png)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
