"""Data loaders on small files made here, and each bad input's error message."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.config import TrainConfig
from training.data import DataError, Normalization, load_data, split_indices


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    data = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def test_digits_gives_64_long_examples_for_mlp_and_1x8x8_for_conv() -> None:
    mlp = load_data(TrainConfig(data="digits"))
    conv = load_data(TrainConfig(data="digits", arch="conv"))
    assert mlp.example_shape == (64,) and conv.example_shape == (1, 8, 8)
    assert len(mlp.train) + len(mlp.val) + len(mlp.test) == 1797
    assert mlp.train.dtype == torch.float32 and conv.train.shape[1:] == (1, 8, 8)
    assert mlp.normalization.to_dict() == {"kind": "scale", "offset": 0.0, "scale": 16.0}
    assert 0.0 <= float(mlp.train.min()) and float(mlp.train.max()) <= 1.0


def test_the_split_is_deterministic_from_the_seed_and_disjoint() -> None:
    a = split_indices(100, 0.1, 0.2, seed=3)
    b = split_indices(100, 0.1, 0.2, seed=3)
    c = split_indices(100, 0.1, 0.2, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert [len(x) for x in a] == [70, 10, 20]
    assert len(np.unique(np.concatenate(a))) == 100


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_with_train_and_t10k_keeps_t10k_as_the_test_split(tmp_path: Path, gz: bool) -> None:
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", images(40), gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", images(7, seed=1), gz)
    s = load_data(TrainConfig(data=f"mnist:{tmp_path}", arch="conv", conv_channels=(4,)))
    assert (len(s.train), len(s.val), len(s.test)) == (36, 4, 7)
    assert s.example_shape == (1, 8, 8)
    torch.testing.assert_close(s.test[:, 0], torch.from_numpy(images(7, seed=1)).float() / 255)


def test_mnist_with_only_t10k_is_split(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images(50), gz=True)
    s = load_data(TrainConfig(data=f"mnist:{tmp_path}"))
    assert (len(s.train), len(s.val), len(s.test)) == (40, 5, 5)
    assert s.example_shape == (64,)


def test_npy_float_data_with_gaussian_is_standardised_on_the_train_split(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(5.0, 3.0, size=(200, 3)).astype(np.float32)
    x[:, 2] = 7.0  # a constant dimension must not divide by zero
    np.save(tmp_path / "x.npy", x)
    cfg = TrainConfig(data=f"npy:{tmp_path / 'x.npy'}", likelihood="gaussian", test_fraction=0.0)
    s = load_data(cfg)
    assert isinstance(s.normalization.offset, list) and isinstance(s.normalization.scale, list)
    assert s.normalization.kind == "standardize" and len(s.normalization.offset) == 3
    torch.testing.assert_close(s.train.mean(dim=0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.train[:, :2].std(dim=0, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    assert s.normalization.scale[2] == 1.0 and len(s.test) == 0
    # the inverse maps model space back to raw units
    np.testing.assert_allclose(s.normalization.invert(s.train.numpy())[:, 2], 7.0, rtol=1e-6)


def test_npz_with_one_array_and_uint8_images_is_scaled_into_0_1(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", anything=images(20))
    s = load_data(TrainConfig(data=f"npy:{tmp_path / 'd.npz'}", arch="conv", conv_channels=(4,)))
    assert s.example_shape == (1, 8, 8) and s.normalization.scale == 255.0


def test_npy_float_data_outside_0_1_is_rescaled_only_when_asked(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.linspace(-2, 6, 40, dtype=np.float32).reshape(10, 4))
    s = load_data(TrainConfig(data=f"npy:{tmp_path / 'x.npy'}", rescale=True, test_fraction=0.0))
    assert float(s.train.min()) >= 0.0 and float(s.train.max()) <= 1.0
    assert s.normalization.kind == "scale" and isinstance(s.normalization.scale, float)
    assert s.normalization.scale > 0


def test_images_folder_of_grayscale_and_rgb_is_resized_to_image_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8), "L").save(tmp_path / f"g{i}.png")
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8), "RGB").save(tmp_path / "c.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_data(TrainConfig(data=f"images:{tmp_path}", arch="conv", image_size=8, conv_channels=(4,),
                              test_fraction=0.0))
    assert s.example_shape == (3, 8, 8) and len(s.train) + len(s.val) == 5
    assert s.image_shape == (3, 8, 8)


def test_binarize_makes_held_out_splits_binary_once(tmp_path: Path) -> None:
    s = load_data(TrainConfig(data="digits", binarize=True))
    assert set(torch.unique(s.val).tolist()) <= {0.0, 1.0}
    assert len(torch.unique(s.train)) > 2  # training batches are binarised afresh each step


def test_normalization_round_trips_through_its_dict() -> None:
    n = Normalization(kind="standardize", offset=[1.0, 2.0], scale=[3.0, 4.0])
    assert Normalization.from_dict(n.to_dict()) == n


# --- bad inputs: each fails before training with a message naming the problem


@pytest.mark.parametrize("spec, match", [
    ("mnist:{tmp}/missing", r"no such directory"),
    ("npy:{tmp}/missing.npy", r"no such file"),
    ("images:{tmp}/missing", r"no such directory"),
    ("mnist:{tmp}", r"no train-images-idx3-ubyte"),
    ("images:{tmp}", r"no PNG or JPEG files"),
    ("parquet:{tmp}", r"expected digits, mnist:DIR, npy:FILE or images:DIR"),
    ("npy:", r"expected npy:PATH"),
])
def test_missing_or_unknown_sources_are_named(tmp_path: Path, spec: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load_data(TrainConfig(data=spec.format(tmp=tmp_path)))


def test_an_unreadable_npy_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match=r"x\.npy: unreadable file"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 'x.npy'}"))


def test_a_corrupt_gzip_idx_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: unreadable IDX file"):
        load_data(TrainConfig(data=f"mnist:{tmp_path}"))


def test_a_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images(5), gz=False)
    p = tmp_path / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"unreadable IDX file \(header says"):
        load_data(TrainConfig(data=f"mnist:{tmp_path}"))


def test_an_unreadable_image_is_reported(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        load_data(TrainConfig(data=f"images:{tmp_path}"))


def test_wrong_rank_is_reported(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros(10, dtype=np.float32))
    with pytest.raises(DataError, match=r"wrong rank.*got shape \(10,\)"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 'v.npy'}"))
    np.save(tmp_path / "t.npy", np.zeros((10, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"wrong rank for arch 'conv'"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 't.npy'}", arch="conv"))


def test_fewer_than_two_examples_are_reported(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((1, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"fewer than 2 examples \(got 1\)"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 'one.npy'}"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_are_reported(tmp_path: Path, bad: float) -> None:
    x = np.full((10, 4), 0.5, dtype=np.float32)
    x[3, 2] = bad
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(DataError, match=r"1 NaN/Inf values"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 'x.npy'}"))


def test_values_outside_0_1_for_bernoulli_without_rescale_are_reported(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.linspace(-1, 2, 40, dtype=np.float32).reshape(10, 4))
    with pytest.raises(DataError, match=r"values outside \[0, 1\] \(min -1, max 2\).*--rescale"):
        load_data(TrainConfig(data=f"npy:{tmp_path / 'x.npy'}"))
