"""Export a trained VAE to ONNX with a manifest, behind a parity gate.

    python -m training.export --run runs/demo [--checkpoint best|last] --out exported/ [--opset 18]
                              [--calibration-k 16] [--calibration-seed 0]
    python -m training.export --run runs/demo --repository models/ --name digits     # -> models/digits/<N+1>/

Writes `encoder.onnx`, `decoder.onnx` and `model.json` (schema: serving/manifest.py) into a temporary
directory beside `--out`, checks ONNX Runtime (CPU) against PyTorch on real and random inputs at several
batch sizes (and the anomaly scorer against PyTorch), scores the run's validation split for the
calibration tables of `Score` (training/calibrate.py; skipped, with a warning, when the data cannot be
read here), and only then swaps the new directory into place atomically (renameat2 RENAME_EXCHANGE on
Linux; two renames elsewhere). With `--repository DIR --name N` it publishes the next version of model
N in that model repository instead (DIR/N/<highest + 1>/, renamed into place, printed; serving/layout.py),
which a server polling DIR picks up, each version with its own calibration. A failed gate, an error or
an interrupt leaves the previous export as it
was. Exit codes: 0 published, 1 parity gate failed, 2 bad input (run, checkpoint, output directory).

The gate is training/parity.py, the staging and swap training/publish.py, the manifest's one writer
serving/manifest.py (`build_manifest`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.layout import LayoutError, check_name
from serving.manifest import (
    FileEntry,
    GraphSpec,
    Manifest,
    build_manifest,
    graph_specs,
    verify_model_dir,
    write_manifest,
)
from serving.scoring import DEFAULT_K
from training.calibrate import calibrate, validation_examples
from training.checkpoint import CheckpointError
from training.config import CHECKPOINT_CHOICES, TrainConfig
from training.model import DecoderGraph, EncoderGraph
from training.parity import PARITY_TOLERANCE, ParityError, check_parity, real_examples
from training.publish import ExportError, publish, publish_version, stage_dir
from training.rundir import LoadedCheckpoint, RunDir

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18


@dataclass(frozen=True)
class ExportConfig:
    run: Path
    out: Path
    checkpoint: str = "best"
    opset: int = DEFAULT_OPSET
    name: str | None = None
    tolerance: float = PARITY_TOLERANCE
    repository: Path | None = None  # publish as the next version of `name` in this model repository
    calibration_k: int = DEFAULT_K
    calibration_seed: int = 0


def parse_args(argv: list[str] | None = None) -> ExportConfig:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory written by training.fit")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="which checkpoint: best (lowest validation -ELBO) or last")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=Path("exported"), help="directory to publish into")
    where.add_argument("--repository", type=Path, default=None,
                       help="model repository to publish the next version of --name into (DIR/NAME/VERSION/)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset to pin")
    p.add_argument("--name", default=None, help="model name in the manifest (default: vae-<data kind>); with "
                                                "--repository, required: the model's directory there")
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                   help="parity gate: largest allowed absolute difference between ORT and PyTorch")
    p.add_argument("--calibration-k", type=int, default=DEFAULT_K,
                   help="importance samples per example when scoring the validation split for the calibration "
                        "tables (the server's default Score k)")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed of the calibration's eps")
    a = p.parse_args(argv)
    if a.calibration_k < 1 or a.calibration_seed < 0:
        p.error(f"--calibration-k: expected an integer >= 1 and --calibration-seed >= 0, got "
                f"{a.calibration_k} and {a.calibration_seed}")
    if a.repository is not None:
        if a.name is None:
            p.error("--name is required with --repository (the model's directory in the repository)")
        try:
            check_name(a.name, "--name")
        except LayoutError as e:
            p.error(str(e))
    return ExportConfig(run=a.run, out=a.out, checkpoint=a.checkpoint, opset=a.opset, name=a.name,
                        tolerance=a.tolerance, repository=a.repository, calibration_k=a.calibration_k,
                        calibration_seed=a.calibration_seed)


def _export_graph(module: torch.nn.Module, example: torch.Tensor, input_name: str,
                  output_names: list[str], path: Path, opset: int) -> None:
    """torch.onnx.export with the dynamo exporter, a dynamic batch dimension and one self-contained file."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        # The exporter warns about its own internals (deprecations in onnxscript/torch.export); they do
        # not affect the graph, which the parity gate checks numerically.
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[input_name], output_names=output_names,
                          dynamic_shapes=({0: batch},), external_data=False, optimize=True, verbose=False)
    if not path.is_file():
        raise ExportError(f"{path}: the exporter wrote no file")
    _strip_source_paths(path)


