"""Encoder and decoder networks of the two families: `mlp` and `conv`.

An encoder maps items `(B, *input_shape)` to `(mu, logvar)`, each `(B, latent_dim)`.
A decoder maps codes `(B, latent_dim)` to one tensor `(B, *input_shape)`: the
location parameter of the likelihood (Bernoulli logits or Gaussian means).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from models.config import VAEConfig


class MLPEncoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_size
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x.flatten(1))).chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.latent_dim
        for h in reversed(config.hidden):
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, config.input_size))
        self.body = nn.Sequential(*layers)
        self.input_shape = config.input_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).unflatten(-1, self.input_shape)


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions (each halves H and W), then a linear head."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, height, width = config.input_shape
        layers: list[nn.Module] = []
        for h in config.hidden:
            layers += [nn.Conv2d(channels, h, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            channels = h
        self.body = nn.Sequential(*layers)
        factor = 2 ** len(config.hidden)
        self.head = nn.Linear(channels * (height // factor) * (width // factor),
                              2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x).flatten(1)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """A linear layer to the smallest feature map, then stride-2 transposed convolutions."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        out_channels, height, width = config.input_shape
        factor = 2 ** len(config.hidden)
        self.start_shape = (config.hidden[-1], height // factor, width // factor)
        self.stem = nn.Sequential(nn.Linear(config.latent_dim, math.prod(self.start_shape)),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        channels = [*reversed(config.hidden), out_channels]
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            if i < len(channels) - 2:
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(z).unflatten(-1, self.start_shape))


@torch.no_grad()
def set_output_bias(decoder: nn.Module, loc: torch.Tensor) -> None:
    """Start the decoder's last layer at `loc` (item-shaped): the likelihood's location for
    a code that carries nothing yet. An MLP's bias is per value; a transposed convolution's
    is per channel, so it gets the channel's mean of `loc`."""
    last = decoder.body[-1]
    if isinstance(last, nn.Linear):
        last.bias.copy_(loc.reshape(-1).to(last.bias.dtype))
    else:
        last.bias.copy_(loc.reshape(loc.shape[0], -1).mean(1).to(last.bias.dtype))


def build_encoder(config: VAEConfig) -> nn.Module:
    return MLPEncoder(config) if config.family == "mlp" else ConvEncoder(config)


def build_decoder(config: VAEConfig) -> nn.Module:
    return MLPDecoder(config) if config.family == "mlp" else ConvDecoder(config)
