"""Export a trained VAE to ONNX with a manifest, behind a parity gate.

    python -m training.export --run runs/demo [--checkpoint best|last] --out exported/ [--opset 18]

Writes `encoder.onnx`, `decoder.onnx` and `model.json` (schema: serving/manifest.py) into a temporary
directory beside `--out`, checks ONNX Runtime (CPU) against PyTorch on real and random inputs at several
batch sizes, and only then swaps the new directory into place atomically (renameat2 RENAME_EXCHANGE on
Linux; two renames elsewhere). A failed gate, an error or an interrupt leaves the previous export as it
was. Exit codes: 0 published, 1 parity gate failed, 2 bad input (run, checkpoint, output directory).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serving.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    GraphSpec,
    Manifest,
    graph_specs,
    model_version,
    sha256_file,
    verify_model_dir,
)
from training.checkpoint import CheckpointError
from training.config import CHECKPOINT_CHOICES, TrainConfig
from training.model import VAE, DecoderGraph, EncoderGraph
from training.rundir import LoadedCheckpoint, RunDir

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 7, 128)


class ExportError(Exception):
    """Bad input to the export: the message names the run, file or directory at fault."""


class ParityError(Exception):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance, or produced NaN/Inf."""


@dataclass(frozen=True)
class ExportConfig:
    run: Path
    out: Path
    checkpoint: str = "best"
    opset: int = DEFAULT_OPSET
    name: str | None = None
    tolerance: float = PARITY_TOLERANCE


def parse_args(argv: list[str] | None = None) -> ExportConfig:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run directory written by training.fit")
    p.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="best",
                   help="which checkpoint: best (lowest validation -ELBO) or last")
    p.add_argument("--out", type=Path, default=Path("exported"), help="directory to publish into")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset to pin")
    p.add_argument("--name", default=None, help="model name in the manifest (default: vae-<data kind>)")
    p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                   help="parity gate: largest allowed absolute difference between ORT and PyTorch")
    a = p.parse_args(argv)
    return ExportConfig(run=a.run, out=a.out, checkpoint=a.checkpoint, opset=a.opset, name=a.name,
                        tolerance=a.tolerance)


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


def _real_examples(config: TrainConfig, n: int) -> np.ndarray | None:
    """Up to n test-split examples in model space, or None when the run's data cannot be read here."""
    try:
        from training.data import load_data  # the data module pulls in sklearn/PIL: import lazily
        splits = load_data(config)
    except Exception as e:  # noqa: BLE001  # the data may live on another machine: random inputs still gate the export
        logger.warning("parity: cannot load the run's data %r (%s); checking random inputs only",
                       config.data, e)
        return None
    source = splits.test if len(splits.test) else splits.val
    return source[:n].numpy().astype(np.float32)


# Outputs gated on |diff| / max(1, |reference|) rather than |diff|: the Bernoulli logits are unbounded
# pre-activations (|logit| reaches 50 on MNIST), where float32's spacing alone is ~4e-6, so two correct
# matmul implementations differ by a few ulps there. Every other output is gated on the absolute difference.
SCALED_OUTPUTS: frozenset[str] = frozenset({"logits"})


def _diffs(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, max |got - want| / max(1, |want|)); raises ParityError on NaN/Inf."""
    if not np.all(np.isfinite(got)):
        raise ParityError("ONNX Runtime produced NaN or Inf")
    if not got.size:
        return 0.0, 0.0
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return float(d.max()), float((d / np.maximum(1.0, np.abs(want.astype(np.float64)))).max())


def check_parity(model: VAE, encoder_path: Path, decoder_path: Path, graphs: dict[str, GraphSpec],
                 real: np.ndarray | None, train_batch_size: int, tolerance: float,
                 seed: int = 0) -> dict[str, Any]:
    """Compare ONNX Runtime (CPU) with PyTorch; raise ParityError beyond `tolerance` or on NaN."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    enc = ort.InferenceSession(str(encoder_path), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(decoder_path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    sizes = sorted({*PARITY_BATCH_SIZES, 2 * train_batch_size + 3})
    shape, d = model.example_shape, model.config.latent_dim
    encoder_outputs, decoder_outputs = graphs["encoder"].output_names(), graphs["decoder"].output_names()
    keys = [f"encoder.{n}" for n in encoder_outputs] + [f"decoder.{n}" for n in decoder_outputs]
    worst = dict.fromkeys(keys, 0.0)  # max |ORT - PyTorch|
    worst_scaled = dict.fromkeys(keys, 0.0)  # max |ORT - PyTorch| / max(1, |PyTorch|)

    def record(key: str, got: np.ndarray, want: np.ndarray) -> None:
        a, r = _diffs(got, want)
        worst[key], worst_scaled[key] = max(worst[key], a), max(worst_scaled[key], r)

    cases: list[tuple[str, np.ndarray]] = []
    for b in sizes:
        if model.likelihood == "bernoulli":
            cases.append((f"random-{b}", rng.random((b, *shape), dtype=np.float32)))
        else:
            cases.append((f"random-{b}", rng.standard_normal((b, *shape), dtype=np.float32)))
        if real is not None and len(real):
            idx = np.arange(b) % len(real)
            cases.append((f"real-{b}", real[idx]))
    enc_graph, dec_graph = EncoderGraph(model).eval(), DecoderGraph(model).eval()
    with torch.no_grad():
        for label, x in cases:
            want = [t.numpy() for t in enc_graph(torch.from_numpy(x))]
            got = enc.run(encoder_outputs, {"x": x})
            for n, g, w in zip(encoder_outputs, got, want):
                record(f"encoder.{n}", g, w)
            # The decoder sees both prior draws and the posterior means of the case's inputs.
            for z in (rng.standard_normal((len(x), d), dtype=np.float32), want[0]):
                want_x = [t.numpy() for t in dec_graph(torch.from_numpy(z))]
                got_x = dec.run(decoder_outputs, {"z": z})
                for n, g, w in zip(decoder_outputs, got_x, want_x):
                    record(f"decoder.{n}", g, w)
            logger.debug("parity %s ok", label)
    gated = {k: worst_scaled[k] if k.split(".")[1] in SCALED_OUTPUTS else worst[k] for k in keys}
    report = {"tolerance": tolerance, "provider": "CPUExecutionProvider", "batch_sizes": sizes,
              "real_examples": real is not None and len(real) > 0, "max_abs_diff": worst,
              "max_scaled_diff": worst_scaled, "scaled_outputs": sorted(SCALED_OUTPUTS), "gated": gated,
              "passed": all(v <= tolerance for v in gated.values())}
    if not report["passed"]:
        bad = {k: v for k, v in gated.items() if v > tolerance}
        raise ParityError(f"max |ORT - PyTorch| above {tolerance:g}: "
                          + ", ".join(f"{k}={v:.3g}" for k, v in bad.items()))
    return report


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


