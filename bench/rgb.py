"""An RGB conv VAE with the discretised logistic on 8-bit images: seconds per epoch and
held-out bits/dim after a short run.

    python bench/rgb.py [--items 2000] [--size 32] [--epochs 40] [--blocks 1] [--norm group]

Data: generated uint8 images, stored and read as a memory map like an ingested dataset: a
grey background with +-8 levels of noise per value and a filled square or disc whose colour
is its class. The noise alone is worth log2(17) = 4.1 bits on most values, so that is
about the floor a model of these images can reach. Epoch times are the median over epochs
(the CPU may be shared: the slowest epochs say more about neighbours than about the model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.config import TrainConfig, VAEConfig
from models.data import open_npy
from models.evaluate import evaluate
from models.trainer import Callback, Trainer

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [240, 220, 30]])


def coloured_shapes(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) uint8: a noisy grey background and a square or disc per item."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for i in range(n):
        img = np.full((size, size, 3), rng.integers(60, 120), dtype=np.int64)
        img += rng.integers(-8, 9, img.shape)
        r = rng.integers(size // 6, size // 3)
        cy, cx = rng.integers(r, size - r, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if i % 2 else (
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
        img[mask] = COLOURS[rng.integers(len(COLOURS))]
        out[i] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


class EpochTimes(Callback):
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: list[float] = []

    def on_train_start(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()  # after validation and the start from the data

    def on_epoch_end(self, trainer: Trainer, rows: list[dict]) -> None:
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--norm", default="group")
    parser.add_argument("--importance-samples", type=int, default=100)
    args = parser.parse_args()
    hidden = (32, 64, 128) if args.size <= 32 else (32, 64, 128, 128)
    cfg = VAEConfig(input_shape=(3, args.size, args.size), family="conv", hidden=hidden,
                    latent_dim=32, blocks=args.blocks, norm=args.norm,
                    likelihood="discretized_logistic", min_log_scale=-7.0)
    train = TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, seed=0, val_fraction=0.1,
                        eval_importance_samples=0, importance_samples=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        np.save(path, coloured_shapes(args.items, args.size))
        data = open_npy(path)
        times = EpochTimes()
        trainer = Trainer(cfg, train, callbacks=[times])
        result = trainer.fit(data)
        heldout = evaluate(result.model, data, result.val_rows,
                           importance_samples=args.importance_samples, seed=0).summary()
    per_epoch = statistics.median(times.seconds)
    print(json.dumps({
        "items": args.items, "shape": list(cfg.input_shape), "hidden": list(hidden),
        "blocks": args.blocks, "norm": args.norm, "epochs": args.epochs,
        "parameters": sum(p.numel() for p in result.model.parameters()),
        "threads": torch.get_num_threads(),
        "seconds_per_epoch_median": round(per_epoch, 2),
        "train_items_per_second": round(len(result.train_rows) / per_epoch, 1),
        "heldout_bits_per_dim": round(heldout["bits_per_dim"], 3),
        "heldout_elbo_bits_per_dim": round(
            -heldout["elbo"] / (cfg.input_size * np.log(2)), 3),
        "log_scale_per_channel": [round(v, 2) for v in
                                  result.model.likelihood.log_scale().detach().view(-1).tolist()],
    }, indent=2))


if __name__ == "__main__":
    main()
