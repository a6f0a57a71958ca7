"""DCGAN (Radford et al. 2016) at any power-of-two resolution >= 16: 4x4 up to R by stride-2 convs.

Options: a class-conditional G (conditional BN) and D (projection head, Miyato & Koyama 2018), D's
normalisation (model.d_norm) and spectral normalisation of every D layer (model.spectral_norm).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import ConditionalBatchNorm2d, ProjectionHead, need_labels, norm2d, raw_weight, sn


def widths(resolution: int, base: int) -> list[int]:
    """Channel widths from the 4x4 end to the full-resolution end: base*2^(n-1) ... base."""
    n = int(math.log2(resolution)) - 2  # stride-2 layers between 4x4 and R
    return [base * 2 ** (n - 1 - i) for i in range(n)]


class Generator(nn.Module):
    """`G(z, y=None)`: (N, latent_dim) -> (N, C, R, R) in [-1, 1]. With num_classes > 0 every BatchNorm2d is
    a ConditionalBatchNorm2d and y is required; otherwise y is ignored and the network is the plain DCGAN G."""

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int, num_classes: int = 0):
        super().__init__()
        self.conditional = num_classes > 0

        def bn(c: int) -> nn.Module:
            return ConditionalBatchNorm2d(c, num_classes) if self.conditional else nn.BatchNorm2d(c)

        ws = widths(resolution, width)
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, ws[0], 4, 1, 0, bias=False), bn(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), bn(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        # Same indices, hence the same state_dict keys, either way; a Sequential cannot pass y along.
        self.net = nn.ModuleList(layers) if self.conditional else nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = z.reshape(z.shape[0], -1, 1, 1)
        if not self.conditional:
            return self.net(h)
        need_labels(y)
        for layer in self.net:
            h = layer(h, y) if isinstance(layer, ConditionalBatchNorm2d) else layer(h)
        return h


class Discriminator(nn.Module):
    """`D(x, y=None)` -> logits (N,) (no Sigmoid, so the loss runs safely under autocast).

    norm: batch | layer | none after every stride-2 conv but the first (hidden convs get a bias when none).
    Unconditional: a last 4x4 conv to one logit. Conditional (num_classes > 0): the 4x4 features are flattened
    into h and a ProjectionHead gives linear(h) + <embed(y), h>. Spectral norm is added by `build`, after init.
    """

    def __init__(self, channels: int, resolution: int, width: int, norm: str = "batch", num_classes: int = 0):
        super().__init__()
        self.conditional = num_classes > 0
        ws = widths(resolution, width)[::-1]  # base ... base*2^(n-1)
        layers: list[nn.Module] = [nn.Conv2d(channels, ws[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=norm == "none"), norm2d(norm, w_out),
                       nn.LeakyReLU(0.2, True)]
        if self.conditional:
            self.net = nn.Sequential(*layers, nn.Flatten())
            self.head = ProjectionHead(ws[-1] * 4 * 4, num_classes)
        else:
            self.net = nn.Sequential(*layers, nn.Conv2d(ws[-1], 1, 4, 1, 0, bias=False))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if not self.conditional:
            return self.net(x).reshape(-1)
        return self.head(self.net(x), need_labels(y))


def init_weights(net: nn.Module) -> None:
    """The DCGAN paper's initialisation: N(0, 0.02) for convs and linears, N(1, 0.02) for BN scales; extended to
    what that function does not know: the raw weight of a spectral-normalised layer, the projection embedding
    (N(0, 0.02) like the linears), BN without affine parameters (skipped) and conditional BN (gains 1, biases 0)."""
    for mod in net.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(raw_weight(mod), 0.0, 0.02)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.BatchNorm2d) and mod.affine:
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, ProjectionHead):
            nn.init.normal_(raw_weight(mod.embed), 0.0, 0.02)
    for mod in net.modules():
        if isinstance(mod, ConditionalBatchNorm2d):
            mod.reset_parameters()


def build(m) -> dict[str, nn.Module]:
    k = m.num_classes if m.conditional else 0
    G = Generator(m.latent_dim, m.channels, m.resolution, m.g_width, k)
    D = Discriminator(m.channels, m.resolution, m.d_width, m.d_norm, k)
    for net in (G, D):
        init_weights(net)
    if m.spectral_norm:  # after init, so the power iteration starts from the final weights
        for mod in [x for x in D.modules() if isinstance(x, (nn.Conv2d, nn.Linear, nn.Embedding))]:
            sn(mod, True)
    return {"G": G, "D": D}
