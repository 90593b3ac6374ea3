"""serving.manifest: schema validation and checksums, without torch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from serving.manifest import (
    ChecksumMismatch,
    Manifest,
    ManifestError,
    load_manifest,
    model_version,
    sha256_file,
    verify_model_dir,
)


def _manifest(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "encoder.onnx").write_bytes(b"enc")
    (tmp_path / "decoder.onnx").write_bytes(b"dec")
    enc, dec = sha256_file(tmp_path / "encoder.onnx"), sha256_file(tmp_path / "decoder.onnx")
    spec = lambda n, *s: {"name": n, "dtype": "float32", "shape": [-1, *s]}
    d = {"schema_version": 1, "name": "m", "version": model_version(enc, dec), "example_shape": [4],
         "latent_dim": 2, "likelihood": "bernoulli", "normalization": {"kind": "scale", "offset": 0.0,
                                                                        "scale": [1.0, 2.0, 3.0, 4.0]},
         "files": {"encoder": {"path": "encoder.onnx", "sha256": enc, "bytes": 3},
                   "decoder": {"path": "decoder.onnx", "sha256": dec, "bytes": 3}},
         "encoder": {"inputs": [spec("x", 4)], "outputs": [spec("mu", 2), spec("var", 2), spec("logvar", 2)]},
         "decoder": {"inputs": [spec("z", 2)], "outputs": [spec("x_mean", 4), spec("logits", 4)]},
         "opset": 18}
    (tmp_path / "model.json").write_text(json.dumps(d))
    return d


def test_a_valid_manifest_loads_and_verifies(tmp_path: Path) -> None:
    _manifest(tmp_path)
    m = verify_model_dir(tmp_path)
    assert m.example_size == 4 and m.graphs["decoder"].output_names() == ["x_mean", "logits"]


def test_a_changed_byte_is_a_checksum_mismatch(tmp_path: Path) -> None:
    _manifest(tmp_path)
    (tmp_path / "encoder.onnx").write_bytes(b"enC")
    with pytest.raises(ChecksumMismatch, match="files.encoder: .* the manifest expects"):
        verify_model_dir(tmp_path)


def test_a_missing_manifest_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest; export a model with `python -m training.export`"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema_version=2), "schema_version: expected 1, got 2"),
    (lambda d: d.pop("latent_dim"), "missing key 'latent_dim'"),
    (lambda d: d.update(likelihood="poisson"), "likelihood: expected 'bernoulli' or 'gaussian'"),
    (lambda d: d["encoder"]["outputs"].pop(1), r"encoder output 'var': expected in the manifest"),
    (lambda d: d["decoder"]["inputs"][0].update(shape=[-1, 3]), r"decoder input 'z': expected float32 \[-1, 2\]"),
    (lambda d: d["normalization"].update(scale=[1.0]), "normalization.scale: expected a number or 4 numbers"),
    (lambda d: d["decoder"]["outputs"].pop(1), r"decoder outputs: likelihood 'bernoulli' .* needs \['logits'\]"),
    (lambda d: d.update(likelihood="gaussian", learned_variance=True),
     r"decoder outputs: likelihood 'gaussian' \(learned_variance=True\) needs \['x_var'\]"),
])
def test_a_malformed_manifest_names_the_field(tmp_path: Path, mutate: Any, message: str) -> None:
    d = copy.deepcopy(_manifest(tmp_path))
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d)


def test_the_version_depends_on_the_file_contents() -> None:
    assert model_version("a", "b") == model_version("a", "b") != model_version("a", "c")
