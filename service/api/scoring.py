"""Per-item scores of new items through a model's ONNX encoder and decoder, in NumPy: the API
imports no torch, so the bounds of models/vae.py are written again here, in float64
(docs/internals/serving.md)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.config import VAEConfig
from models.transforms import dequantization_offset

LOG_2PI = math.log(2 * math.pi)
P_FLOOR = 2.0 ** -24
# An old continuous-Bernoulli export's logit is read from lambda where lambda is in
# [0.07, 0.93] (|l| < 2.6), elsewhere from the mean: float32 resolves each best there.
CB_LAMBDA_BAND = (0.07, 0.93)
NEWTON_STEPS = 8
# Values per decoder call: K draws of B items are decoded in chunks of this size (more
# items than fit are scored a slice at a time). float64 temporaries of the likelihood cost
# about 10 x 8 bytes a value: 1 << 22 took +372 MiB for 1024 x 784 values at K = 256.
MAX_DECODED_VALUES = 1 << 18

Decoder = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class Scores:
    """Per-item arrays (B,), float64; the log p(x) fields are None without importance
    samples, the standard errors None with fewer than two draws."""

    elbo: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    elbo_se: np.ndarray | None
    log_px: np.ndarray | None = None
    log_px_se: np.ndarray | None = None
    ess: np.ndarray | None = None


def cb_log_normalizer(logits: np.ndarray) -> np.ndarray:
    """log C of the continuous Bernoulli at logit l: log(l / tanh(l / 2)), log 2 at 0."""
    a = np.abs(logits)
    small = a < 0.1
    safe = np.where(small, 1.0, a)
    exact = np.log(safe) - np.log(-np.expm1(-safe)) + np.log1p(np.exp(-safe))
    a2 = a ** 2
    return np.where(small, math.log(2.0) + a2 / 12 - 7 * a2 ** 2 / 1440
                    + 62 * a2 ** 3 / 181440, exact)


def cb_mean_gap(a: np.ndarray) -> np.ndarray:
    """1 - E[x] of the continuous Bernoulli at logit a >= ~1: 1/a - 1/(e^a - 1), which
    falls from 1/2 at 0 like 1/a (models/likelihoods.py: cb_mean)."""
    return 1.0 / a - np.exp(-a) / -np.expm1(-a)


def recover_cb_logits(mean: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """The logits of a continuous-Bernoulli decoder exported without them, from its float32
    mean and lambda (float64).

    Inside CB_LAMBDA_BAND, l = log(lambda / (1 - lambda)). Outside it the mean's distance
    s to the nearer end, 1/|l| - 1/(e^|l| - 1), is solved for |l| by Newton's method on
    h(a) = 1 / gap(a) = 1 / s: h rises from 2 with a slope between 1/3 and 1 (convex),
    and h(a) >= a, so from a = 1/s the steps fall monotonically onto the root (the
    error squares each step; 8 steps are exact in float64 from |l| = 2.6 up). The mean's
    float32 rounding (3e-8) moves a logit l by about 3e-8 l^2: 3e-5 at |l| = 30.
    """
    m, lam = mean.astype(np.float64), probs.astype(np.float64)
    out = np.empty(m.shape, dtype=np.float64)
    middle = (lam > CB_LAMBDA_BAND[0]) & (lam < CB_LAMBDA_BAND[1])
    out[middle] = np.log(lam[middle]) - np.log1p(-lam[middle])
    far = ~middle
    mf = m[far]
    # the mean rounds to 0 or 1 only beyond |l| ~ 3e7: hold it there, not at infinity
    s = np.clip(np.minimum(mf, 1.0 - mf), 2.0 ** -25, 0.5)
    target = 1.0 / s
    a = target.copy()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for _ in range(NEWTON_STEPS):
            g = cb_mean_gap(a)
            slope = (1.0 / a ** 2 - np.exp(-a) / np.expm1(-a) ** 2) / g ** 2  # h'(a)
            a = np.maximum(a - (1.0 / g - target) / slope, 1e-6)
    out[far] = np.where(mf > 0.5, a, -a)
    return out


def log_bin_probability(x: np.ndarray, loc: np.ndarray, log_scale: np.ndarray,
                        levels: int) -> np.ndarray:
    """log P(x's bin) of the discretised logistic, elementwise, as models/likelihoods.py
    computes it: x binned to the nearest level k / (L - 1); with a, b the bin's upper and
    lower edges standardised, -softplus(-a) at the lowest level, -softplus(b) at the
    highest, -softplus(-a) - softplus(b) + log(-expm1(b - a)) between (exact, stable)."""
    n = levels - 1
    k = np.clip(np.round(x * n), 0, n)
    inv_s = np.exp(-log_scale)
    centre = k / n - loc
    a = (centre + 0.5 / n) * inv_s
    b = (centre - 0.5 / n) * inv_s
    low, high = -np.logaddexp(0.0, -a), -np.logaddexp(0.0, b)
    middle = low + high + np.log(-np.expm1(-inv_s / n))
    return np.where(k == 0, low, np.where(k == n, high, middle))


def logits_source(output_names: list[str] | tuple[str, ...], likelihood: str) -> str | None:
    """Where `log_px_given_z` takes a (continuous) Bernoulli decoder's logits from, given
    its file's outputs: `exported` (exact), `recovered` (an older continuous-Bernoulli
    export: from its mean), `floored` (an older Bernoulli export: probabilities floored at
    2^-24); None for a Gaussian decoder."""
    if likelihood not in ("bernoulli", "continuous_bernoulli"):
        return None
    if "logits" in output_names:
        return "exported"
    return "recovered" if likelihood == "continuous_bernoulli" else "floored"


def log_px_given_z(x: np.ndarray, params: dict[str, np.ndarray], config: VAEConfig,
                   ) -> np.ndarray:
    """log p(x|z) per row of the decoder's outputs (rows, *item) -> (rows,), float64."""
    axes = tuple(range(1, x.ndim))
    x64 = x.astype(np.float64)
    source = logits_source(tuple(params), config.likelihood)
    if source == "floored" or (source == "recovered" and "mean" not in params):
        p = np.clip(params["probs"].astype(np.float64), P_FLOOR, 1.0 - P_FLOOR)
        log_p = x64 * np.log(p) + (1.0 - x64) * np.log1p(-p)
        if config.likelihood == "continuous_bernoulli":
            log_p += cb_log_normalizer(np.log(p) - np.log1p(-p))
    elif source is not None:
        logits = (params["logits"].astype(np.float64) if source == "exported"
                  else recover_cb_logits(params["mean"], params["probs"]))
        # x log sigmoid(l) + (1 - x) log sigmoid(-l) = x l - softplus(l), for any l
        log_p = x64 * logits - np.logaddexp(0.0, logits)
        if config.likelihood == "continuous_bernoulli":
            log_p += cb_log_normalizer(logits)
    elif config.likelihood == "discretized_logistic":
        loc = params["loc"] if "loc" in params else params["mean"]
        log_p = log_bin_probability(x64, loc.astype(np.float64),
                                    params["log_scale"].astype(np.float64), config.levels)
    else:
        mean = params["mean"].astype(np.float64)
        log_scale = params["log_scale"].astype(np.float64)
        standardized = (x64 - mean) * np.exp(-log_scale)
        log_p = -0.5 * standardized ** 2 - log_scale - 0.5 * LOG_2PI
    offset = (dequantization_offset(config.input_size, config.levels)
              if config.dequantize != "none" else 0.0)
    return log_p.sum(axis=axes) + offset


