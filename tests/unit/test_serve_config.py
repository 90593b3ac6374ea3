"""ServeConfig: defaults, flags over VAE_SERVE_* env over defaults, validation naming the flag."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.config import ConfigError, ServeConfig, deprecated_settings


def test_the_parsers_defaults_are_the_dataclass_defaults() -> None:
    # The documented defaults (docs/ARCHITECTURE.md's flag table, README) are checked against ServeConfig
    # in tests/unit/test_docs.py; here the parser must not bring defaults of its own.
    assert ServeConfig.from_args([], env={}) == ServeConfig()


def test_environment_variables_set_defaults_and_flags_win_over_them() -> None:
    env = {"VAE_SERVE_PORT": "6000", "VAE_SERVE_MAX_BATCH_SIZE": "32", "VAE_SERVE_PROVIDERS": "cpu"}
    c = ServeConfig.from_args(["--port", "7000"], env=env)
    assert (c.port, c.max_batch_size, c.providers) == (7000, 32, "cpu")


def test_the_renamed_metrics_flags_and_variables_still_work_and_say_their_new_names() -> None:
    c = ServeConfig.from_args(["--metrics-port", "9100", "--metrics-host", "127.0.0.2"], env={})
    assert (c.http_port, c.http_host) == (9100, "127.0.0.2")
    assert ServeConfig.from_args([], env={"VAE_SERVE_METRICS_PORT": "9101"}).http_port == 9101
    assert ServeConfig.from_args([], env={"VAE_SERVE_METRICS_PORT": "9101", "VAE_SERVE_HTTP_PORT": "9102"}
                                 ).http_port == 9102
    notes = deprecated_settings(["--metrics-port=9100", "--metrics-tls"], {"VAE_SERVE_METRICS_HOST": "x"})
    assert len(notes) == 3 and notes[0].startswith("--metrics-port is now --http-port")
    assert "VAE_SERVE_METRICS_HOST is now VAE_SERVE_HTTP_HOST (used)" in notes[1]
    assert notes[2].startswith("--metrics-tls is now --http-tls")
    assert deprecated_settings(["--http-port", "1"], {}) == []


def test_a_malformed_environment_variable_is_reported_by_name() -> None:
    with pytest.raises(ConfigError, match="VAE_SERVE_PORT: expected int, got 'abc'"):
        ServeConfig.from_args([], env={"VAE_SERVE_PORT": "abc"})


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "max-batch-size: expected an integer >= 1"),
    ({"max_queue_rows": 8, "max_batch_size": 16}, "max-queue-rows: expected an integer >= max_batch_size"),
    ({"port": 70000}, "port: expected 0"),
    ({"http_port": -2}, "http-port: expected -1"),
    ({"http_read_timeout_s": 0.0}, "http-read-timeout-s: expected a number > 0"),
    ({"providers": "tpu"}, "providers: expected one of"),
    ({"max_queue_delay_us": -1}, "max-queue-delay-us: expected an integer >= 0"),
    ({"grace_period_s": -1.0}, "grace-period-s: expected a number >= 0"),
    ({"tls_cert": Path("/nonexistent.pem")}, "tls-key: expected --tls-cert and --tls-key given together"),
    ({"tls_client_ca": Path("/x.pem")}, "tls-client-ca: expected only with --tls-cert"),
])
def test_invalid_settings_are_refused_with_the_flag_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeConfig(**kwargs)  # type: ignore[arg-type]


def test_tls_files_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls-cert: expected a readable file"):
        ServeConfig(tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
