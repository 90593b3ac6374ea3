"""Datasets for training: `--data digits | mnist:DIR | npy:FILE | images:DIR` -> splits in model space.

    python -m training.data --data mnist:../shared/data/mnist [--arch conv] [--seed 0]

(prints what would be trained on: split sizes, example shape, normalisation; no training.)

`load_data(config)` is the one entry point the trainer, the evaluator and the exporter use:

1. read raw examples (N, ...) from the source named by `config.data` and validate them before any
   training starts (missing path, unreadable file, wrong rank, fewer than 2 examples, NaN/Inf,
   values outside [0, 1] for Bernoulli without `--rescale`): every failure is a `DataError` whose
   message names the source and the problem;
2. split them deterministically from `config.seed` into train / validation / test (MNIST keeps its
   own t10k file as the test split when the train file is present);
3. fit the normalisation on the training split only (Bernoulli: one scalar offset/scale into [0, 1];
   Gaussian: per-dimension standardisation) and map every split into *model space*,
   `x_model = (x_raw - offset) / scale` (see docs/ARCHITECTURE.md);
4. reshape to the model's example shape: (D,) for `mlp`, (C, H, W) for `conv`.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from training.config import ARCHES, LIKELIHOODS, TrainConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_IDX_UBYTE = 0x08


class DataError(ValueError):
    """The data named by `--data` is missing, unreadable or unfit for the model; the message says why."""


@dataclass(frozen=True)
class Normalization:
    """Raw data -> model space: `x_model = (x_raw - offset) / scale`, fitted on the training split.

    `offset` and `scale` are floats (one for every dimension) or lists flattened over the example,
    `prod(example_shape)` long. `kind` is "scale" (Bernoulli: into [0, 1]) or "standardize"
    (Gaussian: per-dimension mean 0, standard deviation 1).
    """

    kind: str
    offset: float | list[float]
    scale: float | list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "offset": self.offset, "scale": self.scale}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        return cls(kind=str(d["kind"]), offset=d["offset"], scale=d["scale"])

    def _arrays(self, n_dims: int) -> tuple[np.ndarray, np.ndarray]:
        offset = np.broadcast_to(np.asarray(self.offset, dtype=np.float64), (n_dims,))
        scale = np.broadcast_to(np.asarray(self.scale, dtype=np.float64), (n_dims,))
        return offset, scale

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        """(N, ...) raw -> (N, ...) float32 model space."""
        flat = x_raw.reshape(x_raw.shape[0], -1).astype(np.float64)
        offset, scale = self._arrays(flat.shape[1])
        return ((flat - offset) / scale).astype(np.float32).reshape(x_raw.shape)

    def invert(self, x_model: np.ndarray) -> np.ndarray:
        """(N, ...) model space -> (N, ...) float64 raw units."""
        flat = x_model.reshape(x_model.shape[0], -1).astype(np.float64)
        offset, scale = self._arrays(flat.shape[1])
        return (flat * scale + offset).reshape(x_model.shape)


@dataclass
class RawData:
    """Examples as read from the source, before splitting and normalisation."""

    x: np.ndarray                      # (N, ...) uint8 or float
    source: str                        # for messages, e.g. "mnist:/data/mnist"
    value_range: tuple[float, float] | None = None  # known raw range (uint8 pixels: 0..255)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) when the examples are images
    test_x: np.ndarray | None = None   # a source-defined test split (MNIST t10k beside train)


@dataclass
class DataSplits:
    """Train / validation / test in model space: float32 tensors of shape (N, *example_shape)."""

    train: Tensor
    val: Tensor
    test: Tensor
    example_shape: tuple[int, ...]
    normalization: Normalization
    source: str
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for display, when images

    def describe(self) -> str:
        return (f"{self.source}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)}, "
                f"example shape {self.example_shape}, normalization {self.normalization.kind}")


# --------------------------------------------------------------------------------------------------
# Readers, one per source kind


def read_digits() -> RawData:
    """scikit-learn's bundled 8x8 digits: 1,797 images, integer intensities 0..16."""
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32)  # (1797, 8, 8)
    return RawData(x=x, source="digits", value_range=(0.0, 16.0), image_shape=(1, 8, 8))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or plain) of unsigned bytes: returns (N, ...) uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable IDX file ({type(e).__name__}: {e})") from e
    if len(data) < 4:
        raise DataError(f"{path}: unreadable IDX file (only {len(data)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _IDX_UBYTE or ndim < 1:
        raise DataError(f"{path}: unreadable IDX file (bad magic {data[:4].hex()}; expected unsigned-byte "
                        "IDX, magic 0000 08 nn)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: unreadable IDX file (truncated header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(f"{path}: unreadable IDX file (header says {dims} = {expected} bytes, file holds "
                        f"{len(data) - header})")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_mnist(directory: Path) -> RawData:
    """MNIST-format IDX images in `directory` (train and/or t10k, gzipped or not; labels ignored)."""
    if not directory.is_dir():
        raise DataError(f"mnist:{directory}: no such directory")
    train = _find_idx(directory, "train-images-idx3-ubyte")
    test = _find_idx(directory, "t10k-images-idx3-ubyte")
    if train is None and test is None:
        raise DataError(f"mnist:{directory}: no train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz] "
                        "file")
    arrays = {p: _read_idx(p) for p in (train, test) if p is not None}
    for p, a in arrays.items():
        if a.ndim != 3:
            raise DataError(f"{p}: wrong rank: expected images of shape (N, H, W), got {a.shape}")
    main = arrays[train] if train is not None else arrays[test]  # type: ignore[index]
    test_x = arrays[test] if (train is not None and test is not None) else None
    if test_x is not None and test_x.shape[1:] != main.shape[1:]:
        raise DataError(f"mnist:{directory}: train images are {main.shape[1:]}, test images "
                        f"{test_x.shape[1:]}")
    h, w = main.shape[1:]
    return RawData(x=main, source=f"mnist:{directory}", value_range=(0.0, 255.0), image_shape=(1, h, w),
                   test_x=test_x)


def read_npy(path: Path) -> RawData:
    """A `.npy` array or `.npz` archive of shape (N, ...), uint8 or float."""
    if not path.is_file():
        raise DataError(f"npy:{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"npy:{path}: unreadable file ({type(e).__name__}: {e})") from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in ("x", "data", "images") if k in keys), None)
            if key is None:
                raise DataError(f"npy:{path}: .npz holds {keys}; expected one array or one named x, data "
                                "or images")
            x = loaded[key]
    else:
        x = loaded
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
            or x.dtype == np.bool_):
        raise DataError(f"npy:{path}: expected uint8 or float values, got dtype {x.dtype}")
    value_range = (0.0, 255.0) if x.dtype == np.uint8 else None
    image_shape = None
    if x.ndim == 3:
        image_shape = (1, x.shape[1], x.shape[2])
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        image_shape = (x.shape[1], x.shape[2], x.shape[3])
    return RawData(x=x, source=f"npy:{path}", value_range=value_range, image_shape=image_shape)


def read_images(directory: Path, size: int) -> RawData:
    """PNG/JPEG files in `directory` (sorted by name), resized to size x size; grayscale unless any is colour."""
    from PIL import Image, UnidentifiedImageError

    if not directory.is_dir():
        raise DataError(f"images:{directory}: no such directory")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"images:{directory}: no PNG or JPEG files")
    images: list[Any] = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"images:{p}: unreadable image ({type(e).__name__}: {e})") from e
    colour = any(im.mode not in ("L", "1", "I", "I;16", "F", "LA") for im in images)
    mode = "RGB" if colour else "L"
    arrays = [np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
              for im in images]
    x = np.stack(arrays)  # (N, S, S) or (N, S, S, 3)
    x = x.transpose(0, 3, 1, 2) if colour else x[:, None]  # (N, C, S, S)
    return RawData(x=np.ascontiguousarray(x), source=f"images:{directory}", value_range=(0.0, 255.0),
                   image_shape=(x.shape[1], size, size))


