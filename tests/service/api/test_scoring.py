"""service.api.scoring against closed forms: a linear-Gaussian decoder, whose marginal
p(x) = N(b, W W^T + s^2 I) is known exactly, and Bernoulli and KL terms written out."""

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from models.config import VAEConfig
from service.api.scoring import kl_closed_form, log_px_given_z, score, threshold_at

D, P, S = 2, 5, 0.5
GAUSSIAN = VAEConfig(input_shape=(P,), latent_dim=D, likelihood="gaussian")


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(P, D)), rng.normal(size=P)
    x = rng.multivariate_normal(b, w @ w.T + S ** 2 * np.eye(P), size=6).astype(np.float32)
    # the exact posterior's mean and its marginal variances: a diagonal q close to it
    precision = np.eye(D) + w.T @ w / S ** 2
    cov = np.linalg.inv(precision)
    mu = (cov @ w.T @ (x.astype(np.float64) - b).T / S ** 2).T
    logvar = np.log(np.broadcast_to(np.diag(cov), mu.shape))

    def decode(z):
        mean = z.astype(np.float64) @ w.T + b
        return {"mean": mean.astype(np.float32),
                "log_scale": np.full_like(mean, math.log(S), dtype=np.float32)}

    exact = multivariate_normal(b, w @ w.T + S ** 2 * np.eye(P)).logpdf(x.astype(np.float64))
    return decode, x, mu.astype(np.float32), logvar.astype(np.float32), exact


def test_log_px_converges_to_the_exact_marginal_within_its_standard_error(linear):
    decode, x, mu, logvar, exact = linear
    got = score(decode, x, mu, logvar, GAUSSIAN, 4000, np.random.default_rng(1))
    assert got.log_px is not None and got.log_px_se is not None and got.ess is not None
    assert np.all(np.abs(got.log_px - exact) <= 4 * got.log_px_se + 1e-3), (
        got.log_px - exact, got.log_px_se)
    assert np.all((got.ess > 1) & (got.ess <= 4000))
    # the ELBO bounds log p(x) from below, and the KL is exact
    assert np.all(got.elbo <= exact + 4 * got.elbo_se)
    np.testing.assert_allclose(got.kl, kl_closed_form(mu, logvar).sum(1))


def test_the_standard_error_matches_the_spread_over_seeds(linear):
    decode, x, mu, logvar, _ = linear
    # a poorer proposal (twice the posterior's spread) so the error is well above rounding
    runs = [score(decode, x, mu, logvar + np.log(4.0), GAUSSIAN, 50,
                  np.random.default_rng(seed)) for seed in range(200)]
    spread = np.std([r.log_px for r in runs], axis=0, ddof=1)
    reported = np.mean([r.log_px_se for r in runs], axis=0)
    np.testing.assert_allclose(reported, spread, rtol=0.35)
    elbo_spread = np.std([r.elbo for r in runs], axis=0, ddof=1)
    np.testing.assert_allclose(np.mean([r.elbo_se for r in runs], axis=0), elbo_spread,
                               rtol=0.35)


def test_one_draw_has_no_standard_error_and_k0_no_log_px(linear):
    decode, x, mu, logvar, _ = linear
    got = score(decode, x, mu, logvar, GAUSSIAN, 0, np.random.default_rng(0))
    assert got.log_px is None and got.elbo_se is None and got.ess is None
    got = score(decode, x, mu, logvar, GAUSSIAN, 1, np.random.default_rng(0))
    assert got.log_px_se is None and got.log_px is not None
    np.testing.assert_allclose(got.ess, 1.0)


def test_bernoulli_and_gaussian_log_probabilities_written_out():
    rng = np.random.default_rng(2)
    x = rng.random((3, 1, 2, 2)).astype(np.float32)
    p = rng.uniform(0.05, 0.95, size=(3, 1, 2, 2)).astype(np.float32)
    want = [sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                for xi, pi in zip(row.ravel().tolist(), prow.ravel().tolist(), strict=True))
            for row, prow in zip(x, p, strict=True)]
    bernoulli = VAEConfig(input_shape=(1, 2, 2))
    np.testing.assert_allclose(log_px_given_z(x, {"probs": p}, bernoulli), want, rtol=1e-6)
    # a probability float32 rounds to 1 is floored, not -inf
    assert np.isfinite(log_px_given_z(np.zeros((1, 1)), {"probs": np.ones((1, 1))},
                                      VAEConfig(input_shape=(1,)))).all()
    mean, log_scale = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)) * 0.3
    xs = rng.normal(size=(3, 4))
    want = [sum(-0.5 * ((a - m) / math.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi)
                for a, m, s in zip(r, mr, sr, strict=True))
            for r, mr, sr in zip(xs.tolist(), mean.tolist(), log_scale.tolist(), strict=True)]
    np.testing.assert_allclose(
        log_px_given_z(xs, {"mean": mean, "log_scale": log_scale},
                       VAEConfig(input_shape=(4,), likelihood="gaussian")), want)


def test_threshold_interpolates_the_stored_quantiles():
    from models.evaluate import QUANTILE_LEVELS

    values = np.random.default_rng(3).normal(-100, 10, 997)
    stored = {"levels": QUANTILE_LEVELS.tolist(),
              "values": np.quantile(values, QUANTILE_LEVELS).tolist()}
    for fpr in (0.001, 0.01, 0.0123, 0.05, 0.5):
        # the share of held-out values below the threshold is the rate asked for
        below = (values < threshold_at(stored, fpr)).mean()
        assert abs(below - fpr) <= 1.5 / len(values), (fpr, below)
