"""Atomic publication of an export: a staging directory beside `--out`, swapped into place in one step.

The export writes into `.<out>.staging-<pid>-<random>` (`stage_dir`), and `publish` swaps it with the
previous export (renameat2 RENAME_EXCHANGE on Linux; two renames elsewhere), so a failed or interrupted
export leaves the previous one as it was. Into a model repository (`publish_version`) the staging
directory is `<repository>/<name>/.version.staging-...` (hidden: never read as a version) and is renamed to
the next version number, never over an existing version. `stage_dir` first removes the staging directories that killed
exports left behind (never one whose process still runs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class ExportError(Exception):
    """Bad input to the export: the message names the run, file or directory at fault."""


def _exchange_dirs(new: Path, old: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = libc.renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(old), rename_exchange)
    if rc != 0:
        err = ctypes.get_errno()
        logger.debug("renameat2 failed: %s", os.strerror(err))
        return False
    return True


def publish(staging: Path, out: Path) -> None:
    """Move the staged export to `out`, replacing any previous export in one step where possible."""
    if not out.exists():
        os.rename(staging, out)
        return
    if not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if _exchange_dirs(staging, out):
        shutil.rmtree(staging)  # now holds the previous export
        return
    backup = out.with_name(f".{out.name}.previous")
    shutil.rmtree(backup, ignore_errors=True)
    os.rename(out, backup)
    os.rename(staging, out)
    shutil.rmtree(backup)


def publish_version(staging: Path, model_dir: Path) -> int:
    """Move the staged export into a model repository as `model_dir`'s next version (one more than the
    highest there); returns that version. A rename onto an existing version directory fails rather than
    replace it, so two exports at once get two versions."""
    from serving.layout import next_version  # (serving.layout imports nothing heavy)

    for _ in range(100):
        version = next_version(model_dir)
        try:
            os.rename(staging, model_dir / str(version))
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # another export took this version first
                continue
            raise ExportError(f"--repository: cannot publish into {model_dir} ({e.strerror or e})") from e
        return version
    raise ExportError(f"--repository: {model_dir} kept changing; no version could be published")


# A staging directory without a pid in its name (older versions) is stale once this old.
STALE_STAGING_AGE_S = 3600.0


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Delete the staging directories that killed exports left beside `out`; returns those removed.

    A staging directory is named `.<out>.staging-<pid>-<random>`: it is stale when that pid no longer runs
    (a concurrent export's directory is kept). One without a pid is stale after STALE_STAGING_AGE_S.
    """
    parent = out.resolve().parent
    prefix = _staging_prefix(out)
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return removed
    for p in candidates:
        pid_text = p.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit():
            stale = int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > STALE_STAGING_AGE_S
            except OSError:
                continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            logger.info("removed %s, left by an export that was killed", p)
    return removed


def stage_dir(out: Path) -> Path:
    """A new, empty staging directory beside `out` (stale ones removed first); ExportError if it cannot be."""
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write beside it in {parent} ({e.strerror or e})") from e
