"""Images from a folder of files (png/jpg/jpeg/webp/bmp), searched recursively."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from aigc_cli.errors import UsageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_MAX_FILE_WARNINGS = 20  # one line per bad file up to here, then only the final count
_BATCH = 1024            # files decoded per round, so `limit` stops early on huge folders


def list_images(folder: str) -> list[str]:
    """Sorted relative paths of image files under `folder`, skipping hidden files and folders
    (e.g. macOS "._x.jpg" resource forks, which look like images but are not)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparency is composited on black, 16-bit is scaled down."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: PIL's own convert clips at 255 (nearly all white), so rescale instead.
        # Integer modes are taken as 16-bit (what PNG/TIFF store); floats as 0..1 if they fit.
        arr = np.asarray(img).astype(np.float64)
        scale = 255.0 / 65535.0 if img.mode != "F" else 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def decode(path: str, resolution: int) -> np.ndarray:
    """One file as (resolution, resolution, 3) uint8: shorter side scaled, centre-cropped."""
    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps it >= the target size.
        img.draft("RGB", (resolution, resolution))
        img = to_rgb(ImageOps.exif_transpose(img))
        # fit() crops the centre to a square first, then resizes: same result as
        # scale-then-crop, with less work.
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


def load_folder(folder: str, resolution: int, limit: int,
                warn: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """Decode a folder; returns images (N, 3, R, R), labels or None, num_classes, skipped count.

    Class folders: when every image sits inside a first-level subfolder, the label is the index
    of that subfolder's name among the sorted names; otherwise there are no labels.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"image folder {folder} does not exist; pass an existing folder or one of "
                         "the built-in sources")
    paths = list_images(folder)
    if not paths:
        raise UsageError(f"no images (.png/.jpg/.jpeg/.webp/.bmp) found under {folder}; "
                         "point at a folder that holds images")
    wanted = min(limit, len(paths)) if limit > 0 else len(paths)
    # Filled in place (not stacked at the end) so peak memory is one copy of the data set.
    out = np.empty((wanted, 3, resolution, resolution), dtype=np.uint8)
    kept: list[str] = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pos = 0
        while pos < len(paths) and len(kept) < wanted:
            # Decode about as many as are still needed (with slack for bad files), not all.
            batch = paths[pos:pos + min(_BATCH, wanted - len(kept) + 16)]
            pos += len(batch)
            for rel, result in zip(batch, pool.map(lambda p: _try_decode(folder, p, resolution), batch)):
                if isinstance(result, np.ndarray):
                    if len(kept) < wanted:
                        out[len(kept)] = result.transpose(2, 0, 1)
                        kept.append(rel)
                    continue
                skipped += 1
                if skipped <= _MAX_FILE_WARNINGS:
                    warn(f"skipping unreadable image {os.path.join(folder, rel)}: {result}")
    if skipped:
        more = f" (only the first {_MAX_FILE_WARNINGS} named above)" if skipped > _MAX_FILE_WARNINGS else ""
        warn(f"skipped {skipped} unreadable image file(s) under {folder}{more}")
    if not kept:
        raise UsageError(f"none of the {len(paths)} image files under {folder} could be read; "
                         "check that they are valid images")
    images = torch.from_numpy(out[:len(kept)])
    labels, num_classes = _class_labels(kept)
    return images, labels, num_classes, skipped


def _try_decode(folder: str, rel: str, resolution: int) -> np.ndarray | str:
    try:
        return decode(os.path.join(folder, rel), resolution)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _class_labels(rel_paths: list[str]) -> tuple[torch.Tensor | None, int]:
    parts = [p.split(os.sep) for p in rel_paths]
    if any(len(p) < 2 for p in parts):
        return None, 0
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), len(classes)
