"""DiffAugment: differentiable augmentation for data-efficient GAN training.

Zhao, Liu, Lin, Zhu, Han (2020), "Differentiable Augmentation for Data-Efficient GAN Training",
https://arxiv.org/abs/2006.10738. The three ops of the reference implementation (color,
translation, cutout), applied with the same parameters to a batch in [-1, 1] shaped (N, C, H, W).
Every op is differentiable with respect to the images, so the same augmentation can be applied to
real and generated batches before the discriminator and gradients still reach the generator.

All random draws are made per image in one call each, on the generator's device (the global RNG of
``x.device`` when no generator is given), and nothing reads tensor values back to the host, so the
functions neither branch on data nor force a device sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("translation", "cutout", "color")

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """``"translation,cutout"`` -> ``("translation", "cutout")``; ``""`` -> ``()``; unknown names -> ValueError."""
    names = tuple(part.strip() for part in policy.split(",") if part.strip())
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(OPS)} (comma-separated)")
    return names


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) of shape (n, 1, 1, 1) in x's dtype on x's device (drawn in fp32 so the stream is dtype-independent)."""
    device = generator.device if generator is not None else x.device
    r = torch.rand((n, 1, 1, 1), generator=generator, device=device, dtype=torch.float32)
    return r.to(device=x.device, dtype=x.dtype, non_blocking=True)


def _randint(low: int, high: int, n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Integers in [low, high) of shape (n, 1, 1) on x's device."""
    device = generator.device if generator is not None else x.device
    r = torch.randint(low, high, (n, 1, 1), generator=generator, device=device, dtype=torch.long)
    return r.to(device=x.device, non_blocking=True)


def _brightness(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return x + (_rand(x.size(0), x, g) - 0.5)


def _saturation(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x.size(0), x, g) * 2) + mean


def _contrast(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x.size(0), x, g) + 0.5) + mean


def _translation(x: torch.Tensor, g: torch.Generator | None, ratio: float = TRANSLATION_RATIO) -> torch.Tensor:
    """Shift each image by up to ratio*size pixels per axis, zero-filling, via an index gather into a padded copy."""
    n, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = _randint(-shift_h, shift_h + 1, n, x, g)
    ty = _randint(-shift_w, shift_w + 1, n, x, g)
    gb, gx, gy = torch.meshgrid(
        torch.arange(n, dtype=torch.long, device=x.device),
        torch.arange(h, dtype=torch.long, device=x.device),
        torch.arange(w, dtype=torch.long, device=x.device),
        indexing="ij",
    )
    # Indices into the 1-pixel zero-padded image: anything shifted out of range lands on the zero border.
    gx = torch.clamp(gx + tx + 1, 0, h + 1)
    gy = torch.clamp(gy + ty + 1, 0, w + 1)
    x_pad = F.pad(x, [1, 1, 1, 1])
    return x_pad.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, g: torch.Generator | None, ratio: float = CUTOUT_RATIO) -> torch.Tensor:
    """Zero a (ratio*H) x (ratio*W) rectangle per image at a random centre; clipped where it crosses the border.

    Same offsets and clipping as the reference (which scatters zeros into a mask through clamped
    indices); the mask is built here by comparing row/column indices with the rectangle's bounds.
    """
    n, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    off_h = _randint(0, h + (1 - size_h % 2), n, x, g).view(n, 1)
    off_w = _randint(0, w + (1 - size_w % 2), n, x, g).view(n, 1)
    lo_h = off_h - size_h // 2
    lo_w = off_w - size_w // 2
    rows = torch.arange(h, dtype=torch.long, device=x.device).view(1, h)
    cols = torch.arange(w, dtype=torch.long, device=x.device).view(1, w)
    in_rows = (rows >= lo_h) & (rows < lo_h + size_h)  # (n, h)
    in_cols = (cols >= lo_w) & (cols < lo_w + size_w)  # (n, w)
    keep = ~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))  # (n, h, w)
    return x * keep.unsqueeze(1).to(x.dtype)


def _color(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return _contrast(_saturation(_brightness(x, g), g), g)


_FNS = {"translation": _translation, "cutout": _cutout, "color": _color}


def diff_augment(x: torch.Tensor, policy: tuple[str, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the ops of ``policy`` in order to a (N, C, H, W) batch; returns ``x`` itself for an empty policy."""
    if isinstance(policy, str):
        policy = parse_policy(policy)
    if not policy:
        return x
    unknown = [p for p in policy if p not in _FNS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; choose from {', '.join(OPS)}")
    if x.dim() != 4:
        raise ValueError(f"diff_augment expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    for name in policy:
        x = _FNS[name](x, generator)
    return x.contiguous()
