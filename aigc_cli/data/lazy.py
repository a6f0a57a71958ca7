"""Sources of uint8 image batches by index, for data too large to keep on the training device.

`LazyFolder` decodes image files only when a batch asks for them (in DataLoader workers), so an
image folder of any size needs memory for a few batches, not for the data set. `HostImages` wraps
a data set already in CPU memory (IDX, CIFAR-10) and gathers batches into pinned memory.

Both have `fetch(indices) -> (images uint8 (B, C, R, R), labels int64 (B,) or None, failures)`.

A file that fails to decode in a worker cannot be skipped there (the batch has a fixed size and
the order is fixed by the seed), so the next file in sorted order that does decode takes its
place, with that file's label. This is deterministic, so resume stays exact. `failures` lists
(file, reason, substitute) for the caller to warn about (or to stop on with --strict) in the main
process. Files that are obviously unusable (not regular, empty) are dropped up front instead.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from aigc_cli.data.folder import class_labels, decode, describe_error, stat_problem
from aigc_cli.data.transforms import to_channels
from aigc_cli.errors import UsageError, one_line

Failure = tuple[str, str, str]  # (relative path, one-line reason, relative path used instead)


def report_failures(failures: list[Failure], warn: Callable[[str], None] | None, strict: bool,
                    seen: set[str] | None = None) -> list[str]:
    """What fetch replaced, said as streamed training and `aigc eval` both say it: --strict, the one-line
    error; else a warning per file (once per file, given `seen`). A failure without a substitute (no file
    decodes) is left to the caller's error. Returns the files newly warned of."""
    warned = []
    for rel, reason, substitute in failures:
        if strict:
            raise UsageError(f"cannot use image file {rel}: {reason} (stopped by --strict; without it, "
                             "an unreadable file is replaced by the next readable one with a warning)")
        if seen is not None:
            if rel in seen:  # it comes up again every epoch
                continue
            seen.add(rel)
        if warn is not None and substitute:
            warn(f"skipping {rel}: {reason}; {substitute} is used in its place")
            warned.append(rel)
    return warned


class LazyFolder:
    """The images of a folder, decoded on demand to `channels` x `resolution` x `resolution`.

    Indexing with an int, a slice or a list of indices gives a uint8 tensor, so code that only
    reads `len(images)`, `images.shape` and `images[:k]` works as it does with a tensor.
    """

    dtype = torch.uint8

    def __init__(self, folder: str, rel_paths: Sequence[str], channels: int, resolution: int,
                 among: Sequence[str] = ()):
        self.folder = folder
        self.paths = list(rel_paths)
        self.channels, self.resolution = channels, resolution
        self.labels, self.class_names = class_labels(self.paths, among=list(among), folder=folder)  # as load_folder
        self.num_classes = len(self.class_names)
        self._bad: dict[int, str] = {}  # per process: files already known not to decode

    @staticmethod
    def usable(folder: str, rel_paths: Sequence[str], warn: Callable[[str], None]) -> list[str]:
        """`rel_paths` without the files a stat() already shows are unusable (one warning each):
        special files (a FIFO would block a worker forever), dangling links, empty files."""
        kept = []
        for rel in rel_paths:
            reason = stat_problem(os.path.join(folder, rel))
            if reason is None:
                kept.append(rel)
            else:
                warn(f"skipping {one_line(rel)}: {reason}")
        return kept

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.channels, self.resolution, self.resolution))

    def _decode(self, i: int) -> np.ndarray | None:
        if i in self._bad:
            return None
        try:
            return decode(os.path.join(self.folder, self.paths[i]), self.resolution)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "use another file"
            self._bad[i] = describe_error(e)
            return None

    def fetch(self, indices: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Failure]]:
        """Decode the files at `indices`; images is None when not one file of the folder decodes."""
        Image.init()  # plugins once per worker process, not lazily inside each open
        n = len(self.paths)
        out = np.empty((len(indices), self.resolution, self.resolution, 3), dtype=np.uint8)
        used, failures = [], []
        for slot, i in enumerate(indices):
            i = int(i)
            for j in (i + k if i + k < n else i + k - n for k in range(n)):
                pixels = self._decode(j)
                if pixels is not None:
                    break
            else:
                return None, None, [(one_line(self.paths[i]), self._bad[i], "")]
            if j != i:
                failures.append((one_line(self.paths[i]), self._bad[i], one_line(self.paths[j])))
            out[slot] = pixels
            used.append(j)
        # The same conversion as the eager path (load_folder + conform), so both give equal bytes.
        images = to_channels(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), self.channels).contiguous()
        labels = self.labels[torch.tensor(used, dtype=torch.int64)] if self.labels is not None else None
        return images, labels, failures

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, int):
            return self[[key % len(self)]][0]  # a folder where nothing decodes: the UsageError below
        if isinstance(key, slice):
            key = range(*key.indices(len(self)))
        elif torch.is_tensor(key):
            key = key.tolist()
        images = self.fetch(list(key))[0]
        if images is None:
            raise UsageError(f"none of the image files under {one_line(self.folder)} could be decoded "
                             "(reasons above); check that they are valid images")
        return images

    def split(self, size: int):
        """Consecutive chunks of `size` images, like Tensor.split (a bad file is replaced as in fetch)."""
        for start in range(0, len(self), size):
            yield self[start:start + size]


def pick(images, labels: torch.Tensor | None, indices: torch.Tensor, warn, strict: bool,
         seen: set[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """images[indices] and labels[indices] (labels may be None), from a tensor or a streamed folder (its
    replaced files said once each, given `seen`: see report_failures)."""
    if isinstance(images, LazyFolder):  # streamed, as training streamed it: a bad file is found only now
        return _fetch_reporting(images, indices.tolist(), warn, strict, seen)
    return images[indices], labels[indices] if labels is not None else None


def _fetch_reporting(real: LazyFolder, indices: list[int], warn, strict: bool,
                     seen: set[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The picked images of a streamed folder, and their labels (those of the files used); a file that
    does not decode is replaced by the next readable one, as in streamed training, with a warning
    (--strict: an error)."""
    images, labels, failures = real.fetch(indices)
    report_failures(failures, warn, strict, seen)
    if images is None:
        raise UsageError(f"none of the image files under {one_line(real.folder)} could be decoded "
                         f"({failures[0][0]}: {failures[0][1]}); check that they are valid images")
    return images, labels


class HostImages:
    """A data set held in CPU memory; batches are gathered straight into pinned memory so the copy
    to the device can run asynchronously."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, pin: bool):
        self.images, self.labels, self.pin = images, labels, pin

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None, list[Failure]]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        # Pinned blocks come from torch's caching host allocator, which keeps each one until the
        # asynchronous copy that reads it has finished, so a fresh buffer per batch is cheap and safe.
        out = torch.empty((len(idx), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        torch.index_select(self.images, 0, idx, out=out)
        labels = None
        if self.labels is not None:
            labels = torch.empty(len(idx), dtype=torch.int64, pin_memory=self.pin)
            torch.index_select(self.labels, 0, idx, out=labels)
        return out, labels, []