def kl_closed_form(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(q(z|x) || N(0, I)) per item and dimension: (B, D) -> (B, D)."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    return 0.5 * (np.exp(logvar) + mu ** 2 - 1.0 - logvar)


def score(decode: Decoder, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray,
          config: VAEConfig, importance_samples: int, rng: np.random.Generator) -> Scores:
    """ELBO terms of each item from `max(1, K)` posterior draws and, with K > 0, its
    importance-sampled log p(x) with standard error and effective sample size (the ELBO
    terms average the same K draws, as an embedding job's do)."""
    item_values = int(np.prod(x.shape[1:]))
    per = max(1, MAX_DECODED_VALUES // max(1, item_values))
    if len(x) > per:  # a slice of items at a time: memory bounded by MAX_DECODED_VALUES
        parts = [score(decode, x[i:i + per], mu[i:i + per], logvar[i:i + per], config,
                       importance_samples, rng) for i in range(0, len(x), per)]
        return Scores(*(None if getattr(parts[0], f.name) is None else np.concatenate(
            [getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Scores)))
    batch, dim = mu.shape
    draws = max(1, importance_samples)
    mu64, logvar64 = mu.astype(np.float64), logvar.astype(np.float64)
    sigma = np.exp(0.5 * logvar64)
    kl = kl_closed_form(mu, logvar).sum(-1)
    chunk = max(1, min(draws, MAX_DECODED_VALUES // max(1, batch * item_values)))
    log_lik = np.empty((draws, batch))
    log_w = np.empty((draws, batch))
    for a in range(0, draws, chunk):
        n = min(chunk, draws - a)
        eps = rng.standard_normal((n, batch, dim))
        z = mu64 + sigma * eps  # (n, B, D)
        out = decode(z.reshape(n * batch, dim).astype(np.float32))
        tiled = np.broadcast_to(x[None], (n, *x.shape)).reshape(n * batch, *x.shape[1:])
        lik = log_px_given_z(tiled, out, config).reshape(n, batch)
        log_prior = -0.5 * (LOG_2PI + z ** 2).sum(-1)
        log_q = -0.5 * (LOG_2PI + logvar64 + eps ** 2).sum(-1)  # (z - mu)^2 / sigma^2 = eps^2
        log_lik[a:a + n], log_w[a:a + n] = lik, lik + log_prior - log_q
    reconstruction = log_lik.mean(0)
    elbo_se = log_lik.std(0, ddof=1) / math.sqrt(draws) if draws > 1 else None
    scores = Scores(reconstruction - kl, reconstruction, kl, elbo_se)
    if importance_samples > 0:
        top = log_w.max(0)
        w = np.exp(log_w - top)  # in (0, 1], the largest exactly 1
        mean_w = w.mean(0)
        scores.log_px = top + np.log(mean_w)
        scores.ess = w.sum(0) ** 2 / (w ** 2).sum(0)
        if draws > 1:
            scores.log_px_se = np.sqrt(w.var(0, ddof=1) / draws) / mean_w
    return scores


# -- held-out thresholds (stored by models.evaluate.Evaluation.quantiles) ----------

def threshold_at(quantiles: dict[str, object], fpr: float) -> float:
    """The value below which a share `fpr` of the held-out items lie."""
    levels = np.asarray(quantiles["levels"], dtype=np.float64)
    values = np.asarray(quantiles["values"], dtype=np.float64)
    return float(np.interp(fpr, levels, values))
