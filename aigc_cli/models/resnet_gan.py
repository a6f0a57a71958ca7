"""SNGAN's ResNet generator and discriminator (Miyato et al. 2018; class-conditional with conditional BN in G
and a projection discriminator, Miyato & Koyama 2018), after the authors' Chainer code and its PyTorch ports
(mimicry, StudioGAN).

Widths: g_width is G's widest (4x4) width, d_width D's widest (last) width.
- resolution <= 32, the CIFAR-10 models: every G block has g_width channels (SNGAN: 256); D is an optimized
  block and three residual blocks of d_width channels (SNGAN: 128), downsampling in the first two.
- resolution >= 64, the STL/ImageNet-64 models: G halves the width at each up-block (SNGAN-64: g_width 1024 ->
  64 at 64x64); D doubles it at each down-block, downsampling in all, ending at d_width (SNGAN-64: 64 -> 1024).
Spectral norm is on every D layer, always; G has none (as in SNGAN).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConditionalBatchNorm2d, ProjectionHead, need_labels, sn


def _xavier(module: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(module.weight, gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def _conv(c_in: int, c_out: int, k: int, gain: float, spectral: bool) -> nn.Module:
    return sn(_xavier(nn.Conv2d(c_in, c_out, k, 1, k // 2), gain), spectral)


def g_widths(resolution: int, width: int) -> list[int]:
    """Channels at 4x4, 8x8, ..., R x R."""
    n = int(math.log2(resolution)) - 2
    if resolution <= 32:
        return [width] * (n + 1)
    return [max(width >> i, 1) for i in range(n + 1)]


def d_blocks(resolution: int, width: int) -> list[tuple[int, bool]]:
    """(output channels, downsample) of each D block; the first is the optimized block."""
    if resolution <= 32:
        return [(width, True), (width, True), (width, False), (width, False)]
    n = int(math.log2(resolution)) - 1  # 64: 5 blocks, 64x64 -> 2x2
    return [(max(width >> (n - 1 - i), 1), True) for i in range(n)]


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class GBlock(nn.Module):
    """BN, ReLU, 2x nearest upsample, 3x3 conv, BN, ReLU, 3x3 conv; shortcut: upsample, 1x1 conv.
    With num_classes > 0 both BNs are class-conditional."""

    def __init__(self, c_in: int, c_out: int, num_classes: int = 0):
        super().__init__()
        self.conditional = num_classes > 0

        def bn(c: int) -> nn.Module:
            return ConditionalBatchNorm2d(c, num_classes) if self.conditional else nn.BatchNorm2d(c)

        self.b1, self.c1 = bn(c_in), _conv(c_in, c_out, 3, math.sqrt(2), False)
        self.b2, self.c2 = bn(c_out), _conv(c_out, c_out, 3, math.sqrt(2), False)
        self.c_sc = _conv(c_in, c_out, 1, 1.0, False)

    def _bn(self, bn: nn.Module, h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return bn(h, y) if self.conditional else bn(h)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.c1(_up(F.relu(self._bn(self.b1, x, y))))
        h = self.c2(F.relu(self._bn(self.b2, h, y)))
        return h + self.c_sc(_up(x))


class DBlock(nn.Module):
    """Pre-activation residual block: ReLU, 3x3 conv, ReLU, 3x3 conv, (2x2 average pool); shortcut: 1x1 conv then
    pool when the shape changes, else identity. `optimized` (the first block): no leading ReLU, hidden width
    c_out, shortcut pool then 1x1 conv. All convs spectral-normalised."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, optimized: bool = False):
        super().__init__()
        self.downsample, self.optimized = downsample, optimized
        hidden = c_out if optimized else c_in
        self.c1 = _conv(c_in, hidden, 3, math.sqrt(2), True)
        self.c2 = _conv(hidden, c_out, 3, math.sqrt(2), True)
        learnable = optimized or downsample or c_in != c_out
        self.c_sc = _conv(c_in, c_out, 1, 1.0, True) if learnable else None

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(h, 2) if self.downsample else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._pool(self.c2(F.relu(self.c1(x if self.optimized else F.relu(x)))))
        if self.c_sc is None:
            return h + x
        return h + (self.c_sc(self._pool(x)) if self.optimized else self._pool(self.c_sc(x)))


class Generator(nn.Module):
    """`G(z, y=None)`: linear z -> 4x4 x g_width, up-blocks to R x R, BN, ReLU, 3x3 conv, Tanh.
    With num_classes > 0 the blocks use conditional BN and y is required; otherwise y is ignored."""

    def __init__(self, latent_dim: int, channels: int, resolution: int, width: int, num_classes: int = 0):
        super().__init__()
        self.conditional = num_classes > 0
        ws = g_widths(resolution, width)
        self.w0 = ws[0]
        self.fc = _xavier(nn.Linear(latent_dim, 4 * 4 * ws[0]))
        self.blocks = nn.ModuleList(GBlock(a, b, num_classes) for a, b in zip(ws, ws[1:]))
        self.bn = nn.BatchNorm2d(ws[-1])
        self.out = _conv(ws[-1], channels, 3, 1.0, False)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            need_labels(y)
        else:
            y = None
        h = self.fc(z.reshape(z.shape[0], -1)).reshape(z.shape[0], self.w0, 4, 4)
        for block in self.blocks:
            h = block(h, y)
        return torch.tanh(self.out(F.relu(self.bn(h))))


class Discriminator(nn.Module):
    """`D(x, y=None)` -> logits (N,): residual down-blocks, ReLU, global sum pooling, then a linear layer, or a
    projection head (linear(h) + <embed(y), h>) with num_classes > 0. Spectral norm on every layer."""

    def __init__(self, channels: int, resolution: int, width: int, num_classes: int = 0):
        super().__init__()
        self.conditional = num_classes > 0
        blocks, c_in = [], channels
        for i, (c_out, down) in enumerate(d_blocks(resolution, width)):
            blocks.append(DBlock(c_in, c_out, down, optimized=i == 0))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        if self.conditional:
            self.head = ProjectionHead(c_in, num_classes, spectral_norm=True)
        else:
            self.fc = sn(_xavier(nn.Linear(c_in, 1)), True)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        if self.conditional:
            return self.head(h, need_labels(y))
        return self.fc(h).reshape(-1)


def build(m) -> dict[str, nn.Module]:
    k = m.num_classes if m.conditional else 0
    return {"G": Generator(m.latent_dim, m.channels, m.resolution, m.g_width, k),
            "D": Discriminator(m.channels, m.resolution, m.d_width, k)}
