"""PNG figures of a training run: curves, latent scatter, image grids (matplotlib Agg).

Shared by the workers (files next to a run) and the API (PNG answers): each figure goes
to a path or to a binary file object. Imports neither torch nor Celery.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

Target = str | IO[bytes]


def _save_figure(fig: Any, path: Target) -> None:
    if isinstance(path, str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def plot_training_curves(history: Sequence[dict[str, Any]], path: Target) -> Target:
    """ELBO, reconstruction, KL and log p(x) per epoch and split."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for split, style in (("train", "-"), ("val", "--")):
        rows = [r for r in history if r["split"] == split]
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["elbo"] for r in rows], style, label=f"{split} ELBO")
        if any(r.get("log_px") is not None for r in rows):
            axes[0].plot(epochs, [r["log_px"] for r in rows], style,
                         label=f"{split} log p(x) (IWAE-{rows[0]['importance_samples']})")
        axes[1].plot(epochs, [r["reconstruction"] for r in rows], style, label=split)
        axes[2].plot(epochs, [r["kl"] for r in rows], style, label=split)
    for ax, title in zip(axes, ("bound (nats, higher is better)", "E_q[log p(x|z)] (nats)",
                                "KL(q(z|x) || p(z)) (nats)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def plot_latents(mu: np.ndarray, labels: np.ndarray | None, path: Target) -> Target:
    """2-D PCA of the posterior means, coloured by label when there are labels."""
    centred = mu - mu.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T if vt.shape[0] >= 2 else np.c_[centred[:, 0], np.zeros(len(mu))]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels if labels is not None else None, s=8,
                    cmap="tab10")
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_title("latent means, first two principal components")
    fig.tight_layout()
    _save_figure(fig, path)
    return path


def image_grid(images: np.ndarray, columns: int = 8, scale: int = 4) -> Image.Image:
    """Items (N, C, H, W) with C = 1 (grey) or 3 (RGB), or (N, H, W) grey, with values in
    [0, 1], as one grid image: `columns` tiles a row, each tile framed by a 1-pixel black
    border, the whole enlarged `scale` times (nearest neighbour: pixels stay sharp)."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes (N, 1|3, H, W) or (N, H, W); got "
                         f"{list(images.shape)}")
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((c, rows * (h + 1) + 1, columns * (w + 1) + 1), np.float32)
    for i in range(n):
        top, left = (1 + (h + 1) * (i // columns), 1 + (w + 1) * (i % columns))
        grid[:, top:top + h, left:left + w] = images[i]
    pixels = (grid.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)
