"""CIFAR-10 binary folders (aigc_cli/data/cifar.py): where they are found, cache keys, labels, the download check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aigc_cli.data import cifar, load_images
from aigc_cli.errors import UsageError


@pytest.fixture
def small_cifar(monkeypatch):
    """Batch files of 4 records (the real ones hold 10000): random pixels, labels 0-9."""
    monkeypatch.setattr(cifar, "RECORDS_PER_FILE", 4)
    rng = np.random.default_rng(7)
    out = {}
    for names in cifar.FILES.values():
        for name in names:
            recs = rng.integers(0, 256, (4, cifar.RECORD_BYTES), dtype=np.uint8)
            recs[:, 0] %= 10
            out[name] = recs
    return out


def write_cifar(folder: Path, records) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, recs in records.items():
        (folder / name).write_bytes(recs.tobytes())
    return folder


def refuse_fetch(*args):
    raise AssertionError("downloaded although the data set was there")


def test_labels_are_int64_as_for_every_source(tmp_path, small_cifar):
    write_cifar(tmp_path / "cifar-10-batches-bin", small_cifar)
    data = load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split="test")
    assert data.labels.dtype == torch.int64


def test_batch_files_directly_in_the_data_root_are_found(tmp_path, small_cifar):
    write_cifar(tmp_path, small_cifar)
    assert load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split="test").images.shape[0] == 4


def test_the_specific_folder_is_preferred_to_the_data_root_itself(tmp_path, small_cifar):
    write_cifar(tmp_path, {**small_cifar, "test_batch.bin": np.zeros((4, cifar.RECORD_BYTES), np.uint8)})
    write_cifar(tmp_path / "cifar-10-batches-bin", small_cifar)
    data = load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split="test")
    assert np.array_equal(data.images.numpy(), small_cifar["test_batch.bin"][:, 1:].reshape(-1, 3, 32, 32))


def test_download_leaves_a_complete_copy_under_cifar10_alone(tmp_path, small_cifar, monkeypatch):
    """--download with the data set whole in root/cifar10/cifar-10-batches-bin fetched 170 MB again
    (and failed offline) when the 'found elsewhere' condition was dropped."""
    write_cifar(tmp_path / "cifar10" / "cifar-10-batches-bin", small_cifar)
    monkeypatch.setattr(cifar, "_fetch", refuse_fetch)
    data = load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=True)
    assert data.images.shape[0] == 20


def test_an_archive_without_the_batches_folder_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "_fetch", lambda url, root, filename, md5: None)  # "downloaded", held nothing usable
    with pytest.raises(UsageError, match="held no cifar-10-batches-bin folder"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=True)


def test_a_changed_later_batch_file_is_not_answered_from_the_cache(tmp_path, small_cifar):
    """The cache key hashes split_files(): with only data_batch_1 in it, a replaced data_batch_5 came back stale."""
    assert cifar.split_files("train") == [f"data_batch_{i}.bin" for i in range(1, 6)]
    d = write_cifar(tmp_path / "cifar-10-batches-bin", small_cifar)
    old = time.time() - 3600  # not "racy" for the cache
    for p in d.iterdir():
        os.utime(p, (old, old))
    first = load_images(str(d), channels=3, resolution=16)  # converted: cached
    assert load_images(str(d), channels=3, resolution=16).cached
    changed = small_cifar["data_batch_5.bin"].copy()
    changed[:, 1:] = 255 - changed[:, 1:]
    (d / "data_batch_5.bin").write_bytes(changed.tobytes())
    os.utime(d / "data_batch_5.bin", (old - 60, old - 60))
    again = load_images(str(d), channels=3, resolution=16)
    assert not again.cached and not torch.equal(again.images[-4:], first.images[-4:])
