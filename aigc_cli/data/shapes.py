"""The built-in "shapes" data set: coloured shapes drawn procedurally, no download needed.

Each image holds one shape (the label) with a random colour, size, position and rotation on a
dark background that is either flat or a gentle two-colour gradient. PIL draws only a one-channel
coverage mask per image, supersampled and box-reduced for anti-aliasing; colouring and the
backgrounds are then done for the whole batch at once in numpy, which keeps it fast.
"""

from __future__ import annotations

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")
SIZES = {"train": 4096, "test": 1024}
# A separate seed stream per split, so "test" never repeats "train" images for the same seed.
_STREAM = {"train": 0, "test": 1}
_CHUNK = 256  # images composited at once in float32; bounds memory at large resolutions


def _outline(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices for a non-circle shape of circumradius `r` turned by `angle`."""
    if kind == 1:  # square
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        scale = r / np.sqrt(2)
    elif kind == 2:  # equilateral triangle
        pts = [(np.cos(a), np.sin(a)) for a in (-np.pi / 2, np.pi / 6, 5 * np.pi / 6)]
        scale = r
    else:  # plus-shaped cross, arms a third of the width
        t = 1 / 3
        pts = [(t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t),
               (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t)]
        scale = r / np.hypot(1, t)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts]


def _mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int, factor: int) -> np.ndarray:
    """Anti-aliased coverage (size x size uint8) of one shape; geometry in output pixels."""
    big = Image.new("L", (size * factor, size * factor), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * factor, cy * factor, r * factor
    if kind == 0:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(_outline(kind, cx, cy, r, angle), fill=255)
    return np.asarray(big.reduce(factor) if factor > 1 else big)


def _colours(rng: np.random.Generator, n: int, lo: float, hi: float, sat: tuple[float, float]) -> np.ndarray:
    hues, sats, vals = rng.random(n), rng.uniform(*sat, n), rng.uniform(lo, hi, n)
    return np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)]) * 255


def draw_shapes(split: str, resolution: int, seed: int, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images (N, 3, R, R) uint8 and labels (N,) int64; same arguments -> identical output.

    All random parameters are drawn for the full split first, so `limit` yields exactly the
    first `limit` images of the full set.
    """
    total = SIZES[split]
    rng = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, _STREAM[split]])
    kinds = rng.integers(0, len(CLASSES), total)
    radius = rng.uniform(0.18, 0.42, total) * resolution
    # Centres keep most of the shape inside the frame: it may touch, but not leave, the edge.
    cx = rng.uniform(0, 1, total) * (resolution - 1.6 * radius) + 0.8 * radius
    cy = rng.uniform(0, 1, total) * (resolution - 1.6 * radius) + 0.8 * radius
    angle = rng.uniform(0, 2 * np.pi, total)
    fg = _colours(rng, total, 0.65, 1.0, (0.45, 1.0))           # bright, saturated shapes
    bg_a = _colours(rng, total, 0.0, 0.30, (0.0, 0.8))          # dark backgrounds
    bg_b = np.where(rng.random(total)[:, None] < 0.5, bg_a, _colours(rng, total, 0.0, 0.35, (0.0, 0.8)))
    bg_dir = rng.uniform(0, 2 * np.pi, total)

    n = min(limit, total) if limit > 0 else total
    # Supersample 4x at small sizes; 2x is plenty (and 4x too slow) for large images.
    factor = 4 if resolution <= 64 else 2
    coords = (np.arange(resolution) + 0.5) / resolution - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    out = np.empty((n, 3, resolution, resolution), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        idx = range(start, min(n, start + _CHUNK))
        cov = np.stack([_mask(int(kinds[i]), cx[i], cy[i], radius[i], angle[i], resolution, factor)
                        for i in idx]).astype(np.float32)[:, None] / 255
        # Background gradient: ramp t in [0, 1] along a random direction, between bg_a and bg_b.
        d = bg_dir[idx.start:idx.stop]
        t = (np.cos(d)[:, None, None] * xx + np.sin(d)[:, None, None] * yy) / np.sqrt(0.5) * 0.5 + 0.5
        t = t[:, None].astype(np.float32)
        a = bg_a[idx.start:idx.stop, :, None, None].astype(np.float32)
        b = bg_b[idx.start:idx.stop, :, None, None].astype(np.float32)
        f = fg[idx.start:idx.stop, :, None, None].astype(np.float32)
        img = (a + (b - a) * t) * (1 - cov) + f * cov
        out[idx.start:idx.stop] = np.clip(np.rint(img), 0, 255)
    return torch.from_numpy(out), torch.from_numpy(kinds[:n].astype(np.int64))
