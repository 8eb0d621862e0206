"""Trainer throughput against a plain PyTorch loop, and memory when training from a memmap.

    python bench/train.py [--quick] [--skip-memmap]

Both loops train the same VAE module on the same data with the same batch size and
Adam settings in this one process, alternating, best of `--repeats`; the table gives
samples/s and their ratio (target >= 0.95: callbacks, metrics and checkpointing cost
almost nothing). The memmap part trains one epoch from a ~2 GB `.npy` in a child process
and samples its resident memory: anonymous (heap: what the process really holds) and
file-backed (pages of the mapped file, which the kernel reclaims at will).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.config import TrainConfig, VAEConfig
from models.trainer import Callback, CheckpointEachEpoch, Trainer
from models.vae import VAE

MLP = VAEConfig(input_shape=(784,), latent_dim=20, hidden=(400,), likelihood="bernoulli")
CONV = VAEConfig(input_shape=(1, 28, 28), family="conv", hidden=(32, 64), latent_dim=16)


def plain_loop(cfg: VAEConfig, data: np.ndarray, epochs: int, batch_size: int) -> float:
    """The 20-line loop of the PyTorch VAE example, on the same module; returns seconds."""
    torch.manual_seed(0)
    model = VAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(data)
    started = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_all)).split(batch_size):
            x = x_all[idx]
            mu, logvar = model.encoder(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = model.decoder(z)
            rec = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = 0.5 * (logvar.exp() + mu.pow(2) - 1 - logvar).sum()
            loss = -(rec - kl) / len(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - started


class CountProgress(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_progress(self, trainer, progress) -> None:
        self.calls += 1


def trainer_run(cfg: VAEConfig, data: np.ndarray, epochs: int, batch_size: int,
                grad_clip: float | None, tmp: str) -> float:
    train_cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, val_fraction=0.0,
                            grad_clip=grad_clip, importance_samples=0)
    callbacks = [CheckpointEachEpoch(os.path.join(tmp, "bench.safetensors")), CountProgress()]
    started = time.perf_counter()
    Trainer(cfg, train_cfg, callbacks=callbacks).fit(data)
    return time.perf_counter() - started


def throughput_rows(quick: bool, repeats: int) -> list[tuple[str, str, float]]:
    rng = np.random.default_rng(0)
    rows = []
    cases = [("mlp 784-400-20 bernoulli", MLP, 8000 if quick else 30000, 2),
             ("conv 1x28x28 (32,64)-16", CONV, 2000 if quick else 6000, 2)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, n, epochs in cases:
            data = rng.random((n, *cfg.input_shape), dtype=np.float32)
            best = {"plain": np.inf, "trainer": np.inf, "trainer-noclip": np.inf}
            for _ in range(repeats):  # alternate so drift on a shared machine hits all alike
                best["plain"] = min(best["plain"], plain_loop(cfg, data, epochs, 128))
                best["trainer"] = min(best["trainer"],
                                      trainer_run(cfg, data, epochs, 128, 100.0, tmp))
                best["trainer-noclip"] = min(best["trainer-noclip"],
                                             trainer_run(cfg, data, epochs, 128, None, tmp))
            base = n * epochs / best["plain"]
            rows.append((name, "plain loop (baseline)", base, 1.0))
            rows.append((name, "Trainer, defaults (grad clip, ckpt/epoch, progress)",
                         n * epochs / best["trainer"], best["plain"] / best["trainer"]))
            rows.append((name, "Trainer, no grad clip (same work as baseline)",
                         n * epochs / best["trainer-noclip"],
                         best["plain"] / best["trainer-noclip"]))
    return rows


MEMMAP_CHILD = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
from models.config import TrainConfig, VAEConfig
from models.data import open_npy
from models.trainer import Trainer
data = open_npy(sys.argv[1])
cfg = VAEConfig(input_shape=data.shape[1:], latent_dim=20, hidden=(400,))
Trainer(cfg, TrainConfig(epochs=1, batch_size=256, val_fraction=0.01, importance_samples=0,
                         eval_importance_samples=0)).fit(data)
"""


def rss_parts(pid: int) -> tuple[int, int]:
    anon = file = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1]) * 1024
            elif line.startswith("RssFile:"):
                file = int(line.split()[1]) * 1024
    return anon, file


def memmap_row(gigabytes: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        path = os.path.join(tmp, "big.npy")
        n = int(gigabytes * 1e9 / (784 * 4))
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 784))
        rng = np.random.default_rng(0)
        for start in range(0, n, 65536):
            stop = min(n, start + 65536)
            out[start:stop] = rng.random((stop - start, 784), dtype=np.float32)
        out.flush()
        del out
        size = os.path.getsize(path)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", MEMMAP_CHILD, path, root])
        peak_anon = peak_total = 0
        stop_event = threading.Event()

        def sample() -> None:
            nonlocal peak_anon, peak_total
            while not stop_event.is_set():
                try:
                    anon, file = rss_parts(child.pid)
                except OSError:
                    return
                peak_anon, peak_total = max(peak_anon, anon), max(peak_total, anon + file)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        rc = child.wait()
        stop_event.set()
        sampler.join()
        if rc != 0:
            raise SystemExit(f"memmap child failed with {rc}")
        seconds = time.perf_counter() - started
    return {"file_bytes": size, "rows": n, "peak_anon": peak_anon, "peak_rss": peak_total,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memmap", action="store_true")
    parser.add_argument("--memmap-gb", type=float, default=2.0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128\n")
    rows = throughput_rows(args.quick, 1 if args.quick else args.repeats)
    print(f"{'model':26s} {'loop':52s} {'samples/s':>10s} {'ratio':>6s}")
    for name, loop, sps, ratio in rows:
        print(f"{name:26s} {loop:52s} {sps:10.0f} {ratio:6.3f}")
    if not args.skip_memmap:
        gb = 0.2 if args.quick else args.memmap_gb
        m = memmap_row(gb)
        mib = 1 << 20
        print(f"\none epoch from a memory-mapped .npy: {m['rows']} x 784 float32, "
              f"{m['file_bytes'] / mib:.0f} MiB, {m['seconds']:.1f} s")
        print(f"  peak anonymous memory (heap)    {m['peak_anon'] / mib:8.0f} MiB "
              f"= {m['peak_anon'] / m['file_bytes']:.3f} x file")
        print(f"  peak RSS incl. mapped file pages {m['peak_rss'] / mib:7.0f} MiB "
              "(file pages are page cache, reclaimable)")


if __name__ == "__main__":
    main()
