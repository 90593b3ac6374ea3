"""Small, valid exports built without torch, for model repository tests: each version's outputs say
which version computed them.

    write_export(dir, offset=3.0)        # encoder: mu = x @ W + 3; decoder: logits = z @ V + 3

Both graphs are real ONNX (MatMul, Add, Exp, Sigmoid) with the manifest's exact tensor contract
(`serving.manifest.graph_specs`, Bernoulli likelihood), checksummed by `build_manifest` as
`training.export` does, so the server verifies, loads and warms them like any export. With `offset`
the version number, an answer's values name the version that computed it; `hidden` > 0 puts a
(hidden x hidden) layer in each graph, to give a version a measurable memory cost.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from serving.manifest import FileEntry, build_manifest, write_manifest

EXAMPLE_DIM = 4
LATENT_DIM = 2
OPSET = 18


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)


def _linear(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: str, out: str, w: np.ndarray,
            prefix: str) -> None:
    inits.append(numpy_helper.from_array(w, f"{prefix}_w"))
    nodes.append(helper.make_node("MatMul", [x, f"{prefix}_w"], [out]))


def _graph(role: str, offset: float, hidden: int) -> onnx.ModelProto:
    """encoder x (N, 4) -> mu, var, logvar (N, 2); decoder z (N, 2) -> x_mean, logits (N, 4)."""
    n_in, n_out, inp = (EXAMPLE_DIM, LATENT_DIM, "x") if role == "encoder" else (LATENT_DIM, EXAMPLE_DIM, "z")
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array(offset, dtype=np.float32), "offset")]
    src = inp
    if hidden:
        _linear(nodes, inits, src, "h0", _weights(n_in, hidden, 1), "in")
        _linear(nodes, inits, "h0", "h1", _weights(hidden, hidden, 2), "hidden")
        src, n_in = "h1", hidden
    _linear(nodes, inits, src, "lin", _weights(n_in, n_out, 3), "out")
    if role == "encoder":
        _linear(nodes, inits, src, "logvar_raw", np.zeros((n_in, n_out), np.float32), "logvar")
        nodes += [helper.make_node("Add", ["lin", "offset"], ["mu"]),
                  helper.make_node("Identity", ["logvar_raw"], ["logvar"]),
                  helper.make_node("Exp", ["logvar"], ["var"])]
        outs: tuple[str, ...] = ("mu", "var", "logvar")
    else:
        nodes += [helper.make_node("Add", ["lin", "offset"], ["logits"]),
                  helper.make_node("Sigmoid", ["logits"], ["x_mean"])]
        outs = ("x_mean", "logits")
    graph = helper.make_graph(
        nodes, role, [helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["N", LATENT_DIM if inp == "z" else EXAMPLE_DIM])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", n_out]) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_export(out: Path, offset: float, name: str = "m", hidden: int = 0,
                 calibrate_on: np.ndarray | None = None) -> Path:
    """A whole export in `out` (created; written in place: see `publish_version` for a repository).
    `calibrate_on` (N, 4): held-out examples the export's Score calibration is made from, as
    `training.export` makes it (`training.calibrate.calibrate`, k = 16, seed 0); None: no calibration."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for role in ("encoder", "decoder"):
        path = out / f"{role}.onnx"
        onnx.save(_graph(role, offset, hidden), str(path))
        files[role] = FileEntry.of(path)
    calibration = None
    if calibrate_on is not None:
        from serving.scoring import DEFAULT_K
        from training.calibrate import calibrate  # torch: only for the tests that calibrate

        calibration = calibrate(out / "encoder.onnx", out / "decoder.onnx", calibrate_on.astype(np.float32),
                                "bernoulli", DEFAULT_K, 0).to_dict()
    manifest = build_manifest(
        name=name, files=files, example_shape=(EXAMPLE_DIM,), latent_dim=LATENT_DIM, likelihood="bernoulli",
        learned_variance=False, normalization={"kind": "scale", "offset": 0.0, "scale": 1.0}, opset=OPSET,
        versions={"onnx": onnx.__version__}, training={"tiny_export": {"offset": offset}}, parity={},
        calibration=calibration)
    write_manifest(out, manifest)
    return out


def publish_version(repository: Path, name: str, version: int, offset: float | None = None,
                    hidden: int = 0, corrupt: bool = False, calibrate_on: np.ndarray | None = None) -> Path:
    """Write version `version` of `name` beside the repository's model directory, then rename it into
    place (what a server polling the repository may see: nothing, then the whole version). `corrupt`
    flips one byte of the encoder after the manifest was written (a checksum mismatch)."""
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.staging-", dir=model_dir))
    write_export(staging, float(version if offset is None else offset), name, hidden, calibrate_on)
    if corrupt:
        data = bytearray((staging / "encoder.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (staging / "encoder.onnx").write_bytes(bytes(data))
    staging.chmod(0o755)
    target = model_dir / str(version)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def encoder_mu(x: np.ndarray, offset: float, hidden: int = 0) -> np.ndarray:
    """What version `offset`'s encoder answers for x (N, 4): mu (N, 2), in float32 as ONNX Runtime computes it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(_graph("encoder", offset, hidden).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["mu"], {"x": x.astype(np.float32)})[0]  # type: ignore[no-any-return]
