"""Decoder likelihoods p(x|z): log-densities in nats, summed over the item's dimensions.

`loc` is the decoder's output, shaped like the data: Bernoulli logits or Gaussian means.
Leading dimensions broadcast, so `x` of shape `(B, *item)` scores `loc` of `(K, B, *item)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.config import VAEConfig

LOG_2PI = math.log(2 * math.pi)


class Bernoulli(nn.Module):
    """p(x|z) = prod_i p_i^x_i (1 - p_i)^(1 - x_i) with p = sigmoid(logits), x in [0, 1]."""

    name = "bernoulli"
    output_names = ("probs",)

    def __init__(self, item_dims: int) -> None:
        super().__init__()
        self.item_dims = tuple(range(-item_dims, 0))

    def log_prob(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # x log sigmoid(l) + (1 - x) log sigmoid(-l) == x l - softplus(l), stable for any l.
        return (x * logits - F.softplus(logits)).sum(self.item_dims)

    def parameters_of(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The distribution's parameters as exported: `(probs,)`."""
        return (torch.sigmoid(logits),)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)


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
        return (-0.5 * standardized.square() - log_scale - 0.5 * LOG_2PI).sum(self.item_dims)

    def parameters_of(self, mean: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The distribution's parameters as exported: `(mean, log_scale)`, both batch-shaped."""
        return mean, self.log_scale().expand_as(mean)

    def mean(self, mean: torch.Tensor) -> torch.Tensor:
        return mean


def build_likelihood(config: VAEConfig) -> nn.Module:
    if config.likelihood == "bernoulli":
        return Bernoulli(len(config.input_shape))
    return Gaussian(config)
