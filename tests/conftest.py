"""Shared fixtures: a real trained run and a real export, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


def python_env() -> dict[str, str]:
    """The environment for a child `python`: this repo importable, one OpenMP thread unless set."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def python_module_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def run_module(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m ARGS` from the repo root. With `check` (the default), fail the test with its output
    if it exits non-zero; without, the caller checks the exit status."""
    proc = subprocess.run(python_module_cmd(*args), cwd=REPO, env=python_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                    f"--- stderr\n{proc.stderr}")
    return proc


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Invert every bit of one byte of `path` in place (the middle byte unless `offset` says); returns
    the offset flipped. Negative offsets count from the end."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset % len(data)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return at


@pytest.fixture(scope="session")
def trained_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small VAE trained on digits for a few epochs with `python -m training.fit`, then evaluated."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    run_module("training.fit", "--data", "digits", "--epochs", "4", "--seed", "0", "--out", str(run))
    run_module("training.evaluate", "--run", str(run), "--k", "50")
    return run


# A pytest run in a child process (tests/integration/test_oip.py) reuses its parent's export via this variable.
EXPORTED_DIR_ENV = "VAE_TEST_EXPORTED_DIR"


@pytest.fixture(scope="session")
def exported_model_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """`trained_run_dir` exported with `python -m training.export` (the real export, parity gate included)."""
    if os.environ.get(EXPORTED_DIR_ENV):
        return Path(os.environ[EXPORTED_DIR_ENV])
    trained_run_dir: Path = request.getfixturevalue("trained_run_dir")
    out = tmp_path_factory.mktemp("export") / "exported"
    run_module("training.export", "--run", str(trained_run_dir), "--out", str(out))
    return out
