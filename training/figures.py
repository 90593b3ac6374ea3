"""Figures of a finished run: samples.png, reconstructions.png, curves.png, interpolation.png.

Written by `training.fit` (rank 0) from the best checkpoint. Image data (digits, MNIST, images:DIR,
npy of shape (N, H, W) or (N, C, H, W)) is drawn as image grids; other data as heat maps with one
row per example.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display

import matplotlib.pyplot as plt
import numpy as np
import torch

from training.data import DataSplits
from training.model import VAE

logger = logging.getLogger(__name__)


def _to_display(x_model: torch.Tensor, splits: DataSplits) -> np.ndarray:
    """(N, *example_shape) model space -> (N, H, W[, 3]) in [0, 1] for images, else (N, D) in [0, 1]."""
    x = x_model.detach().cpu().numpy().reshape(len(x_model), -1)
    if splits.normalization.kind != "scale":  # standardised: back to raw units, then min-max for display
        x = splits.normalization.invert(x)
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    x = np.clip(x, 0.0, 1.0)
    if splits.image_shape is None:
        return x
    c, h, w = splits.image_shape
    imgs = x.reshape(len(x), c, h, w)
    return imgs[:, 0] if c == 1 else imgs.transpose(0, 2, 3, 1)


def _grid(ax: Any, images: np.ndarray, rows: int, cols: int, is_image: bool) -> None:
    ax.axis("off")
    if not is_image:  # one heat-map row per example
        ax.imshow(images[: rows * cols], aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        return
    h, w = images.shape[1:3]
    tile = np.ones((rows * (h + 1) - 1, cols * (w + 1) - 1, *images.shape[3:]))
    for i, im in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        tile[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = im
    ax.imshow(tile, cmap="gray", vmin=0, vmax=1, interpolation="nearest")


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def write_all(out: Path, model: VAE, splits: DataSplits, history: list[dict[str, Any]], seed: int) -> None:
    """Write the four figures into `out`. `model` on CPU, eval mode."""
    model = model.cpu().eval()
    is_image = splits.image_shape is not None
    g = torch.Generator().manual_seed(seed)
    d = model.config.latent_dim
    held = splits.test if len(splits.test) else splits.val

    # samples.png: decoder means of z ~ N(0, I)
    z = torch.randn((64, d), generator=g)
    fig, ax = plt.subplots(figsize=(6, 6))
    _grid(ax, _to_display(model.decode(z).mean, splits), 8, 8, is_image)
    ax.set_title("samples from the prior (decoder mean)")
    _save(fig, out / "samples.png")

    # reconstructions.png: rows alternate inputs and reconstructions from the posterior mean
    x = held[:32]
    mu, _ = model.encode(x)
    rec = model.decode(mu).mean
    pairs = []
    for i in range(0, len(x), 8):
        pairs += [x[i:i + 8], rec[i:i + 8]]
    fig, ax = plt.subplots(figsize=(6, 6))
    _grid(ax, _to_display(torch.cat(pairs), splits), len(pairs), min(8, len(x)), is_image)
    ax.set_title("inputs (odd rows) and reconstructions (even rows)")
    _save(fig, out / "reconstructions.png")

    # curves.png: -ELBO and its terms per epoch
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    ep = [r["epoch"] for r in history]
    a1.plot(ep, [r["train_neg_elbo"] for r in history], label="train")
    a1.plot(ep, [r["val_neg_elbo"] for r in history], label="validation")
    a1.set(xlabel="epoch", ylabel="-ELBO (nats per example)", title="loss")
    a1.legend()
    a2.plot(ep, [r["val_recon_nll"] for r in history], label="val reconstruction -log P(x|z)")
    a2.plot(ep, [r["val_kl"] for r in history], label="val KL(Q || N(0, I))")
    a2.set(xlabel="epoch", ylabel="nats per example", title="ELBO terms")
    a2.legend()
    _save(fig, out / "curves.png")

    # interpolation.png: straight lines in latent space between pairs of held-out posterior means
    n_pairs, steps = min(4, len(held) // 2), 10
    if n_pairs >= 1:
        mu, _ = model.encode(held[: 2 * n_pairs])
        t = torch.linspace(0, 1, steps).reshape(1, steps, 1)
        path = mu[0::2].unsqueeze(1) * (1 - t) + mu[1::2].unsqueeze(1) * t  # (pairs, steps, d)
        dec = model.decode(path.reshape(-1, d)).mean
        fig, ax = plt.subplots(figsize=(8, 1 + 0.8 * n_pairs))
        _grid(ax, _to_display(dec, splits), n_pairs, steps, is_image)
        ax.set_title("latent interpolation between held-out examples")
        _save(fig, out / "interpolation.png")
    logger.info("figures written to %s", out)
