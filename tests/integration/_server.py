"""Start the real server (`python -m serving`) on port 0 in a subprocess, and read its metrics.

A subprocess keeps the server's protobuf descriptors (package `inference`) away from tritonclient's,
which the OIP tests load into the test process, and lets tests send it real signals. The process
helper is `loadgen.process.LocalServer`, shared with `make bench`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from loadgen.process import LocalServer, ServerStartError, serving_cmd
from tests.conftest import REPO

ServerProcess = LocalServer

__all__ = ["FRONTEND", "REPO", "ServerProcess", "serving_cmd", "start_failure", "start_server"]


# The gRPC front end the servers of the running test module use (`--grpc-frontend`), set by the
# `grpc_frontend` fixture (tests/integration/conftest.py) for modules that run on both; None: the default.
FRONTEND: dict[str, str | None] = {"value": None}


def _frontend_flags() -> list[str]:
    value = FRONTEND["value"]
    return [] if value is None else ["--grpc-frontend", value]


def start_server(model_dir: Path, workdir: Path, *flags: str, timeout: float = 60) -> LocalServer:
    """Start `python -m serving` on port 0 and wait for its ready file; fail the test with its log. The
    module's front end (`FRONTEND`) comes first, so a test's own `--grpc-frontend` wins."""
    try:
        return LocalServer.start(serving_cmd(model_dir, *_frontend_flags(), *flags), workdir, timeout_s=timeout,
                                 cwd=REPO)
    except ServerStartError as e:
        pytest.fail(str(e))


def start_failure(model_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`python -m serving` expected to refuse to start: its exit status and output, for the test to check."""
    return subprocess.run([*serving_cmd(model_dir, "--http-port", "-1", *_frontend_flags()), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