def read_raw(config: TrainConfig) -> RawData:
    """Dispatch on `config.data` ("digits", "mnist:DIR", "npy:FILE", "images:DIR")."""
    spec = config.data
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return read_digits()
    if kind in ("mnist", "npy", "images") and not arg:
        raise DataError(f"data: {spec!r}: expected {kind}:PATH")
    if kind == "mnist":
        return read_mnist(Path(arg).expanduser())
    if kind == "npy":
        return read_npy(Path(arg).expanduser())
    if kind == "images":
        return read_images(Path(arg).expanduser(), config.image_size)
    raise DataError(f"data: expected digits, mnist:DIR, npy:FILE or images:DIR, got {spec!r}")


# --------------------------------------------------------------------------------------------------
# Validation, splitting, normalisation


def _validate(raw: RawData, config: TrainConfig) -> None:
    for name, x in (("examples", raw.x), ("test examples", raw.test_x)):
        if x is None:
            continue
        if x.ndim < 2:
            raise DataError(f"{raw.source}: wrong rank: expected an array of shape (N, ...) with rank >= 2, "
                            f"got shape {x.shape}")
        if name == "examples" and x.shape[0] < 2:
            raise DataError(f"{raw.source}: fewer than 2 examples (got {x.shape[0]}); need at least 2 to "
                            "split into train and validation")
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).sum())
            raise DataError(f"{raw.source}: {bad} NaN/Inf values in the {name}")
    if config.arch == "conv" and raw.x.ndim not in (3, 4):
        raise DataError(f"{raw.source}: wrong rank for arch 'conv': expected images (N, H, W) or "
                        f"(N, C, H, W), got shape {raw.x.shape}")
    if config.likelihood == "bernoulli" and raw.value_range is None and not config.rescale:
        lo, hi = float(raw.x.min()), float(raw.x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{raw.source}: values outside [0, 1] (min {lo:g}, max {hi:g}) for likelihood "
                            "'bernoulli'; pass --rescale to min-max scale them from the training split, or "
                            "use --likelihood gaussian")


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                  has_test: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/val/test indices from `seed`. With `has_test`, no test indices are taken."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = 0 if has_test else round(test_fraction * n)
    n_val = max(1, round(val_fraction * n))
    n_test = min(n_test, max(0, n - n_val - 1))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"split: {n} examples leave no training examples (val {n_val}, test {n_test})")
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def fit_normalization(train_raw: np.ndarray, raw: RawData, config: TrainConfig) -> Normalization:
    """Fit offset/scale on the training split only (see the module docstring)."""
    flat = train_raw.reshape(train_raw.shape[0], -1).astype(np.float64)
    if config.likelihood == "bernoulli":
        if raw.value_range is not None:
            lo, hi = raw.value_range
        elif config.rescale:
            lo, hi = float(flat.min()), float(flat.max())
        else:
            lo, hi = 0.0, 1.0
        return Normalization(kind="scale", offset=float(lo), scale=float(hi - lo) if hi > lo else 1.0)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)
    # A constant dimension (digits' corner pixels) would divide by 0: keep it centred, unscaled.
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-12), std, 1.0)
    return Normalization(kind="standardize", offset=[float(v) for v in mean], scale=[float(v) for v in std])


