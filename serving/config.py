"""Serving configuration: one frozen dataclass built from flags and `VAE_SERVE_*` environment variables.

    python -m serving --model-dir exported/ --port 50051 --http-port 8080 --providers auto

Every flag `--some-flag` is also the environment variable `VAE_SERVE_SOME_FLAG`; a flag given on the
command line wins over the environment, which wins over the default.

Renamed flags still work, with a warning at start-up (`deprecated_settings`): `--metrics-port`,
`--metrics-host` and `--metrics-tls` (and their VAE_SERVE_METRICS_* variables) are now `--http-port`,
`--http-host` and `--http-tls`, since that port serves the Open Inference Protocol's REST API and health
beside `/metrics` (0.3.0).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from serving.layout import LayoutError, VersionPolicy

PROVIDER_CHOICES: tuple[str, ...] = ("auto", "cuda", "cpu")
LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ENV_PREFIX = "VAE_SERVE_"
# Old flag -> the flag it became (each still accepted, with a warning at start-up).
RENAMED_FLAGS: dict[str, str] = {"--metrics-port": "--http-port", "--metrics-host": "--http-host",
                                 "--metrics-tls": "--http-tls"}


GRPC_FRONTENDS = ("auto", "native", "grpcio")
# Triton's model control modes (serving/repository.py): none = what is there at start-up, poll = rescanned every
# --repository-poll-s, explicit = the Open Inference Protocol's repository extension loads and unloads.
MODEL_CONTROL_MODES = ("none", "poll", "explicit")
# Where prometheus-client's multiprocess mode keeps the workers' samples (--workers); it must be set before
# prometheus_client is first imported. Here, not in workers.py or metrics.py, so neither imports the other.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class ConfigError(ValueError):
    """A serving setting is out of range; the message names the field (flag)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything `python -m serving` needs. Validated on construction."""

    model_dir: Path = Path("exported")
    model_repository: Path | None = None
    model_control: str = "none"
    repository_poll_s: float = 10.0
    version_policy: str = "latest:1"
    load_model: str = ""
    host: str = "0.0.0.0"
    port: int = 50051
    http_port: int = 8080
    http_host: str = ""
    http_tls: bool = False
    http_read_timeout_s: float = 30.0
    providers: str = "auto"
    intra_op_threads: int = 1
    workers: int = 1
    max_batch_size: int = 256
    preferred_batch_size: int = 0
    max_queue_delay_us: int = 500
    max_queue_rows: int = 16384
    max_sample_count: int = 4096
    outlier_quantile: float = 0.99
    max_score_k: int = 256
    max_message_bytes: int = 16 * 1024 * 1024
    max_inflight_bytes: int = 256 * 1024 * 1024
    max_stream_inflight: int = 64
    grace_period_s: float = 10.0
    drain_delay_s: float = 2.0
    max_concurrent_rpcs: int = 4096
    max_connection_age_s: float = 300.0
    grpc_frontend: str = "auto"
    grpc_io_threads: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_level: str = "INFO"
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("port", 0 <= self.port <= 65535, "0 (any free port) .. 65535"),
            ("http_port", -1 <= self.http_port <= 65535, "-1 (off), 0 (any free port) .. 65535"),
            ("http_read_timeout_s", self.http_read_timeout_s > 0, "a number > 0"),
            ("providers", self.providers in PROVIDER_CHOICES, f"one of {PROVIDER_CHOICES}"),
            ("intra_op_threads", self.intra_op_threads >= 0, "an integer >= 0 (0 = ONNX Runtime default)"),
            ("workers", self.workers >= 0, "an integer >= 0 (0 = one per available CPU)"),
            ("max_batch_size", self.max_batch_size >= 1, "an integer >= 1 (rows)"),
            ("preferred_batch_size", 0 <= self.preferred_batch_size <= self.max_batch_size,
             f"an integer in [0, max_batch_size ({self.max_batch_size})] (0 = auto)"),
            ("max_queue_delay_us", self.max_queue_delay_us >= 0, "an integer >= 0"),
            ("max_queue_rows", self.max_queue_rows >= self.max_batch_size,
             f"an integer >= max_batch_size ({self.max_batch_size})"),
            ("max_sample_count", self.max_sample_count >= 1, "an integer >= 1"),
            ("outlier_quantile", 0.0 < self.outlier_quantile < 1.0, "a number in (0, 1), e.g. 0.99"),
            ("max_score_k", 1 <= self.max_score_k <= self.max_queue_rows,
             f"an integer from 1 to max_queue_rows ({self.max_queue_rows})"),
            ("max_message_bytes", self.max_message_bytes >= 1024, "an integer >= 1024"),
            ("max_inflight_bytes", self.max_inflight_bytes >= 0, "an integer >= 0 (0 = no limit)"),
            ("max_stream_inflight", self.max_stream_inflight >= 1, "an integer >= 1"),
            ("grace_period_s", self.grace_period_s >= 0, "a number >= 0"),
            ("drain_delay_s", self.drain_delay_s >= 0, "a number >= 0"),
            ("max_concurrent_rpcs", self.max_concurrent_rpcs >= 0, "an integer >= 0 (0 = no limit)"),
            ("max_connection_age_s", self.max_connection_age_s >= 0, "a number >= 0 (0 = no limit)"),
            ("http_tls", not self.http_tls or self.tls_cert is not None,
             "only with --tls-cert and --tls-key (the HTTP port uses the same files)"),
            ("log_level", self.log_level in LOG_LEVELS, f"one of {LOG_LEVELS}"),
            ("model_control", self.model_control in MODEL_CONTROL_MODES, f"one of {MODEL_CONTROL_MODES}"),
            ("model_control", self.model_control == "none" or self.model_repository is not None,
             "none without --model-repository (--model-dir serves one export as it is)"),
            ("model_control", self.model_control != "explicit" or self.workers == 1,
             ("poll or none with --workers other than 1 (a load or unload would reach one worker only; "
              "run one worker per pod and scale pods)")),
            ("repository_poll_s", self.repository_poll_s > 0, "a number > 0 (seconds)"),
            ("load_model", not self.load_model or self.model_control == "explicit",
             "empty unless --model-control explicit (the other modes load every model)"),
            ("grpc_frontend", self.grpc_frontend in GRPC_FRONTENDS, f"one of {GRPC_FRONTENDS}"),
            ("grpc_frontend", not (self.grpc_frontend == "native" and self.tls_cert is not None),
             ("grpcio or auto with --tls-cert (pygrpc-native 0.5.0 has no TLS; --grpc-frontend native and "
             "--tls-cert cannot be used together)")),
            ("grpc_io_threads", self.grpc_io_threads >= 1, "an integer >= 1"),
            ("tls_key", (self.tls_cert is None) == (self.tls_key is None),
             "--tls-cert and --tls-key given together"),
            ("tls_client_ca", self.tls_client_ca is None or self.tls_cert is not None,
             "only with --tls-cert and --tls-key (mutual TLS needs server TLS)"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name.replace('_', '-')}: expected {expected}, got {getattr(self, name)!r}")
        try:
            VersionPolicy.parse(self.version_policy)
        except LayoutError as e:
            raise ConfigError(f"version-policy: {e}") from None
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name.replace('_', '-')}: expected a readable file, got {str(path)!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def frontend(self) -> str:
        """The gRPC front end that runs: `auto` is native, or grpcio with TLS (native has none yet)."""
        if self.grpc_frontend == "auto":
            return "grpcio" if self.tls else "native"
        return self.grpc_frontend

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None) -> ServeConfig:
        """Parse flags (argv) over `VAE_SERVE_*` variables (env, default os.environ) over defaults."""
        args = build_parser(os.environ if env is None else env).parse_args(argv)
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _field(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def deprecated_settings(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """One warning line per renamed flag or variable that `argv` or `env` still uses."""
    notes = []
    for old, new in RENAMED_FLAGS.items():
        if any(a == old or a.startswith(old + "=") for a in argv):
            notes.append(f"{old} is now {new} (the same port also serves the REST API); please rename it")
        old_env, new_env = _env_name(_field(old)), _env_name(_field(new))
        if old_env in env:
            used = "ignored: " + new_env + " is set" if new_env in env else "used"
            notes.append(f"{old_env} is now {new_env} ({used}); please rename it")
    return notes


def _opt_path(s: str) -> Path | None:
    return Path(s) if s else None


def _bool(s: str | bool) -> bool:
    if isinstance(s, bool):
        return s
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {s!r}")


_bool.__name__ = "bool"


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The one parser of `python -m serving`; defaults come from `env` where set."""
    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="python -m serving", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve an exported VAE over gRPC on ONNX Runtime. Every flag is also an environment "
                    "variable VAE_SERVE_<FLAG_IN_UPPER_SNAKE>.")

    old_names = {new: old for old, new in RENAMED_FLAGS.items()}

    def add(flag: str, typ: type | object, help_: str, **kw: object) -> None:
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name)
        old = old_names.get(flag)
        raw = env.get(_env_name(name))
        if raw is None and old is not None:
            raw = env.get(_env_name(_field(old)))
        if raw is not None:
            try:
                default = typ(raw)  # type: ignore[operator]
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{_env_name(name)}: expected {getattr(typ, '__name__', typ)}, "
                                  f"got {raw!r}") from e
        flags = (flag, old) if old is not None else (flag,)
        if old is not None:
            help_ += f" (formerly {old}, still accepted)"
        p.add_argument(*flags, dest=name, type=typ, default=default, help=help_, **kw)  # type: ignore[arg-type]

    add("--model-dir", Path, "exported model directory (model.json, encoder.onnx, decoder.onnx), served as a "
                             "one-model repository; not read when --model-repository is given")
    add("--model-repository", _opt_path, "model repository: DIR/<name>/<version>/ each one export, versions "
                                         "positive integers (serving/repository.py); empty = serve --model-dir")
    add("--model-control", str, "none: load the repository at start-up; poll: also rescan it every "
                                "--repository-poll-s (new versions verified, warmed, then routed to); explicit: "
                                "the repository extension (/v2/repository, RepositoryModelLoad/Unload) loads "
                                "and unloads", choices=MODEL_CONTROL_MODES)
    add("--repository-poll-s", float, "poll mode: seconds between rescans of the repository")
    add("--version-policy", str, "versions of each model served: latest:N, all, or specific:V[,V...]")
    add("--load-model", str, "explicit mode: models to load at start-up, comma-separated (* = all)")
    add("--host", str, "address to bind for gRPC and HTTP")
    add("--port", int, "gRPC port; 0 = any free port (see --ready-file)")
    add("--http-port", int, "HTTP port: the Open Inference Protocol REST API (/v2/...), its health "
                            "endpoints and Prometheus /metrics; 0 = any free port, -1 = off")
    add("--http-host", str, "address to bind the HTTP port (empty = the same as --host)")
    add("--http-tls", _bool, "serve HTTP over TLS with --tls-cert/--tls-key (and --tls-client-ca)",
        nargs="?", const=True)
    add("--http-read-timeout-s", float, "seconds an HTTP client gets to send a request's head, and again "
                                        "its body; slower connections are closed (408 for a body)")
    add("--providers", str, "ONNX Runtime providers: auto (CUDA if it really works, else CPU), cuda, cpu",
        choices=PROVIDER_CHOICES)
    add("--intra-op-threads", int, "ONNX Runtime intra-op threads per session (0 = ORT default)")
    add("--workers", int, "server processes on the same ports (SO_REUSEPORT), each with its own sessions and "
                          "batchers; 0 = one per available CPU. A connection stays on one worker: clients "
                          "spread load with several connections (see serving/workers.py)")
    add("--max-batch-size", int, "most rows in one ONNX Runtime run; larger requests are split")
    add("--preferred-batch-size", int, "a batch stops taking requests and stops waiting for more once it has "
        "this many rows (Triton's preferred_batch_size; 0 = 64 on the CPU, --max-batch-size on a GPU)")
    add("--max-queue-delay-us", int, "longest a queued row waits for a batch to fill once the runner is free")
    add("--max-queue-rows", int, "queued rows per model before RESOURCE_EXHAUSTED")
    add("--max-sample-count", int, "largest Sample count")
    add("--outlier-quantile", float, "Score: the calibration quantile above which an example is flagged an "
                                     "outlier (0.99 flags about 1% of data like the model's validation split); "
                                     "a request may ask for another")
    add("--max-score-k", int, "Score: most importance samples per example (k); k x rows decoder rows must also "
                              "fit in --max-queue-rows")
    add("--max-message-bytes", int, "largest gRPC message received or sent")
    add("--max-inflight-bytes", int, "budget of request and response bytes (times the copies each needs) "
                                     "held by RPCs at once; over it, RESOURCE_EXHAUSTED (0 = no limit)")
    add("--max-stream-inflight", int, "messages of one stream read but not yet answered; at this many the "
                                      "server stops reading that stream (HTTP/2 flow control holds the client)")
    add("--grace-period-s", float, "seconds in-flight requests get to finish on SIGTERM/SIGINT")
    add("--drain-delay-s", float, "on SIGTERM, seconds of serving on after health turns NOT_SERVING, before "
                                  "new RPCs are refused (load balancers stop sending meanwhile); SIGINT skips it")
    add("--max-connection-age-s", float, "close each client connection after this long (GOAWAY; its RPCs get "
                                         "--grace-period-s): spreads reconnects over replicas and ends calls a "
                                         "client left open without a message (0 = never)")
    add("--max-concurrent-rpcs", int, "RPCs handled at once, over all connections, before RESOURCE_EXHAUSTED "
                                      "(0 = no limit)")
    add("--grpc-frontend", str, "what serves the gRPC port: native (pygrpc-native: HTTP/2 in Rust, calls "
                                "reach Python in batches), grpcio (grpc.aio), or auto (native; grpcio with "
                                "--tls-cert, which native does not support yet)", choices=GRPC_FRONTENDS)
    add("--grpc-io-threads", int, "native front end: tokio threads doing the HTTP/2 and gRPC work")
    add("--tls-cert", _opt_path, "server certificate chain (PEM); enables TLS")
    add("--tls-key", _opt_path, "server private key (PEM)")
    add("--tls-client-ca", _opt_path, "CA bundle (PEM) for client certificates; enables mutual TLS")
    add("--log-level", str.upper, "logging level", choices=LOG_LEVELS)
    add("--ready-file", _opt_path, "write JSON {grpc_port, http_port, metrics_port, pid} here once SERVING "
                                   "(metrics_port: the HTTP port, under its old name)")
    return p


def write_ready_file(path: Path, grpc_port: int, http_port: int) -> None:
    """Atomically write the `--ready-file` JSON {grpc_port, http_port, metrics_port, pid}: a reader never
    sees half. `metrics_port` is the HTTP port (where /metrics is), for readers of the old layout."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "http_port": http_port, "metrics_port": http_port,
                               "pid": os.getpid()}))
    tmp.replace(path)
