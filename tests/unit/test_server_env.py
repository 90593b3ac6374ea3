"""deploy/server_env.py: the deploy files' VAE_SERVE_* settings are ServeConfig's defaults plus listed overrides."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from serving.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))
import server_env

sys.path.pop(0)


def test_the_committed_server_env_files_and_dockerfile_env_match_the_generator() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "deploy" / "server_env.py"), "--check"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_every_serveconfig_field_with_a_default_is_in_the_base_configmap() -> None:
    d = ServeConfig()
    want = {f"VAE_SERVE_{f.name.upper()}" for f in dataclasses.fields(ServeConfig) if getattr(d, f.name) is not None}
    lines = [ln for ln in server_env.ENV_FILES["base"].read_text().splitlines() if ln and not ln.startswith("#")]
    assert {ln.split("=", 1)[0] for ln in lines} == want


def test_the_base_configmap_parses_back_to_the_defaults_except_the_listed_overrides() -> None:
    lines = [ln for ln in server_env.ENV_FILES["base"].read_text().splitlines() if ln and not ln.startswith("#")]
    config = ServeConfig.from_args([], env=dict(ln.split("=", 1) for ln in lines))
    differs = {f.name for f in dataclasses.fields(ServeConfig) if getattr(config, f.name) != getattr(ServeConfig(), f.name)}
    assert differs <= set(server_env.OVERRIDES["base"])


def test_a_dockerfile_env_line_that_drifts_from_the_defaults_is_reported() -> None:
    text = server_env.DOCKERFILE.read_text().replace("VAE_SERVE_PORT=50051", "VAE_SERVE_PORT=50052", 1)
    (error,) = server_env.check(dockerfile_text=text)
    assert "target gpu" in error and "50052" in error
