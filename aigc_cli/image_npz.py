"""Images as one .npz file, in the layout guided-diffusion's and StyleGAN's evaluation scripts read and
write: `arr_0` uint8 (N, H, W, C), and for a conditional model `arr_1` int64 class labels (N,).
Written entry by entry as the images are generated, so any N takes a few batches of memory; read back
without unpickling anything (the npy headers are parsed here, object arrays refused)."""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
import zlib
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import UsageError, first_line
from .files import atomic_write

IMAGES, LABELS = "arr_0", "arr_1"
_LABEL_CHUNK = 1 << 20


class _Entry:
    """One .npy member being written: its header first (the shape is known), then the rows."""

    def __init__(self, zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.f = zf.open(f"{name}.npy", "w", force_zip64=True)  # members over 4 GiB need zip64 up front
        np.lib.format.write_array_header_2_0(self.f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": shape})
        self.rows, self.left = shape[0], shape[0]

    def add(self, rows: np.ndarray) -> None:
        if len(rows) > self.left:
            raise RuntimeError(f"{len(rows)} rows for the {self.left} left of {self.rows}")
        self.f.write(np.ascontiguousarray(rows).tobytes())
        self.left -= len(rows)

    def close(self) -> None:
        self.f.close()
        if self.left:
            raise RuntimeError(f"{self.left} of {self.rows} rows were never written")


@contextmanager
def image_npz_writer(path: str | os.PathLike, n: int, labels: Callable[[int, int], torch.Tensor] | None = None
                     ) -> Iterator[Callable[[torch.Tensor], None]]:
    """Yields add(images): uint8 (B, C, H, W) batches, n images in all, in order. labels(start, stop):
    the class labels of images start..stop-1, written after the images as arr_1. The file appears
    complete at `path` when the block ends, and not at all after an error or a stop."""
    with atomic_write(path, ".npz") as tmp:
        zf = zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        entries: list[_Entry] = []

        def add(images: torch.Tensor) -> None:
            if not entries:  # the image size is that of the first batch
                entries.append(_Entry(zf, IMAGES, (n, *images.shape[2:], images.shape[1]), np.dtype(np.uint8)))
            entries[0].add(images.permute(0, 2, 3, 1).numpy())

        try:
            yield add
            if not entries:
                raise RuntimeError("no images were generated")
            entries[0].close()
            if labels is not None:
                entries.append(_Entry(zf, LABELS, (n,), np.dtype(np.int64)))
                for start in range(0, n, _LABEL_CHUNK):
                    entries[1].add(labels(start, min(n, start + _LABEL_CHUNK)).numpy().astype(np.int64))
                entries[1].close()
        except BaseException:  # the file is dropped (atomic_write): close what is open, and let the error be heard
            for closing in [e.f.close for e in entries] + [zf.close]:
                with contextlib.suppress(Exception):
                    closing()
            raise
        zf.close()


def check_replaceable(path: str | os.PathLike, option: str, *, images: bool) -> None:
    """An existing .npz is replaced only by one of its kind: images (`sample --npz`, `eval --save-fakes`)
    by images, reference statistics (`eval stats --out`) by statistics. Statistics can take an hour to
    compute, and an image file may be the set a paper's numbers came from; any other arrays are someone
    else's. A file that is not a zip at all (a write cut short) may be replaced."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
    except (zipfile.BadZipFile, OSError):  # none there, a folder, or not a zip: others say what is wrong
        return
    if images and names <= {IMAGES, LABELS}:
        return
    if not images and {"mu", "sigma"} <= names and IMAGES not in names:  # guided-diffusion's batches hold both
        return
    held = ("images and their statistics (a reference batch)" if {"mu", "sigma", IMAGES} <= names
            else "reference statistics (from `aigc eval stats`)" if {"mu", "sigma"} <= names
            else "images (from `aigc sample --npz`)" if IMAGES in names
            else f"other arrays ({', '.join(sorted(names)[:6]) or 'none'})")
    raise UsageError(f"{option} {path}: holds {held}, which this would overwrite; name another file or remove it first")


def is_npz(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".npz")


def load_images(path: str, *, n: int | None = None, seed: int = 0, what: str = "--fake") -> torch.Tensor:
    """arr_0 of an image .npz as uint8 (N, 3, H, W), as image folders are read for scoring (grey
    images repeated to three channels). n: a seeded subset of at most n images, the first n of
    native.seeded_order (as for folders), read row by row so that only those are held."""
    shown = f"{what} {path}"
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UsageError(f"{shown}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise UsageError(f"{shown}: not a readable .npz file ({e})") from None
    with zf:
        names = zf.namelist()
        if f"{IMAGES}.npy" not in names:
            hint = ("; it holds reference statistics: pass it as --ref" if {"mu.npy", "sigma.npy"} <= set(names)
                    else f" (it holds {', '.join(x.removesuffix('.npy') for x in names[:6]) or 'nothing'})")
            raise UsageError(f"{shown}: holds no '{IMAGES}' array of images{hint}")
        try:
            out = _read_rows(zf, n, seed, shown)
        # a bad CRC, a broken deflate stream; RuntimeError: encrypted; NotImplementedError: Deflate64 and the like
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as e:
            raise UsageError(f"{shown}: '{IMAGES}' is damaged or unreadable ({first_line(e)})") from None
    images = torch.from_numpy(out).permute(0, 3, 1, 2)
    return (images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images).contiguous()


def _read_rows(zf: zipfile.ZipFile, n: int | None, seed: int, shown: str) -> np.ndarray:
    from .data.native import real_indices

    member = zf.getinfo(f"{IMAGES}.npy")
    with zf.open(member) as f:
        shape, fortran = _read_header(f, shown)
        total, row = shape[0], math.prod(shape[1:])  # Python ints: np.prod wraps in int64 (2**40 * 2**40 * 3 is 0)
        if f.tell() + total * row > member.file_size:  # before allocating what the header claims
            have = max(0, member.file_size - f.tell()) // row
            raise UsageError(f"{shown}: '{IMAGES}' is cut short ({have} of the {total:,} images its header names)")
        picked = (real_indices(total, n, seed) if n is not None else torch.arange(total)).numpy()
        if fortran:  # numpy writes any F-contiguous array so (x.T, say): pixels of all images interleave
            data = f.read(total * row)
            if len(data) != total * row:
                raise UsageError(f"{shown}: '{IMAGES}' is cut short ({len(data) // row} of {total} images)")
            whole = np.frombuffer(data, dtype=np.uint8).reshape(shape[::-1]).transpose()
            return np.ascontiguousarray(whole[picked])
        out = np.empty((len(picked), *shape[1:]), dtype=np.uint8)
        chunk = max(1, (64 << 20) // max(1, row))  # rows read at a time: 64 MB
        for start in range(0, total, chunk):
            count = min(chunk, total - start)
            data = f.read(count * row)
            if len(data) != count * row:
                raise UsageError(f"{shown}: '{IMAGES}' is cut short ({start + len(data) // row} of {total} images)")
            block = np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
            lo, hi = np.searchsorted(picked, [start, start + count])
            out[lo:hi] = block[picked[lo:hi] - start]
    return out


def _read_header(f, shown: str) -> tuple[tuple[int, ...], bool]:
    """The shape of an npy member holding uint8 (N, H, W, C) images, and whether it is in Fortran order, from its header (a Python literal,
    read with ast.literal_eval as numpy does, never unpickled); anything else is a one-line error."""
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f, max_header_size=1 << 16) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f, max_header_size=1 << 16))
    except (ValueError, SyntaxError, OSError, EOFError) as e:
        raise UsageError(f"{shown}: '{IMAGES}' is not a readable npy array ({e})") from None
    if dtype != np.uint8:
        raise UsageError(f"{shown}: '{IMAGES}' holds {dtype} values; images must be uint8 (0..255)")
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise UsageError(f"{shown}: '{IMAGES}' has shape {tuple(shape)}; images must be (N, H, W, C) with C 1 or 3, "
                         "as guided-diffusion's and StyleGAN's scripts write them")
    if shape[0] < 1 or min(shape[1:3]) < 1:
        raise UsageError(f"{shown}: '{IMAGES}' holds no images (shape {tuple(shape)})")
    return tuple(int(s) for s in shape), bool(fortran)