def _strip_source_paths(path: Path) -> None:
    """Drop the exporter's per-node Python stack traces: they hold this checkout's absolute paths, which
    would make the bytes, and so the manifest's content-derived version, differ between machines."""
    import onnx

    model = onnx.load(str(path))
    g = model.graph
    for item in (*g.node, *g.value_info, *g.input, *g.output, *g.initializer):
        keep = [(p.key, p.value) for p in item.metadata_props if not p.key.endswith("stack_trace")]
        if len(keep) != len(item.metadata_props):
            del item.metadata_props[:]
            for key, value in keep:
                item.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def _load_run(cfg: ExportConfig) -> LoadedCheckpoint:
    if not cfg.run.is_dir():
        raise ExportError(f"--run {cfg.run}: no such run directory")
    try:
        return RunDir(cfg.run).load(cfg.checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from e


def _run_metrics(run: Path) -> dict[str, Any]:
    try:
        return RunDir(run).read_summary()
    except (OSError, ValueError):
        logger.warning("%s: summary.json missing or unreadable; the manifest carries no training metrics", run)
        return {}


def _check_contract(role: str, graph: torch.nn.Module, example: torch.Tensor, spec: GraphSpec) -> None:
    """The torch graph gives what the manifest's contract says: as many outputs, each (N, *tail) for it."""
    with torch.no_grad():
        outputs = graph.eval()(example)
    got = [tuple(t.shape[1:]) for t in outputs]
    want = [t.tail for t in spec.outputs]
    if got != want:
        raise ExportError(f"{role}: the graph gives outputs of shapes {got}, the manifest contract "
                          f"{spec.output_names()} says {want}")


def export(cfg: ExportConfig) -> Manifest:
    """Export, gate and publish. Returns the published manifest."""
    return export_to(cfg)[0]


def export_to(cfg: ExportConfig) -> tuple[Manifest, Path]:
    """Export, gate and publish. Returns the published manifest and the directory it was published to."""
    import onnx
    import onnxruntime as ort

    loaded = _load_run(cfg)
    state, model, ckpt_path = loaded.state, loaded.model, loaded.path
    config: TrainConfig = loaded.config
    shape, d = model.example_shape, config.latent_dim
    learned_variance = model.x_logvar is not None
    model_dir = None if cfg.repository is None else cfg.repository / str(cfg.name)
    staging = stage_dir(cfg.out if model_dir is None else model_dir / "version")
    try:
        enc_path, dec_path = staging / "encoder.onnx", staging / "decoder.onnx"
        # The graph contract comes from the manifest's one description; the torch graphs must match it.
        graphs = graph_specs(shape, d, config.likelihood, learned_variance)
        for role, graph, example in (("encoder", EncoderGraph(model), torch.zeros(2, *shape)),
                                     ("decoder", DecoderGraph(model), torch.zeros(2, d))):
            spec = graphs[role]
            _check_contract(role, graph, example, spec)
            _export_graph(graph, example, spec.input.name, spec.output_names(), staging / f"{role}.onnx", cfg.opset)
        for p in (enc_path, dec_path):
            onnx.checker.check_model(str(p), full_check=True)
        real = real_examples(config, 256)
        parity = check_parity(model, enc_path, dec_path, graphs, real, config.batch_size, cfg.tolerance)
        val = validation_examples(config)
        calibration = None if val is None else calibrate(
            enc_path, dec_path, val, config.likelihood, cfg.calibration_k, cfg.calibration_seed).to_dict()
        manifest = build_manifest(
            name=cfg.name or f"vae-{config.data.split(':', 1)[0]}",
            files={"encoder": FileEntry.of(enc_path), "decoder": FileEntry.of(dec_path)},
            example_shape=shape, latent_dim=d, likelihood=config.likelihood, learned_variance=learned_variance,
            normalization=_plain(state["normalization"]), opset=cfg.opset,
            versions={"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            training={"config": config.to_dict(), "checkpoint": ckpt_path.name, "epoch": state.get("epoch"),
                      "metrics": _run_metrics(cfg.run)},
            parity=parity, calibration=calibration)
        write_manifest(staging, manifest)
        verify_model_dir(staging)  # the exact check a server makes before loading
        for p in staging.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server may run as another user
        if model_dir is None:
            publish(staging, cfg.out)
            published = cfg.out
        else:
            published = model_dir / str(publish_version(staging, model_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_model_dir(published), published


def _plain(v: Any) -> Any:
    """Tensors/arrays/numpy scalars -> JSON-ready Python values."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return [float(x) for x in v.reshape(-1)] if v.ndim else float(v)
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):  # the exporter's own chatter
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cfg = parse_args(argv)
    try:
        manifest, published = export_to(cfg)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"export refused by the parity gate, nothing published: {e}", file=sys.stderr)
        return 1
    parity = manifest.raw["parity"]
    if cfg.repository is not None:
        print(f"published {manifest.name} version {published.name} (manifest version {manifest.version}) to "
              f"{published}/")
    else:
        print(f"exported {manifest.name} version {manifest.version} to {cfg.out}/")
    for entry in manifest.files.values():
        print(f"  {entry.path}: {entry.bytes:,} bytes, sha256 {entry.sha256[:16]}...")
    print(f"  parity (ORT CPU vs PyTorch, batch sizes {parity['batch_sizes']}, tolerance {parity['tolerance']:g}, "
          f"real examples: {parity['real_examples']}):")
    for k, v in parity["max_abs_diff"].items():
        scaled = k.split(".")[1] in parity["scaled_outputs"]
        extra = f"  (gated on |diff|/max(1,|ref|) = {parity['max_scaled_diff'][k]:.3g})" if scaled else ""
        print(f"    {k:<16} max |diff| = {v:.3g}{extra}")
    for k, v in parity["score"]["max_scaled_diff"].items():
        print(f"    {k:<16} max |diff|/max(1,|ref|) = {v:.3g} (k={parity['score']['k']}, tolerance "
              f"{parity['score']['tolerance']:g})")
    cal = manifest.calibration
    print("  calibration: " + (f"{cal.describe()}; threshold at 0.99: "
                               + ", ".join(f"{kind} {cal.threshold(kind, 0.99):.4g}" for kind in cal.quantiles)
                               if cal is not None else "none (the run's data could not be read)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
