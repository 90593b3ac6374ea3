"""The export manifest (`exported/model.json`): schema, writing, validation and checksum verification.

The one writer and the one reader of model.json: `training.export` builds and writes it with
`build_manifest` / `write_manifest`, and `python -m serving` reads it with `verify_model_dir` (refusing to
load a model whose files do not match it). Imports nothing heavier than numpy (the calibration tables,
`serving.scoring`): no torch, no ORT.

Schema version 1, the keys that matter to a reader:

    schema_version   1
    name, version    model name; version = first 16 hex of sha256(encoder sha256 + decoder sha256)
    example_shape    e.g. [64] or [1, 28, 28]: one example, without the batch dimension
    latent_dim       d
    likelihood       "bernoulli" | "gaussian";  learned_variance: bool
    normalization    how raw data becomes model space: x_model = (x_raw - offset) / scale, and back:
                     x_raw = x_model * scale + offset. offset/scale are numbers or flat lists of
                     prod(example_shape) numbers. The ONNX graphs and the server speak model space.
    files            {"encoder": {"path", "sha256", "bytes"}, "decoder": {...}}
    encoder/decoder  {"inputs": [TensorSpec], "outputs": [TensorSpec]}; TensorSpec = {name, dtype,
                     shape} with -1 for the dynamic batch dimension
    opset, created_at, versions {torch, onnx, onnxruntime}, training {config, metrics}, parity {...}
    calibration      optional (exports before issue 27 have none): the anomaly scores' distribution on the
                     run's validation split, `serving.scoring.Calibration`; a malformed one is refused

The graph contract (which tensors each graph takes and gives, and their shapes) is written once, in
`graph_specs`: `build_manifest` writes it into the manifest, `Manifest._check` requires it, and both
serving protocol adapters read the manifest's `graphs` (never a table of their own).

Errors:

    ManifestError             the manifest is missing, unreadable or does not match the schema
    └── ChecksumMismatch      a model file's sha256 differs from the manifest (tampered or corrupt)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.scoring import Calibration, CalibrationError

SCHEMA_VERSION = 1
MANIFEST_NAME = "model.json"
MODEL_ROLES: tuple[str, ...] = ("encoder", "decoder")


class ManifestError(Exception):
    """The manifest is missing, unreadable, or does not match the schema."""


class ChecksumMismatch(ManifestError):
    """A model file's sha256 differs from the one recorded in the manifest."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 marks the dynamic batch dimension

    @property
    def tail(self) -> tuple[int, ...]:
        """The shape of one row: without the batch dimension."""
        return self.shape[1:]

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> TensorSpec:
        try:
            return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(s) for s in d["shape"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"{where}: expected {{name, dtype, shape}}, got {d!r} ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def input(self) -> TensorSpec:
        """The one input (every graph of a VAE export takes exactly one)."""
        return self.inputs[0]

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def graph_specs(example_shape: tuple[int, ...], latent_dim: int, likelihood: str,
                learned_variance: bool) -> dict[str, GraphSpec]:
    """The one description of both graphs' inputs and outputs (float32, dynamic batch dimension -1).

        encoder  x (N, *example_shape) -> mu, var, logvar (N, d)
        decoder  z (N, d) -> x_mean (N, *example_shape), plus logits (Bernoulli) or x_var (learned
                 Gaussian variance), each (N, *example_shape)
    """
    def spec(name: str, tail: tuple[int, ...]) -> TensorSpec:
        return TensorSpec(name, "float32", (-1, *tail))

    x, z = tuple(example_shape), (latent_dim,)
    extra = ["logits"] if likelihood == "bernoulli" else (["x_var"] if learned_variance else [])
    return {
        "encoder": GraphSpec(inputs=(spec("x", x),), outputs=tuple(spec(n, z) for n in ("mu", "var", "logvar"))),
        "decoder": GraphSpec(inputs=(spec("z", z),), outputs=tuple(spec(n, x) for n in ("x_mean", *extra))),
    }


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    bytes: int

    @classmethod
    def of(cls, path: Path) -> FileEntry:
        """The entry of a model file as it is on disk now: its name, sha256 and size."""
        return cls(path=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Manifest:
    """A validated `model.json`. `raw` keeps every key, including the informational ones."""

    name: str
    version: str
    example_shape: tuple[int, ...]
    latent_dim: int
    likelihood: str
    learned_variance: bool
    normalization: dict[str, Any]
    files: dict[str, FileEntry]
    graphs: dict[str, GraphSpec]
    opset: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    calibration: Calibration | None = field(repr=False, default=None)  # None: exported without one

    @property
    def example_size(self) -> int:
        return math.prod(self.example_shape)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"schema_version: expected {SCHEMA_VERSION}, got {d.get('schema_version')!r}")
        try:
            files = {role: FileEntry(path=str(d["files"][role]["path"]), sha256=str(d["files"][role]["sha256"]),
                                     bytes=int(d["files"][role]["bytes"])) for role in MODEL_ROLES}
            graphs = {role: GraphSpec(
                inputs=tuple(TensorSpec.from_dict(t, f"{role}.inputs") for t in d[role]["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t, f"{role}.outputs") for t in d[role]["outputs"]))
                for role in MODEL_ROLES}
            m = cls(name=str(d["name"]), version=str(d["version"]),
                    example_shape=tuple(int(s) for s in d["example_shape"]),
                    latent_dim=int(d["latent_dim"]), likelihood=str(d["likelihood"]),
                    learned_variance=bool(d.get("learned_variance", False)),
                    normalization=dict(d["normalization"]), files=files, graphs=graphs,
                    opset=int(d["opset"]), raw=d,
                    calibration=Calibration.from_dict(d["calibration"], math.prod(int(s) for s in d["example_shape"]))
                    if "calibration" in d else None)
        except CalibrationError as e:
            raise ManifestError(f"{e}; re-export the model (python -m training.export) to rewrite it") from e
        except KeyError as e:
            raise ManifestError(f"manifest: missing key {e}") from e
        except (TypeError, ValueError) as e:
            raise ManifestError(f"manifest: malformed value ({e})") from e
        m._check()
        return m

    def _check(self) -> None:
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ManifestError(f"likelihood: expected 'bernoulli' or 'gaussian', got {self.likelihood!r}")
        if self.latent_dim < 1 or not self.example_shape or min(self.example_shape) < 1:
            raise ManifestError(f"latent_dim/example_shape: expected positive sizes, got "
                                f"{self.latent_dim}, {self.example_shape}")
        want = graph_specs(self.example_shape, self.latent_dim, self.likelihood, self.learned_variance)
        for role, expected in want.items():
            graph = self.graphs[role]
            if graph.to_dict() != expected.to_dict():
                raise ManifestError(
                    f"{role}: expected inputs {_specs_str(expected.inputs)} and outputs "
                    f"{_specs_str(expected.outputs)} for example_shape {list(self.example_shape)}, latent_dim "
                    f"{self.latent_dim}, likelihood {self.likelihood!r} (learned_variance={self.learned_variance}), "
                    f"got inputs {_specs_str(graph.inputs)} and outputs {_specs_str(graph.outputs)}")
        for key in ("offset", "scale"):
            v = self.normalization.get(key)
            values = v if isinstance(v, list) else [v]
            ok = (isinstance(v, (int, float)) or (isinstance(v, list) and len(v) == self.example_size)) and all(
                _finite_number(a) for a in values)
            if not ok:
                raise ManifestError(f"normalization.{key}: expected a finite number or {self.example_size} finite "
                                    f"numbers, got {_describe(v)}")
            if key == "scale" and any(a == 0 for a in values):
                raise ManifestError("normalization.scale: expected non-zero numbers, got a 0")
        for role, entry in self.files.items():
            p = Path(entry.path)
            if p.is_absolute() or len(p.parts) != 1 or p.name in ("", ".", ".."):
                raise ManifestError(f"files.{role}.path: expected a file name inside the model directory, "
                                    f"got {entry.path[:200]!r}")
            if entry.bytes < 1:
                raise ManifestError(f"files.{role}.bytes: expected a size >= 1, got {entry.bytes}")


def _finite_number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)


def _describe(v: Any) -> str:
    if isinstance(v, list):
        bad = [a for a in v if not _finite_number(a)]
        return f"a list of {len(v)}" + (f" with {len(bad)} non-finite or non-numeric entries ({bad[0]!r})" if bad else "")
    return repr(v)[:80]


def _specs_str(specs: tuple[TensorSpec, ...]) -> str:
    return "[" + ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in specs) + "]"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_version(encoder_sha256: str, decoder_sha256: str) -> str:
    """A version derived from the file contents: equal files, equal version."""
    return hashlib.sha256((encoder_sha256 + decoder_sha256).encode()).hexdigest()[:16]


def build_manifest(*, name: str, files: dict[str, FileEntry], example_shape: tuple[int, ...], latent_dim: int,
                   likelihood: str, learned_variance: bool, normalization: dict[str, Any], opset: int,
                   versions: dict[str, str], training: dict[str, Any], parity: dict[str, Any],
                   created_at: str | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model.json dict of an export (schema above): the graphs from `graph_specs`, the version from the
    files' checksums, `created_at` now (UTC) unless given. Values must already be JSON-ready."""
    graphs = graph_specs(tuple(example_shape), latent_dim, likelihood, learned_variance)
    if created_at is None:
        created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": model_version(files["encoder"].sha256, files["decoder"].sha256),
        "created_at": created_at,
        "example_shape": list(example_shape),
        "latent_dim": latent_dim,
        "likelihood": likelihood,
        "learned_variance": learned_variance,
        "normalization": normalization,
        "files": {role: files[role].to_dict() for role in MODEL_ROLES},
        **{role: graphs[role].to_dict() for role in MODEL_ROLES},
        "opset": opset,
        "versions": versions,
        "training": training,
        "parity": parity,
        **({"calibration": calibration} if calibration is not None else {}),
    }


def manifest_json(manifest: dict[str, Any]) -> str:
    """model.json's text: the dict validated (`Manifest.from_dict`), indented by 2, newline-terminated."""
    Manifest.from_dict(manifest)
    return json.dumps(manifest, indent=2) + "\n"


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> Path:
    """Validate `manifest` and write it as `model_dir/model.json`; returns the path written."""
    path = Path(model_dir) / MANIFEST_NAME
    text = manifest_json(manifest)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a reader never sees half a manifest
    return path


def load_manifest(model_dir: Path) -> Manifest:
    """Read and validate `model_dir/model.json` (does not verify checksums: see `verify_model_dir`)."""
    path = Path(model_dir) / MANIFEST_NAME
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: no manifest; export a model with `python -m training.export`") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not UTF-8 text (byte {e.start}); expected the JSON written by "
                            f"`python -m training.export`") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return Manifest.from_dict(d)


def verify_files(model_dir: Path, manifest: Manifest) -> None:
    """Check every model file against its recorded size and sha256; raise ChecksumMismatch if not."""
    for role, entry in manifest.files.items():
        path = Path(model_dir) / entry.path
        if not path.is_file():
            raise ManifestError(f"files.{role}: {path} is missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise ChecksumMismatch(f"files.{role}: {path} has {size} bytes, the manifest expects {entry.bytes}; "
                                   f"the file was modified, truncated or corrupted after export")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ChecksumMismatch(f"files.{role}: {path} has sha256 {actual}, the manifest expects "
                                   f"{entry.sha256}; the file was modified or corrupted after export")


def verify_model_dir(model_dir: Path) -> Manifest:
    """Load the manifest and verify every checksum: the one call a server makes before loading."""
    manifest = load_manifest(model_dir)
    verify_files(model_dir, manifest)
    return manifest
