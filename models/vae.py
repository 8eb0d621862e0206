"""The VAE and its bounds, one function per formula of DESIGN.md.

q(z|x) = N(mu(x), diag(exp(logvar(x)))),  p(z) = N(0, I),  p(x|z) from models.likelihoods.
Every quantity is per item, in nats, with log-likelihood signs (higher is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.config import VAEConfig
from models.likelihoods import LOG_2PI, build_likelihood
from models.networks import build_decoder, build_encoder


class VAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = build_decoder(config)
        self.likelihood = build_likelihood(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, *item) -> mu, logvar, each (B, D)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> the likelihood's location (..., *item), any leading dimensions."""
        lead = z.shape[:-1]
        return self.decoder(z.reshape(-1, z.shape[-1])).reshape(*lead, *self.config.input_shape)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z): x (B, *item), z (..., B, D) -> (..., B), in at least float32."""
        loc = at_least_float32(self.decode(z))
        return self.likelihood.log_prob(x.to(loc.dtype), loc)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision activations (mixed precision) are promoted; float64 stays float64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2); eps ~ N(0, I) broadcasts over mu."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_normal_std(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per dimension, closed form: (..., D) -> (..., D)."""
    return 0.5 * (torch.exp(logvar) + mu.square() - 1.0 - logvar)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).square() * torch.exp(-logvar)).sum(-1)


def log_std_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.square()).sum(-1)


def logmeanexp(a: torch.Tensor, dim: int) -> torch.Tensor:
    """log(mean(exp(a))) along `dim`, without overflow."""
    return torch.logsumexp(a, dim=dim) - math.log(a.shape[dim])


