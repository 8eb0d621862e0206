"""Per-item evaluation of a trained VAE over a dataset, in nats.

For each item: ELBO, reconstruction E_q[log p(x|z)], KL(q(z|x) || p(z)) and, with
K > 0 importance samples, log p(x) ~ logmeanexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)].
Over the set: mean KL per latent dimension and active units (Burda et al., 2016:
dimension d is active when Var_x(E_q[z_d]) > 0.01).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.config import VAEConfig
from models.data import iter_batches
from models.vae import VAE, elbo_terms, log_px_importance

ACTIVE_UNIT_THRESHOLD = 0.01
QUANTILE_LEVELS = np.round(np.linspace(0.0, 0.5, 1001), 6)  # steps of 0.0005


@dataclass
class Evaluation:
    """Per-item arrays (N,) float64 and set-level statistics. `log_px` is None when K = 0."""

    elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    log_px: np.ndarray | None
    kl_per_dim: np.ndarray  # (D,) mean over items
    mu_variance: np.ndarray  # (D,) Var over items of E_q[z_d]
    importance_samples: int

    @property
    def active_units(self) -> int:
        return int((self.mu_variance > ACTIVE_UNIT_THRESHOLD).sum())

    def quantiles(self) -> dict[str, object]:
        """The lower half of the held-out distribution of log p(x) (ELBO when K = 0),
        stored with the model, so that a threshold at any false-positive rate is a lookup
        when new items are scored (service.api.scoring.threshold_at)."""
        values = self.log_px if self.log_px is not None else self.elbo
        return {"statistic": "log_px" if self.log_px is not None else "elbo",
                "importance_samples": self.importance_samples,
                "n_items": len(values), "levels": QUANTILE_LEVELS.tolist(),
                "values": np.quantile(values, QUANTILE_LEVELS).tolist()}

    def summary(self) -> dict[str, float | int | None]:
        """Means over items (nats; ELBO and log p(x) higher is better)."""
        return {
            "n_items": int(self.elbo.shape[0]),
            "elbo": float(self.elbo.mean()),
            "reconstruction": float(self.reconstruction.mean()),
            "kl": float(self.kl.mean()),
            "log_px": float(self.log_px.mean()) if self.log_px is not None else None,
            "importance_samples": self.importance_samples,
            "active_units": self.active_units,
        }


@torch.no_grad()
def evaluate(model: VAE, array: np.ndarray, rows: np.ndarray, *, importance_samples: int,
             batch_size: int = 512, seed: int = 0, device: str | torch.device = "cpu",
             elbo_samples: int = 1,
             on_batch: Callable[[int, int], None] | None = None) -> Evaluation:
    """Evaluate `model` on `array[rows]`, reproducibly for a given `seed`.

    With K = `importance_samples` > 0 the ELBO terms average the same K draws that
    estimate log p(x); with K = 0 they average `elbo_samples` draws.
    `on_batch(done, total)` reports progress in items.
    """
    config: VAEConfig = model.config
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(rows)
    out = {name: np.empty(n, dtype=np.float64) for name in ("elbo", "reconstruction", "kl")}
    log_px = np.empty(n, dtype=np.float64) if importance_samples > 0 else None
    kl_dims = torch.zeros(config.latent_dim, dtype=torch.float64)
    mu_sum = torch.zeros(config.latent_dim, dtype=torch.float64)
    mu_sq_sum = torch.zeros(config.latent_dim, dtype=torch.float64)
    done = 0
    try:
        for x in iter_batches(array, rows, batch_size, config):
            x = x.to(device)
            if importance_samples > 0:
                est = log_px_importance(model, x, importance_samples, generator)
                terms, mu = est, est.mu
                log_px[done:done + len(x)] = est.log_px.double().cpu().numpy()  # type: ignore[index]
            else:
                terms = elbo_terms(model, x, elbo_samples, generator)
                mu, _ = model.encode(x)
            for name, array_out in out.items():
                array_out[done:done + len(x)] = getattr(terms, name).double().cpu().numpy()
            kl_dims += terms.kl_per_dim.double().sum(0).cpu()
            mu64 = mu.double().cpu()
            mu_sum += mu64.sum(0)
            mu_sq_sum += mu64.square().sum(0)
            done += len(x)
            if on_batch is not None:
                on_batch(done, n)
    finally:
        model.train(was_training)
    mean_mu = mu_sum / max(n, 1)
    mu_variance = (mu_sq_sum / max(n, 1) - mean_mu.square()).clamp(min=0)
    return Evaluation(out["elbo"], out["reconstruction"], out["kl"], log_px,
                      (kl_dims / max(n, 1)).numpy(), mu_variance.numpy(), importance_samples)
