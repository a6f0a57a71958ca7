"""Batches streamed to the training device, for data larger than data.device_max_mb.

Same interface and same batches as DeviceBatches (batches.py): the per-epoch permutation decides
which images form batch (epoch, index), the flips / shifts are drawn on the device from
(seed, epoch, index), and the conversion to float happens on the device. What differs is where the
uint8 images come from: a source's `fetch(indices)` (data/lazy.py), run by DataLoader worker
processes for an image folder (decoding is the slow part) or in this process for data already in
memory. A sampler that starts at any (epoch, image) makes seek(), and so resume, exact.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import warnings
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.lazy import report_failures
from ..errors import UsageError, counted, one_line
from .batches import Augment, gather, permutation, to_float
from .signals import stop_signals


def _left_to_the_parent() -> list[int]:
    """The signals a worker ignores: the stops, and SIGUSR1 (`srun` with `--signal=USR1@T` sends it to
    every process of the step; its default action kills)."""
    return [*stop_signals(), signal.SIGUSR1]


def _leave_stops_to_the_parent(_worker_id: int) -> None:
    """A SIGTERM sent to the whole process group (`timeout`, SLURM at a time limit) reached the workers
    too; they died, and torch raised "DataLoader worker ... killed" mid-step in the parent, before its
    own handler could save. The parent stops its workers itself (StreamBatches.close). So with Ctrl-C
    and a closed terminal (SIGHUP, also sent to the whole foreground group). A worker starts with these
    blocked (_held_while_workers_start): ignoring them discards any that came since, then they are let in."""
    signals = _left_to_the_parent()  # once: an ignored SIGHUP is left out of stop_signals()
    for s in signals:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


@contextlib.contextmanager
def _held_while_workers_start() -> Iterator[None]:
    """Block the stops in this thread while torch starts the workers, which inherit the mask: a worker
    ignores them only once worker_init_fn runs, and a group-wide SIGTERM in the ~20 ms before (a tester's
    `timeout` hit it 2 times in 40) killed it and so the run, exit 1, unsaved. Blocked, they wait: the
    parent gets its own when the mask is restored, the worker discards its own."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    if multiprocessing.get_start_method() != "fork":  # spawn (macOS), forkserver (Linux from Python 3.14)
        # Starting Python's resource tracker unblocks SIGINT and SIGTERM in this thread: start it first.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    before = signal.pthread_sigmask(signal.SIG_BLOCK, _left_to_the_parent())
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _without_torchs_worker_advice(make):
    """torch's multi-line advice on more workers than CPUs, given when the loader is made and again
    when its workers start: make_batches says it in one note instead (which --quiet silences)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes")
        return make()

PREFETCH = 4  # batches each worker decodes ahead


class EpochBatchSampler(Sampler):
    """Index lists of `batch_size`, epoch after epoch without end, from position `start` (epoch,
    image); the last partial batch of each epoch is dropped, as DeviceBatches does."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start = (0, 0)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, image = self.start
        while True:
            perm = permutation(self.n, self.seed, epoch)
            for i in range(image, self.n - self.batch_size + 1, self.batch_size):
                yield perm[i:i + self.batch_size].tolist()
            epoch, image = epoch + 1, 0


class _Batches(Dataset):
    """Adapts a source to the DataLoader: the sampler hands over whole index lists."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, indices):
        return self.source.fetch(indices)


def _as_is(batch):
    return batch  # the source already returns tensors; the default collate would copy them


class StreamBatches:
    kind = "stream"

    def __init__(self, source, batch_size: int, device: torch.device, seed: int, *, workers: int = 0,
                 hflip: bool = False, translate: int = 0, channels_last: bool = False,
                 warn: Callable[[str], None] | None = None, strict: bool = False):
        self.source = source
        self.batch_size, self.seed = batch_size, seed
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.augment = Augment(seed, hflip, translate, self.device)
        self.warn, self.strict = warn, strict
        self.epoch, self.image = 0, 0
        if len(source) < batch_size:  # the sampler would cycle through empty epochs for ever
            raise UsageError(f"data has {counted(len(source), 'image')}, fewer than the batch size {batch_size}")
        self.sampler = EpochBatchSampler(len(source), batch_size, seed)
        self.workers = workers
        self._loader = None
        if workers > 0:
            # Worker processes cannot hand over pinned memory, so on CUDA the DataLoader's pinning
            # thread copies each batch into pinned memory; the copy to the device is then async.
            self._loader = _without_torchs_worker_advice(lambda: DataLoader(
                _Batches(source), batch_size=None, sampler=self.sampler, num_workers=workers, collate_fn=_as_is,
                persistent_workers=True, prefetch_factor=PREFETCH, pin_memory=self.device.type == "cuda",
                worker_init_fn=_leave_stops_to_the_parent,
                # its own generator: starting the workers would otherwise draw from the global one, at
                # another step in a resumed run than in the original
                generator=torch.Generator().manual_seed(seed)))
        self._it: Iterator | None = None
        self.reported: set[str] = set()  # files said to be replaced (the accuracy at the end says no more)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "image": self.image}

    def seek(self, epoch: int, image: int) -> None:
        self.epoch, self.image = int(epoch), int(image)
        self._it = None  # batches already prefetched from the old position are dropped

    def _fetch_all(self) -> Iterator:
        return (self.source.fetch(ix) for ix in self.sampler)

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.image + self.batch_size > len(self.source):  # the last partial batch is dropped
            self.epoch, self.image = self.epoch + 1, 0
        if self._it is None:
            self.sampler.start = (self.epoch, self.image)
            if self._loader is not None:
                with _held_while_workers_start():
                    self._it = _without_torchs_worker_advice(lambda: iter(self._loader))
            else:
                self._it = self._fetch_all()
        images, labels, failures = next(self._it)
        self._report(failures)
        if images is None:
            raise UsageError(f"none of the {len(self.source)} image files could be decoded "
                             f"({failures[0][0]}: {failures[0][1]}); check that they are valid images")
        epoch, index = self.epoch, self.image // self.batch_size
        self.image += self.batch_size
        cuda = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=cuda and images.is_pinned())
        coords = None
        if self.augment.active:
            _, _, h, w = images.shape
            coords = self.augment.coords(epoch, index, len(images), h, w)
        x = to_float(gather(images, None, coords), self.channels_last)
        y = labels.to(self.device, non_blocking=cuda and labels.is_pinned()) if labels is not None else None
        return x, y

    def _report(self, failures) -> None:
        for rel in report_failures(failures, self.warn, self.strict, self.reported):
            self._class_lost(rel)

    def _class_lost(self, rel: str) -> None:
        """Said once a class folder's every file has failed, as the in-memory load says it: its images
        are all replaced by other classes' from then on, so a conditional model never sees it."""
        names = getattr(self.source, "class_names", ())
        if not names or os.sep not in rel:
            return
        if not hasattr(self, "_class_sizes"):
            self._class_sizes = Counter(one_line(p).split(os.sep)[0] for p in self.source.paths)
            self._class_failed: Counter = Counter()
        name = rel.split(os.sep)[0]
        self._class_failed[name] += 1
        if self._class_failed[name] == self._class_sizes.get(name, -1):
            self.warn(f"class folder {name}: none of its images could be read; the class keeps the number its "
                      "folder name gives it, its images are replaced by other classes', and a conditional model or "
                      "classifier never sees it")

    def close(self) -> None:
        """Stop the worker processes now (dropping the last reference to the DataLoader and its
        iterator shuts them down; they also stop when this object is garbage collected)."""
        self._it = None
        self._loader = None
