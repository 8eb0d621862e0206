"""Encoder and decoder networks of the two families, `mlp` and `conv`: an encoder maps items to
(mu, logvar), a decoder maps codes to the likelihood's location parameter
(docs/internals/models.md)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from models.config import VAEConfig

ACTIVATION_MODULES: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU,
    "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """A new module of the named nonlinearity (models.config.ACTIVATIONS)."""
    return ACTIVATION_MODULES[name]()


class MLPEncoder(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = config.input_size
        for h in config.hidden:
            layers += [nn.Linear(width, h), activation(config.activation)]
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
            layers += [nn.Linear(width, h), activation(config.activation)]
            width = h
        layers.append(nn.Linear(width, config.input_size))
        self.body = nn.Sequential(*layers)
        self.input_shape = config.input_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z).unflatten(-1, self.input_shape)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of equal size (a divisor of `channels`)."""
    return nn.GroupNorm(math.gcd(channels, 32), channels)


class ResidualBlock(nn.Module):
    """x + conv3x3(act(norm(conv3x3(act(norm(x)))))): pre-activation (He et al., 2016),
    the second convolution started at zero so a new block is the identity and a deep
    stack trains from the start like a shallow one."""

    def __init__(self, channels: int, norm: str, act: str = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            if norm == "group":
                layers.append(group_norm(channels))
            layers += [activation(act), nn.Conv2d(channels, channels, kernel_size=3, padding=1)]
        self.body = nn.Sequential(*layers)
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _stage(channels: int, config: VAEConfig) -> list[nn.Module]:
    """What follows a resizing convolution that is not the last: [norm,] the activation,
    then the residual blocks at that resolution (with blocks 0 and norm none, the layers of
    earlier models, so their parameters keep their names)."""
    layers: list[nn.Module] = [group_norm(channels)] if config.norm == "group" else []
    layers.append(activation(config.activation))
    return layers + [ResidualBlock(channels, config.norm, config.activation)
                     for _ in range(config.blocks)]


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions (each halves H and W; `norm` and `blocks` per
    models.config.VAEConfig after each), then a linear head."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        channels, height, width = config.input_shape
        layers: list[nn.Module] = []
        for h in config.hidden:
            layers += [nn.Conv2d(channels, h, kernel_size=4, stride=2, padding=1),
                       *_stage(h, config)]
            channels = h
        self.body = nn.Sequential(*layers)
        factor = 2 ** len(config.hidden)
        self.head = nn.Linear(channels * (height // factor) * (width // factor),
                              2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x).flatten(1)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """A linear layer to the smallest feature map (then its residual blocks), then stride-2
    transposed convolutions, each but the last followed by `norm` and `blocks`."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        out_channels, height, width = config.input_shape
        factor = 2 ** len(config.hidden)
        self.start_shape = (config.hidden[-1], height // factor, width // factor)
        self.stem = nn.Sequential(nn.Linear(config.latent_dim, math.prod(self.start_shape)),
                                  activation(config.activation),
                                  *(ResidualBlock(config.hidden[-1], config.norm,
                                                  config.activation)
                                    for _ in range(config.blocks)))
        layers: list[nn.Module] = []
        channels = [*reversed(config.hidden), out_channels]
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            if i < len(channels) - 2:
                layers += _stage(c_out, config)
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem[0](z)
        return self.body(self.stem[1:](x.unflatten(-1, self.start_shape)))


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
