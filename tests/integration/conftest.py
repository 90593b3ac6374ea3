"""Shared helpers for the integration tests: the server fixture, the export's manifest and ONNX Runtime
sessions (the reference outputs are compared against), the MNIST test set, runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from serving.manifest import Manifest, load_manifest
from tests.conftest import MNIST_DIR
from tests.integration._server import FRONTEND, ServerProcess, start_server
from training.trainer import TIMING_KEYS

# Tiny and fast: a few seconds of CPU per run on digits.
TINY_FLAGS = ["--data", "digits", "--hidden", "32", "--latent-dim", "4", "--lr", "3e-3", "--no-progress",
              "--log-level", "WARNING"]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics rows minus wall-clock fields (training.trainer.TIMING_KEYS), which legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# Both gRPC front ends (`--grpc-frontend`): every test of a module that uses `server` or names
# `grpc_frontend` (pytestmark usefixtures) runs once on each, the module's servers started with it.
FRONTENDS = ("native", "grpcio")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module may narrow the front ends with `GRPC_FRONTENDS = (...)` (what it tests does not go through
    the gRPC port), keeping `make test` within its time."""
    if "grpc_frontend" in metafunc.fixturenames:
        frontends = getattr(metafunc.module, "GRPC_FRONTENDS", FRONTENDS)
        metafunc.parametrize("grpc_frontend", frontends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def grpc_frontend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The gRPC front end this module's servers run (`start_server` adds `--grpc-frontend` for it)."""
    FRONTEND["value"] = request.param
    yield request.param
    FRONTEND["value"] = None


@pytest.fixture(scope="module")
def server(grpc_frontend: str, exported_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real server on the session's export, one per test module and front end; it must exit 0 when
    stopped."""
    s = start_server(exported_model_dir, tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def manifest(exported_model_dir: Path) -> Manifest:
    return load_manifest(exported_model_dir)


@pytest.fixture(scope="module")
def sessions(exported_model_dir: Path) -> dict[str, ort.InferenceSession]:
    """ONNX Runtime on the export's graphs, in the test process: what the server's answers must equal."""
    return {role: ort.InferenceSession(str(exported_model_dir / f"{role}.onnx"),
                                       providers=["CPUExecutionProvider"]) for role in ("encoder", "decoder")}


@pytest.fixture
def mnist_dir() -> Path:
    """The real MNIST test set beside the repo (../shared/data/mnist), or skip."""
    if not any((MNIST_DIR / f"t10k-images-idx3-ubyte{s}").is_file() for s in (".gz", "")):
        pytest.skip(f"the MNIST test set is not at {MNIST_DIR} (expected ../shared/data/mnist beside the repo)")
    return MNIST_DIR
