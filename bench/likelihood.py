"""The service's trainer against the PyTorch-examples VAE loop, at equal epochs: held-out
log p(x) on the same MNIST-like test items, measured by one evaluator, across seeds.

    python bench/likelihood.py [--quick] [--seeds 3] [--epochs 10]

The plain loop is pytorch/examples `vae/main.py` written out (784-400-20, ReLU, Adam 1e-3,
batch 128, BCE summed over pixels, no clipping, no validation split, every training item
each epoch). Its weights are copied into the service's VAE of the same architecture so
both are evaluated by models.evaluate (K importance samples, same test items, same seed).
The service's rows vary one setting at a time from its defaults, which shows where a gap
comes from: the validation split (fewer items and steps per epoch), gradient clipping,
the initialisation. Bernoulli on grey pixels, as the example does (an unnormalised
figure, but the same one for every row); data: bench/mnistlike.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mnistlike import mnist_like
from models.config import TrainConfig, VAEConfig
from models.evaluate import evaluate
from models.trainer import Trainer
from models.vae import VAE

CFG = VAEConfig(input_shape=(784,), latent_dim=20, hidden=(400,), likelihood="bernoulli")


class ExampleVAE(nn.Module):
    """pytorch/examples vae/main.py's model, as written there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h1 = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h1), self.fc22(h1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def plain_loop(train: np.ndarray, epochs: int, seed: int) -> VAE:
    """The example's loop (sum-reduced loss, no clipping); returns its weights in a VAE."""
    torch.manual_seed(seed)
    model = ExampleVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all = torch.from_numpy(train)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_all)).split(128):
            x = x_all[idx]
            logits, mu, logvar = model(x)
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            opt.zero_grad()
            (bce + kld).backward()
            opt.step()
    vae = VAE(CFG)
    with torch.no_grad():
        vae.encoder.body[0].load_state_dict(model.fc1.state_dict())
        vae.encoder.head.weight.copy_(torch.cat([model.fc21.weight, model.fc22.weight]))
        vae.encoder.head.bias.copy_(torch.cat([model.fc21.bias, model.fc22.bias]))
        vae.decoder.body[0].load_state_dict(model.fc3.state_dict())
        vae.decoder.body[2].load_state_dict(model.fc4.state_dict())
    return vae.eval()


def service(train: np.ndarray, epochs: int, seed: int, **overrides: object) -> VAE:
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": 128, "lr": 1e-3, "seed": seed,
                         "eval_importance_samples": 0, "importance_samples": 0, **overrides})
    return Trainer(CFG, cfg).fit(train).model.eval()


ROWS = {
    "plain loop (pytorch/examples)": lambda d, e, s: plain_loop(d, e, s),
    "service, defaults": lambda d, e, s: service(d, e, s),
    "service, val_fraction 0": lambda d, e, s: service(d, e, s, val_fraction=0.0),
    "service, no grad clip": lambda d, e, s: service(d, e, s, grad_clip=None),
    "service, val_fraction 0, no grad clip": lambda d, e, s: service(
        d, e, s, val_fraction=0.0, grad_clip=None),
    "service, no data init": lambda d, e, s: service(d, e, s, init_from_data=False),
    "service, no data init, val_fraction 0": lambda d, e, s: service(
        d, e, s, init_from_data=False, val_fraction=0.0),
    "service, cosine lr": lambda d, e, s: service(d, e, s, lr_schedule="cosine"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--k", type=int, default=200, help="importance samples")
    parser.add_argument("--rows", default="", help="row names to run, separated by |")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train, args.k = 1, 2, 4000, 20
    train, _ = mnist_like(args.train, seed=1)
    test, _ = mnist_like(1000, seed=2)
    rows = {k: v for k, v in ROWS.items() if not args.rows or k in args.rows.split("|")}
    results: dict[str, list[float]] = {name: [] for name in rows}
    print(f"MNIST-like {args.train} train / {len(test)} test items, {args.epochs} epochs, "
          f"held-out log p(x) with K = {args.k} (nats, Bernoulli on grey pixels)")
    for seed in range(args.seeds):
        for name, run in rows.items():
            started = time.perf_counter()
            model = run(train, args.epochs, seed)
            ev = evaluate(model, test, np.arange(len(test)), importance_samples=args.k,
                          seed=1234)
            results[name].append(float(ev.log_px.mean()))
            print(f"  seed {seed} {name:42s} log p(x) {results[name][-1]:9.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    base = np.array(results[next(iter(rows))])
    print(f"\n{'run':42s} {'log p(x) mean':>14s} {'spread':>7s} {'vs first row':>13s}")
    for name, values in results.items():
        v = np.array(values)
        print(f"{name:42s} {v.mean():14.3f} {v.std():7.3f} {np.mean(v - base):+13.3f}")


if __name__ == "__main__":
    main()
