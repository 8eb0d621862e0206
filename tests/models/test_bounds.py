"""Bounds on a model whose log-likelihood is known in closed form.

Linear-Gaussian decoder p(x|z) = N(Wz + b, sigma^2 I) with p(z) = N(0, I): then
p(x) = N(b, W W^T + sigma^2 I) and the posterior is N(S W^T (x - b) / sigma^2, S) with
S = (I + W^T W / sigma^2)^-1. W has orthogonal columns so S is diagonal and the
mean-field encoder can represent the exact posterior. This is the family `mlp` with
no hidden layers and a fixed Gaussian scale, so the real model code is under test.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.config import VAEConfig
from models.vae import VAE, elbo_terms, iwae_log_weights, log_px_importance, logmeanexp

D_X, D_Z, SIGMA = 6, 2, 0.5


def linear_gaussian(shift: float = 0.0, inflate: float = 0.0,
                    ) -> tuple[VAE, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(D_X, D_Z)))
    w = q * np.array([2.0, 0.8])  # orthogonal columns of different lengths
    b = rng.normal(size=D_X)
    s = np.linalg.inv(np.eye(D_Z) + w.T @ w / SIGMA**2)  # diagonal
    a = s @ w.T / SIGMA**2  # posterior mean = a (x - b)
    cfg = VAEConfig(input_shape=(D_X,), latent_dim=D_Z, hidden=(), likelihood="gaussian",
                    gaussian_scale="fixed", fixed_log_scale=math.log(SIGMA))
    model = VAE(cfg).double().eval()
    enc, dec = model.encoder.head, model.decoder.body[0]
    # A wrong encoder: mean shifted by `shift`, variance inflated by exp(inflate).
    logvar = np.log(np.diag(s)) + inflate
    with torch.no_grad():
        dec.weight.copy_(torch.from_numpy(w))
        dec.bias.copy_(torch.from_numpy(b))
        enc.weight.zero_()
        enc.weight[:D_Z] = torch.from_numpy(a)
        enc.bias[:D_Z] = torch.from_numpy(-a @ b + shift)
        enc.bias[D_Z:] = torch.from_numpy(logvar)
    truth = {"w": w, "b": b, "cov_x": w @ w.T + SIGMA**2 * np.eye(D_X)}
    return model, truth


def sample_x(truth: dict[str, np.ndarray], n: int) -> np.ndarray:
    return stats.multivariate_normal(truth["b"], truth["cov_x"]).rvs(
        size=n, random_state=np.random.default_rng(1))


def exact_log_px(truth: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return stats.multivariate_normal(truth["b"], truth["cov_x"]).logpdf(x)


def exact_elbo(model: VAE, truth: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """ELBO in closed form: E_q[log N(x; Wz + b, s^2 I)] - KL(q || p), computed in numpy."""
    with torch.no_grad():
        mu, logvar = (t.numpy() for t in model.encode(torch.from_numpy(x)))
    var = np.exp(logvar)
    w, b = truth["w"], truth["b"]
    resid = x - mu @ w.T - b
    trace = (var @ (w**2).T).sum(1)  # tr(W diag(var) W^T)
    rec = (-0.5 * ((resid**2).sum(1) + trace) / SIGMA**2
           - D_X * math.log(SIGMA) - 0.5 * D_X * math.log(2 * math.pi))
    kl = 0.5 * (var + mu**2 - 1 - logvar).sum(1)
    return rec - kl


def test_exact_posterior_makes_every_importance_weight_equal_log_px():
    model, truth = linear_gaussian()
    x = sample_x(truth, 50)
    expected = exact_log_px(truth, x)
    log_w, _ = iwae_log_weights(model, torch.from_numpy(x), 8)
    np.testing.assert_allclose(log_w.detach().numpy(), np.broadcast_to(expected, (8, 50)),
                               atol=1e-9)
    # Chunked accumulation over K (one sample per chunk here) keeps the estimate exact.
    est = log_px_importance(model, torch.from_numpy(x), 50, max_elements=1)
    np.testing.assert_allclose(est.log_px.numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(exact_elbo(model, truth, x), expected, atol=1e-9)


@pytest.mark.slow
def test_importance_sampled_log_px_within_005_nats_with_k5000():
    model, truth = linear_gaussian(shift=0.15, inflate=0.4)
    x = sample_x(truth, 200)
    g = torch.Generator().manual_seed(0)
    est = log_px_importance(model, torch.from_numpy(x), 5000, generator=g,
                            max_elements=1 << 16)  # forces 55 chunks over K
    err = np.abs(est.log_px.numpy() - exact_log_px(truth, x))
    assert err.max() < 0.05, err.max()
    # The wrong encoder leaves a visible ELBO gap, which IWAE-5000 closes.
    gap = exact_log_px(truth, x) - exact_elbo(model, truth, x)
    assert gap.mean() > 0.2


def test_monte_carlo_elbo_matches_closed_form():
    model, truth = linear_gaussian(shift=0.15, inflate=0.4)
    x = sample_x(truth, 100)
    g = torch.Generator().manual_seed(1)
    terms = elbo_terms(model, torch.from_numpy(x), n_samples=20_000, generator=g)
    np.testing.assert_allclose(terms.elbo.detach().numpy(), exact_elbo(model, truth, x),
                               atol=0.06)


def test_bound_ordering_elbo_le_iwae_le_log_px_and_monotone_in_k():
    model, truth = linear_gaussian(shift=0.15, inflate=0.4)
    x = torch.from_numpy(sample_x(truth, 500))
    log_px = exact_log_px(truth, x.numpy()).mean()
    elbo = exact_elbo(model, truth, x.numpy()).mean()
    g = torch.Generator().manual_seed(2)
    # Average many independent IWAE-K draws so the expectation, not the noise, is compared.
    bounds = []
    for k in (1, 4, 32, 256):
        reps = [logmeanexp(iwae_log_weights(model, x, k, g)[0], 0).mean().item()
                for _ in range(max(1, 256 // k))]
        bounds.append(float(np.mean(reps)))
    assert bounds[0] == pytest.approx(elbo, abs=0.03)  # IWAE-1 is the ELBO
    assert elbo <= bounds[-1] + 1e-9
    assert bounds[-1] <= log_px + 0.01
    assert all(b1 > b0 for b0, b1 in itertools.pairwise(bounds)), bounds


def test_log_px_importance_decodes_in_bounded_chunks():
    model, truth = linear_gaussian(shift=0.15, inflate=0.4)
    x = torch.from_numpy(sample_x(truth, 64))
    rows = []
    hook = model.decoder.register_forward_hook(lambda mod, inp, out: rows.append(len(inp[0])))
    try:
        log_px_importance(model, x, 5000, max_elements=64 * D_X * 100)
    finally:
        hook.remove()
    assert sum(rows) == 5000 * 64  # every sample decoded once
    assert max(rows) * D_X <= 64 * D_X * 100  # never more than max_elements values at once
