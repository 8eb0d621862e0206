"""Per-item evaluation of a trained VAE over a dataset, in nats (ELBO, reconstruction, KL,
importance-sampled log p(x)), and over the set the KL per latent dimension and the active
units: the figures docs/internals/likelihoods.md defines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.config import VAEConfig
from models.data import iter_batches
from models.transforms import bits_per_dim
from models.vae import VAE, ImportanceEstimate, elbo_terms, log_px_importance

ACTIVE_UNIT_THRESHOLD = 0.01
QUANTILE_LEVELS = np.round(np.linspace(0.0, 0.5, 1001), 6)  # steps of 0.0005
CONVERGENCE_K = (1, 10, 100, 1000)  # the held-out summary's log p(x) at these K
COLLAPSE_WARNING_SHARE = 0.5  # warn when more than this share of dimensions collapsed


@dataclass
class Evaluation:
    """Per-item arrays (N,) float64 and set-level statistics. The log p(x) fields are None
    when K = 0 (the standard error also when K = 1); `log_px_at` maps smaller K to the
    nested estimates from the first K of the same draws."""

    elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    log_px: np.ndarray | None
    kl_per_dim: np.ndarray  # (D,) mean over items
    mu_variance: np.ndarray  # (D,) Var over items of E_q[z_d]
    importance_samples: int
    item_size: int = 0
    log_px_se: np.ndarray | None = None
    ess: np.ndarray | None = None
    log_px_at: dict[int, np.ndarray] | None = None

    @property
    def active_units(self) -> int:
        return int((self.mu_variance > ACTIVE_UNIT_THRESHOLD).sum())

    @property
    def collapsed_dims(self) -> list[int]:
        """Latent dimensions whose posterior mean no longer depends on the item."""
        return [int(d) for d in np.flatnonzero(self.mu_variance <= ACTIVE_UNIT_THRESHOLD)]

    def mean_standard_error(self) -> float | None:
        """The Monte-Carlo standard error of the mean log p(x) over the items (the items'
        draws are independent): sqrt(sum se_i^2) / N."""
        if self.log_px_se is None:
            return None
        return float(np.sqrt(np.sum(self.log_px_se ** 2)) / len(self.log_px_se))

    def quantiles(self) -> dict[str, object]:
        """The lower half of the held-out distribution of log p(x) (ELBO when K = 0),
        stored with the model, so that a threshold at any false-positive rate is a lookup
        when new items are scored (service.api.scoring.threshold_at)."""
        values = self.log_px if self.log_px is not None else self.elbo
        return {"statistic": "log_px" if self.log_px is not None else "elbo",
                "importance_samples": self.importance_samples,
                "n_items": len(values), "levels": QUANTILE_LEVELS.tolist(),
                "values": np.quantile(values, QUANTILE_LEVELS).tolist()}

    def summary(self) -> dict[str, object]:
        """Means over items (nats; ELBO and log p(x) higher is better), the Monte-Carlo
        error of the mean log p(x), the weights' mean and smallest ESS, the nested
        estimates at smaller K, and bits per dimension of the best figure (log p(x), else
        the ELBO; meaningful for `discrete` likelihoods)."""
        log_px = float(self.log_px.mean()) if self.log_px is not None else None
        best = log_px if log_px is not None else float(self.elbo.mean())
        return {
            "n_items": int(self.elbo.shape[0]),
            "elbo": float(self.elbo.mean()),
            "reconstruction": float(self.reconstruction.mean()),
            "kl": float(self.kl.mean()),
            "log_px": log_px,
            "log_px_se": self.mean_standard_error(),
            "ess_mean": float(self.ess.mean()) if self.ess is not None else None,
            "ess_min": float(self.ess.min()) if self.ess is not None else None,
            "log_px_by_k": ({str(k): float(v.mean()) for k, v in sorted(
                self.log_px_at.items())} if self.log_px_at else None),
            "bits_per_dim": (float(bits_per_dim(best, self.item_size))
                             if self.item_size else None),
            "importance_samples": self.importance_samples,
            "active_units": self.active_units,
        }


def _keep_estimates(est: ImportanceEstimate, span: slice, log_px: Any, ess: Any,
                    log_px_se: np.ndarray | None, log_px_at: dict[int, np.ndarray]) -> None:
    """A batch's importance-sampled figures written into the evaluation's arrays."""
    log_px[span] = est.log_px.double().cpu().numpy()
    ess[span] = est.ess.double().cpu().numpy()
    if log_px_se is not None and est.log_px_se is not None:
        log_px_se[span] = est.log_px_se.double().cpu().numpy()
    for k, values in log_px_at.items():
        values[span] = est.at[k].double().cpu().numpy()


@torch.no_grad()
def evaluate(model: VAE, array: np.ndarray, rows: np.ndarray, *, importance_samples: int,
             batch_size: int = 512, seed: int = 0, device: str | torch.device = "cpu",
             elbo_samples: int = 1, at: tuple[int, ...] = (),
             on_batch: Callable[[int, int], None] | None = None) -> Evaluation:
    """Evaluate `model` on `array[rows]` (as the model sees them: the evaluation copy of
    binarised or dequantised data), reproducibly for a given `seed`.

    With K = `importance_samples` > 0 the ELBO terms average the same K draws that
    estimate log p(x); with K = 0 they average `elbo_samples` draws. `at` lists smaller
    K whose nested log p(x) estimates are kept too. `on_batch(done, total)` reports
    progress in items.
    """
    config: VAEConfig = model.config
    was_training = model.training
    model.eval()
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    n = len(rows)
    out = {name: np.empty(n, dtype=np.float64) for name in ("elbo", "reconstruction", "kl")}
    log_px = np.empty(n, dtype=np.float64) if importance_samples > 0 else None
    log_px_se = np.empty(n, dtype=np.float64) if importance_samples > 1 else None
    ess = np.empty(n, dtype=np.float64) if importance_samples > 0 else None
    stops = [s for s in at if 0 < s < importance_samples]
    log_px_at = {s: np.empty(n, dtype=np.float64) for s in stops}
    kl_dims = torch.zeros(config.latent_dim, dtype=torch.float64)
    mu_sum = torch.zeros(config.latent_dim, dtype=torch.float64)
    mu_sq_sum = torch.zeros(config.latent_dim, dtype=torch.float64)
    done = 0
    try:
        for x in iter_batches(array, rows, batch_size, config):
            x = x.to(device)
            if importance_samples > 0:
                est = log_px_importance(model, x, importance_samples, generator,
                                        at=tuple(stops))
                terms, mu = est, est.mu
                _keep_estimates(est, slice(done, done + len(x)), log_px, ess, log_px_se,
                                log_px_at)
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
    if log_px_at:
        log_px_at[importance_samples] = log_px  # type: ignore[assignment]
    return Evaluation(out["elbo"], out["reconstruction"], out["kl"], log_px,
                      (kl_dims / max(n, 1)).numpy(), mu_variance.numpy(), importance_samples,
                      item_size=config.input_size, log_px_se=log_px_se, ess=ess,
                      log_px_at=log_px_at or None)


def collapse_warning(active_units: int | None, latent_dim: int) -> str:
    """A progress-message suffix when most latent dimensions have collapsed to the prior
    (inactive on the validation split), naming the knobs that help; else ''."""
    if active_units is None or latent_dim - active_units <= COLLAPSE_WARNING_SHARE * latent_dim:
        return ""
    return (f"; warning: {latent_dim - active_units} of {latent_dim} latent dimensions "
            "collapsed (posterior = prior): try KL warm-up (training.kl_warmup_epochs), "
            "free bits (training.free_bits), a smaller beta or latent_dim")
