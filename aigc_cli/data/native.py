"""Image folders read at their images' own size, for evaluation: pytorch-fid feeds images at native size
and resizes inside the network, so `aigc eval --fake DIR` and a `--data` folder scored with Inception do
the same. Training data, converted to the model's format, comes from `load_images` instead."""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import UsageError
from . import folder


def most_common_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The most frequent (width, height); ties go to the larger area, then the first seen."""
    counts = Counter(sizes)
    best = max(counts.values())
    tied = [s for s in dict.fromkeys(sizes) if counts[s] == best]
    return max(tied, key=lambda s: s[0] * s[1])


def _header_size(path: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF rotation applied), from the header only."""
    with folder.open_image(path) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - unreadable EXIF: as stored
            orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _decode_native(path: str, size: tuple[int, int]) -> np.ndarray:
    """One file as (height, width, 3) uint8 at `size` (its own size unless it differs: then scaled
    and centre-cropped to it), with folder.decode's safeguards (formats, pixel limit, first frame)."""
    with folder.open_image(path) as img:
        img.load()
        folder._check_size(*img.size)
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001
            pass
        img = folder.to_rgb(img)
        if img.size != size:
            img = ImageOps.fit(img, size, Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


def seeded_order(total: int, n: int, seed: int) -> list[int]:
    """All of range(total) in the order a seeded subset of n takes them (the first n; the rest follow,
    to replace any of those that cannot be used). All of them in order when n covers them."""
    return list(range(total)) if total <= n else seeded_permutation(total, seed).tolist()


def seeded_permutation(total: int, seed: int) -> torch.Tensor:
    """The order both seeded_order and real_indices take their subset in."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))


def real_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of at most n indices, in order."""
    if total <= n:  # the first n of seeded_order, as a tensor (no list of every index)
        return torch.arange(total)
    return seeded_permutation(total, seed)[:n].sort().values


def load_folder_native(path: str, *, warn: Callable[[str], None], strict: bool = False,
                       what: str = "image folder", limit: int = 0, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Images of a folder (recursive, sorted) as uint8 (N, 3, H, W) at their own size; when sizes
    differ, each is conformed (scaled, centre-cropped) to the most common one, with a warning.
    limit > 0: the first `limit` readable files only. n: a seeded subset of at most n of them
    (the first n of seeded_order, as real_indices), picked from the headers before anything is decoded,
    so that scoring 2,000 images of a folder of large photos holds 2,000 images, not the folder;
    a picked file that fails to decode is replaced by the next one of the seed's order."""
    if not os.path.isdir(path):
        raise UsageError(f"{what} {path} does not exist or is not a folder")
    folder.refuse_run_folder(path, what)
    problems: list[tuple[str, str | None]] = []
    rels = folder.list_images(path, problems)
    folder.report_listing(problems, warn, strict)
    if not rels:
        raise UsageError(f"{what} {path}: no images ({'/'.join(folder.EXTENSIONS)}) found in it"
                         + folder.data_folder_hint(path))

    rejected = []

    def reject(rel: str, e: BaseException) -> None:
        reason = folder.describe_error(e)
        if strict:
            raise UsageError(f"cannot use image file {folder.one_line(os.path.join(path, rel))}: {reason}")
        warn(f"skipping {folder.one_line(rel)}: {reason}")
        rejected.append(rel)

    def header(rel):
        try:
            return _header_size(os.path.join(path, rel))
        except Exception as e:  # noqa: BLE001
            return e

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        good = []
        for rel, h in zip(rels, pool.map(header, rels)):
            if isinstance(h, BaseException):
                reject(rel, h)
            else:
                good.append((rel, h))
        if not good:
            raise UsageError(f"{what} {path}: none of its {len(rels)} image files could be read")
        if limit > 0:
            good = good[:limit]
        size = most_common_size([h for _, h in good])
        order = seeded_order(len(good), n, seed) if n is not None else list(range(len(good)))
        want = min(len(order), n) if n is not None else len(order)

        def decode(i):
            try:
                return _decode_native(os.path.join(path, good[i][0]), size)
            except Exception as e:  # noqa: BLE001
                return e

        kept: dict[int, np.ndarray] = {}
        nxt = 0
        while len(kept) < want and nxt < len(order):  # a second round only to replace failed decodes
            batch = order[nxt:nxt + want - len(kept)]
            nxt += len(batch)
            for i, arr in zip(batch, pool.map(decode, batch)):
                if isinstance(arr, BaseException):
                    reject(good[i][0], arr)
                else:
                    kept[i] = arr
    if not kept:
        raise UsageError(f"{what} {path}: none of its {len(rels)} image files could be read")
    chosen = sorted(kept)
    off = sum(good[i][1] != size for i in chosen)
    if off:
        warn(f"{what} {path}: {off} of {len(chosen)} images are not {size[0]}x{size[1]} (the most common "
             "size); they are scaled and centre-cropped to it")
    if rejected:  # as training's loader ends: one count after the per-file lines
        warn(folder.skipped_summary(len(rejected), len(rels), path))
    out = np.empty((len(chosen), 3, size[1], size[0]), dtype=np.uint8)
    for k, i in enumerate(chosen):
        out[k] = kept.pop(i).transpose(2, 0, 1)
    return torch.from_numpy(out)
