"""DCGAN (Radford et al. 2016) at any power-of-two resolution >= 16: 4x4 up to R by stride-2 convs."""

from __future__ import annotations

import math

import torch
from torch import nn


def widths(resolution: int, base: int) -> list[int]:
    """Channel widths from the 4x4 end to the full-resolution end: base*2^(n-1) ... base."""
    n = int(math.log2(resolution)) - 2  # stride-2 layers between 4x4 and R
    return [base * 2 ** (n - 1 - i) for i in range(n)]


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int):
        super().__init__()
        ws = widths(resolution, width)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, ws[0], 4, 1, 0, bias=False),
                                   nn.BatchNorm2d(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """Outputs logits (no Sigmoid), so the loss runs safely under autocast."""

    def __init__(self, channels: int, resolution: int, width: int):
        super().__init__()
        ws = widths(resolution, width)[::-1]  # base ... base*2^(n-1)
        layers: list[nn.Module] = [nn.Conv2d(channels, ws[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(ws[-1], 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(-1)


def build(m) -> dict[str, nn.Module]:
    from . import init_dcgan_weights

    nets = {"G": Generator(m.latent_dim, m.channels, m.resolution, m.g_width),
            "D": Discriminator(m.channels, m.resolution, m.d_width)}
    for net in nets.values():
        init_dcgan_weights(net)
    return nets
