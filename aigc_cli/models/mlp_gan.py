"""The classic fully connected GAN (Goodfellow et al. 2014, as in most tutorials): one hidden layer each."""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: int, resolution: int, hidden: int):
        super().__init__()
        self.shape = (channels, resolution, resolution)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2, True),
                                 nn.Linear(hidden, channels * resolution * resolution), nn.Tanh())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # unconditional: y unused
        return self.net(z).reshape(z.shape[0], *self.shape)


class Discriminator(nn.Module):
    def __init__(self, channels: int, resolution: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * resolution * resolution, hidden),
                                 nn.LeakyReLU(0.2, True), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).reshape(-1)


def build(m) -> dict[str, nn.Module]:
    return {"G": Generator(m.latent_dim, m.channels, m.resolution, m.hidden),
            "D": Discriminator(m.channels, m.resolution, m.hidden)}
