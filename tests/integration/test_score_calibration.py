"""Exports and their calibration at the server: one from before issue 27 (no `calibration` in model.json)
still serves and Score says "no calibration"; a malformed calibration stops the server at start-up with an
error naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.client import VaeClient
from serving.manifest import Manifest
from serving.scoring import NLL_KIND
from tests.helpers import x_batch
from tests.integration._server import start_failure, start_server

pytestmark = pytest.mark.usefixtures("grpc_frontend")
# The default front end only: what is tested is the manifest and the detector, the same on both.
GRPC_FRONTENDS = ("native",)


def _copy_with(exported_model_dir: Path, tmp_path: Path, calibration: object) -> Path:
    out = tmp_path / "exported"
    shutil.copytree(exported_model_dir, out)
    raw = json.loads((out / "model.json").read_text())
    if calibration is None:
        del raw["calibration"]
    else:
        raw["calibration"] = calibration
    (out / "model.json").write_text(json.dumps(raw))  # checksums cover the graphs, not the manifest itself
    return out


def test_an_export_without_calibration_serves_scores_without_percentiles(exported_model_dir: Path, tmp_path: Path,
                                                                         manifest: Manifest) -> None:
    server = start_server(_copy_with(exported_model_dir, tmp_path, None), tmp_path / "server")
    try:
        with VaeClient(server.target) as client:
            r = client.score(x_batch(manifest, 3), seed=5)
            assert r.kind == NLL_KIND and r.percentile is None and r.is_outlier is None
            assert np.isnan(r.threshold) and r.calibration.startswith("no calibration: this export has none")
            np.testing.assert_array_equal(r.score, r.nll)
            with pytest.raises(grpc.RpcError) as e:
                client.score(x_batch(manifest, 3), kind="feature-z")
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "needs the calibration this export lacks" in e.value.details()
    finally:
        assert server.stop() == 0, server.log()


def test_a_malformed_calibration_is_refused_at_start_up(exported_model_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((exported_model_dir / "model.json").read_text())["calibration"]
    raw["quantiles"]["feature-z"] = raw["quantiles"]["feature-z"][::-1]
    proc = start_failure(_copy_with(exported_model_dir, tmp_path, raw))
    assert proc.returncode != 0
    assert "calibration.quantiles.feature-z: expected non-decreasing numbers" in proc.stderr + proc.stdout
