"""Decoder likelihoods p(x|z): log-densities in nats, summed over the item's dimensions.

`loc` is the decoder's output, shaped like the data: (continuous) Bernoulli logits,
Gaussian means or the discretised logistic's locations. Leading dimensions broadcast, so
`x` of shape `(B, *item)` scores `loc` of `(K, B, *item)`. A density fitted to dequantised
data adds `-D log L` (models/transforms.py), so its figures are log-probabilities of the
integer data; the discretised logistic's are probabilities of 8-bit data directly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.config import VAEConfig
from models.transforms import dequantization_offset

LOG_2PI = math.log(2 * math.pi)
LOG_2 = math.log(2.0)
CB_TAYLOR_BELOW = 0.1  # |logit| below which log C uses its series
CB_MEAN_TAYLOR_BELOW = 0.5  # and below which the mean does


class Bernoulli(nn.Module):
    """p(x|z) = prod_i p_i^x_i (1 - p_i)^(1 - x_i) with p = sigmoid(logits), x in [0, 1]."""

    name = "bernoulli"
    # `logits` last, after the outputs older exports had: a consumer that reads outputs by
    # name (or takes the first) is unchanged, and a scorer gets log p(x|z) exactly
    # (x l - softplus(l)) where float32 probabilities round to 0 or 1 (|l| > 16.6)
    output_names = ("probs", "logits")

    def __init__(self, item_dims: int) -> None:
        super().__init__()
        self.item_dims = tuple(range(-item_dims, 0))

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # x log sigmoid(l) + (1 - x) log sigmoid(-l) == x l - softplus(l), stable for any l.
        return (x * logits - F.softplus(logits)).sum(self.item_dims)

    def parameters_of(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The distribution's parameters as exported: `(probs, logits)`."""
        return torch.sigmoid(logits), logits

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def location_of(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The logits whose probabilities are the data's per-value means."""
        p = mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)


def cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """log C(l) of the continuous Bernoulli with lambda = sigmoid(l), elementwise.

    C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda) = l / tanh(l / 2), an even function
    of l equal to 2 at l = 0, where the closed form is 0/0: below |l| = 0.1 its series
    log 2 + l^2/12 - 7 l^4/1440 + 62 l^6/181440 is used (the next term is below 1e-12).
    Elsewhere log|l| - log tanh(|l| / 2), with log tanh(a/2) = log(-expm1(-a)) - log1p(e^-a).
    """
    a = logits.abs()
    small = a < CB_TAYLOR_BELOW
    safe = torch.where(small, 1.0, a)  # no 0/0 (nor a NaN gradient) in the unused branch
    exact = safe.log() - torch.log(-torch.expm1(-safe)) + torch.log1p(torch.exp(-safe))
    a2 = a.square()
    series = LOG_2 + a2 / 12 - 7 * a2.square() / 1440 + 62 * a2 * a2.square() / 181440
    return torch.where(small, series, exact)


