"""MNIST, Fashion-MNIST and CIFAR-10 from a data root, downloaded through torchvision on request.

Every file is read by our own numpy parsers: MNIST-style sets from their raw IDX files (idx.py),
CIFAR-10 from its binary version (cifar.py). torchvision's dataset classes are not used to read
anything, because they fall back to torch.load on legacy "processed" MNIST files and CIFAR10 loads
the Python version of CIFAR-10; torchvision only downloads (URLs, mirrors and MD5 checksums).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aigc_cli.data import cifar, idx
from aigc_cli.errors import UsageError

# Debian/Ubuntu's dataset-fashion-mnist package installs the raw files here.
SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


# The datasets' class names in label order (as torchvision lists them), for `aigc info` and `sample --class`.
CLASS_NAMES = {
    "mnist": tuple("0123456789"),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}


def known_class_names(source: str, kind: str, path: str, num_classes: int) -> tuple[str, ...]:
    """Class names of a labelled IDX or CIFAR-10 source: by its built-in name, or for a folder given by
    path by what it holds (CIFAR-10's binary batches) or is called ("fashion" or "mnist" in the path);
    () where that says nothing (an IDX folder of some other data set)."""
    if kind == "cifar":
        dataset = "cifar10"
    elif source in CLASS_NAMES:
        dataset = source
    else:
        lower = os.path.abspath(path).lower()
        dataset = "fashion-mnist" if "fashion" in lower else "mnist" if "mnist" in lower else ""
    names = CLASS_NAMES.get(dataset, ())
    return names if len(names) == num_classes else ()


def default_root() -> str:
    return os.path.expanduser(os.environ.get("AIGC_DATA_ROOT") or os.path.join("~", ".cache", "aigc", "datasets"))


def _torchvision_class(source: str):
    from torchvision import datasets  # imported lazily: it is slow and only needed here

    return {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[source]


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


def find_mnist_like(source: str, root: str, root_given: bool, download: bool) -> str:
    """The folder holding `source`'s IDX files, downloading them first when allowed and missing."""
    folders = idx_candidates(source, root, root_given)
    found = next((f for f in folders if idx.is_idx_folder(f)), None)
    if found is None and download:
        _download_mnist_like(source, root)
        found = folders[0]
    if found is None:
        hint = ", or `apt-get install dataset-fashion-mnist`" if source == "fashion-mnist" else ""
        raise UsageError(f"{source} not found (looked in {', '.join(folders)}); pass --download to "
                         f"fetch it, or --data-root DIR where it is{hint}")
    return found


def load_mnist_from(source: str, found: str, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 1, 28, 28) images and labels of `source` from the IDX folder `found`."""
    images, labels = idx.load_idx_folder(found, split)
    if labels is not None and labels.numel() and int(labels.max()) >= 10:
        raise UsageError(f"labels in {found} go beyond the 10 {source} classes; is it another data set?")
    return images, labels


def load_mnist_like(source: str, root: str, root_given: bool, download: bool,
                    split: str) -> tuple[torch.Tensor, torch.Tensor | None, int, str]:
    """(N, 1, 28, 28) images, labels, 10 classes, and the folder they came from."""
    found = find_mnist_like(source, root, root_given, download)
    images, labels = load_mnist_from(source, found, split)
    return images, labels, 10, found


def _download_mnist_like(source: str, root: str) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    from ..files import make_parent, remove_empty

    cls = _torchvision_class(source)
    raw = os.path.join(root, _class_name(source), "raw")
    made = make_parent(Path(raw) / "file")  # removed again while empty if nothing could be fetched
    for filename, md5 in cls.resources:  # same files, checksums and mirrors torchvision uses
        errors = []
        for mirror in cls.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", download_root=raw, filename=filename, md5=md5)
                break
            except Exception as e:  # noqa: BLE001 - URLError, RuntimeError (bad MD5), OSError, ...
                errors.append(f"{mirror}: {e}")
        else:
            remove_empty(made)
            raise UsageError(f"could not download {source} file {filename} into {raw} "
                             f"({'; '.join(errors)}); check the network or copy the files there")


def load_cifar10(root: str, download: bool, split: str) -> tuple[torch.Tensor, torch.Tensor, int, str]:
    """(N, 3, 32, 32) images, labels, 10 classes, and the folder they came from (binary version)."""
    return cifar.load_cifar10(root, download, split)
