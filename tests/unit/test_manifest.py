"""serving.manifest: schema validation and checksums, without torch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from serving.manifest import (
    ChecksumMismatch,
    FileEntry,
    Manifest,
    ManifestError,
    build_manifest,
    graph_specs,
    load_manifest,
    model_version,
    sha256_file,
    verify_model_dir,
    write_manifest,
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
    (lambda d: d["encoder"]["outputs"].pop(1),
     r"encoder: expected .* outputs \[mu float32 \[-1, 2\], var float32 \[-1, 2\], logvar .* got .* "
     + r"outputs \[mu float32 \[-1, 2\], logvar"),
    (lambda d: d["decoder"]["inputs"][0].update(shape=[-1, 3]),
     r"decoder: expected inputs \[z float32 \[-1, 2\]\] .* got inputs \[z float32 \[-1, 3\]\]"),
    (lambda d: d["normalization"].update(scale=[1.0]), "normalization.scale: expected a finite number or 4 finite"),
    (lambda d: d["normalization"].update(offset=float("nan")), r"normalization.offset: expected a finite .* got nan"),
    (lambda d: d["normalization"].update(scale=[1.0, float("inf"), 1.0, 1.0]),
     r"normalization.scale: .* got a list of 4 with 1 non-finite"),
    (lambda d: d["normalization"].update(scale=0), "normalization.scale: expected non-zero"),
    (lambda d: d["decoder"]["outputs"].pop(1), r"decoder: expected .* outputs \[x_mean float32 \[-1, 4\], logits"),
    (lambda d: d.update(likelihood="gaussian", learned_variance=True),
     r"decoder: expected .* outputs \[x_mean float32 \[-1, 4\], x_var float32 \[-1, 4\]\]"),
    (lambda d: d["files"]["encoder"].update(path="../../etc/passwd"),
     r"files.encoder.path: expected a file name inside the model directory, got '../../etc/passwd'"),
    (lambda d: d["files"]["decoder"].update(path="/models/decoder.onnx"), r"files.decoder.path: expected a file name"),
    (lambda d: d["files"]["decoder"].update(bytes=0), r"files.decoder.bytes: expected a size >= 1, got 0"),
])
def test_a_malformed_manifest_names_the_field(tmp_path: Path, mutate: Any, message: str) -> None:
    d = copy.deepcopy(_manifest(tmp_path))
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d)


def test_the_version_depends_on_the_file_contents() -> None:
    assert model_version("a", "b") == model_version("a", "b") != model_version("a", "c")


def test_a_file_of_another_size_than_recorded_is_refused_before_hashing(tmp_path: Path) -> None:
    d = _manifest(tmp_path)
    d["files"]["decoder"]["bytes"] = 4
    (tmp_path / "model.json").write_text(json.dumps(d))
    with pytest.raises(ChecksumMismatch, match="files.decoder: .* has 3 bytes, the manifest expects 4"):
        verify_model_dir(tmp_path)


def test_a_manifest_of_non_utf8_bytes_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(ManifestError, match=r"model.json: not UTF-8 text \(byte \d+\)"):
        load_manifest(tmp_path)


def test_the_graph_contract_is_one_description_for_each_likelihood() -> None:
    g = graph_specs((1, 28, 28), 20, "gaussian", learned_variance=True)
    assert [t.name for t in g["encoder"].outputs] == ["mu", "var", "logvar"]
    assert g["encoder"].input.shape == (-1, 1, 28, 28) and g["encoder"].outputs[0].tail == (20,)
    assert g["decoder"].output_names() == ["x_mean", "x_var"]
    assert graph_specs((4,), 2, "gaussian", learned_variance=False)["decoder"].output_names() == ["x_mean"]
    assert graph_specs((4,), 2, "bernoulli", learned_variance=False)["decoder"].output_names() == ["x_mean", "logits"]


def _built(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    (tmp_path / "encoder.onnx").write_bytes(b"enc")
    (tmp_path / "decoder.onnx").write_bytes(b"dec")
    kw: dict[str, Any] = {
        "name": "m", "files": {role: FileEntry.of(tmp_path / f"{role}.onnx") for role in ("encoder", "decoder")},
        "example_shape": (4,), "latent_dim": 2, "likelihood": "gaussian", "learned_variance": True,
        "normalization": {"kind": "standardize", "offset": 0.0, "scale": 1.0}, "opset": 18,
        "versions": {"onnx": "1"}, "training": {"config": {}}, "parity": {"passed": True},
        "created_at": "2026-01-01T00:00:00+00:00"}
    return build_manifest(**(kw | overrides))


def test_the_manifest_written_by_build_manifest_is_the_one_the_reader_verifies(tmp_path: Path) -> None:
    d = _built(tmp_path)
    assert list(d) == ["schema_version", "name", "version", "created_at", "example_shape", "latent_dim",
                       "likelihood", "learned_variance", "normalization", "files", "encoder", "decoder", "opset",
                       "versions", "training", "parity"]
    path = write_manifest(tmp_path, d)
    assert path.read_text() == json.dumps(d, indent=2) + "\n"
    m = verify_model_dir(tmp_path)
    assert m.version == model_version(sha256_file(tmp_path / "encoder.onnx"), sha256_file(tmp_path / "decoder.onnx"))
    assert m.graphs == graph_specs((4,), 2, "gaussian", learned_variance=True)
    assert m.files["decoder"] == FileEntry("decoder.onnx", sha256_file(tmp_path / "decoder.onnx"), 3)


def test_write_manifest_refuses_a_manifest_the_reader_would_refuse(tmp_path: Path) -> None:
    d = _built(tmp_path, normalization={"kind": "scale", "offset": 0.0, "scale": 0.0})
    with pytest.raises(ManifestError, match="normalization.scale: expected non-zero numbers"):
        write_manifest(tmp_path, d)
    assert not (tmp_path / "model.json").exists()
