"""Score's answer for a person: a text table and a PNG of the most anomalous inputs over their heat maps.

Used by `python -m serving.client score` (serving/client.py); numpy and, for the PNG, Pillow. No server code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_NO_VALUE = "-"


def score_table(score: np.ndarray, nll: np.ndarray, percentile: np.ndarray | None, is_outlier: np.ndarray | None,
                kind: str, limit: int = 50) -> str:
    """One line per example (the `limit` highest scores first when there are more): index, score, nll,
    percentile and the flag."""
    n = score.shape[0]
    order = np.argsort(-score, kind="stable")[:limit] if n > limit else np.arange(n)
    lines = [f"{'row':>6}  {kind:>12}  {'nll':>10}  {'percentile':>10}  outlier"]
    for i in order.tolist():
        pct = f"{percentile[i]:10.2f}" if percentile is not None else f"{_NO_VALUE:>10}"
        flag = ("yes" if is_outlier[i] else "no") if is_outlier is not None else _NO_VALUE
        lines.append(f"{i:>6}  {score[i]:12.3f}  {nll[i]:10.3f}  {pct}  {flag}")
    if n > limit:
        lines.append(f"... {n - limit} more rows (the {limit} highest scores shown)")
    return "\n".join(lines)


def _heat(values: np.ndarray) -> np.ndarray:
    """(H, W) non-negative values -> (H, W, 3) uint8, black -> red -> yellow -> white, scaled to the max."""
    v = values.astype(np.float64)
    top = float(v.max())
    t = np.clip(v / top, 0.0, 1.0) if top > 0 else np.zeros_like(v)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def save_heatmaps(x_raw: np.ndarray, feature_scores: np.ndarray, score: np.ndarray,
                  layout: tuple[int, int, int], path: Path, top: int = 8, upscale: int = 4) -> list[int]:
    """The `top` highest-scoring inputs (top row, grey) over their per-feature scores (bottom row, heat map
    scaled per image), as one PNG. x_raw and feature_scores are (N, *example_shape). Returns the rows shown."""
    from PIL import Image  # only the CLI needs Pillow

    c, h, w = layout
    rows = np.argsort(-score, kind="stable")[:top].tolist()
    cols = len(rows)
    grid = np.full((2 * (h + 1) + 1, cols * (w + 1) + 1, 3), 255, dtype=np.uint8)
    for j, i in enumerate(rows):
        img = x_raw[i].reshape(c, h, w).astype(np.float64).mean(axis=0)  # colour: shown as grey
        lo, hi = float(img.min()), float(img.max())
        grey = ((img - lo) / (hi - lo) * 255).round().astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
        x0 = 1 + j * (w + 1)
        grid[1:1 + h, x0:x0 + w] = grey[..., None]
        heat = np.maximum(feature_scores[i].reshape(c, h, w).astype(np.float64), 0.0).sum(axis=0)
        grid[2 + h:2 + 2 * h, x0:x0 + w] = _heat(heat)
    image = Image.fromarray(grid)
    image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)
    return rows


def summary(n: int, kind: str, k: int, seed: int, quantile: float, threshold: float, calibration: str,
            flagged: int | None, shown: Sequence[int] | None, png: Path | None) -> dict[str, Any]:
    """The JSON line the CLI prints after the table."""
    return {"n": n, "kind": kind, "k": k, "seed": seed, "quantile": quantile,
            "threshold": None if math.isnan(threshold) else threshold, "flagged": flagged,
            "calibration": calibration, "png": str(png) if png else None,
            "png_rows": list(shown) if shown is not None else None}