def standard_normal(shape: tuple[int, ...], like: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """eps ~ N(0, I) with `like`'s device and dtype, from `generator` (on that device)."""
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


@dataclass
class ElboTerms:
    """Per-item terms: elbo = reconstruction - kl, each (B,); kl_per_dim (B, D)."""

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor


def elbo_terms(model: VAE, x: torch.Tensor, n_samples: int = 1,
               generator: torch.Generator | None = None,
               encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> ElboTerms:
    """ELBO = E_q[log p(x|z)] - KL(q || p): reparameterized Monte-Carlo reconstruction
    over `n_samples` draws, closed-form KL. `encoded` = (mu, logvar) skips the encoder."""
    mu, logvar = encoded if encoded is not None else model.encode(x)
    mu, logvar = at_least_float32(mu), at_least_float32(logvar)
    eps = standard_normal((n_samples, *mu.shape), mu, generator)  # (S, B, D)
    reconstruction = model.log_px_given_z(x, reparameterize(mu, logvar, eps)).mean(0)
    kl_per_dim = kl_normal_std(mu, logvar)
    kl = kl_per_dim.sum(-1)
    return ElboTerms(reconstruction - kl, reconstruction, kl, kl_per_dim)


def beta_elbo_loss(terms: ElboTerms, beta: float, free_bits: float = 0.0) -> torch.Tensor:
    """The training loss -(E[log p(x|z)] - beta * KL), averaged over the batch.

    With free bits (Kingma et al., 2016) each latent dimension's batch-mean KL counts
    as at least `free_bits` nats, so the optimiser gains nothing below that floor.
    """
    kl_dims = terms.kl_per_dim.mean(0)
    if free_bits > 0:
        kl_dims = kl_dims.clamp(min=free_bits)
    return -(terms.reconstruction.mean() - beta * kl_dims.sum())


def iwae_log_weights(model: VAE, x: torch.Tensor, k: int,
                     generator: torch.Generator | None = None,
                     encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k ~ q(z|x).

    Returns (log_w, log p(x|z_k)), each (K, B).
    """
    mu, logvar = encoded if encoded is not None else model.encode(x)
    mu, logvar = at_least_float32(mu), at_least_float32(logvar)
    z = reparameterize(mu, logvar, standard_normal((k, *mu.shape), mu, generator))  # (K, B, D)
    log_px_z = model.log_px_given_z(x, z)
    log_w = log_px_z + log_std_normal(z) - log_normal_diag(z, mu, logvar)
    return log_w, log_px_z


def iwae_bound(model: VAE, x: torch.Tensor, k: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """IWAE-K bound: logmeanexp_k log w_k, per item (B,). Differentiable; ELBO at K = 1."""
    log_w, _ = iwae_log_weights(model, x, k, generator)
    return logmeanexp(log_w, dim=0)


@dataclass
class ImportanceEstimate:
    """Per-item (B,): log p(x) ~ logmeanexp_k log w_k with its Monte-Carlo standard error
    and the weights' effective sample size, the ELBO terms from the same draws, and
    log p(x) after the first k draws for each k of `at` (nested: the same draws)."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor | None  # None with K = 1
    ess: torch.Tensor
    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    at: dict[int, torch.Tensor]


class WeightMoments:
    """Streaming sums over importance weights in log space, per item: the largest log
    weight m, S1 = sum exp(log w - m) and S2 = sum exp(2 (log w - m)), rescaled whenever
    m grows, so any K fits and nothing overflows.

    From them: log p(x) ~ m + log(S1 / K); the delta method's standard error of that
    estimate, sqrt(Var(w) / K) / mean(w) with the unbiased variance; and the effective
    sample size (sum w)^2 / sum w^2 (K when all weights are equal, 1 when one dominates).
    """

    def __init__(self, batch: int, like: torch.Tensor) -> None:
        self.m = torch.full((batch,), -math.inf, device=like.device, dtype=like.dtype)
        self.s1 = torch.zeros(batch, device=like.device, dtype=like.dtype)
        self.s2 = torch.zeros_like(self.s1)
        self.k = 0

    def add(self, log_w: torch.Tensor) -> None:
        """log_w (n, B)."""
        m = torch.maximum(self.m, log_w.max(0).values)
        scale = torch.exp(self.m - m)  # 0 on the first add (exp(-inf))
        w = torch.exp(log_w - m)
        self.s1 = self.s1 * scale + w.sum(0)
        self.s2 = self.s2 * scale.square() + w.square().sum(0)
        self.m, self.k = m, self.k + log_w.shape[0]

    def log_mean(self) -> torch.Tensor:
        return self.m + torch.log(self.s1 / self.k)

    def standard_error(self) -> torch.Tensor | None:
        if self.k < 2:
            return None
        mean = self.s1 / self.k
        var = ((self.s2 - self.s1.square() / self.k) / (self.k - 1)).clamp(min=0)
        return torch.sqrt(var / self.k) / mean

    def ess(self) -> torch.Tensor:
        return self.s1.square() / self.s2


@torch.no_grad()
def log_px_importance(model: VAE, x: torch.Tensor, k: int,
                      generator: torch.Generator | None = None,
                      max_elements: int = 1 << 22,
                      encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
                      at: tuple[int, ...] = (),
                      ) -> ImportanceEstimate:
    """Importance-sampled log p(x) with K samples from q, chunked over K.

    Each chunk decodes at most about `max_elements` output values, so K = 5000 fits in
    bounded memory whatever the batch; the weights' moments are accumulated across
    chunks (WeightMoments), so the result equals the unchunked estimate. The
    reconstruction term averages the same K draws; the KL is closed form. `encoded` =
    (mu, logvar) skips the encoder. `at` lists smaller K (< k) whose nested estimates
    from the first draws are reported too (to show the bound converge).
    """
    if k < 1:
        raise ValueError(f"importance samples must be >= 1, got {k}")
    mu, logvar = encoded if encoded is not None else model.encode(x)
    mu, logvar = at_least_float32(mu), at_least_float32(logvar)
    batch = x.shape[0]
    chunk = max(1, min(k, max_elements // max(1, batch * model.config.input_size)))
    stops = sorted({s for s in at if 0 < s < k})
    moments = WeightMoments(batch, mu)
    rec_sum = torch.zeros(batch, device=mu.device, dtype=mu.dtype)
    nested: dict[int, torch.Tensor] = {}
    while moments.k < k:
        n = min(chunk, k - moments.k, *(s - moments.k for s in stops if s > moments.k))
        log_w, log_px_z = iwae_log_weights(model, x, n, generator, encoded=(mu, logvar))
        moments.add(log_w)
        rec_sum += log_px_z.sum(0)
        if moments.k in stops:
            nested[moments.k] = moments.log_mean()
    nested[k] = log_px = moments.log_mean()
    kl_per_dim = kl_normal_std(mu, logvar)
    kl = kl_per_dim.sum(-1)
    reconstruction = rec_sum / k
    return ImportanceEstimate(log_px, moments.standard_error(), moments.ess(),
                              reconstruction - kl, reconstruction, kl, kl_per_dim, mu, logvar,
                              nested)
