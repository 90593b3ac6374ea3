"""training.export: real ONNX files, the parity gate, the manifest, and atomic publication."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from serving.manifest import load_manifest, verify_model_dir
from tests.conftest import REPO, run_module
from training import export as export_mod
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.model import DecoderGraph, EncoderGraph


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("training.export", *args, timeout=300, check=False)


def _tree_digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_the_manifest_validates_and_records_checksums_parity_and_metrics(exported_model_dir: Path) -> None:
    m = verify_model_dir(exported_model_dir)
    assert sorted(p.name for p in exported_model_dir.iterdir()) == ["decoder.onnx", "encoder.onnx", "model.json"]
    assert m.example_shape == (64,) and m.likelihood == "bernoulli"
    assert m.graphs["encoder"].output_names() == ["mu", "var", "logvar"]
    assert m.graphs["decoder"].output_names() == ["x_mean", "logits"]
    parity = m.raw["parity"]
    assert parity["passed"] and parity["real_examples"]
    assert max(parity["gated"].values()) <= 1e-5
    assert parity["scaled_outputs"] == ["logits"]  # every other output is gated on the absolute difference
    for key in ("encoder.mu", "encoder.var", "encoder.logvar", "decoder.x_mean"):
        assert parity["gated"][key] == parity["max_abs_diff"][key] <= 1e-5
    assert 1 in parity["batch_sizes"] and 7 in parity["batch_sizes"] and 128 in parity["batch_sizes"]
    assert max(parity["batch_sizes"]) > m.raw["training"]["config"]["batch_size"]
    metrics = m.raw["training"]["metrics"]
    assert "best_val_neg_elbo" in metrics and "iwae_log_likelihood" in metrics["test"]
    assert m.raw["versions"]["torch"].startswith("2.") and m.opset == 18
    assert len(m.version) == 16


@pytest.mark.parametrize("batch", [1, 3, 128, 1000])
def test_onnx_runtime_reproduces_pytorch_at_batch_sizes_never_seen_at_export(
        exported_model_dir: Path, trained_run_dir: Path, batch: int) -> None:
    model = model_from_checkpoint(load_checkpoint(trained_run_dir / "best.pt"))
    enc = ort.InferenceSession(str(exported_model_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(exported_model_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch)
    x = rng.random((batch, 64), dtype=np.float32)
    z = rng.standard_normal((batch, model.config.latent_dim), dtype=np.float32)
    with torch.no_grad():
        want_enc = [t.numpy() for t in EncoderGraph(model)(torch.from_numpy(x))]
        want_dec = [t.numpy() for t in DecoderGraph(model)(torch.from_numpy(z))]
    got_enc = enc.run(["mu", "var", "logvar"], {"x": x})
    got_dec = dec.run(["x_mean", "logits"], {"z": z})
    for got, want in zip([*got_enc, *got_dec], [*want_enc, *want_dec]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_enc[1], np.exp(got_enc[2]), rtol=1e-6)


def test_an_export_that_fails_midway_leaves_the_previous_export_intact(
        exported_model_dir: Path, trained_run_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "exported"
    shutil.copytree(exported_model_dir, out)
    before = _tree_digest(out)
    real_export_graph = export_mod._export_graph
    calls: list[str] = []

    def fail_after_first_file(module, example, input_name, output_names, path, opset):  # type: ignore[no-untyped-def]
        if calls:
            raise RuntimeError("simulated crash after the first file")
        calls.append(input_name)
        real_export_graph(module, example, input_name, output_names, path, opset)

    monkeypatch.setattr(export_mod, "_export_graph", fail_after_first_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_mod.export(export_mod.ExportConfig(run=trained_run_dir, out=out))
    assert calls == ["x"]
    assert _tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no staging directory left behind


def test_a_failed_parity_gate_publishes_nothing(trained_run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    proc = _export("--run", str(trained_run_dir), "--out", str(out), "--tolerance", "1e-12")
    assert proc.returncode == 1, proc.stderr
    assert "parity gate, nothing published" in proc.stderr and "max |ORT - PyTorch| above 1e-12" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    proc = _export("--run", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"--run {tmp_path / 'nope'}: no such run directory" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_missing_or_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    proc = _export("--run", str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "best.pt: checkpoint not found" in proc.stderr
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    proc = _export("--run", str(run), "--checkpoint", "last", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "checkpoint.pt: unreadable or corrupt checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(trained_run_dir: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained_run_dir / "best.pt")
    state["config"] = dict(state["config"], latent_dim=state["config"]["latent_dim"] + 1)
    run = tmp_path / "run"
    save_checkpoint(run / "best.pt", state)
    proc = _export("--run", str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "weights do not fit the model its config describes" in proc.stderr


def test_an_unwritable_output_directory_is_a_clear_error(trained_run_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = _export("--run", str(trained_run_dir), "--out", str(blocker / "exported"))
    assert proc.returncode == 2
    assert f"--out {blocker / 'exported'}: cannot write beside it" in proc.stderr


def test_reexport_replaces_the_previous_export_in_one_step(trained_run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    proc = _export("--run", str(trained_run_dir), "--checkpoint", "last", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "model.json").read_text())["training"]["checkpoint"] == "checkpoint.pt"
    assert load_manifest(out).name == "vae-digits"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def test_exported_files_hold_no_path_of_this_checkout(exported_model_dir: Path) -> None:
    # The version is derived from the bytes: a path baked in would make it differ between machines.
    for name in ("encoder.onnx", "decoder.onnx"):
        assert str(REPO).encode() not in (exported_model_dir / name).read_bytes(), name


def test_an_export_removes_the_staging_directories_of_killed_exports_but_not_of_running_ones(
        trained_run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs: the export that used it was killed
    killed = [tmp_path / f".exported.staging-{dead.pid}-abc123", tmp_path / ".exported.staging-k1x2y3z"]
    running = tmp_path / f".exported.staging-{os.getpid()}-def456"  # this process is alive: a concurrent export
    other = tmp_path / f".other.staging-{dead.pid}-ghi789"  # beside another output: not ours to clean
    for d in (*killed, running, other):
        d.mkdir()
        (d / "encoder.onnx").write_bytes(b"half-written")
    old = time.time() - 2 * 3600  # a staging directory without a pid (older exports) is judged by its age
    os.utime(killed[1], (old, old))
    proc = _export("--run", str(trained_run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["exported", running.name, other.name])


def test_export_into_a_repository_publishes_the_next_version_and_a_polling_server_serves_it(
        exported_model_dir: Path, trained_run_dir: Path, tmp_path: Path) -> None:
    from tests.integration._server import start_server

    repo = tmp_path / "repo"
    shutil.copytree(exported_model_dir, repo / "digits" / "1")
    server = start_server(repo, tmp_path, "--model-repository", str(repo), "--model-control", "poll",
                          "--repository-poll-s", "0.1")
    try:
        proc = _export("--run", str(trained_run_dir), "--repository", str(repo), "--name", "digits")
        assert proc.returncode == 0, proc.stderr
        assert "published digits version 2 (manifest version " in proc.stdout and str(repo / "digits" / "2") in proc.stdout
        assert sorted(p.name for p in (repo / "digits").iterdir()) == ["1", "2"]  # no staging directory left
        assert verify_model_dir(repo / "digits" / "2").name == "digits"
        deadline = time.monotonic() + 30
        while server.metrics().get(("vae_model_unloads_total", (("name", "digits"),)), 0.0) < 1:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        assert "model digits version 2: routed to" in server.log()
    finally:
        assert server.stop() == 0, server.log()
    no_name = _export("--run", str(trained_run_dir), "--repository", str(repo))
    assert no_name.returncode == 2 and "--name is required with --repository" in no_name.stderr
