"""Runs tests/integration/oip_tritonclient.py (tritonclient against our server) in a pytest process of its own.

tritonclient and the server's generated Open Inference Protocol code both define the protobuf package
`inference`; one process's descriptor pool cannot hold both, and the rest of this suite imports the
server's. The child pytest reuses this session's export, and its full report is shown on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXPORTED_DIR_ENV, REPO


@pytest.mark.slow
def test_tritonclient_unmodified_passes_every_open_inference_protocol_check(
        exported_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, EXPORTED_DIR_ENV: str(exported_model_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
         "tests/integration/oip_tritonclient.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{summary}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, proc.stdout
