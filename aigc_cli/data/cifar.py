"""CIFAR-10, binary version (https://www.cs.toronto.edu/~kriz/cifar.html), parsed with numpy.

Layout of `cifar-10-batches-bin`: data_batch_1.bin .. data_batch_5.bin (train) and
test_batch.bin (test), 10000 records each. A record is one label byte (0-9) followed by
3072 pixel bytes: the 32x32 red plane, then green, then blue, each row by row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from aigc_cli.errors import UsageError, first_line

# Only the binary version is read: the "python version" (cifar-10-batches-py, what torchvision's
# CIFAR10 class loads) is a set of pickle files, and unpickling a downloaded or user-supplied file
# can run arbitrary code, so aigc never does it.

FOLDER_NAME = "cifar-10-batches-bin"
PY_FOLDER_NAME = "cifar-10-batches-py"  # torchvision's layout, which we refuse to read
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
SIZE, CHANNELS, NUM_CLASSES = 32, 3, 10
RECORD_BYTES = 1 + CHANNELS * SIZE * SIZE  # 3073
RECORDS_PER_FILE = 10_000  # every file of the real data set; anything else is damaged


def is_cifar_bin_folder(folder: str) -> bool:
    """True when `folder` directly holds CIFAR-10 binary batch files (either split)."""
    return os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, name))
                                         for names in FILES.values() for name in names)


def complete(folder: str) -> bool:
    """Whether every batch file of both splits is in `folder`, each of the right size."""
    expected = RECORDS_PER_FILE * RECORD_BYTES
    return all(os.path.isfile(p := os.path.join(folder, name)) and os.path.getsize(p) == expected
               for names in FILES.values() for name in names)


def read_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as images (N, 3, 32, 32) uint8 and labels (N,) uint8."""
    expected = RECORDS_PER_FILE * RECORD_BYTES
    # `--download` applies to `--data cifar10`, not to a folder given by path: say the whole command.
    fix = f"delete it and fetch the data set again (`--data cifar10 --download`), or unpack {ARCHIVE} again"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                what = "truncated" if size < expected else "longer than expected"
                raise UsageError(f"CIFAR-10 file {path} is {what} ({size} bytes, expected {expected}: "
                                 f"{RECORDS_PER_FILE} records of {RECORD_BYTES} bytes); {fix}")
            data = np.fromfile(f, dtype=np.uint8, count=expected)
    except OSError as e:
        raise UsageError(f"cannot read CIFAR-10 file {path}: {e.strerror or e}; {fix}") from None
    if data.size != expected:  # shrank while we were reading it
        raise UsageError(f"CIFAR-10 file {path} is truncated ({data.size} bytes read, expected {expected}); {fix}")
    records = data.reshape(RECORDS_PER_FILE, RECORD_BYTES)
    labels = records[:, 0]
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise UsageError(f"{path} has label {int(labels.max())}, but CIFAR-10 labels are 0-9; "
                         "is it another data set (CIFAR-100 has its own format)?")
    return records[:, 1:].reshape(-1, CHANNELS, SIZE, SIZE), labels


def load_cifar_bin_folder(folder: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 for `split` from a batches-bin folder."""
    paths = [os.path.join(folder, name) for name in FILES[split]]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise UsageError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)} for the '{split}' split; "
                         f"fetch the data set (`--data cifar10 --download`), or unpack {ARCHIVE} again")
    n = len(paths) * RECORDS_PER_FILE
    # Filled file by file so peak memory is about one copy of the data set.
    images = np.empty((n, CHANNELS, SIZE, SIZE), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i, path in enumerate(paths):
        rows = slice(i * RECORDS_PER_FILE, (i + 1) * RECORDS_PER_FILE)
        images[rows], labels[rows] = read_batch(path)
    return torch.from_numpy(images), torch.from_numpy(labels)


def candidates(root: str) -> list[str]:
    """Folders that may hold the batch files, most specific first."""
    return [os.path.join(root, FOLDER_NAME), os.path.join(root, "cifar10", FOLDER_NAME), root]


def split_files(split: str) -> list[str]:
    """The batch files that make up `split`, relative to the folder."""
    return list(FILES[split])


def find_cifar10(root: str, download: bool) -> str:
    """The batches-bin folder under `root`, downloading the archive first when allowed and missing."""
    folders = candidates(root)
    found = next((f for f in folders if is_cifar_bin_folder(f)), None)
    if download and found in (None, folders[0]) and not complete(folders[0]):  # also what a cut-short unpacking left
        _download(root)  # the archive is fetched again only when its MD5 is wrong or it is missing
        found = folders[0]
    if found is None:
        python_only = [p for p in (os.path.join(root, PY_FOLDER_NAME), os.path.join(root, "cifar10", PY_FOLDER_NAME))
                       if os.path.isdir(p)]
        if python_only:
            raise UsageError(f"found only {python_only[0]}, CIFAR-10's Python version, which aigc does not "
                             "read because loading it can run code; aigc reads the binary version "
                             f"({FOLDER_NAME}): pass --download to fetch {ARCHIVE} into {root}, or unpack "
                             f"{ARCHIVE} (from {URL}) into {root}")
        raise UsageError(f"cifar10 not found (no {FOLDER_NAME} in {', '.join(folders[:2])}); pass --download "
                         f"to fetch it, or --data-root DIR where {ARCHIVE} is unpacked")
    return found


def _fetch(url: str, root: str, filename: str, md5: str) -> None:
    """Download `url` into root/filename, check its MD5, and unpack it into `root`."""
    from torchvision.datasets.utils import download_and_extract_archive  # slow import: only here

    download_and_extract_archive(url, download_root=root, filename=filename, md5=md5)


def _download(root: str) -> None:
    from ..files import make_parent, remove_empty

    made = []
    try:
        made = make_parent(Path(root) / ARCHIVE)
        _fetch(URL, root, ARCHIVE, MD5)
    except Exception as e:  # noqa: BLE001 - URLError, RuntimeError (bad MD5), OSError, tarfile errors
        remove_empty(made)  # the folders it made for the download, while they are empty
        raise UsageError(f"could not download cifar10 from {URL} into {root} ({first_line(e)}); check the network, "
                         f"or unpack {ARCHIVE} into {root} yourself") from None
    if not is_cifar_bin_folder(os.path.join(root, FOLDER_NAME)):
        raise UsageError(f"{ARCHIVE} was downloaded into {root} but held no {FOLDER_NAME} folder; "
                         "delete it and try again")
