"""MNIST, Fashion-MNIST and CIFAR-10 from a data root, downloaded through torchvision on request.

Every file is read by our own numpy parsers: MNIST-style sets from their raw IDX files (idx.py),
CIFAR-10 from its binary version (cifar.py). torchvision's dataset classes are not used to read
anything, because they fall back to torch.load on legacy "processed" MNIST files and CIFAR10 loads
the Python version of CIFAR-10; torchvision only downloads (URLs, mirrors and MD5 checksums).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import torch

from aigc_cli.data import idx
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


# MD5s of the uncompressed images files, which say which data set a folder holds: names alone cannot (both
# sets use the same file names), nor can the .gz files' MD5s (Debian's package recompresses them).
IMAGES_MD5 = {
    "6bbc9ace898e44ae57da46a324031adb": "mnist", "2646ac647ad5339dbf082846283269ea": "mnist",
    "f4a8712d7a061bf5bd6d2ca38dc4d50a": "fashion-mnist", "8181f5470baa50b63fa0f6fddb340f0a": "fashion-mnist",
}
SPLIT_SIZES = (60_000, 10_000)
SHOWN = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def identify(images: torch.Tensor) -> str:
    """"mnist" or "fashion-mnist" when `images` (N, 1, H, W) uint8, as read from an IDX file, are one of
    that data set's splits whole (the MD5 of the file they were read from); "" otherwise."""
    n, c, h, w = images.shape
    if images.dtype != torch.uint8 or (c, h, w) != (1, 28, 28) or n not in SPLIT_SIZES:
        return ""  # said without hashing
    digest = hashlib.md5(b"\0\0\x08\x03" + struct.pack(">III", n, h, w), usedforsecurity=False)
    digest.update(images.contiguous().numpy())
    return IMAGES_MD5.get(digest.hexdigest(), "")


def check_identity(source: str, held: str, folder: str) -> None:
    """--data mnist must not train on Fashion-MNIST's files (or the other way round) found under its name."""
    if source in SHOWN and held and held != source:
        raise UsageError(f"{folder} holds {SHOWN[held]}, not {SHOWN[source]} (by its files' checksums); use "
                         f"--data {held}, or --data-root where {source} is")


def known_class_names(source: str, kind: str, path: str, num_classes: int, held: str = "") -> tuple[str, ...]:
    """Class names of a labelled IDX or CIFAR-10 source: by what it holds (CIFAR-10's binary batches;
    `held`, what identify() found), else by its built-in name, else for a folder given by path by what it
    is called ("fashion" or "mnist" in the path); () where that says nothing (an IDX folder of some other
    data set)."""
    if kind == "cifar":
        dataset = "cifar10"
    elif held or source in CLASS_NAMES:
        dataset = held or source
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
    if download and found in (None, folders[0]):  # also what an interrupted download left missing or cut short
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


UNPACKED = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _download_mnist_like(source: str, root: str) -> None:
    """Fetch into root/<Name>/raw what is missing there or cut short. A file counts as there when it is whole
    unpacked or packed: a .gz-only copy (Debian's, recompressed, whose MD5s are not torchvision's) is used as it
    is, and a cut-short unpacked file next to a whole .gz is removed (the .gz is then read)."""
    from ..files import make_parent, remove_empty

    raw = os.path.join(root, _class_name(source), "raw")
    missing = []
    for name in UNPACKED:
        plain = os.path.join(raw, name)
        if idx.intact(plain):
            continue
        if not idx.whole(plain + ".gz"):
            missing.append(name)
        elif os.path.lexists(plain):  # an unpacking cut short: read first, it would hide the whole .gz
            os.remove(plain)
    if not missing:
        return  # nothing to fetch (and torchvision, slow to import, not needed)
    from torchvision.datasets.utils import download_and_extract_archive

    cls = _torchvision_class(source)
    made = make_parent(Path(raw) / "file")  # removed again while empty if nothing could be fetched
    for filename, md5 in cls.resources:  # same files, checksums and mirrors torchvision uses
        if filename.removesuffix(".gz") not in missing:
            continue
        # download_url fetches the .gz again only when its MD5 is wrong (cut short) or it is missing
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
