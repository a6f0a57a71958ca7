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

from aigc_cli.data import cache as decoded_cache
from aigc_cli.data import cifar, idx, torchvision_sources
from aigc_cli.data.folder import (folder_kind, list_images, load_folder, pixel_limit, refuse_run_folder, report_listing,
                                  say_limited_classes, say_unseen_classes)
from aigc_cli.data.lazy import LazyFolder
from aigc_cli.data.shapes import CLASSES as SHAPE_CLASSES
from aigc_cli.data.shapes import draw_shapes
from aigc_cli.data.transforms import conform
from aigc_cli.errors import UsageError, counted, one_line


@dataclass
class ImageData:
    # uint8 (N, C, H, W), contiguous, CPU; a LazyFolder (decoded on demand, same len / shape /
    # [:k] slicing) when load_images was asked for lazy data and the folder is large.
    images: torch.Tensor | LazyFolder
    labels: torch.Tensor | None  # int64 (N,), or None when the source has no labels
    num_classes: int             # 0 when unlabelled
    name: str                    # short description, e.g. "fashion-mnist (train, 60000 images)"
    class_names: tuple[str, ...] = ()  # class folder names of an image folder, shapes' kinds; else ()
    cached: bool = False         # True when read from the decoded-image cache instead of decoded
    held_out: bool = True        # False for an image folder: its "test" split is its training images

    @property
    def lazy(self) -> bool:
        return isinstance(self.images, LazyFolder)

    @property
    def nbytes(self) -> int:
        """Size of the decoded images in bytes (computed from the shape for lazy data)."""
        n, c, h, w = self.images.shape
        return n * c * h * w


