"""Channel and resolution conversion for uint8 image batches of shape (N, C, H, W)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights: the conventional RGB -> grey mapping (what PIL's "L" mode uses too).
LUMA_601 = (0.299, 0.587, 0.114)

# Float working copies are made chunk by chunk so converting a large dataset never holds more
# than about this many bytes of float32 at once, whatever N is.
_CHUNK_BYTES = 64 * 1024 * 1024


def _chunk_size(per_image_floats: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(1, per_image_floats)))


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Return `images` with `channels` channels: 1 -> 3 repeats grey, 3 -> 1 takes BT.601 luma."""
    have = images.shape[1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        n, _, h, w = images.shape
        out = torch.empty((n, 1, h, w), dtype=torch.uint8)
        weights = torch.tensor(LUMA_601, dtype=torch.float32).view(1, 3, 1, 1)
        step = _chunk_size(3 * h * w)
        for start in range(0, n, step):
            chunk = images[start:start + step].to(torch.float32)
            luma = (chunk * weights).sum(dim=1, keepdim=True)
            out[start:start + step] = luma.round_().clamp_(0, 255).to(torch.uint8)
        return out
    raise ValueError(f"cannot convert {have} channels to {channels}")


def resized_shape(height: int, width: int, resolution: int) -> tuple[int, int]:
    """Size after scaling the shorter side to `resolution`, keeping the aspect ratio."""
    if height <= width:
        return resolution, max(resolution, round(width * resolution / height))
    return max(resolution, round(height * resolution / width)), resolution


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Scale the shorter side to `resolution` (antialiased bilinear), then centre-crop to a square."""
    n, c, h, w = images.shape
    if h == w == resolution:
        return images
    new_h, new_w = resized_shape(h, w, resolution)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    out = torch.empty((n, c, resolution, resolution), dtype=torch.uint8)
    step = _chunk_size(c * max(h * w, new_h * new_w))
    for start in range(0, n, step):
        chunk = images[start:start + step].to(torch.float32)
        if (new_h, new_w) != (h, w):
            # antialias=True makes downscaling average over the footprint instead of aliasing.
            chunk = F.interpolate(chunk, size=(new_h, new_w), mode="bilinear",
                                  align_corners=False, antialias=True)
        chunk = chunk[:, :, top:top + resolution, left:left + resolution]
        out[start:start + step] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def conform(images: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """Convert a uint8 batch to `channels` x `resolution` x `resolution`, contiguous."""
    # Do the resize on the smaller of the two channel counts: it is the expensive step.
    if channels < images.shape[1]:
        images = resize_square(to_channels(images, channels), resolution)
    else:
        images = to_channels(resize_square(images, resolution), channels)
    return images.contiguous()