def _stage_dir(out: Path) -> Path:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        return Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=parent))
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write beside it in {parent} ({e.strerror or e})") from e


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


def export(cfg: ExportConfig) -> Manifest:
    """Export, gate and publish. Returns the published manifest."""
    import onnx
    import onnxruntime as ort

    loaded = _load_run(cfg)
    state, model, ckpt_path = loaded.state, loaded.model, loaded.path
    config: TrainConfig = loaded.config
    shape, d = model.example_shape, config.latent_dim
    staging = _stage_dir(cfg.out)
    try:
        enc_path, dec_path = staging / "encoder.onnx", staging / "decoder.onnx"
        # The graph contract comes from the manifest's one description; the torch graphs must match it.
        graphs = graph_specs(shape, d, config.likelihood, model.x_logvar is not None)
        enc_graph, dec_graph = EncoderGraph(model), DecoderGraph(model)
        if dec_graph.output_names() != graphs["decoder"].output_names():
            raise ExportError(f"decoder outputs {dec_graph.output_names()} differ from the manifest contract "
                              f"{graphs['decoder'].output_names()}")
        for role, graph, example in (("encoder", enc_graph, torch.zeros(2, *shape)),
                                     ("decoder", dec_graph, torch.zeros(2, d))):
            spec = graphs[role]
            _export_graph(graph, example, spec.input.name, spec.output_names(), staging / f"{role}.onnx", cfg.opset)
        for p in (enc_path, dec_path):
            onnx.checker.check_model(str(p), full_check=True)
        real = _real_examples(config, 256)
        parity = check_parity(model, enc_path, dec_path, graphs, real, config.batch_size, cfg.tolerance)
        enc_sha, dec_sha = sha256_file(enc_path), sha256_file(dec_path)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": cfg.name or f"vae-{config.data.split(':', 1)[0]}",
            "version": model_version(enc_sha, dec_sha),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "example_shape": list(shape),
            "latent_dim": d,
            "likelihood": config.likelihood,
            "learned_variance": model.x_logvar is not None,
            "normalization": _plain(state["normalization"]),
            "files": {"encoder": {"path": enc_path.name, "sha256": enc_sha, "bytes": enc_path.stat().st_size},
                      "decoder": {"path": dec_path.name, "sha256": dec_sha, "bytes": dec_path.stat().st_size}},
            "encoder": graphs["encoder"].to_dict(),
            "decoder": graphs["decoder"].to_dict(),
            "opset": cfg.opset,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            "training": {"config": config.to_dict(), "checkpoint": ckpt_path.name,
                         "epoch": state.get("epoch"), "metrics": _run_metrics(cfg.run)},
            "parity": parity,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        verify_model_dir(staging)  # the exact check a server makes before loading
        for p in staging.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server may run as another user
        publish(staging, cfg.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_model_dir(cfg.out)


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
        manifest = export(cfg)
    except ExportError as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"export refused by the parity gate, nothing published: {e}", file=sys.stderr)
        return 1
    parity = manifest.raw["parity"]
    print(f"exported {manifest.name} version {manifest.version} to {cfg.out}/")
    for entry in manifest.files.values():
        print(f"  {entry.path}: {entry.bytes:,} bytes, sha256 {entry.sha256[:16]}...")
    print(f"  parity (ORT CPU vs PyTorch, batch sizes {parity['batch_sizes']}, tolerance {parity['tolerance']:g}, "
          f"real examples: {parity['real_examples']}):")
    for k, v in parity["max_abs_diff"].items():
        scaled = k.split(".")[1] in parity["scaled_outputs"]
        extra = f"  (gated on |diff|/max(1,|ref|) = {parity['max_scaled_diff'][k]:.3g})" if scaled else ""
        print(f"    {k:<16} max |diff| = {v:.3g}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