BUILTIN_SOURCES = ("shapes", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")
MAX_RESOLUTION = 4096


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def has_test_split(source: str) -> bool:
    """Whether `source` holds a held-out set of its own: the built-in sources, IDX (t10k-*) and CIFAR-10
    (test_batch) folders do; an image folder does not ("test" would be the training images again)."""
    path = os.path.expanduser(source)
    return source in BUILTIN_SOURCES or not os.path.isdir(path) or folder_kind(path) != "folder"


def find_builtin(source: str, root: str | None, download: bool) -> tuple[str, str]:
    """("idx" or "cifar", the folder holding its files) for mnist, fashion-mnist or cifar10: under `root`,
    else $AIGC_DATA_ROOT / ~/.cache/aigc/datasets (and the Debian package's folder), downloading only when
    allowed. Raises UsageError when not found."""
    data_root = os.path.expanduser(root) if root else torchvision_sources.default_root()
    if source == "cifar10":
        return "cifar", cifar.find_cifar10(data_root, download)
    return "idx", torchvision_sources.find_mnist_like(source, data_root, bool(root), download)


def load_images(source: str, *, channels: int, resolution: int, root: str | None = None,
                download: bool = False, split: str = "train", limit: int = 0, seed: int = 0,
                warn: Callable[[str], None] | None = None, strict: bool = False, cache: bool = True,
                lazy_above_mb: float | None = None) -> ImageData:
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
    cache: keep the converted images of an image folder (or of IDX / CIFAR-10 data that needed
        converting) in $AIGC_CACHE_DIR/decoded, keyed by the files' names and contents and the
        conversion, and read them from there next time (see cache.py). Its warnings are replayed.
    lazy_above_mb: when given and `source` is an image folder whose decoded images would take more
        than this many MB, nothing is decoded now: `images` is a LazyFolder that decodes on demand
        (for streaming through DataLoader workers). Other sources always load into memory.
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

    if source == "shapes":  # generated faster than a cache could be read: never cached
        images, labels = draw_shapes(split, resolution, seed, limit)
        return ImageData(images=conform(images, channels, resolution), labels=labels, num_classes=4,
                         name=f"shapes ({split}, {images.shape[0]} images)", class_names=SHAPE_CLASSES)

    # Find the files first (downloading if allowed), so the cache key can be made before reading them.
    if source in ("mnist", "fashion-mnist", "cifar10"):
        kind, path = find_builtin(source, root, download)
        name = source
    else:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.isfile(path) else "is not a built-in source or an existing folder"
            raise UsageError(f"data source {source!r} {what}; use one of {', '.join(BUILTIN_SOURCES)} "
                             "or the path of a folder of images")
        kind = folder_kind(path)
        name = {"idx": "IDX folder", "cifar": "CIFAR-10 folder", "folder": "folder"}[kind] + f" {path}"

    if kind == "folder":
        refuse_run_folder(path, "data folder")
        problems: list[tuple[str, str | None]] = []
        files = list_images(path, problems)
        report_listing(problems, warn, strict)
        if lazy_above_mb is not None and files:
            wanted = files[:limit] if limit > 0 else files
            if len(wanted) * channels * resolution * resolution > lazy_above_mb * 2**20:
                return _lazy_folder(path, wanted, channels, resolution, name, warn, strict, limit, files)
        # A folder has no split of its own: "test" is the same images, so both share one entry.
        params = {"kind": kind, "channels": channels, "resolution": resolution, "limit": limit,
                  "pixel_limit": pixel_limit()}
    else:
        files = idx.split_files(path, split) if kind == "idx" else cifar.split_files(split)
        params = {"kind": kind, "channels": channels, "resolution": resolution, "limit": limit, "split": split,
                  "source": source if source in BUILTIN_SOURCES else ""}
        if kind == "idx":  # entries from before IDX contents were checked (a "mnist" one of Fashion-MNIST's files) miss
            params["identified"] = True

    relist = (lambda: list_images(path)) if kind == "folder" else None
    key = decoded_cache.make_key(path, files, params, relist, read_first=limit if kind == "folder" else 0) if cache else None
    if key is not None:
        hit = decoded_cache.load(key, warn)
        # --strict must stop on a bad file that an earlier, lenient run skipped: decode again.
        if hit is not None and not (strict and hit.info["warnings"]):
            # The entry may come from a copy of these files elsewhere: name this folder, not that one.
            then, now = f" under {hit.info['folder']} (", f" under {one_line(path)} ("
            for line in hit.info["warnings"]:
                # Only the summary line names the folder; per-file lines name files relative to it.
                warn(line.replace(then, now, 1) if line.startswith("skipped ") else line)
            return ImageData(images=hit.images, labels=hit.labels,
                             num_classes=int(hit.info["num_classes"]) if hit.labels is not None else 0,
                             name=f"{name} ({hit.info['details']})",
                             class_names=tuple(hit.info.get("class_names", ())) or (
                                 torchvision_sources.known_class_names(source, kind, path, int(hit.info["num_classes"]))
                                 if hit.labels is not None and kind != "folder" else ()),
                             cached=True, held_out=kind != "folder")

    warnings: list[str] = []

    def record(line: str) -> None:
        warnings.append(line)
        warn(line)

    class_names: tuple[str, ...] = ()
    held = ""  # an IDX folder's data set, by its contents
    if kind == "folder":
        images, labels, class_names, _ = load_folder(path, resolution, limit, record, strict=strict, paths=files)
        num_classes = len(class_names)
    elif kind == "idx":
        if source in ("mnist", "fashion-mnist"):
            images, labels = torchvision_sources.load_mnist_from(source, path, split)
            num_classes = 10
        else:
            images, labels = idx.load_idx_folder(path, split)
            num_classes = int(labels.max()) + 1 if labels is not None and labels.numel() else 0
        held = torchvision_sources.identify(images)
        torchvision_sources.check_identity(source, held, path)
    else:
        images, labels = cifar.load_cifar_bin_folder(path, split)
        num_classes = cifar.NUM_CLASSES
    if kind != "folder" and labels is not None:
        class_names = torchvision_sources.known_class_names(source, kind, path, num_classes, held)

    if limit > 0:
        images = images[:limit]
        labels = labels[:limit].contiguous() if labels is not None else None
    needs_conversion = tuple(images.shape[1:]) != (channels, resolution, resolution)
    images = conform(images, channels, resolution)
    details = [counted(images.shape[0], "image")]
    if kind == "folder":
        if labels is not None:
            details.append(f"{num_classes} classes")
    else:
        details.insert(0, split)
    data = ImageData(images=images, labels=labels, num_classes=num_classes if labels is not None else 0,
                     name=f"{name} ({', '.join(details)})", class_names=class_names, held_out=kind != "folder")
    # IDX and CIFAR-10 files parse about as fast as a cache entry reads: only their conversion
    # (e.g. 28 -> 64 pixels for every MNIST image) is worth keeping. Decoding a folder always is.
    if key is not None and (kind == "folder" or needs_conversion):
        info = {"num_classes": data.num_classes, "class_names": list(class_names), "name": data.name,
                "details": ", ".join(details), "folder": one_line(path), "warnings": warnings}
        decoded_cache.store(key, decoded_cache.Entry(data.images, data.labels, info), warn)
    return data


def _lazy_folder(path: str, files: list[str], channels: int, resolution: int, name: str,
                 warn: Callable[[str], None], strict: bool, limit: int = 0, listed: list[str] = ()) -> ImageData:
    def refuse(line: str) -> None:
        raise UsageError(f"cannot use image file {line.removeprefix('skipping ')} (stopped by --strict; "
                         "without it, unreadable files are skipped with a warning)")

    usable = LazyFolder.usable(path, files, refuse if strict else warn)
    if not usable:
        raise UsageError(f"none of the {len(files)} image files under {path} could be read "
                         "(reasons above); check that they are valid images")
    lazy = LazyFolder(path, usable, channels, resolution, among=files)
    if lazy.labels is not None:  # as load_folder says them in memory
        present = {p.split(os.sep)[0] for p in usable}  # a class whose files a stat() rejected, all of them
        say_unseen_classes([c for c in lazy.class_names if c not in present], warn)
        say_limited_classes(limit, len(usable), lazy.class_names, list(listed), warn)
    details = [counted(len(usable), "image")]
    if lazy.labels is not None:
        details.append(f"{lazy.num_classes} classes")
    return ImageData(images=lazy, labels=lazy.labels, num_classes=lazy.num_classes,
                     name=f"{name} ({', '.join(details)}, decoded on demand)", class_names=lazy.class_names,
                     held_out=False)
