"""training.rundir.RunDir: metrics.jsonl reading and the one summary.json merge rule (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.checkpoint import CheckpointError
from training.rundir import RunDir


def test_a_torn_last_metrics_line_is_skipped_and_a_torn_middle_line_is_an_error(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.write_metrics([{"epoch": 1}, {"epoch": 2}])
    run.append_metrics({"epoch": 3})
    assert [r["epoch"] for r in run.read_metrics(upto_epoch=2)] == [1, 2]
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 4, "val_ne')  # killed mid-write
    assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: line 2 is not JSON"):
        run.read_metrics()


def test_the_summary_keeps_a_test_block_only_while_it_describes_the_same_best_model(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.update_summary({"best_epoch": 3, "epochs_completed": 5})
    run.update_summary({"test": {"neg_elbo": 30.0}})
    assert run.update_summary({"best_epoch": 3, "epochs_completed": 6})["test"] == {"neg_elbo": 30.0}
    after = run.update_summary({"best_epoch": 7, "epochs_completed": 8})
    assert "test" not in after and json.loads((tmp_path / "summary.json").read_text()) == after


def test_only_best_and_last_name_a_checkpoint(tmp_path: Path) -> None:
    assert RunDir(tmp_path).checkpoint("best").name == "best.pt"
    assert RunDir(tmp_path).checkpoint("last").name == "checkpoint.pt"
    with pytest.raises(ValueError, match=r"checkpoint: expected one of \['best', 'last'\], got 'first'"):
        RunDir(tmp_path).checkpoint("first")
