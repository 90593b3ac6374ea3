"""training.checkpoint: the checksummed format and the background writer (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import flip_byte
from training.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint, save_checkpoint


def _state(value: float) -> dict[str, object]:
    return {"format_version": 2, "config": {}, "example_shape": [3], "normalization": {},
            "model": {"w": torch.full((1000,), value)}}


def test_the_writer_puts_the_same_bytes_under_both_names_and_a_later_write_leaves_best_alone(tmp_path: Path) -> None:
    last, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"
    writer = CheckpointWriter()
    state = _state(1.0)
    writer.submit(state, [last, best])
    state["model"]["w"].fill_(9.0)  # type: ignore[index]  # the snapshot was taken at submit
    writer.submit(_state(2.0), [last])
    writer.close()
    assert float(load_checkpoint(best)["model"]["w"][0]) == 1.0
    assert float(load_checkpoint(last)["model"]["w"][0]) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint.pt"]


def test_a_flipped_header_byte_and_a_format_1_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, _state(1.0))
    flip_byte(path, 30)  # inside the sha256 line
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    torch.save(_state(1.0), path)  # what the previous version wrote: a bare zip, no checksum
    with pytest.raises(CheckpointError, match="format-1 checkpoint from an older version"):
        load_checkpoint(path)
