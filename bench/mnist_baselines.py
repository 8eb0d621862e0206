"""What bench/mnist.py reads the service against, written with no project code: the
paper's one-layer VAE/IWAE as a plain PyTorch loop with its own importance-sampled test
log p(x), and exact kNN label accuracy."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

# -- the plain PyTorch loop (no project code) ------------------------------------------

def plain_loop(train: np.ndarray, test: np.ndarray, epochs: int, batch: int, k_train: int,
               k_eval: int, seed: int) -> dict[str, Any]:
    """The paper's one-layer VAE/IWAE in plain PyTorch: train on `train` (N, 784) in [0, 1]
    (binarised anew each batch), then test log p(x) with K = k_eval on `test`, binary
    already (the very bits the service scores). As the service trains: the decoder's
    output bias starts at the training pixels' log-odds, and at k = 1 the loss is the ELBO
    with the KL in closed form (Kingma & Welling's estimator B). Returns the mean log p(x),
    its Monte-Carlo standard error, per-item values and seconds."""
    import torch
    from torch import nn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                        nn.Linear(200, 100))
    dec = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                        nn.Linear(200, 784))
    with torch.no_grad():
        mean = torch.from_numpy(train.mean(0).astype(np.float32)).clamp(1e-3, 1 - 1e-3)
        dec[-1].bias.copy_(torch.log(mean / (1 - mean)))
    enc, dec = enc.to(device), dec.to(device)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-4)

    def log_w(x: torch.Tensor, k: int) -> torch.Tensor:  # (k, B)
        mu, logvar = enc(x).chunk(2, -1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape, device=device)
        logits = dec(z)
        log_px_z = -nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * ((z - mu).square() / logvar.exp() + logvar
                         + math.log(2 * math.pi)).sum(-1)
        return log_px_z + log_pz - log_qz

    x_train = torch.from_numpy(train.astype(np.float32)).to(device)
    started = time.perf_counter()
    for epoch in range(epochs):
        stage = next(i for i in range(64) if epoch < (3 ** (i + 1) - 1) // 2)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 10 ** (-stage / 7)
        for rows in torch.randperm(len(x_train), device=device).split(batch):
            x = torch.bernoulli(x_train[rows])
            if k_train == 1:  # the ELBO: one draw for the reconstruction, the KL exact
                mu, logvar = enc(x).chunk(2, -1)
                logits = dec(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
                rec = -nn.functional.binary_cross_entropy_with_logits(
                    logits, x, reduction="none").sum(-1)
                kl = 0.5 * (logvar.exp() + mu.square() - 1 - logvar).sum(-1)
                loss = -(rec - kl).mean()
            else:  # the IWAE-k bound
                w = log_w(x, k_train)
                loss = -(torch.logsumexp(w, 0) - math.log(k_train)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    x_test = torch.from_numpy(test.astype(np.float32)).to(device)
    log_px, se = [], []
    with torch.no_grad():
        for x in x_test.split(100):
            w = torch.cat([log_w(x, min(500, k_eval - s)) for s in range(0, k_eval, 500)])
            m = w.max(0).values
            r = torch.exp(w - m)  # weights relative to the largest: no overflow
            log_px.append(m + torch.log(r.mean(0)))
            se.append(r.std(0) / math.sqrt(k_eval) / r.mean(0))  # delta method, in nats
    values = torch.cat(log_px).double().cpu().numpy()
    item_se = torch.cat(se).double().cpu().numpy()
    return {"log_px": float(values.mean()),
            "mc_se": float(np.sqrt((item_se ** 2).sum()) / len(item_se)),
            "items": values, "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - started}


# -- kNN -------------------------------------------------------------------------------

def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                 test_labels: np.ndarray, k: int = 10) -> float:
    """Exact L2 kNN of each test row among the training rows: the majority label of the k
    nearest (on a tie, the label reached first going outwards)."""
    train = train.reshape(len(train), -1).astype(np.float32)
    test = test.reshape(len(test), -1).astype(np.float32)
    norms = np.einsum("ij,ij->i", train, train)
    hits = 0
    for start in range(0, len(test), 500):
        d = norms[None, :] - 2 * test[start:start + 500] @ train.T  # + |q|^2: the same
        near = np.argpartition(d, k, axis=1)[:, :k]
        near = np.take_along_axis(near, np.take_along_axis(d, near, 1).argsort(1), 1)
        decided = np.asarray([vote(labels) for labels in train_labels[near]])
        hits += int((decided == test_labels[start:start + 500]).sum())
    return hits / len(test)


def vote(labels: np.ndarray) -> int:
    """The most common of `labels` (nearest first); a tie goes to the one met first."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[int(label)] = counts.get(int(label), 0) + 1
    best = max(counts.values())
    return next(int(lab) for lab in labels if counts[int(lab)] == best)
