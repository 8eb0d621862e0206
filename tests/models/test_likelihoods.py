"""Likelihoods users can compare, each against an independent computation: the continuous
Bernoulli's normalising constant and mean (SciPy quadrature), the dequantisation offset
(the exact bin probability from the normal CDF), bits/dim (closed forms), binarisation
(its mean over draws), the Monte-Carlo standard error and ESS of log p(x) (the spread
over independent runs; a brute-force log-sum-exp)."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from models.config import ConfigError, TrainConfig, VAEConfig
from models.data import DataError, model_rows, validate_array
from models.evaluate import evaluate
from models.likelihoods import cb_log_normalizer, cb_mean
from models.pipeline import train_evaluate_export
from models.trainer import Trainer
from models.transforms import (
    binarize,
    bits_per_dim,
    dequantize,
    prepare,
    training_seed,
    uniform_noise,
)
from models.vae import VAE, WeightMoments, log_px_importance
from service.api.scoring import cb_log_normalizer as np_cb_log_normalizer
from service.api.scoring import log_px_given_z

# both sides of each series' switch (0.1 for log C, 0.5 for the mean), zero, the tails
LOGITS = [-30.0, -5.0, -1.0, -0.5, -0.4999, -0.2, -0.1, -0.0999, -1e-3, 0.0, 1e-4, 0.05,
          0.0999, 0.1, 0.3, 0.5, 2.0, 10.0, 25.0]


def quad_cb(logit: float) -> tuple[float, float]:
    """(log C = -log of the integral of lambda^x (1 - lambda)^(1 - x) over [0, 1], the
    normalised mean), by quadrature in 40-digit arithmetic (mpmath, which torch brings)."""
    import mpmath

    with mpmath.workdps(40):
        lam = 1 / (1 + mpmath.exp(-mpmath.mpf(logit)))
        z = mpmath.quad(lambda x: lam ** x * (1 - lam) ** (1 - x), [0, 1])
        m = mpmath.quad(lambda x: x * lam ** x * (1 - lam) ** (1 - x), [0, 1])
        return float(-mpmath.log(z)), float(m / z)


@pytest.mark.parametrize("logit", LOGITS)
def test_continuous_bernoulli_constant_and_mean_equal_quadrature(logit):
    log_c, mean = quad_cb(logit)
    t64 = torch.tensor([logit], dtype=torch.float64)
    assert float(cb_log_normalizer(t64)) == pytest.approx(log_c, abs=1e-10)
    assert float(cb_mean(t64)) == pytest.approx(mean, abs=1e-10)
    # float32 (training) and the API's NumPy copy
    assert float(cb_log_normalizer(t64.float())) == pytest.approx(log_c, abs=1e-6)
    assert float(cb_mean(t64.float())) == pytest.approx(mean, abs=1e-6)
    assert float(np_cb_log_normalizer(np.array([logit]))[0]) == pytest.approx(log_c, abs=1e-10)


def test_continuous_bernoulli_is_a_density_with_finite_gradients():
    cfg = VAEConfig(input_shape=(1,), likelihood="continuous_bernoulli")
    lik = VAE(cfg).likelihood
    for logit in (-3.0, -0.05, 0.0, 0.02, 4.0):
        loc = torch.tensor([[logit]], dtype=torch.float64)
        total, _ = integrate.quad(
            lambda x, loc=loc: math.exp(float(lik.log_prob(torch.tensor([[x]],
                                                                         dtype=torch.float64),
                                                           loc))), 0, 1)
        assert total == pytest.approx(1.0, abs=1e-9)
    # the gradient is finite at l = 0 and on both sides of the switch
    logits = torch.tensor([0.0, 0.0999, 0.1001, -0.5, 0.5], dtype=torch.float64,
                          requires_grad=True)
    (cb_log_normalizer(logits).sum() + cb_mean(logits).sum()).backward()
    assert torch.isfinite(logits.grad).all()
    # d log C / dl = l/6 near 0 (the series' derivative), continuous across 0.1
    assert float(logits.grad[1]) == pytest.approx(float(logits.grad[2]), abs=1e-3)


def test_the_api_scores_a_continuous_bernoulli_as_torch_does():
    cfg = VAEConfig(input_shape=(2, 3), likelihood="continuous_bernoulli")
    torch.manual_seed(0)
    lik = VAE(cfg).likelihood
    logits = torch.randn(4, 2, 3, dtype=torch.float64) * 3
    logits[0] = torch.tensor([[-30.0, -17.0, 0.05], [16.0, 25.0, 30.0]])  # beyond float32 probs
    x = torch.rand(4, 2, 3, dtype=torch.float64)
    want = lik.log_prob(x, logits).numpy()
    outputs = dict(zip(lik.output_names, (t.numpy() for t in lik.parameters_of(logits)),
                       strict=True))
    got = log_px_given_z(x.numpy(), outputs, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # and torch's own distribution (computed from probabilities: 1e-4 near |l| = 30)
    independent = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum((1, 2))
    np.testing.assert_allclose(got, independent.numpy(), rtol=0, atol=1e-3)


def test_dequantised_gaussian_bounds_the_exact_bin_probability():
    """P(x) = Phi((x+1)/L) - Phi(x/L) for the density on y = (x + u) / L; the likelihood's
    E_u[log p(y)] - log L lies below log P(x) by Jensen's gap, which vanishes as the scale
    grows against a bin."""
    levels, m, s = 16, 0.45, 0.2
    cfg = VAEConfig(input_shape=(1,), likelihood="gaussian", gaussian_scale="fixed",
                    fixed_log_scale=math.log(s), dequantize="uniform", levels=levels)
    lik = VAE(cfg).likelihood.double()
    x = np.arange(levels, dtype=np.float64)[:, None]
    exact = np.log(stats.norm.cdf((x + 1) / levels, m, s) - stats.norm.cdf(x / levels, m, s))
    rows = np.repeat(np.arange(levels)[None], 4000, axis=0)
    ys = [dequantize(x, np.arange(levels) + levels * j, seed=3, levels=levels)
          for j in range(rows.shape[0])]
    logp = np.mean([lik.log_prob(torch.from_numpy(y.astype(np.float64)),
                                 torch.full((levels, 1), m, dtype=torch.float64)).numpy()
                    for y in ys], axis=0)
    gap = exact[:, 0] - logp
    assert np.all(gap > -2e-3), gap  # a lower bound (up to Monte-Carlo noise)
    # and a tight one: Jensen's gap is about half the variance of log p(y) within a bin,
    # slope^2 * width^2 / 24 <= (0.55 / s^2)^2 / (24 * 16^2) = 0.03 at the far bins
    assert np.all(gap < 0.03), gap
    assert gap[7] < 3e-3  # near the mean the slope is small
    # the offset itself: -D log L
    y = torch.full((1, 1), 0.5, dtype=torch.float64)
    mean = torch.full((1, 1), m, dtype=torch.float64)
    plain = VAE(VAEConfig(input_shape=(1,), likelihood="gaussian", gaussian_scale="fixed",
                          fixed_log_scale=math.log(s))).likelihood.double()
    assert float(lik.log_prob(y, mean) - plain.log_prob(y, mean)) == pytest.approx(
        -math.log(levels))


def test_noise_is_uniform_and_the_same_for_an_item_however_it_is_batched():
    u = uniform_noise(11, np.arange(2000), 50).ravel()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # neighbouring elements and rows are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    whole = uniform_noise(5, np.arange(10), 7)
    np.testing.assert_array_equal(uniform_noise(5, np.array([3, 8]), 7), whole[[3, 8]])
    assert not np.allclose(uniform_noise(6, np.arange(10), 7), whole)


def test_binarisation_is_unbiased_and_dequantisation_lands_in_its_bin():
    x = np.array([[0.0, 0.1, 0.5, 0.93, 1.0]], dtype=np.float32)
    draws = np.stack([binarize(x, np.array([0]), seed) for seed in range(4000)])
    assert set(np.unique(draws)) <= {0.0, 1.0}
    se = np.sqrt(x * (1 - x) / 4000) + 1e-12
    assert np.all(np.abs(draws.mean(0) - x) <= 4 * se)
    ints = np.array([[0, 3, 255]], dtype=np.float32)
    y = dequantize(ints, np.array([9]), 1, 256)
    assert np.all((y >= ints / 256) & (y < (ints + 1) / 256))


def test_static_and_dynamic_binarisation_protocols():
    cfg_static = VAEConfig(input_shape=(4,), binarize="static", data_seed=7)
    cfg_dynamic = VAEConfig(input_shape=(4,), binarize="dynamic", data_seed=7)
    data = np.full((50, 4), 0.5, dtype=np.float32)
    rows = np.arange(50)
    eval_copy = model_rows(data, rows, cfg_dynamic).numpy()
    np.testing.assert_array_equal(eval_copy, model_rows(data, rows, cfg_static).numpy())
    # static trains on the evaluation copy; dynamic draws anew each epoch
    assert training_seed(cfg_static, 0, 3) is None
    seeds = {training_seed(cfg_dynamic, 0, e) for e in range(5)}
    assert len(seeds) == 5 and 7 not in seeds
    epoch0 = model_rows(data, rows, cfg_dynamic, training_seed(cfg_dynamic, 0, 0)).numpy()
    assert (epoch0 != eval_copy).mean() > 0.3  # about half differ for p = 0.5
    assert prepare(data, rows, VAEConfig(input_shape=(4,))) is data  # nothing to do


def test_transform_options_are_checked():
    with pytest.raises(ConfigError, match="binarize: binarises data for the bernoulli"):
        VAEConfig(input_shape=(4,), likelihood="gaussian", binarize="static")
    with pytest.raises(ConfigError, match="dequantize: makes integer data continuous"):
        VAEConfig(input_shape=(4,), dequantize="uniform")
    with pytest.raises(ConfigError, match="levels"):
        VAEConfig(input_shape=(4,), likelihood="gaussian", dequantize="uniform", levels=1)
    cfg = VAEConfig(input_shape=(3,), likelihood="gaussian", dequantize="uniform", levels=256)
    with pytest.raises(DataError, match=r"integers 0 \.\. 255 .*item 1 has values in "
                                        r"\[0, 0\.5\]"):
        validate_array(np.array([[0, 1, 2], [0, 0.5, 0.25]], np.float32), cfg)
    with pytest.raises(DataError, match="item 0"):
        validate_array(np.array([[0, 256, 2]], np.float32), cfg)
    cb = VAEConfig(input_shape=(2,), likelihood="continuous_bernoulli")
    with pytest.raises(DataError, match="continuous_bernoulli likelihood needs values in"):
        validate_array(np.array([[0.2, 1.5]], np.float32), cb)


def test_likelihood_kinds():
    grey = VAEConfig(input_shape=(4,))
    assert grey.likelihood_kind(data_is_binary=False) == "unnormalised"
    assert grey.likelihood_kind(data_is_binary=True) == "discrete"
    assert VAEConfig(input_shape=(4,), binarize="dynamic").likelihood_kind(False) == "discrete"
    assert VAEConfig(input_shape=(4,), likelihood="continuous_bernoulli").likelihood_kind(
        False) == "density"
    assert VAEConfig(input_shape=(4,), likelihood="gaussian", dequantize="uniform"
                     ).likelihood_kind(False) == "discrete"


def test_bits_per_dim_of_a_coin_is_one_and_of_a_flat_256_level_density_eight():
    """A Bernoulli decoder whose every logit is 0 with an encoder that returns the prior
    (mu = 0, logvar = 0): q = p(z), so log p(x) = -D log 2 exactly, whatever the draws, and
    bits/dim = 1. The same flat decoder as a continuous Bernoulli (lambda = 1/2 is the
    uniform density on [0, 1]) on dequantised 256-level data: log P(x) = -D log 256,
    8 bits/dim."""
    data = (np.random.default_rng(0).random((40, 6)) > 0.5).astype(np.float32)
    for cfg, data_, bits in (
            (VAEConfig(input_shape=(6,), latent_dim=2, hidden=(4,), binarize="static"),
             np.random.default_rng(0).random((40, 6)).astype(np.float32), 1.0),
            (VAEConfig(input_shape=(6,), latent_dim=2, hidden=(4,)), data, 1.0),
            (VAEConfig(input_shape=(6,), latent_dim=2, hidden=(4,),
                       likelihood="continuous_bernoulli", dequantize="uniform", levels=256),
             np.random.default_rng(0).integers(0, 256, (40, 6)).astype(np.float32), 8.0)):
        model = VAE(cfg).double()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        result = evaluate(model.float(), data_, np.arange(40), importance_samples=20, seed=1)
        s = result.summary()
        expected = -6 * (math.log(2) if bits == 1.0 else math.log(256))
        np.testing.assert_allclose(result.log_px, expected, rtol=1e-5)
        np.testing.assert_allclose(result.elbo, expected, rtol=1e-5)
        assert s["bits_per_dim"] == pytest.approx(bits, rel=1e-5)
        assert bits_per_dim(expected, 6) == pytest.approx(bits)
        # all weights are equal: the ESS is K and the error 0
        np.testing.assert_allclose(result.ess, 20, rtol=1e-4)
        np.testing.assert_allclose(result.log_px_se, 0, atol=1e-4)  # float32 rounding


def test_weight_moments_equal_a_brute_force_over_all_weights():
    rng = np.random.default_rng(4)
    log_w = rng.normal(-300, 3, size=(500, 7))  # far below exp's range: needs the shift
    moments = WeightMoments(7, torch.zeros(1, dtype=torch.float64))
    for a in range(0, 500, 37):  # uneven chunks
        moments.add(torch.from_numpy(log_w[a:a + 37]))
    top = log_w.max(0)
    w = np.exp(log_w - top)
    want_log_mean = top + np.log(w.mean(0))
    want_se = np.sqrt(w.var(0, ddof=1) / 500) / w.mean(0)
    want_ess = w.sum(0) ** 2 / (w ** 2).sum(0)
    np.testing.assert_allclose(moments.log_mean().numpy(), want_log_mean, rtol=1e-12)
    np.testing.assert_allclose(moments.standard_error().numpy(), want_se, rtol=1e-9)
    np.testing.assert_allclose(moments.ess().numpy(), want_ess, rtol=1e-9)


@pytest.fixture(scope="module")
def small_model():
    from models.data import load_digits_dataset

    images, _ = load_digits_dataset()
    cfg = VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(32,), binarize="dynamic")
    trainer = Trainer(cfg, TrainConfig(epochs=5, seed=0, eval_importance_samples=0,
                                       importance_samples=0))
    result = trainer.fit(images[:600])
    return result.model.double().eval(), model_rows(images, np.arange(600, 610), cfg).double()


def test_standard_error_matches_the_spread_over_independent_runs(small_model):
    model, x = small_model
    runs = [log_px_importance(model, x, 50, torch.Generator().manual_seed(s))
            for s in range(150)]
    spread = torch.stack([r.log_px for r in runs]).std(0)
    reported = torch.stack([r.log_px_se for r in runs]).mean(0)
    np.testing.assert_allclose(reported.numpy(), spread.numpy(), rtol=0.35)
    ess = torch.stack([r.ess for r in runs])
    assert bool(((ess >= 1) & (ess <= 50)).all())


def test_nested_estimates_use_the_first_draws(small_model):
    """The estimate at k of a K = 100 run equals a run with K = k alone, drawn from the same
    generator in the same chunks (torch's draws depend on the chunk sizes)."""
    model, x = small_model
    chunked = {"max_elements": 64 * 10 * 7}  # chunks of 7 draws, also cut at 1 and 10
    est = log_px_importance(model, x, 100, torch.Generator().manual_seed(3), at=(1, 10),
                            **chunked)
    for k in (1, 10):
        alone = log_px_importance(model, x, k, torch.Generator().manual_seed(3), at=(1,),
                                  **chunked)
        np.testing.assert_allclose(est.at[k].numpy(), alone.log_px.numpy(), rtol=1e-12)
    np.testing.assert_allclose(est.log_px.numpy(), est.at[100].numpy())
    assert set(est.at) == {1, 10, 100}


@pytest.mark.slow
def test_summary_names_its_figure_shows_the_bound_converge_and_flags_collapse(tmp_path):
    from models.data import load_digits_dataset

    images, _ = load_digits_dataset()
    data = images[:400]
    # beta 30 pushes every dimension to the prior: collapse, with the warning
    result = train_evaluate_export(
        data, VAEConfig(input_shape=(1, 8, 8), latent_dim=6, hidden=(32,), beta=30.0),
        TrainConfig(epochs=3, importance_samples=100, eval_importance_samples=4),
        str(tmp_path))
    s = result.summary
    assert s["likelihood_kind"] == "unnormalised" and "NOT a normalised" in s[
        "likelihood_note"]
    assert list(s["heldout_log_px_by_k"]) == ["1", "10", "100"]
    assert s["heldout_log_px_by_k"]["100"] == s["heldout_log_px"]
    by_k = list(s["heldout_log_px_by_k"].values())
    assert by_k[0] <= by_k[-1] + 3 * s["heldout_log_px_se"]  # the bound tightens with K
    assert s["heldout_log_px_se"] > 0 and 1 <= s["heldout_ess_min"] <= s["heldout_ess_mean"]
    assert s["collapse"]["n_collapsed"] == 6 and "KL warm-up" in s["collapse"]["warning"]
    val = [r for r in result.train.history if r["split"] == "val"]
    assert all(r["log_px_se"] is not None and r["ess"] is not None for r in val)
    # a binarised model's figures are discrete, with bits/dim
    result = train_evaluate_export(
        data, VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(32,), binarize="static"),
        TrainConfig(epochs=2, importance_samples=10, eval_importance_samples=0),
        str(tmp_path / "b"))
    s = result.summary
    assert s["likelihood_kind"] == "discrete"
    assert s["heldout_bits_per_dim"] == pytest.approx(-s["heldout_log_px"] / (64 * math.log(2)))
    assert (s["collapse"]["warning"] is None) == (s["collapse"]["n_collapsed"] <= 2)
