"""Mini-batches from a uint8 image tensor kept on the training device.

The order is a fresh permutation per epoch drawn from (seed, epoch) alone, so the position
(epoch, index) is all a checkpoint needs to continue the exact same sequence later.
"""

from __future__ import annotations

import torch

from ..sampling import from_uint8


class DeviceBatches:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 device: torch.device, seed: int):
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0  # next batch within the epoch
        self.per_epoch = len(images) // batch_size  # the last partial batch is dropped
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.images), generator=g).to(self.images.device)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, epoch: int, index: int) -> None:
        self.epoch, self.index = int(epoch), int(index)
        self._perm = self._permutation()

    def next(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.index >= self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        return from_uint8(self.images[idx]), (self.labels[idx] if self.labels is not None else None)
