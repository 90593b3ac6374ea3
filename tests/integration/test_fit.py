"""python -m training.fit end to end: digits, the MNIST test set, SIGKILL + --resume, evaluate."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, flip_byte, python_env, python_module_cmd, run_module
from tests.helpers import read_metrics, wait_until
from tests.integration.conftest import TINY_FLAGS, without_timing
from training import evaluate, fit
from training.checkpoint import CheckpointError, load_checkpoint

RUN_FILES = ("config.json", "checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json", "samples.png",
             "reconstructions.png", "curves.png", "interpolation.png")


def test_fit_on_digits_lowers_validation_neg_elbo_and_writes_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--epochs", "5", "--batch-size", "64", "--out", str(run)]) == 0
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["val_neg_elbo"] < rows[0]["val_neg_elbo"]
    for key in ("train_neg_elbo", "train_recon_nll", "train_kl", "val_neg_elbo", "val_recon_nll", "val_kl",
                "val_kl_per_dim", "val_active_units", "lr", "examples_per_s", "seconds"):
        assert key in rows[0], key
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 5
    assert summary["best_val_neg_elbo"] == min(r["val_neg_elbo"] for r in rows)
    state = load_checkpoint(run / "best.pt")
    assert state["epoch"] == summary["best_epoch"]
    assert state["normalization"] == {"kind": "scale", "offset": 0.0, "scale": 16.0}
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [32]
    assert config["matmul_precision"] == "highest"  # "auto" recorded as what it chose: too small for bfloat16
    assert torch.get_float32_matmul_precision() == "highest"  # set around the steps only

    # evaluate merges a "test" block into summary.json
    assert evaluate.main(["--run", str(run), "--k", "20", "--log-level", "WARNING"]) == 0
    test = json.loads((run / "summary.json").read_text())["test"]
    for key in ("neg_elbo", "iwae_log_likelihood", "iwae_k", "active_units", "kl_per_dim", "recon_log_lik", "kl"):
        assert key in test, key
    assert test["iwae_k"] == 20 and len(test["kl_per_dim"]) == 4
    # the IWAE bound is at least as tight as the ELBO (up to Monte-Carlo noise)
    assert test["iwae_log_likelihood"] > -test["neg_elbo"] - 1.0


def test_early_stopping_and_refusing_to_overwrite_a_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--epochs", "40", "--patience", "1", "--lr", "0.3", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs_completed"] < 40
    assert fit.main([*TINY_FLAGS, "--epochs", "2", "--out", str(run)]) == 2  # already holds a run
    assert fit.main([*TINY_FLAGS, "--resume", "--lr", "0.1", "--out", str(run)]) == 2  # lr differs


def test_fit_on_the_mnist_test_set(tmp_path: Path, mnist_dir: Path) -> None:
    run = tmp_path / "mnist"
    assert fit.main(["--data", f"mnist:{mnist_dir}", "--hidden", "128", "--latent-dim", "8", "--epochs", "3",
                     "--batch-size", "128", "--no-progress", "--log-level", "WARNING", "--out", str(run)]) == 0
    rows = read_metrics(run)
    assert rows[-1]["val_neg_elbo"] < rows[0]["val_neg_elbo"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["example_shape"] == [784]
    assert (summary["data"]["train"], summary["data"]["val"], summary["data"]["test"]) == (8000, 1000, 1000)
    assert evaluate.main(["--run", str(run), "--k", "5", "--log-level", "WARNING"]) == 0


def _wait_and_kill_mid_epoch(proc: subprocess.Popen[str], run: Path, after_epochs: int) -> None:
    """SIGKILL `proc` about half-way through epoch after_epochs + 1 (timed from the epochs so far)."""
    def progressed() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before it could be killed")
        return (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= after_epochs

    wait_until(progressed, 120, f"{after_epochs} epoch(s) in metrics.jsonl", interval=0.01)
    epoch_s = read_metrics(run)[-1]["seconds"]
    time.sleep(epoch_s / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["highest", "medium"])  # medium: bfloat16 products where AMX has them
def test_a_run_killed_mid_epoch_and_resumed_ends_with_identical_metrics(tmp_path: Path, precision: str) -> None:
    flags = [*TINY_FLAGS, "--epochs", "5", "--batch-size", "4", "--binarize", "--kl-warmup-epochs", "2",
             "--free-bits", "0.05", "--matmul-precision", precision]
    ref = tmp_path / "uninterrupted"
    run_module("training.fit", *flags, "--out", str(ref))

    run = tmp_path / "killed"
    with (tmp_path / "killed.log").open("w") as log, subprocess.Popen(
            python_module_cmd("training.fit", *flags, "--out", str(run)), cwd=REPO, env=python_env(),
            text=True, stdout=log, stderr=subprocess.STDOUT) as proc:
        _wait_and_kill_mid_epoch(proc, run, after_epochs=2)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] < 5
    assert not (run / "summary.json").exists()

    run_module("training.fit", *flags, "--resume", "--out", str(run))
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(ref))
    a, b = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(ref / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    sa = json.loads((run / "summary.json").read_text())
    sb = json.loads((ref / "summary.json").read_text())
    assert (sa["best_epoch"], sa["best_val_neg_elbo"], sa["final"]) == (sb["best_epoch"], sb["best_val_neg_elbo"],
                                                                        sb["final"])


def test_resume_survives_a_metrics_file_whose_last_line_was_cut_off(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--epochs", "2", "--out", str(run)]) == 0
    rows = read_metrics(run)
    with (run / "metrics.jsonl").open("a") as f:  # a kill during the write of epoch 3's row
        f.write(json.dumps(dict(rows[-1], epoch=3))[:40])
    assert fit.main([*TINY_FLAGS, "--epochs", "3", "--resume", "--out", str(run)]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_a_checkpoint_with_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    size = (run / "checkpoint.pt").stat().st_size
    for offset in (size // 2, (3 * size) // 4, -200):  # tensor data (weights, optimiser state) and the tail
        copy = tmp_path / f"flipped{offset}.pt"
        copy.write_bytes((run / "checkpoint.pt").read_bytes())
        flip_byte(copy, offset)
        with pytest.raises(CheckpointError, match=r"flipped.*\.pt: .*(checksum|corrupt)"):
            load_checkpoint(copy)
    assert fit.main([*TINY_FLAGS, "--epochs", "2", "--resume", "--out", str(run)]) == 0  # the intact one loads


def test_a_time_budget_stops_training_on_time_and_the_run_finishes_normally(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--time-budget-s", "3", "--out", str(run)]) == 0  # no --epochs: no epoch limit
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "time_budget" and summary["time_budget_s"] == 3.0
    config = json.loads((run / "config.json").read_text())
    assert (config["time_budget_s"], config["epochs"]) == (3.0, 0)
    assert abs(summary["train_seconds"] - 3.0) <= 0.05 * 3.0, summary["train_seconds"]
    rows = read_metrics(run)
    assert not any(r["partial"] for r in rows[:-1])  # only the last epoch may be cut short
    for name in RUN_FILES:
        assert (run / name).is_file(), name


def test_the_iwae_objective_trains(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit.main([*TINY_FLAGS, "--epochs", "3", "--objective", "iwae", "--iwae-k", "4", "--out", str(run)]) == 0
    rows = read_metrics(run)
    assert rows[-1]["val_neg_elbo"] < rows[0]["val_neg_elbo"]
    assert json.loads((run / "config.json").read_text())["objective"] == "iwae"
