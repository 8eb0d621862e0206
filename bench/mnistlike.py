"""MNIST-like data offline: scikit-learn's 8x8 digits (the only real images a package
ships here) scaled to 28x28 and jittered (shift, rotation, stroke scale), grey pixels in
[0, 1]. Not MNIST: its figures are comparable with each other, not with MNIST tables.
"""

from __future__ import annotations

import numpy as np


def mnist_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 784) float32 in [0, 1], labels (n,)): each a random digit of the 1797,
    upscaled to 20x20 (bilinear), rotated by up to 15 degrees, placed at a random offset
    (+-2 pixels) of the 28x28 centre, with a random contrast in [0.8, 1]."""
    from scipy import ndimage
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(digits.images), n)
    out = np.zeros((n, 28, 28), dtype=np.float32)
    for i, j in enumerate(picks):
        img = ndimage.zoom(digits.images[j] / 16.0, 20 / 8, order=1)
        img = ndimage.rotate(img, rng.uniform(-15, 15), reshape=False, order=1)
        dy, dx = rng.integers(2, 7, size=2)  # the 20x20 box at 4 +- 2
        out[i, dy:dy + 20, dx:dx + 20] = np.clip(img, 0, 1) * rng.uniform(0.8, 1.0)
    return out.reshape(n, 784), digits.target[picks].astype(np.int64)
