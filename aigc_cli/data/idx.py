"""MNIST-style IDX files (optionally gzipped), parsed with numpy.

Layout (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions, then each dimension as a big-endian uint32, then the values, big-endian.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np
import torch

from aigc_cli.errors import UsageError

_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_PREFIX = {"train": "train", "test": "t10k"}
# Both spellings occur in the wild ("train-images.idx3-ubyte" comes from some unzip tools).
_SEPARATORS = ("-", ".")


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (".gz" is decompressed) into a native-endian numpy array."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(f"cannot read IDX file {path}: {e}; re-download or replace it") from None
    if len(data) < 4 or data[0:2] != b"\0\0" or data[2] not in _TYPES or data[3] == 0:
        raise UsageError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'in empty file'}); "
                         "re-download or replace it")
    ndim, dtype = data[3], _TYPES[data[2]]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"IDX file {path} is truncated (header cut short); re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize  # Python ints: numpy's int64 product wraps (2**31 x 2**31 x 4 -> 0)
    if len(data) - header != expected:
        what = "truncated" if len(data) - header < expected else "longer than its header says"
        raise UsageError(f"IDX file {path} is {what} ({len(data) - header} data bytes, "
                         f"header {dims} needs {expected}); re-download it")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def intact(path: str) -> bool:
    """Whether the uncompressed IDX file `path` is there and as long as its header says (no data read)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in _TYPES or head[3] == 0:
                return False
            raw = f.read(4 * head[3])
            if len(raw) != 4 * head[3]:  # cut inside the dimension words (frombuffer would raise on 6 bytes)
                return False
            dims = np.frombuffer(raw, dtype=">u4")
            return os.fstat(f.fileno()).st_size == (
                4 + 4 * head[3] + math.prod(int(d) for d in dims) * _TYPES[head[2]].itemsize)
    except OSError:
        return False


def whole(path: str) -> bool:
    """Whether the IDX file `path` (".gz": decompressed to check) reads whole."""
    try:
        read_idx(path)
        return True
    except UsageError:
        return False


def _find(folder: str, split: str, kind: str) -> str | None:
    """Path of the `kind` ("images"/"labels") file for `split` in `folder`, or None."""
    idx = "idx3" if kind == "images" else "idx1"
    for sep in _SEPARATORS:
        base = os.path.join(folder, f"{_PREFIX[split]}-{kind}{sep}{idx}-ubyte")
        # Prefer the uncompressed file: it is faster to read and torchvision leaves both.
        for path in (base, base + ".gz"):
            if os.path.isfile(path):
                return path
    return None


def split_files(folder: str, split: str) -> list[str]:
    """The files `load_idx_folder(folder, split)` reads, relative to `folder` (for cache keys)."""
    found = (_find(folder, split, kind) for kind in ("images", "labels"))
    return [os.path.basename(p) for p in found if p is not None]


def is_idx_folder(folder: str) -> bool:
    """True when `folder` directly holds MNIST-style image files for either split."""
    return os.path.isdir(folder) and any(_find(folder, s, "images") for s in _PREFIX)


def load_idx_folder(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 (None if no labels file) for `split`."""
    images_path = _find(folder, split, "images")
    if images_path is None:
        raise UsageError(f"no {_PREFIX[split]}-images-idx3-ubyte[.gz] in {folder}; "
                         f"that IDX folder has no '{split}' split")
    images = read_idx(images_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise UsageError(f"{images_path} holds {images.dtype} data of shape {images.shape}, "
                         "expected unsigned bytes (N, H, W); is it an image file?")
    if images.size == 0:
        raise UsageError(f"{images_path} holds no images (shape {images.shape}); re-download or replace it")
    labels_path = _find(folder, split, "labels")
    labels = None
    if labels_path is not None:
        raw = read_idx(labels_path)
        if raw.ndim != 1 or raw.shape[0] != images.shape[0] or raw.dtype.kind not in "iu":
            raise UsageError(f"{labels_path} holds {raw.dtype} data of shape {raw.shape}, expected "
                             f"{images.shape[0]} integer labels to match {images_path}")
        if raw.size and raw.min() < 0:
            raise UsageError(f"{labels_path} holds negative labels; expected class indices")
        labels = torch.from_numpy(raw.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1), labels
