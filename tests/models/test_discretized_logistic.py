"""The discretised logistic likelihood for 8-bit data, against independent computations:
bin probabilities as direct CDF differences in float64 (SciPy's logistic, its survival
function where the CDF would cancel) and in 50-digit arithmetic (mpmath) where float64
underflows; the L probabilities summing to 1; bits/dim in closed form; the API's NumPy
scorer against torch."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from models.config import ConfigError, VAEConfig
from models.data import DataError, validate_array
from models.evaluate import evaluate
from models.likelihoods import log_bin_probability
from models.transforms import range_problem
from models.vae import VAE
from service.api.scoring import log_bin_probability as np_log_bin_probability
from service.api.scoring import log_px_given_z

# (mu, log s): inside [0, 1], beyond either end, sharp and flat
CASES = [(0.5, -3.0), (0.0, -4.0), (1.0, -2.0), (0.3, 0.0), (0.7, 3.0), (-0.4, -2.5),
         (1.6, -1.0), (-3.0, -4.0), (4.0, -3.5), (0.5, -8.0), (0.123, -6.0)]


def scipy_log_probs(mu: float, log_s: float, levels: int) -> np.ndarray:
    """log P(k) for k = 0 .. L-1 from logistic CDFs in float64: the lowest bin's CDF at its
    upper edge, the highest's survival at its lower edge, between the difference of CDFs,
    or of survival functions above mu (where the CDFs are near 1 and would cancel)."""
    n = levels - 1
    s = math.exp(log_s)
    k = np.arange(levels)
    upper, lower = (k + 0.5) / n, (k - 0.5) / n
    dist = stats.logistic(loc=mu, scale=s)
    with np.errstate(divide="ignore"):
        middle = np.where(k / n > mu, np.log(dist.sf(lower) - dist.sf(upper)),
                          np.log(dist.cdf(upper) - dist.cdf(lower)))
    middle[0] = dist.logcdf(upper[0])
    middle[-1] = dist.logsf(lower[-1])
    return middle


def mp_log_prob(k: int, mu: float, log_s: float, levels: int) -> float:
    import mpmath

    with mpmath.workdps(50):
        n = levels - 1
        s = mpmath.exp(mpmath.mpf(log_s))

        def cdf(v, sign):  # sign -1: the survival function (1 - CDF)
            return 1 / (1 + mpmath.exp(-sign * (v - mpmath.mpf(mu)) / s))
        # a difference of the small ends: of survivals above mu, of CDFs below it
        sign = -1 if k / n > mu else 1
        up, lo = mpmath.mpf(k + 0.5) / n, mpmath.mpf(k - 0.5) / n
        hi = (1 if sign > 0 else 0) if k == n else cdf(up, sign)
        lo = (0 if sign > 0 else 1) if k == 0 else cdf(lo, sign)
        return float(mpmath.log(sign * (hi - lo)))


def torch_log_probs(mu: float, log_s: float, levels: int, dtype=torch.float64) -> torch.Tensor:
    x = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    return log_bin_probability(x.to(dtype), torch.tensor(mu, dtype=dtype),
                               torch.tensor(log_s, dtype=dtype), levels)


@pytest.mark.parametrize(("mu", "log_s"), CASES)
def test_bin_probabilities_equal_float64_cdf_differences_and_sum_to_one(mu, log_s):
    want = scipy_log_probs(mu, log_s, 256)
    got = torch_log_probs(mu, log_s, 256).numpy()
    finite = np.isfinite(want) & (want > -700)  # float64's CDF differences resolve these
    assert finite.sum() >= 3
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-9, atol=1e-12)
    # where float64's difference underflows, 50 digits (both edges, a few between)
    beyond = np.flatnonzero(~finite)
    for k in {*beyond[:: max(1, len(beyond) // 5)], *({0, 255} & {*beyond})}:
        assert got[k] == pytest.approx(mp_log_prob(int(k), mu, log_s, 256), rel=1e-9)
    assert np.isfinite(got).all()
    # the 256 probabilities sum to 1
    assert float(torch.logsumexp(torch.from_numpy(got), 0)) == pytest.approx(0.0, abs=1e-12)
    # float32 (training) sums to 1 as well, up to its rounding of k/n - mu (6e-8) times
    # 1/s (3000 at log s = -8) at the bins that hold the mass
    assert float(torch.logsumexp(torch_log_probs(mu, log_s, 256, torch.float32).double(),
                                 0)) == pytest.approx(0.0, abs=1e-4)
    # and the API's NumPy copy
    x = np.arange(256) / 255
    np.testing.assert_allclose(np_log_bin_probability(x, mu, log_s, 256), got, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("levels", [2, 16, 256])
def test_other_level_counts_sum_to_one_and_values_between_levels_are_binned(levels):
    for mu, log_s in CASES[:6]:
        lp = torch_log_probs(mu, log_s, levels)
        assert float(torch.logsumexp(lp, 0)) == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(lp.numpy(), scipy_log_probs(mu, log_s, levels), rtol=1e-9)
    # a value a third of a level above level 1 is scored as level 1
    x = torch.tensor([1.0, 1.0 + 1 / 3, 1.0 - 1 / 3], dtype=torch.float64) / (levels - 1)
    lp = log_bin_probability(x, torch.tensor(0.4, dtype=torch.float64),
                             torch.tensor(-2.0, dtype=torch.float64), levels)
    assert float(lp[0]) == float(lp[1]) == float(lp[2])


def test_gradients_are_finite_at_the_edges_and_for_extreme_parameters():
    x = torch.tensor([0.0, 1 / 255, 0.5, 254 / 255, 1.0]).repeat(6)
    mu = torch.tensor([-50.0, -1.0, 0.0, 0.5, 1.0, 50.0]).repeat_interleave(5).requires_grad_()
    log_s = torch.tensor([-20.0, -4.0, 0.0, 5.0, -7.0, -9.0]).repeat_interleave(5)
    log_s.requires_grad_()
    lp = log_bin_probability(x, mu, log_s, 256)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_s.grad).all()
    # at the lowest bin with mu far below it, the bin is certain and its gradient vanishes
    assert float(lp[0].detach()) == pytest.approx(0.0, abs=1e-6)


def test_the_default_floor_caps_an_interior_bin_as_documented():
    """At s = e^-7 the bin centred on mu holds sigma(d/s) - sigma(-d/s), d = 1/510: 0.79;
    at e^-4, 0.053 (SciPy's logistic)."""
    for log_s, cap in ((-7.0, 0.79), (-4.0, 0.053)):
        d = stats.logistic(loc=0.5 + 0.5 / 255, scale=math.exp(log_s))
        p = d.cdf(128.5 / 255) - d.cdf(127.5 / 255)
        assert p == pytest.approx(cap, abs=0.005)
        lp = log_bin_probability(torch.tensor(128 / 255, dtype=torch.float64),
                                 torch.tensor(128 / 255, dtype=torch.float64),
                                 torch.tensor(log_s, dtype=torch.float64), 256)
        assert math.exp(float(lp)) == pytest.approx(p, rel=1e-9)


def test_per_channel_scale_floor_and_data_initialisation():
    cfg = VAEConfig(input_shape=(3, 4, 4), family="conv", hidden=(4,),
                    likelihood="discretized_logistic", min_log_scale=-5.0)
    lik = VAE(cfg).likelihood
    assert tuple(lik.log_scale_param.shape) == (3, 1, 1)
    flat = VAEConfig(input_shape=(6,), likelihood="discretized_logistic")
    assert tuple(VAE(flat).likelihood.log_scale_param.shape) == (6,)
    std = torch.ones(3, 4, 4) * torch.tensor([0.1, 1e-9, 0.3])[:, None, None]
    std[2, 0, 0] = 0.5  # the channel's spread is the root mean of its variances
    mean = torch.rand(3, 4, 4)
    assert torch.equal(lik.location_of(mean, std), mean)
    spread2 = math.sqrt((15 * 0.3 ** 2 + 0.5 ** 2) / 16)
    want = [math.log(0.1 * math.sqrt(3) / math.pi), -5.0,
            math.log(spread2 * math.sqrt(3) / math.pi)]
    np.testing.assert_allclose(lik.log_scale_param.detach().reshape(3).numpy(), want,
                               rtol=1e-5)
    with torch.no_grad():
        lik.log_scale_param.fill_(-9.0)
    assert float(lik.log_scale().detach().max()) == -5.0  # floored


def test_bits_per_dim_in_closed_form():
    """A decoder whose location is constant with an encoder that returns the prior: log
    p(x) = log p(x|z) exactly. With 2 levels and mu = 1/2 each value's bin has probability
    sigma(0) = 1/2 whatever the scale: 1 bit/dim. With 256 levels, mu = 0, s = 1 on black
    items: each value's probability is sigma(1/510), log2(1 + e^(-1/510)) bits/dim."""
    for levels, loc, data, bits in (
            (2, 0.5, (np.random.default_rng(0).random((30, 6)) > 0.5).astype(np.float32),
             1.0),
            (256, 0.0, np.zeros((30, 6), dtype=np.float32), math.log2(1 + math.exp(-1 / 510)))):
        cfg = VAEConfig(input_shape=(6,), latent_dim=2, hidden=(4,),
                        likelihood="discretized_logistic", levels=levels)
        model = VAE(cfg)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.decoder.body[-1].bias.fill_(loc)
        result = evaluate(model, data, np.arange(30), importance_samples=10, seed=1)
        assert result.summary()["bits_per_dim"] == pytest.approx(bits, rel=1e-5)
        np.testing.assert_allclose(result.log_px, -6 * bits * math.log(2), rtol=1e-5)
    assert cfg.likelihood_kind(data_is_binary=False) == "discrete"


def test_the_api_scores_it_as_torch_does():
    cfg = VAEConfig(input_shape=(3, 2, 2), family="conv", hidden=(2,),
                    likelihood="discretized_logistic", min_log_scale=-7.0)
    torch.manual_seed(0)
    lik = VAE(cfg).likelihood.double()
    with torch.no_grad():
        lik.log_scale_param.copy_(torch.tensor([-6.5, -2.0, 1.0]).reshape(3, 1, 1))
    loc = torch.randn(5, 3, 2, 2, dtype=torch.float64) * 0.6 + 0.5  # some beyond [0, 1]
    loc[0, 0] = torch.tensor([[-3.0, 4.0], [0.0, 1.0]])
    x = torch.randint(0, 256, (5, 3, 2, 2)).double() / 255
    x[:, :, 0, 0] = 0.0
    x[:, :, 1, 1] = 1.0
    with torch.no_grad():
        want = lik.log_prob(x, loc).numpy()
    with torch.no_grad():
        params = dict(zip(lik.output_names, (t.numpy() for t in lik.parameters_of(loc)),
                          strict=True))
    assert list(params) == ["mean", "log_scale", "loc"]
    np.testing.assert_array_equal(params["mean"], np.clip(loc.numpy(), 0, 1))
    got = log_px_given_z(x.numpy(), params, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # against SciPy, value by value, where float64's CDFs resolve the bin
    s = np.exp(params["log_scale"])
    k = np.round(x.numpy() * 255)
    dist = stats.logistic(loc=loc.numpy(), scale=s)
    with np.errstate(divide="ignore"):
        p = np.where(k == 255, 1.0, dist.cdf((k + 0.5) / 255)) - np.where(
            k == 0, 0.0, dist.cdf((k - 0.5) / 255))
        log_p = np.log(p)
    each = np_log_bin_probability(x.numpy(), params["loc"], params["log_scale"], 256)
    resolved = log_p > -700
    assert resolved.sum() > 40
    np.testing.assert_allclose(each[resolved], log_p[resolved], rtol=1e-6, atol=1e-12)


def test_options_and_values_are_checked():
    with pytest.raises(ConfigError, match="dequantize"):
        VAEConfig(input_shape=(4,), likelihood="discretized_logistic", dequantize="uniform")
    with pytest.raises(ConfigError, match="binarize"):
        VAEConfig(input_shape=(4,), likelihood="discretized_logistic", binarize="static")
    cfg = VAEConfig(input_shape=(4,), likelihood="discretized_logistic")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    # an unset floor is the likelihood's own, and stored as a number
    assert cfg.min_log_scale == -7.0 and cfg.to_dict()["min_log_scale"] == -7.0
    assert VAEConfig(input_shape=(4,), likelihood="gaussian").min_log_scale == -4.0
    assert VAEConfig(input_shape=(4,)).to_dict()["min_log_scale"] == -4.0  # as before
    assert VAEConfig(input_shape=(4,), likelihood="discretized_logistic",
                     min_log_scale=-4.0).min_log_scale == -4.0
    with pytest.raises(DataError, match=r"discretized_logistic likelihood needs values in "
                                        r"\[0, 1\]; item 1 has values in \[0, 2\]"):
        validate_array(np.array([[0, 1, 0.5, 0], [0, 2, 0, 0]], dtype=np.float32), cfg)
    assert "[0, 255]" in range_problem(0.0, 255.0, cfg)
    assert range_problem(0.0, 1.0, cfg) is None
