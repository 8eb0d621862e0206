"""Each formula of models.vae / models.likelihoods against an independent computation."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Normal, kl_divergence

from models.config import VAEConfig
from models.likelihoods import Bernoulli, Gaussian
from models.vae import (
    VAE,
    ElboTerms,
    beta_elbo_loss,
    kl_normal_std,
    log_normal_diag,
    log_std_normal,
    logmeanexp,
    reparameterize,
)


def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))
    torch.testing.assert_close(kl_normal_std(mu, logvar), expected, rtol=1e-5, atol=1e-6)


def test_kl_closed_form_agrees_with_monte_carlo():
    g = torch.Generator().manual_seed(2)
    mu = torch.tensor([0.5, -1.2, 2.0], dtype=torch.float64)
    logvar = torch.tensor([-0.7, 0.4, -2.0], dtype=torch.float64)
    n = 400_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, 3, generator=g, dtype=torch.float64)
    # log q - log p per sample, with scipy's densities (not ours).
    q = stats.norm(mu.numpy(), np.exp(0.5 * logvar.numpy()))
    diff = (q.logpdf(z.numpy()) - stats.norm(0, 1).logpdf(z.numpy())).sum(axis=1)
    mc, stderr = diff.mean(), diff.std() / math.sqrt(n)
    closed = kl_normal_std(mu, logvar).sum().item()
    assert abs(mc - closed) < 4 * stderr, (mc, closed, stderr)


def test_log_densities_match_scipy():
    g = torch.Generator().manual_seed(3)
    z, mu, logvar = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = stats.norm(mu.numpy(), np.exp(0.5 * logvar.numpy())).logpdf(z.numpy()).sum(1)
    np.testing.assert_allclose(log_normal_diag(z, mu, logvar).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(log_std_normal(z).numpy(),
                               stats.norm(0, 1).logpdf(z.numpy()).sum(1), rtol=1e-12)


def test_logmeanexp_is_stable_and_exact():
    a = torch.tensor([[1000.0, 1000.0], [1000.0 + math.log(3), 1000.0]], dtype=torch.float64)
    np.testing.assert_allclose(logmeanexp(a, 0).numpy(), [1000.0 + math.log(2), 1000.0])


def test_bernoulli_log_prob_binary_and_fractional():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * 4
    lik = Bernoulli(item_dims=3)
    x_bin = (torch.rand(3, 1, 2, 2, generator=g) > 0.5).double()
    expected = TorchBernoulli(logits=logits).log_prob(x_bin).sum((1, 2, 3))
    torch.testing.assert_close(lik.log_prob(x_bin, logits), expected)
    # x in [0, 1]: x log p + (1 - x) log(1 - p), computed in numpy.
    x = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64)
    p = 1 / (1 + np.exp(-logits.numpy()))
    ref = (x.numpy() * np.log(p) + (1 - x.numpy()) * np.log1p(-p)).sum((1, 2, 3))
    np.testing.assert_allclose(lik.log_prob(x, logits).numpy(), ref, rtol=1e-10)
    # Extreme logits stay finite.
    extreme = Bernoulli(item_dims=1).log_prob(torch.ones(1, 4), torch.full((1, 4), -200.0))
    assert torch.isfinite(extreme).all()


@pytest.mark.parametrize("scale", ["learned", "fixed"])
def test_gaussian_log_prob_matches_scipy(scale):
    cfg = VAEConfig(input_shape=(4,), likelihood="gaussian", gaussian_scale=scale,
                    fixed_log_scale=-0.3, min_log_scale=-2.0)
    lik = Gaussian(cfg).double()
    if scale == "learned":
        with torch.no_grad():
            lik.log_scale_param.copy_(torch.tensor([0.2, -1.0, -5.0, 1.5]))  # -5 floors to -2
        log_scale = np.array([0.2, -1.0, -2.0, 1.5])
    else:
        log_scale = np.full(4, -0.3)
    g = torch.Generator().manual_seed(5)
    x, mean = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2))
    expected = stats.norm(mean.numpy(), np.exp(log_scale)).logpdf(x.numpy()).sum(1)
    np.testing.assert_allclose(lik.log_prob(x, mean).detach().numpy(), expected, rtol=1e-6)


def test_reparameterized_gradient_matches_analytic():
    # d/dmu E[z^2] = 2 mu, d/dlogvar E[z^2] = exp(logvar) for z ~ N(mu, exp(logvar)).
    g = torch.Generator().manual_seed(6)
    mu = torch.tensor([0.7, -0.3], dtype=torch.float64, requires_grad=True)
    logvar = torch.tensor([0.2, -1.1], dtype=torch.float64, requires_grad=True)
    eps = torch.randn(400_000, 2, generator=g, dtype=torch.float64)
    reparameterize(mu, logvar, eps).square().mean(0).sum().backward()
    np.testing.assert_allclose(mu.grad.numpy(), 2 * mu.detach().numpy(), atol=0.01)
    np.testing.assert_allclose(logvar.grad.numpy(), np.exp(logvar.detach().numpy()), atol=0.01)


def test_elbo_gradient_matches_finite_differences():
    """Autograd through reparameterization vs central finite differences (gradcheck)."""
    torch.manual_seed(0)
    cfg = VAEConfig(input_shape=(3,), latent_dim=2, hidden=(4,))
    model = VAE(cfg).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    eps = torch.randn(5, 2, 2, dtype=torch.float64)
    mu0, logvar0 = model.encode(x)

    def elbo(mu, logvar):
        z = reparameterize(mu, logvar, eps)
        return (model.log_px_given_z(x.double(), z.double()).mean(0)
                - kl_normal_std(mu, logvar).sum(-1))

    assert torch.autograd.gradcheck(
        elbo, (mu0.detach().requires_grad_(), logvar0.detach().requires_grad_()))


def test_beta_elbo_loss_with_free_bits_by_hand():
    rec = torch.tensor([-10.0, -12.0])
    kl_per_dim = torch.tensor([[0.1, 2.0], [0.3, 1.0]])  # batch means: 0.2, 1.5
    terms = ElboTerms(rec - kl_per_dim.sum(1), rec, kl_per_dim.sum(1), kl_per_dim)
    assert beta_elbo_loss(terms, beta=1.0).item() == pytest.approx(11.0 + 1.7)
    assert beta_elbo_loss(terms, beta=0.5).item() == pytest.approx(11.0 + 0.85)
    # free bits 0.5: dimension 0 counts as 0.5 nats, dimension 1 stays 1.5.
    assert beta_elbo_loss(terms, beta=2.0, free_bits=0.5).item() == pytest.approx(11.0 + 4.0)
