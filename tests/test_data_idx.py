"""IDX parsing edge cases (aigc_cli/data/idx.py): byte orders, short and odd headers, label checks, intact()."""

from __future__ import annotations

import gzip
import os
import struct
import time

import numpy as np
import pytest

from aigc_cli.data import idx, load_images
from aigc_cli.errors import UsageError


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
            np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(folder, name: str, array: np.ndarray) -> None:
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
        f.write(idx_bytes(array))


IMAGES = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)


def test_files_shorter_than_the_magic_number_are_usage_errors_not_tracebacks(tmp_path):
    """3 bytes: the magic check read data[3] (IndexError); intact() did the same on head[3]."""
    for blob in (b"\0", b"\0\0", b"\0\0\x08"):
        (tmp_path / "short").write_bytes(blob)
        with pytest.raises(UsageError, match="bad magic"):
            idx.read_idx(str(tmp_path / "short"))
        assert idx.intact(str(tmp_path / "short")) is False


def test_intact_is_false_for_a_header_cut_between_two_dimension_words(tmp_path):
    """An unpacking cut short 6 bytes in: np.frombuffer raised ValueError out of intact(), so
    `aigc train --data mnist --download` died with a traceback before fetching anything (a real bug)."""
    (tmp_path / "cut").write_bytes(b"\0\0\x08\x03\0\0")
    assert idx.intact(str(tmp_path / "cut")) is False


def test_intact_is_false_for_what_cannot_be_opened_as_a_file(tmp_path):
    (tmp_path / "a folder").mkdir()
    assert idx.intact(str(tmp_path / "a folder")) is False


def test_intact_counts_the_element_size_of_wider_types(tmp_path):
    values = np.arange(12, dtype=np.int32).reshape(3, 4)
    (tmp_path / "ints").write_bytes(idx_bytes(values))
    assert idx.intact(str(tmp_path / "ints"))
    (tmp_path / "ints").write_bytes(idx_bytes(values)[:-4])
    assert not idx.intact(str(tmp_path / "ints"))


def test_signed_and_16_bit_types_are_read_big_endian_and_signed(tmp_path):
    for values in (np.array([-128, -1, 0, 127], dtype=np.int8), np.array([-300, 258, 32767], dtype=np.int16)):
        (tmp_path / "v").write_bytes(idx_bytes(values))
        parsed = idx.read_idx(str(tmp_path / "v"))
        assert parsed.dtype == values.dtype and parsed.tolist() == values.tolist()


def test_negative_or_fractional_labels_and_non_byte_images_are_refused(tmp_path):
    labels = np.zeros(6, dtype=np.int8)
    labels[3] = -1
    write(tmp_path / "neg", "train-images-idx3-ubyte", IMAGES)
    write(tmp_path / "neg", "train-labels-idx1-ubyte", labels)
    with pytest.raises(UsageError, match="negative labels"):
        load_images(str(tmp_path / "neg"), channels=1, resolution=28)
    write(tmp_path / "float", "train-images-idx3-ubyte", IMAGES)
    write(tmp_path / "float", "train-labels-idx1-ubyte", np.full(6, 1.5, dtype=np.float32))
    with pytest.raises(UsageError, match="integer labels"):
        load_images(str(tmp_path / "float"), channels=1, resolution=28)
    write(tmp_path / "wide", "train-images-idx3-ubyte", IMAGES.astype(np.int16) * 3)
    with pytest.raises(UsageError, match="expected unsigned bytes"):
        load_images(str(tmp_path / "wide"), channels=1, resolution=28)


def test_the_dotted_spelling_of_idx_file_names_is_found(tmp_path):
    """"train-images.idx3-ubyte", as some unzip tools name them."""
    write(tmp_path / "dots", "train-images.idx3-ubyte", IMAGES)
    write(tmp_path / "dots", "train-labels.idx1-ubyte", np.arange(6, dtype=np.uint8))
    data = load_images(str(tmp_path / "dots"), channels=1, resolution=28)
    assert np.array_equal(data.images[:, 0].numpy(), IMAGES) and data.labels.tolist() == list(range(6))


def test_a_replaced_labels_file_is_not_answered_from_the_cache(tmp_path):
    """The cache key names the files it hashes: without the labels file, new labels came back stale."""
    d = tmp_path / "idx"
    write(d, "train-images-idx3-ubyte", IMAGES)
    write(d, "train-labels-idx1-ubyte", np.arange(6, dtype=np.uint8))
    assert idx.split_files(str(d), "train") == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    old = time.time() - 3600  # not "racy" for the cache
    for p in d.iterdir():
        os.utime(p, (old, old))
    first = load_images(str(d), channels=3, resolution=32)  # converted: cached
    assert load_images(str(d), channels=3, resolution=32).cached
    write(d, "train-labels-idx1-ubyte", np.full(6, 7, dtype=np.uint8))
    os.utime(d / "train-labels-idx1-ubyte.gz", (old - 60, old - 60))
    again = load_images(str(d), channels=3, resolution=32)
    assert first.labels.tolist() == list(range(6)) and again.labels.tolist() == [7] * 6
