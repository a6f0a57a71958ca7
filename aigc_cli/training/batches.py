"""Mini-batches for training: from a uint8 tensor kept on the training device (DeviceBatches), or
streamed to it (StreamBatches, streaming.py) when the decoded data is larger than
data.device_max_mb. `make_batches` picks one.

The order is a fresh permutation per epoch drawn from (seed, epoch) alone, and the optional flips
and shifts of a batch from (seed, epoch, index) alone (index: the batch's first image // batch size),
so the position (epoch, image: how many images of the epoch's order have been drawn) is all a
checkpoint needs to continue the exact same sequence later, and both kinds give the same batches.
Counted in images, the position survives a batch size changed on resume: the epoch goes on from the
next image not yet drawn, neither skipping nor repeating any.

`next()` never waits for the device: the per-epoch permutation is made on the CPU once per epoch
and copied asynchronously; gathering, augmenting and converting a batch are device kernels.
"""

from __future__ import annotations

import os

import torch

from ..errors import UsageError, counted

_MASK64 = (1 << 64) - 1


def permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch` (CPU int64); the same for every kind of batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _mix(*values: int) -> int:
    """A well-spread 63-bit seed from several integers (splitmix64 finaliser over each)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


class Augment:
    """Random horizontal flips and reflect-padded shifts of up to `translate` pixels, applied as one
    gather on the device. The random draws come from a generator on the device reseeded from
    (seed, epoch, index) for every batch: no host round trip, no shared RNG state to save, and the
    same batch position always gets the same flips and shifts (exact resume, stream == device).

    Every (flip, dy, dx) combination's source rows and columns are tabulated once, so a batch costs
    three small kernels (one draw, two table lookups) before the gather: drawing one combination
    uniformly is the same as drawing flip, dy and dx independently and uniformly."""

    def __init__(self, seed: int, hflip: bool, translate: int, device: torch.device):
        self.seed, self.hflip, self.translate = seed, bool(hflip), int(translate)
        self.active = self.hflip or self.translate > 0
        self.device = device
        self._gen = torch.Generator(device=device) if self.active else None
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (h, w) not in self._tables:
            t = self.translate
            shifts = torch.arange(-t, t + 1)
            flips = torch.tensor([0, 1] if self.hflip else [0])
            f, dy, dx = (v.flatten() for v in torch.meshgrid(flips, shifts, shifts, indexing="ij"))
            rows = _reflect(torch.arange(h) - dy[:, None], h)
            cols = _reflect(torch.arange(w) - dx[:, None], w)
            cols = torch.where(f[:, None].bool(), (w - 1) - cols, cols)
            self._tables[(h, w)] = rows.to(self.device), cols.to(self.device)
        return self._tables[(h, w)]

    def coords(self, epoch: int, index: int, b: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Source row (B, H) and column (B, W) of every output pixel of batch (epoch, index)."""
        rows, cols = self._table(h, w)
        g = self._gen.manual_seed(_mix(self.seed, epoch, index, 0xA11C))
        k = torch.randint(0, len(rows), (b,), generator=g, device=self.device)
        return rows.index_select(0, k), cols.index_select(0, k)


def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index i in [-size+1, 2*size-2] mapped into [0, size) by mirroring at the edges without
    repeating the edge pixel: F.pad's "reflect" mode (-1 -> 1, size -> size-2)."""
    i = i.abs()
    return (size - 1) - ((size - 1) - i).abs()


def gather(images: torch.Tensor, idx: torch.Tensor | None, coords: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """uint8 batch: images[idx] (idx None: all of `images`), flipped / shifted per `coords`."""
    if coords is None:
        return images if idx is None else images.index_select(0, idx)
    rows, cols = coords
    b, c = rows.shape[0], images.shape[1]
    bi = (torch.arange(b, device=images.device) if idx is None else idx).view(b, 1, 1, 1)
    ch = torch.arange(c, device=images.device).view(1, c, 1, 1)
    # One indexing kernel does the batch gather, the flip and the shift together.
    return images[bi, ch, rows.view(b, 1, -1, 1), cols.view(b, 1, 1, -1)]


def to_float(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] in two kernels and one allocation; the same values as
    sampling.from_uint8 (divide by 127.5, then subtract 1, in float32)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=fmt)
    torch.div(images, 127.5, out=x)
    return x.sub_(1.0)


class DeviceBatches:
    kind = "device"

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 device: torch.device, seed: int, *, hflip: bool = False, translate: int = 0,
                 channels_last: bool = False):
        device = torch.device(device)
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.channels_last = channels_last
        self.augment = Augment(seed, hflip, translate, device)
        self.epoch = 0
        self.image = 0  # images of this epoch's order already drawn
        if len(images) < batch_size:  # would never yield a batch
            raise UsageError(f"data has {counted(len(images), 'image')}, fewer than the batch size {batch_size}")
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        perm = permutation(len(self.images), self.seed, self.epoch)
        if self.device.type == "cuda":  # pinned + non_blocking: the copy does not sync the stream
            return perm.pin_memory().to(self.device, non_blocking=True)
        return perm.to(self.device)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "image": self.image}

    def seek(self, epoch: int, image: int) -> None:
        self.epoch, self.image = int(epoch), int(image)
        self._perm = self._permutation()

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.image + self.batch_size > len(self.images):  # the last partial batch is dropped
            self.epoch, self.image = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.image:self.image + self.batch_size]
        coords = None
        if self.augment.active:
            _, _, h, w = self.images.shape
            coords = self.augment.coords(self.epoch, self.image // self.batch_size, len(idx), h, w)
        self.image += self.batch_size
        x = to_float(gather(self.images, idx, coords), self.channels_last)
        return x, (self.labels.index_select(0, idx) if self.labels is not None else None)

    def close(self) -> None:
        """Nothing to release (StreamBatches stops its workers here)."""


def _size(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GB"
    return f"{nbytes / 2**20:.0f} MB" if nbytes >= 100 * 2**20 else f"{nbytes / 2**20:.1f} MB"


def usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM job or `taskset` gets fewer than os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 2


def make_batches(data, cfg, device: torch.device, *, channels_last: bool = False, note=None):
    """DeviceBatches when the decoded data (an ImageData) fits in cfg.data.device_max_mb and is in
    memory, else StreamBatches; `note` (if given) gets a line when the data is streamed, and any warning
    about files that failed to decode while streaming. The chosen object's `description` says which."""
    from ..data.lazy import HostImages
    from .streaming import StreamBatches

    device = torch.device(device)
    d, t = cfg.data, cfg.train
    n, size = len(data.images), _size(data.nbytes)
    aug = {"hflip": d.hflip, "translate": d.translate, "channels_last": channels_last}
    if not data.lazy and data.nbytes <= d.device_max_mb * 2**20:
        batches = DeviceBatches(data.images, data.labels, t.batch_size, device, t.seed, **aug)
        text = f"data: {n} images, {size}, kept on {device}"
    else:
        why, crowded = f"over data.device_max_mb={d.device_max_mb}", None
        if data.lazy:
            # auto: decoding is the bottleneck of a streamed folder (measured on 16 cores: 4 workers 3.3k
            # img/s, 16 workers 15k), so use the cores, leaving one for the training process
            cpus = usable_cpus()
            workers = d.workers if d.workers >= 0 else min(16, max(1, cpus - 1))
            if workers > cpus:
                crowded = (f"data.workers={workers} is more than the {cpus} CPU{'s' * (cpus != 1)} this process "
                           "may use: the workers compete for them (-1 picks one per CPU but one)")
            source = data.images
            how = f"decoded from disk by {workers} worker{'s' * (workers != 1)}" if workers else "decoded from disk in this process"
        else:
            # Already-decoded arrays (IDX, CIFAR-10) are gathered in this process straight into
            # pinned memory: that is a memcpy, cheaper than shipping batches from worker processes.
            source, workers = HostImages(data.images, data.labels, pin=device.type == "cuda"), 0
            how = "streamed from CPU memory"
        batches = StreamBatches(source, t.batch_size, device, t.seed, workers=workers, warn=note,
                                strict=d.strict, **aug)
        text = f"data: {n} images, {size} decoded, {how} ({why})"
        if note is not None:  # the usual case (kept on the device) goes without saying; streaming is news
            note(text)
            if crowded:
                note(crowded)
    batches.description = text
    return batches
