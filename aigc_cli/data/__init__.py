"""Training images: one entry point, `load_images`, for every supported source.

A source is a built-in name (see BUILTIN_SOURCES) or a folder path: a folder of raw MNIST-style
IDX files, a CIFAR-10 binary folder (cifar-10-batches-bin), or a folder of image files. Built-in
names win over a folder of the same name; write "./shapes" to mean the folder.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from aigc_cli.data import cifar, idx, torchvision_sources
from aigc_cli.data.folder import load_folder
from aigc_cli.data.shapes import draw_shapes
from aigc_cli.data.transforms import conform
from aigc_cli.errors import UsageError


@dataclass
class ImageData:
    images: torch.Tensor         # uint8 (N, C, H, W), contiguous, CPU
    labels: torch.Tensor | None  # int64 (N,), or None when the source has no labels
    num_classes: int             # 0 when unlabelled
    name: str                    # short description, e.g. "fashion-mnist (train, 60000 images)"


BUILTIN_SOURCES = ("shapes", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
MAX_RESOLUTION = 4096


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def load_images(source: str, *, channels: int, resolution: int, root: str | None = None,
                download: bool = False, split: str = "train", limit: int = 0, seed: int = 0,
                warn: Callable[[str], None] | None = None, strict: bool = False) -> ImageData:
    """Load `source` as uint8 images of `channels` x `resolution` x `resolution`.

    split: "train", or "test" for the held-out set. An image folder has no held-out set, so
        "test" gives the same images as "train"; an IDX folder uses its t10k-* files.
    limit: when > 0, keep only the first `limit` images in the source's fixed order.
    seed: only affects "shapes" (same seed -> identical images).
    root: where mnist / fashion-mnist / cifar10 live; default $AIGC_DATA_ROOT, else
        ~/.cache/aigc/datasets. Nothing is fetched over the network unless `download` is True.
    warn: receives one-line warnings (default: printed to stderr). An image folder gives one per
        file it skips (its path relative to the folder, and why), then a count of them.
    strict: for an image folder, the first file that cannot be used raises UsageError instead of
        being skipped with a warning.
    Raises UsageError (one line) for anything the user can fix.
    """
    warn = warn or _print_warning
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not isinstance(resolution, int) or not 4 <= resolution <= MAX_RESOLUTION:
        raise UsageError(f"resolution must be a whole number from 4 to {MAX_RESOLUTION}, got {resolution}")
    if split not in SPLITS:
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    if limit < 0:
        raise UsageError(f"limit must be 0 (all images) or a positive count, got {limit}")

    labels: torch.Tensor | None
    is_plain_folder = False  # an image folder: no split of its own, labels from class folders
    if source == "shapes":
        images, labels = draw_shapes(split, resolution, seed, limit)
        num_classes, name = 4, "shapes"
    elif source in ("mnist", "fashion-mnist", "cifar10"):
        data_root = os.path.expanduser(root) if root else torchvision_sources.default_root()
        if source == "cifar10":
            images, labels, num_classes, _ = torchvision_sources.load_cifar10(data_root, download, split)
        else:
            images, labels, num_classes, _ = torchvision_sources.load_mnist_like(
                source, data_root, bool(root), download, split)
        name = source
    else:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.isfile(path) else "is not a built-in source or an existing folder"
            raise UsageError(f"data source {source!r} {what}; use one of {', '.join(BUILTIN_SOURCES)} "
                             "or the path of a folder of images")
        if idx.is_idx_folder(path):
            images, labels = idx.load_idx_folder(path, split)
            num_classes = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
            name = f"IDX folder {path}"
        elif cifar.is_cifar_bin_folder(path):
            images, labels = cifar.load_cifar_bin_folder(path, split)
            num_classes, name = cifar.NUM_CLASSES, f"CIFAR-10 folder {path}"
        else:
            images, labels, num_classes, _ = load_folder(path, resolution, limit, warn, strict=strict)
            name, is_plain_folder = f"folder {path}", True

    if limit > 0:
        images = images[:limit]
        labels = labels[:limit].contiguous() if labels is not None else None
    images = conform(images, channels, resolution)
    details = [f"{images.shape[0]} images"]
    if is_plain_folder:
        if labels is not None:
            details.append(f"{num_classes} classes")
    else:
        details.insert(0, split)
    return ImageData(images=images, labels=labels, num_classes=num_classes if labels is not None else 0,
                     name=f"{name} ({', '.join(details)})")
