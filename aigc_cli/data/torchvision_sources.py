"""MNIST, Fashion-MNIST and CIFAR-10 from a data root, downloaded through torchvision on request.

MNIST-style sets are read from their raw IDX files by our own parser (idx.py) rather than via
torchvision's dataset classes, because those fall back to torch.load on legacy "processed" files.
torchvision is used for downloading them, and for CIFAR-10, whose loader checks every file's MD5
against known values before reading it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from aigc_cli.data import idx
from aigc_cli.errors import UsageError

# Debian/Ubuntu's dataset-fashion-mnist package installs the raw files here.
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def default_root() -> str:
    return os.environ.get("AIGC_DATA_ROOT") or os.path.join(os.path.expanduser("~"), ".cache", "aigc", "datasets")


def _torchvision_class(source: str):
    from torchvision import datasets  # imported lazily: it is slow and only needed here

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
            "cifar10": datasets.CIFAR10}[source]


def _class_name(source: str) -> str:
    # torchvision's folder name under root, e.g. root/FashionMNIST/raw (kept literal so that
    # looking for files never needs torchvision imported).
    return {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[source]


def idx_candidates(source: str, root: str, root_given: bool) -> list[str]:
    """Folders that may hold the raw IDX files for `source`, most specific first: torchvision's
    layout (root/MNIST/raw), a folder named after the source (root/fashion-mnist, as the Debian
    package lays it out), and root itself."""
    folders = [os.path.join(root, _class_name(source), "raw"), os.path.join(root, source), root]
    if source == "fashion-mnist" and not root_given:
        folders.append(SYSTEM_FASHION_MNIST)
    return folders


def load_mnist_like(source: str, root: str, root_given: bool, download: bool,
                    split: str) -> tuple[torch.Tensor, torch.Tensor | None, int, str]:
    """(N, 1, 28, 28) images, labels, 10 classes, and the folder they came from."""
    folders = idx_candidates(source, root, root_given)
    found = next((f for f in folders if idx.is_idx_folder(f)), None)
    if found is None and download:
        _download_mnist_like(source, root)
        found = folders[0]
    if found is None:
        hint = ", or `apt-get install dataset-fashion-mnist`" if source == "fashion-mnist" else ""
        raise UsageError(f"{source} not found (looked in {', '.join(folders)}); pass --download to "
                         f"fetch it, or --data-root DIR where it is{hint}")
    images, labels = idx.load_idx_folder(found, split)
    if labels is not None and labels.numel() and int(labels.max()) >= 10:
        raise UsageError(f"labels in {found} go beyond the 10 {source} classes; is it another data set?")
    return images, labels, 10, found


def _download_mnist_like(source: str, root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    cls = _torchvision_class(source)
    raw = os.path.join(root, _class_name(source), "raw")
    os.makedirs(raw, exist_ok=True)
    for filename, md5 in cls.resources:  # same files, checksums and mirrors torchvision uses
        errors = []
        for mirror in cls.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=raw, filename=filename, md5=md5)
                break
            except Exception as e:  # noqa: BLE001 - URLError, RuntimeError (bad MD5), OSError, ...
                errors.append(f"{mirror}: {e}")
        else:
            raise UsageError(f"could not download {source} file {filename} into {raw} "
                             f"({'; '.join(errors)}); check the network or copy the files there")


def load_cifar10(root: str, download: bool, split: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(N, 3, 32, 32) images, labels, 10 classes, and the folder they came from."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if not download and not os.path.isdir(folder):
        # Checked here so a missing data set fails fast, before torchvision is even imported.
        raise UsageError(f"cifar10 not found (no folder {folder}); pass --download to fetch it, "
                         "or --data-root DIR where it is")
    try:
        ds = _torchvision_class("cifar10")(root=root, train=(split == "train"), download=download)
    except Exception as e:  # noqa: BLE001 - torchvision raises RuntimeError/URLError/OSError
        action = "check the network or the folder" if download else "pass --download to fetch a fresh copy"
        raise UsageError(f"cifar10 in {folder} could not be loaded ({str(e).splitlines()[0]}); {action}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), 10, folder
