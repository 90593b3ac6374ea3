"""ONNX Runtime sessions: checksum verification, provider selection, warm-up.

`load_model` is the one call the server makes at start-up. It verifies the manifest checksums before
ONNX Runtime sees a byte, opens both sessions with the requested providers, reads back the providers the
session *really* got (`session.get_providers()`), refuses an explicit `cuda` that ended up on CPU, and
runs each graph once at batch 1 and once at the maximum batch so the first request pays no warm-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import StartupError
from serving.manifest import Manifest, ManifestError, verify_model_dir

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OrtRunner:
    """One ONNX Runtime session with a single float32 input; `run` is what the batcher calls.

    `run` is called from the batcher's runner thread only; ONNX Runtime releases the GIL while it runs.
    """

    def __init__(self, name: str, session: ort.InferenceSession, input_name: str,
                 output_names: list[str]) -> None:
        self.name = name
        self.session: ort.InferenceSession | None = session
        self.input_name = input_name
        self.output_names = output_names
        self._run = session.run

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """x (B, ...) float32 -> every output, (B, ...) each, in `output_names` order."""
        return self._run(self.output_names, {self.input_name: x})  # type: ignore[no-any-return]

    def release(self) -> None:
        """Drop the session (an unloaded model version): its memory is freed now, whatever still refers
        to this runner (the server's start-up objects are frozen out of the cyclic collector)."""
        self.session = None
        self._run = _released


def _released(*args: object) -> list[np.ndarray]:
    raise RuntimeError("this model version was unloaded")


@dataclass
class LoadedModel:
    """Both graphs of an exported VAE, ready to run."""

    manifest: Manifest
    encoder: OrtRunner
    decoder: OrtRunner
    providers: list[str]  # what the sessions really use, e.g. ["CPUExecutionProvider"]


def _requested(providers: str) -> list[str]:
    return [CPU] if providers == "cpu" else [CUDA, CPU]


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning worker threads burn CPU between runs; under load the batcher keeps them busy anyway.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _open(model_dir: Path, manifest: Manifest, role: str, providers: str,
          intra_op_threads: int) -> tuple[OrtRunner, list[str]]:
    path = model_dir / manifest.files[role].path
    if providers == "auto":
        # A machine without a usable GPU is normal for auto: keep ORT's CUDA load errors out of the
        # log and report the outcome ourselves below.
        ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(str(path), sess_options=_session_options(intra_op_threads),
                                    providers=_requested(providers))
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise StartupError(f"{role}: ONNX Runtime cannot load {path}: {e}") from e
    finally:
        ort.set_default_logger_severity(2)
    got = list(sess.get_providers())
    if providers == "auto" and CUDA not in got:
        logger.info("%s: CUDA is not usable here; --providers auto runs on %s", role, got)
    if providers == "cuda" and CUDA not in got:
        raise StartupError(f"providers: expected CUDAExecutionProvider for --providers cuda, got {got} "
                           f"(no usable GPU or CUDA libraries); use --providers auto or cpu")
    spec = manifest.graphs[role]
    inputs = [i.name for i in sess.get_inputs()]
    want_in = spec.input.name
    if inputs != [want_in]:
        raise StartupError(f"{role}: expected one input {want_in!r} as the manifest says, got {inputs}")
    declared = {t.name: t for t in (spec.input, *spec.outputs)}
    outputs = [o.name for o in sess.get_outputs()]
    missing = [n for n in spec.output_names() if n not in outputs]
    if missing:
        raise StartupError(f"{role}: outputs {missing} are in the manifest but not in {path} ({outputs})")
    for arg in (*sess.get_inputs(), *sess.get_outputs()):
        t = declared.get(arg.name)
        if t is not None and not _shape_agrees(arg.shape, t.shape):
            raise StartupError(f"{role}: {arg.name!r} has shape {list(t.shape)} in the manifest but "
                               f"{list(arg.shape)} in {path}; the manifest does not describe this graph")
    return OrtRunner(role, sess, want_in, spec.output_names()), got


def _shape_agrees(graph: list[int | str | None], manifest: tuple[int, ...]) -> bool:
    """A graph's shape (symbolic dims are names or None) against the manifest's (-1 = dynamic batch)."""
    if len(graph) != len(manifest):
        return False
    return all(not isinstance(g, int) or m == -1 or g == m for g, m in zip(graph, manifest))


def warm_up(runner: OrtRunner, example_shape: tuple[int, ...], max_batch_size: int) -> None:
    """Run once at batch 1 and once at the largest batch, so allocations happen before traffic."""
    for n in sorted({1, max_batch_size}):
        try:
            out = runner.run(np.zeros((n, *example_shape), dtype=np.float32))
        except Exception as e:  # ORT's own exception types: the graph does not take what the manifest says
            raise StartupError(f"{runner.name}: warm-up run of {n} rows of shape {list(example_shape)} failed "
                               f"({str(e).splitlines()[0][:300]})") from e
        if out[0].shape[0] != n:
            raise StartupError(f"{runner.name}: warm-up with {n} rows returned {out[0].shape[0]} rows")


def load_model(model_dir: Path, providers: str = "auto", intra_op_threads: int = 1,
               max_batch_size: int = 256) -> LoadedModel:
    """Verify, open and warm up both graphs; raise StartupError with a clear message otherwise."""
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    try:
        manifest = verify_model_dir(model_dir)
    except ManifestError as e:
        raise StartupError(f"model {model_dir}: {e}") from e
    enc, enc_p = _open(model_dir, manifest, "encoder", providers, intra_op_threads)
    dec, dec_p = _open(model_dir, manifest, "decoder", providers, intra_op_threads)
    if enc_p != dec_p:
        logger.warning("encoder providers %s differ from decoder providers %s", enc_p, dec_p)
    warm_up(enc, manifest.example_shape, max_batch_size)
    warm_up(dec, (manifest.latent_dim,), max_batch_size)
    logger.info("loaded %s version %s from %s on %s in %.0f ms", manifest.name, manifest.version, model_dir,
                enc_p, 1e3 * (time.perf_counter() - t0))
    return LoadedModel(manifest=manifest, encoder=enc, decoder=dec, providers=enc_p)
