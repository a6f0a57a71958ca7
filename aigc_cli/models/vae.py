"""A convolutional VAE (Kingma & Welling 2014). "E" maps images to (mu, logvar); "G" decodes latents.

Conditional (num_classes > 0, a CVAE as in Sohn et al. 2015): E sees the label as one-hot maps concatenated to
the image channels, G sees it one-hot concatenated to z. The decoder's likelihood picks its output squashing:
gaussian -> tanh(logits) (the mean on the [-1, 1] scale), bernoulli -> sigmoid(logits) * 2 - 1 (the pixel
probabilities on the [-1, 1] scale); `G.logits` gives the pre-activation output for the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .dcgan import widths
from .layers import need_labels, one_hot

LIKELIHOODS = ("gaussian", "bernoulli")


class Encoder(nn.Module):
    """`E(x, y=None)` -> (mu, logvar), float32, each (N, latent_dim)."""

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int, num_classes: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.conditional = num_classes > 0
        ws = widths(resolution, width)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(channels + num_classes, ws[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
        layers += [nn.Flatten(), nn.Linear(ws[-1] * 4 * 4, 2 * latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.conditional:
            maps = one_hot(need_labels(y), self.num_classes, x.dtype)[:, :, None, None]
            x = torch.cat([x, maps.expand(-1, -1, *x.shape[2:])], dim=1)
        mu, logvar = self.net(x).float().chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)  # keeps exp(logvar) finite early in training


class Decoder(nn.Module):
    """`G(z, y=None)` -> images (N, C, R, R) in [-1, 1]; `G.logits(z, y=None)` -> the same before squashing."""

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int, num_classes: int = 0,
                 likelihood: str = "gaussian"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; use {' or '.join(LIKELIHOODS)}")
        self.likelihood = likelihood
        self.num_classes = num_classes
        self.conditional = num_classes > 0
        ws = widths(resolution, width)
        self.fc = nn.Linear(latent_dim + num_classes, ws[0] * 4 * 4)
        self.w0 = ws[0]
        layers: list[nn.Module] = [nn.BatchNorm2d(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1)]  # the squashing is in forward (it had no params)
        self.net = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            z = torch.cat([z, one_hot(need_labels(y), self.num_classes, z.dtype)], dim=1)
        return self.net(self.fc(z).reshape(z.shape[0], self.w0, 4, 4))

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = self.logits(z, y)
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out) * 2 - 1
        return torch.tanh(out)


def build(m) -> dict[str, nn.Module]:
    k = m.num_classes if m.conditional else 0
    return {"E": Encoder(m.latent_dim, m.channels, m.resolution, m.d_width, k),
            "G": Decoder(m.latent_dim, m.channels, m.resolution, m.g_width, k, m.likelihood)}
