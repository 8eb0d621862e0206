"""Notebook output: small HTML tables (every value escaped) and optional matplotlib."""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any


def html_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """A two-column table under `title`; every name and value is HTML-escaped."""
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(str(name))}</th>"
        f"<td style='text-align:left'>{html.escape(_text(value))}</td></tr>"
        for name, value in rows if value is not None)
    return (f"<div class='latentbank'><strong>{html.escape(title)}</strong>"
            f"<table>{body}</table></div>")


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def bar(fraction: float) -> str:
    """A text progress bar, e.g. `[#####     ] 50%`."""
    fraction = min(max(float(fraction or 0), 0.0), 1.0)
    filled = round(10 * fraction)
    return f"[{'#' * filled}{' ' * (10 - filled)}] {100 * fraction:.0f}%"


class PNG:
    """PNG bytes a notebook shows as an image (`_repr_png_`); `data` holds them."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def _repr_png_(self) -> bytes:
        return self.data

    def save(self, path: str) -> None:
        """Write the PNG to `path`."""
        with open(path, "wb") as f:
            f.write(self.data)


def pyplot() -> Any:
    """matplotlib.pyplot, or None when matplotlib is not installed."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def curves_figure(rows: list[Any]) -> Any:
    """A matplotlib figure of training curves: the bound(s), reconstruction and KL per
    epoch, train solid and validation dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for split, style in (("train", "-"), ("val", "--")):
        mine = [r for r in rows if r.split == split]
        if not mine:
            continue
        epochs = [r.epoch for r in mine]
        axes[0].plot(epochs, [r.elbo for r in mine], style, label=f"{split} ELBO")
        if any(r.log_px is not None for r in mine):
            axes[0].plot(epochs, [r.log_px for r in mine], style, label=f"{split} log p(x)")
        axes[1].plot(epochs, [r.reconstruction for r in mine], style, label=split)
        axes[2].plot(epochs, [r.kl for r in mine], style, label=split)
    for ax, title in zip(axes, ("bound (nats)", "reconstruction (nats)", "KL (nats)"),
                         strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)  # returned, not shown twice by a notebook's inline backend
    return fig


def latents_figure(projection: Any) -> Any:
    """A matplotlib scatter of a set's projection, coloured by label when all have one."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    labels = projection.labels
    colours = None
    if labels and all(label is not None for label in labels):
        colours = np.unique(np.asarray(labels), return_inverse=True)[1]
    points = np.asarray(projection.points).reshape(-1, 2)
    ax.scatter(points[:, 0], points[:, 1], c=colours, s=8, cmap="tab10")
    share = projection.explained_variance
    ax.set_xlabel(f"PC1 ({100 * share[0]:.0f}%)" if share is not None else "PC1")
    ax.set_ylabel(f"PC2 ({100 * share[1]:.0f}%)" if share is not None else "PC2")
    ax.set_title(f"embedding set {projection.set_id}: latent means")
    fig.tight_layout()
    plt.close(fig)
    return fig
