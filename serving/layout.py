"""The model repository on disk, and how its models are named: no ONNX Runtime, no server.

    REPOSITORY/                      --model-repository
      <name>/                        one VAE; a name is [A-Za-z0-9][A-Za-z0-9_.-]* (at most 128 characters)
        <version>/                   a positive integer without leading zeros: 1, 2, 10, ...
          model.json encoder.onnx decoder.onnx     one export (`python -m training.export`)

Anything else (files, hidden entries such as an export's `.3.staging-*` directory, names that break the
rule) is not a model or a version and is skipped. A version directory must appear whole: written
elsewhere and renamed into place, as `python -m training.export --repository DIR --name N` does; one
that does not verify is refused and retried only when its files change (`fingerprint`).

Names on the Open Inference Protocol: each VAE graph is the OIP model `oip_name(vae, graph)`, that is
`<vae>.<graph>` (`digits.encoder`, `digits.decoder`, `digits.score` (serving.detector); any later graph
the same way). The graph's bare name (`encoder`, `decoder`, `score`) addresses the graph of the one model while exactly one is loaded: what a
server started with `--model-dir` has always answered to. Model versions on OIP are the directory
numbers as strings (a version's manifest `version`, its content hash, is accepted too).

Version policy (`--version-policy`, Triton's): `latest:N` the N highest versions, `all`, or
`specific:V[,V...]` those listed that exist. Inference without a version uses the highest ready one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,17}")
# Between a VAE's name and its graph's in an OIP model name.
GRAPH_SEPARATOR = "."


class LayoutError(ValueError):
    """A repository path, model name or version policy is not as the layout requires."""


def oip_name(vae: str, graph: str) -> str:
    """The Open Inference Protocol model name of `graph` ("encoder", "decoder", ...) of the VAE `vae`."""
    return f"{vae}{GRAPH_SEPARATOR}{graph}"


def split_oip_name(name: str) -> tuple[str | None, str]:
    """An OIP model name -> (VAE name, graph); the VAE is None for a bare graph name ("encoder")."""
    vae, sep, graph = name.rpartition(GRAPH_SEPARATOR)
    return (vae, graph) if sep and vae else (None, name)


def check_name(name: str, field: str = "model_name") -> str:
    if not NAME_RE.fullmatch(name):
        raise LayoutError(f"{field}: expected a model name matching {NAME_RE.pattern}, got {name[:200]!r}")
    return name


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served (Triton's version_policy)."""

    kind: str                       # "latest", "all" or "specific"
    latest: int = 1                 # latest:N
    specific: tuple[int, ...] = ()  # specific:V,...

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        if kind == "all" and not arg:
            return cls("all")
        if kind == "latest" and arg.isdigit() and int(arg) >= 1:
            return cls("latest", latest=int(arg))
        if kind == "specific" and arg:
            parts = arg.split(",")
            if all(VERSION_RE.fullmatch(p.strip()) for p in parts):
                return cls("specific", specific=tuple(sorted({int(p) for p in parts})))
        raise LayoutError(f"expected latest:N (N >= 1), all, or specific:V[,V...] (positive integers), got {text!r}")

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among `available`, ascending."""
        versions = sorted(available)
        if self.kind == "latest":
            return versions[-self.latest:]
        if self.kind == "specific":
            return [v for v in versions if v in self.specific]
        return versions


def scan(root: Path) -> dict[str, dict[int, Path]]:
    """Every model of the repository and its version directories: {name: {version: path}} (models without
    a version included, with none)."""
    models: dict[str, dict[int, Path]] = {}
    try:
        entries = list(os.scandir(root))
    except OSError as e:
        raise LayoutError(f"model-repository: cannot read {str(root)!r} ({e.strerror or e})") from e
    for entry in entries:
        if entry.is_dir() and NAME_RE.fullmatch(entry.name):
            models[entry.name] = versions(Path(entry.path))
    return models


def versions(model_dir: Path) -> dict[int, Path]:
    """The version directories of one model: {version: path}; none if the model directory is gone."""
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return {}
    return {int(e.name): Path(e.path) for e in entries if e.is_dir() and VERSION_RE.fullmatch(e.name)}


def fingerprint(version_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """What a version directory holds, cheaply (names, sizes, mtimes): a refused version is tried again
    only when this changes."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(version_dir)
                            if e.is_file()))
    except OSError:
        return ()


def next_version(model_dir: Path) -> int:
    """The version a new export of this model gets: one more than the highest there (1 for a new model)."""
    return max(versions(model_dir), default=0) + 1
