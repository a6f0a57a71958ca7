"""A convolutional VAE (Kingma & Welling 2014). "E" maps images to (mu, logvar); "G" decodes latents."""

from __future__ import annotations

import torch
from torch import nn

from .dcgan import widths


class Encoder(nn.Module):
    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int):
        super().__init__()
        ws = widths(resolution, width)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(channels, ws[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Flatten(), nn.Linear(ws[-1] * 4 * 4, 2 * latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training


class Decoder(nn.Module):
    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int):
        super().__init__()
        ws = widths(resolution, width)
        self.fc = nn.Linear(latent_dim, ws[0] * 4 * 4)
        self.w0 = ws[0]
        layers: list[nn.Module] = [nn.BatchNorm2d(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).reshape(z.shape[0], self.w0, 4, 4))


def build(m) -> dict[str, nn.Module]:
    return {"E": Encoder(m.latent_dim, m.channels, m.resolution, m.d_width),
            "G": Decoder(m.latent_dim, m.channels, m.resolution, m.g_width)}