def cb_mean(logits: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli: 1 / (1 - e^-l) - 1 / l, which is lambda-like but
    not lambda. Below |l| = 0.5 the closed form cancels (and is 0/0 at 0, where the mean is
    1/2): there its series 1/2 + l/12 - l^3/720 + l^5/30240 - l^7/1209600 (next term below
    1e-10). Written with exp, not expm1, so the exported graph needs no newer opset."""
    small = logits.abs() < CB_MEAN_TAYLOR_BELOW
    safe = torch.where(small, 1.0, logits)  # a scalar: no shape fixed into the export
    exact = 1.0 / (1.0 - torch.exp(-safe)) - 1.0 / safe
    l2 = logits.square()
    series = 0.5 + logits * (1 / 12 + l2 * (-1 / 720 + l2 * (1 / 30240 - l2 / 1209600)))
    return torch.where(small, series, exact)


class ContinuousBernoulli(nn.Module):
    """p(x|z) = C(lambda) lambda^x (1 - lambda)^(1 - x) on x in [0, 1], lambda = sigmoid(l):
    the Bernoulli made a true density by its normalising constant (Loaiza-Ganem &
    Cunningham, 2019). The decoder exports its mean (not lambda), lambda as `probs`, and the
    logits, from which a scorer computes log C(lambda) for any logit (from float32 `probs`
    it cannot beyond |l| = 16.6, where lambda rounds to 0 or 1)."""

    name = "continuous_bernoulli"
    output_names = ("mean", "probs", "logits")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.item_dims = tuple(range(-len(config.input_shape), 0))
        self.offset = (dequantization_offset(config.input_size, config.levels)
                       if config.dequantize != "none" else 0.0)

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return (x * logits - F.softplus(logits) + cb_log_normalizer(logits)).sum(
            self.item_dims) + self.offset

    def parameters_of(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(mean, probs, logits)`: E[x], lambda and its logit."""
        return cb_mean(logits), torch.sigmoid(logits), logits

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return cb_mean(logits)

    def location_of(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Logits whose lambda is the data's mean (lambda, not the CB's mean, is close to
        it away from 1/2 and equal at 1/2: a start, not a fit)."""
        p = mean.clamp(1e-3, 1 - 1e-3)
        return torch.log(p) - torch.log1p(-p)


class Gaussian(nn.Module):
    """p(x|z) = N(x; mean, diag(exp(log_scale))^2): a per-dimension scale, learned or fixed.

    A learned log-scale is floored at `min_log_scale`: otherwise pixels that never
    vary (the border of a digit) drive their scale to zero and the likelihood to +inf.
    """

    name = "gaussian"
    output_names = ("mean", "log_scale")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.item_dims = tuple(range(-len(config.input_shape), 0))
        self.min_log_scale = config.min_log_scale
        self.learned = config.gaussian_scale == "learned"
        self.offset = (dequantization_offset(config.input_size, config.levels)
                       if config.dequantize != "none" else 0.0)
        init = torch.full(config.input_shape, float(config.fixed_log_scale))
        if self.learned:
            self.log_scale_param = nn.Parameter(torch.zeros(config.input_shape))
        else:
            self.register_buffer("log_scale_param", init)

    def log_scale(self) -> torch.Tensor:
        if self.learned:
            return self.log_scale_param.clamp(min=self.min_log_scale)
        return self.log_scale_param

    def log_prob(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        log_scale = self.log_scale()
        standardized = (x - mean) * torch.exp(-log_scale)
        return (-0.5 * standardized.square() - log_scale - 0.5 * LOG_2PI).sum(
            self.item_dims) + self.offset

    def parameters_of(self, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The distribution's parameters as exported: `(mean, log_scale)`, both batch-shaped."""
        return mean, self.log_scale().expand_as(mean)

    def mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean

    @torch.no_grad()
    def location_of(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """The data's per-value means; a learned scale also starts at the data's spread."""
        if self.learned:
            self.log_scale_param.copy_(torch.log(std.clamp(min=1e-6)).clamp(
                min=self.min_log_scale))
        return mean


def log_bin_probability(x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                        levels: int) -> torch.Tensor:
    """log P(x's bin) under logistic(loc, e^log_scale), elementwise (see
    DiscretizedLogistic). With a = (x + delta - loc) / s > b = (x - delta - loc) / s:

        log(sigmoid(a) - sigmoid(b)) = -softplus(-a) - softplus(b) + log(-expm1(b - a))

    exactly (sigmoid(a) (1 - e^(b-a)) / (1 + e^b)), each term stable for any loc and s:
    no CDF difference that cancels or underflows, so no switch to the density at the
    centre (PixelCNN++'s fallback) and no threshold where the figure jumps. The lowest
    bin is log sigmoid(a) = -softplus(-a), the highest log(1 - sigmoid(b)) = -softplus(b).
    """
    n = levels - 1
    k = torch.round(x * n).clamp(0, n)  # float data between levels: the nearest level
    inv_s = torch.exp(-log_scale)
    centre = k / n - loc
    a = (centre + 0.5 / n) * inv_s
    b = (centre - 0.5 / n) * inv_s
    # softplus(t) is t itself beyond `threshold` (torch's 20 drops e^-20 = 2e-9 a value);
    # exp(40) is still finite in float32
    low, high = -F.softplus(-a, threshold=40), -F.softplus(b, threshold=40)
    middle = low + high + torch.log(-torch.expm1(-inv_s / n))
    return torch.where(k == 0, low, torch.where(k == n, high, middle))


class DiscretizedLogistic(nn.Module):
    """p(x|z) = prod_i P(bin of x_i) for 8-bit data on the grid k / (L - 1), k = 0 .. L-1:
    the mass of logistic(mu_i, s_c) on [x - delta, x + delta], delta = 1 / (2 (L - 1)), the
    lowest bin's lower edge at -inf and the highest's upper edge at +inf, so the L
    probabilities sum to 1 and log p(x|z) is a log-probability of the discrete data
    (bits/dim apply). Values between levels are binned to the nearest.

    mu is the decoder's output per value (unbounded: beyond 0 or 1 it makes an edge bin
    near certain, as saturated pixels want); log s is one learned parameter per channel,
    shape (C, 1, 1) for (C, H, W) items, (D,) for flat ones, floored at `min_log_scale`.
    Per channel, as IAF's decoder has it: a per-pixel scale has a free parameter for each
    value that never varies (a constant border) and collapses it to the floor on small
    data; a scale from the decoder per value (PixelCNN++, a mixture per pixel) is the
    richer option, at the cost of a second output map. The floor (by default -7,
    PixelCNN++'s) caps a bin's probability, not keeps it finite: at L = 256, s = e^-7
    gives an interior bin at most 0.79 (0.34 bits), s = e^-4 (the Gaussian's floor) 0.053
    (4.2 bits).

    Exported: `mean` = mu clamped to [0, 1] (the median of the logistic censored to
    [0, 1], whose bins' median is the level nearest it; not the expectation, which the
    edge bins pull towards 1/2), `log_scale` (expanded to the item) and `loc` = mu, last,
    from which a scorer computes log p(x|z) exactly where mu lies outside [0, 1].
    """

    name = "discretized_logistic"
    output_names = ("mean", "log_scale", "loc")

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.item_dims = tuple(range(-len(config.input_shape), 0))
        self.min_log_scale = config.min_log_scale
        self.levels = config.levels
        shape = ((config.input_shape[0], 1, 1) if len(config.input_shape) == 3
                 else config.input_shape)
        self.log_scale_param = nn.Parameter(torch.zeros(shape))

    def log_scale(self) -> torch.Tensor:
        return self.log_scale_param.clamp(min=self.min_log_scale)

    def log_prob(self, x: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        return log_bin_probability(x, loc, self.log_scale().to(loc.dtype), self.levels).sum(
            self.item_dims)

    def parameters_of(self, loc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(mean, log_scale, loc)`: mu clamped to [0, 1], log s per value, mu."""
        return loc.clamp(0.0, 1.0), self.log_scale().expand_as(loc), loc

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return loc.clamp(0.0, 1.0)

    @torch.no_grad()
    def location_of(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """mu at the data's per-value means; log s at each channel's spread (the root mean
        of its values' variances; a logistic's standard deviation is s pi / sqrt(3))."""
        if self.log_scale_param.shape != std.shape:  # per channel: (C, H, W) -> (C, 1, 1)
            std = std.square().mean((1, 2), keepdim=True).sqrt()
        s = std * (math.sqrt(3.0) / math.pi)
        self.log_scale_param.copy_(torch.log(s.clamp(min=1e-6)).clamp(min=self.min_log_scale))
        return mean


def build_likelihood(config: VAEConfig) -> nn.Module:
    if config.likelihood == "bernoulli":
        return Bernoulli(len(config.input_shape))
    if config.likelihood == "continuous_bernoulli":
        return ContinuousBernoulli(config)
    if config.likelihood == "discretized_logistic":
        return DiscretizedLogistic(config)
    return Gaussian(config)
