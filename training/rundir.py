"""The run directory: the one place that knows its file names, how to load its checkpoints and how
its summary is merged. `training.fit` writes it (rank 0 only); `training.evaluate` and `training.export`
read it.

    RUN_DIR/
      config.json        the resolved TrainConfig
      checkpoint.pt      the last epoch's checkpoint (training/checkpoint.py)
      best.pt            the checkpoint with the lowest validation -ELBO
      metrics.jsonl      one JSON row per epoch (a torn last row, from a kill mid-write, is skipped)
      summary.json       fit's summary, plus a "test" block from training.evaluate (docs/ARCHITECTURE.md)
      samples.png, reconstructions.png, curves.png, interpolation.png   (training/figures.py)
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    model_from_checkpoint,
    write_json,
)
from training.config import TrainConfig
from training.model import VAE

logger = logging.getLogger(__name__)

CHECKPOINT_FILES: dict[str, str] = {"best": "best.pt", "last": "checkpoint.pt"}
FIGURES: tuple[str, ...] = ("samples.png", "reconstructions.png", "curves.png", "interpolation.png")
CONFIG, METRICS, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
FILES: tuple[str, ...] = (CONFIG, *CHECKPOINT_FILES.values(), METRICS, SUMMARY, *FIGURES)


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint with the model it describes (eval mode, CPU)."""

    path: Path
    state: dict[str, Any]
    model: VAE

    @property
    def config(self) -> TrainConfig:
        return self.model.config


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def file(self, name: str) -> Path:
        return self.path / name

    def checkpoint(self, which: str = "last") -> Path:
        """`which`: "best" (best.pt) or "last" (checkpoint.pt)."""
        if which not in CHECKPOINT_FILES:
            raise ValueError(f"checkpoint: expected one of {sorted(CHECKPOINT_FILES)}, got {which!r}")
        return self.path / CHECKPOINT_FILES[which]

    def has_run(self) -> bool:
        return self.checkpoint("last").exists()

    def load(self, which: str = "best") -> LoadedCheckpoint:
        """Load and verify a checkpoint and rebuild its model; CheckpointError names the file at fault."""
        path = self.checkpoint(which)
        state = load_checkpoint(path)
        return LoadedCheckpoint(path=path, state=state, model=model_from_checkpoint(state, path))

    # -- metrics.jsonl ---------------------------------------------------------------------------

    def read_metrics(self, upto_epoch: int | None = None) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (up to `upto_epoch`: a crash may have left a later row).

        A last line that is not valid JSON was cut off by a kill during its write: it is skipped with a
        warning. An unreadable line before the last is corruption and raises CheckpointError.
        """
        path = self.path / METRICS
        if not path.is_file():
            return []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        rows: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise CheckpointError(f"{path}: line {i + 1} is not JSON ({e})") from e
                logger.warning("%s: skipping a last line cut off mid-write (%d characters)", path, len(line))
        return [r for r in rows if upto_epoch is None or r["epoch"] <= upto_epoch]

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with `rows` (atomically)."""
        payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write_bytes(self.path / METRICS, lambda f: f.write(payload))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / METRICS).open("a") as f:
            f.write(json.dumps(row) + "\n")

    # -- config.json, summary.json -------------------------------------------------------------------

    def write_config(self, config: TrainConfig) -> None:
        write_json(self.path / CONFIG, config.to_dict())

    def read_summary(self) -> dict[str, Any]:
        path = self.path / SUMMARY
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def update_summary(self, blocks: dict[str, Any]) -> dict[str, Any]:
        """Merge top-level keys into summary.json (atomically) and return the result.

        The one merge rule: a new training summary whose `best_epoch` differs from the file's drops the
        file's "test" block, which described another model; every other key is replaced or kept.
        """
        summary = self.read_summary()
        if "best_epoch" in blocks and summary.get("best_epoch") != blocks["best_epoch"]:
            summary.pop("test", None)
        summary.update(blocks)
        write_json(self.path / SUMMARY, summary)
        return summary