def _model_shape(x: np.ndarray, arch: str) -> tuple[int, ...]:
    if arch == "mlp":
        return (math.prod(x.shape[1:]),)
    return (1, *x.shape[1:]) if x.ndim == 3 else tuple(x.shape[1:])


def binarize_fixed(x: Tensor, seed: int) -> Tensor:
    """One fixed Bernoulli draw per pixel (for validation/test under dynamic binarisation)."""
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(x, generator=g)


def load_data(config: TrainConfig) -> DataSplits:
    """Read, validate, split and normalise `config.data`; every split in model space (float32)."""
    raw = read_raw(config)
    _validate(raw, config)
    tr, va, te = split_indices(len(raw.x), config.val_fraction, config.test_fraction, config.seed,
                               has_test=raw.test_x is not None)
    train_raw = raw.x[tr]
    norm = fit_normalization(train_raw, raw, config)
    test_raw = raw.test_x if raw.test_x is not None else raw.x[te]
    shape = _model_shape(raw.x, config.arch)

    def to_model(x: np.ndarray) -> Tensor:
        xm = norm.apply(x) if len(x) else np.zeros((0, *x.shape[1:]), np.float32)
        if norm.kind == "scale":
            # Validation/test values beyond the training range must stay valid Bernoulli targets.
            np.clip(xm, 0.0, 1.0, out=xm)
        return torch.from_numpy(np.ascontiguousarray(xm.reshape(len(x), *shape)))

    splits = DataSplits(train=to_model(train_raw), val=to_model(raw.x[va]), test=to_model(test_raw),
                        example_shape=shape, normalization=norm, source=raw.source,
                        image_shape=raw.image_shape)
    if config.binarize:
        # Training batches are binarised afresh every step (in the trainer); held-out splits once.
        splits.val = binarize_fixed(splits.val, config.seed + 1)
        splits.test = binarize_fixed(splits.test, config.seed + 2)
    logger.info("data %s", splits.describe())
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load, validate and describe a dataset (no training).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    parser.add_argument("--data", default=d.data, help="digits | mnist:DIR | npy:FILE | images:DIR")
    parser.add_argument("--arch", default=d.arch, choices=ARCHES, help="model architecture")
    parser.add_argument("--likelihood", default=d.likelihood, choices=LIKELIHOODS,
                        help="decoder likelihood (decides the normalisation)")
    parser.add_argument("--rescale", action="store_true", help="min-max scale float data for Bernoulli")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="resize images:DIR to this")
    parser.add_argument("--seed", type=int, default=d.seed, help="split seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = TrainConfig(data=args.data, arch=args.arch, likelihood=args.likelihood, rescale=args.rescale,
                             image_size=args.image_size, seed=args.seed)
        splits = load_data(config)
    except (DataError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    print(splits.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
