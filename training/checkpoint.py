"""Checkpoints: atomic save, checksummed and validated load, and rebuilding the model a checkpoint describes.

A checkpoint file is a header line, a checksum line and a `torch.save` payload:

    vae-serve checkpoint\n
    sha256:<64 hex digits of the payload>\n
    <payload>

`load_checkpoint` verifies the checksum before unpickling anything, so one flipped byte anywhere (a
weight, an optimiser moment, the header) is an error instead of a silently different model. The
payload is one dict (format 2; format 1 was the bare payload, without the checksum):

    format_version      1
    config              TrainConfig.to_dict(): how the model was made
    example_shape       [int, ...]: one example without the batch dimension
    normalization       {"kind", "offset", "scale"}: raw data -> model space, as in the manifest
    model               the VAE's state_dict
    optimizer           the optimiser's state_dict
    epoch               epochs completed
    rng                 RNG states needed to resume bit-for-bit
    best_val_neg_elbo   best validation -ELBO so far (float, inf before the first epoch)
    ...                 any further keys the trainer needs to resume (kept as they are)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from training.config import ConfigError, TrainConfig
from training.model import VAE

FORMAT_VERSION = 2
MAGIC = b"vae-serve checkpoint\n"
_SHA_PREFIX = b"sha256:"
_HEADER_LEN = len(MAGIC) + len(_SHA_PREFIX) + 64 + 1
REQUIRED_KEYS: tuple[str, ...] = ("format_version", "config", "example_shape", "normalization", "model")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or incompatible with this code."""


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(fileobj)` on a temporary file beside `path`, fsync it, then rename it into place.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON (with a final newline) atomically."""
    atomic_write_bytes(Path(path), lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def serialize_checkpoint(state: dict[str, Any]) -> bytes:
    """The payload of a checkpoint: a snapshot, so the caller may go on changing the tensors."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    assert not missing, f"checkpoint state lacks {missing}"
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def write_checkpoint_payload(payload: bytes, paths: list[Path]) -> None:
    """Write a serialised checkpoint to every path in `paths`, each atomically; the data is written and
    fsynced once, the other paths are hard links to it (a later rename over one leaves the others)."""
    header = MAGIC + _SHA_PREFIX + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    first, *others = (Path(p) for p in paths)
    atomic_write_bytes(first, lambda f: (f.write(header), f.write(payload)))
    for other in others:
        tmp = other.with_name(f".{other.name}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(first, tmp)
            os.replace(tmp, other)
        except OSError:  # no hard links on this filesystem: a second copy
            tmp.unlink(missing_ok=True)
            atomic_write_bytes(other, lambda f: (f.write(header), f.write(payload)))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (temporary file + fsync + rename), with its checksum header."""
    write_checkpoint_payload(serialize_checkpoint(state), [Path(path)])


class CheckpointWriter:
    """Writes checkpoints on one background thread, so the file I/O (checksum, write, fsync: tens of
    milliseconds for a few MB) overlaps the next epoch's training instead of adding to it.

    `submit` snapshots the state at once (serialises it) and waits for the previous write first, so at
    most one write is in flight and files land in order; `wait` blocks until the last one is on disk and
    re-raises its error.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[None] | None = None

    def submit(self, state: dict[str, Any], paths: list[Path]) -> None:
        payload = serialize_checkpoint(state)
        self.wait()
        self._pending = self._pool.submit(write_checkpoint_payload, payload, paths)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; raise CheckpointError with a message naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    header, payload = data[:_HEADER_LEN], memoryview(data)[_HEADER_LEN:]
    if not header.startswith(MAGIC):
        hint = (" (a zip: a format-1 checkpoint from an older version, which carries no checksum)"
                if data[:2] == b"PK" else "")
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint (no vae-serve checkpoint header{hint})")
    want = header[len(MAGIC):].removeprefix(_SHA_PREFIX).rstrip(b"\n").decode("ascii", "replace")
    got = hashlib.sha256(payload).hexdigest()
    if got != want:
        raise CheckpointError(f"{path}: corrupt checkpoint: checksum mismatch (payload sha256 {got[:16]}..., "
                              f"header says {want[:16]}...)")
    try:
        # weights_only=False: the checkpoint holds RNG states and plain dicts, all written by us (and the
        # checksum above says these are the bytes we wrote).
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: unreadable or corrupt checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(state).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a vae-serve checkpoint (missing keys {missing})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version: expected {FORMAT_VERSION}, got {state['format_version']!r}")
    return state


def config_from_checkpoint(state: dict[str, Any], path: Path | str = "checkpoint") -> TrainConfig:
    try:
        return TrainConfig.from_dict(dict(state["config"]))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: config incompatible with this version ({e})") from e


def model_from_checkpoint(state: dict[str, Any], path: Path | str = "checkpoint") -> VAE:
    """Rebuild the VAE a checkpoint describes and load its weights, in eval mode, on CPU."""
    config = config_from_checkpoint(state, path)
    try:
        model = VAE(config, tuple(state["example_shape"]))
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build the model its config describes ({e})") from e
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:3]
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                              f"{' '.join(first)}") from e
    return model.eval()
