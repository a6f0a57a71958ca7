"""Tests for aigc_cli.data: every source, channel/resolution conversion and the error paths."""

from __future__ import annotations

import gzip
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from aigc_cli.data import BUILTIN_SOURCES, ImageData, load_images
from aigc_cli.data import transforms
from aigc_cli.data.folder import unlabelled_reason
from aigc_cli.data.idx import read_idx
from aigc_cli.errors import UsageError


pytestmark = pytest.mark.usefixtures("no_network")  # data loading must stay offline


def check_layout(data: ImageData, n: int, channels: int, resolution: int) -> None:
    assert data.images.shape == (n, channels, resolution, resolution)
    assert data.images.dtype == torch.uint8
    assert data.images.is_contiguous() and data.images.device.type == "cpu"
    if data.labels is not None:
        assert data.labels.dtype == torch.int64 and data.labels.shape == (n,)
        assert 0 <= int(data.labels.min()) and int(data.labels.max()) < data.num_classes
    else:
        assert data.num_classes == 0


# ----------------------------------------------------------------------------- shapes


def test_shapes_layout_labels_and_determinism():
    a = load_images("shapes", channels=3, resolution=32, seed=1)
    check_layout(a, 4096, 3, 32)
    assert a.num_classes == 4 and a.name == "shapes (train, 4096 images)"
    assert set(a.labels.tolist()) == {0, 1, 2, 3}
    # Every image has a shape on it: some pixel differs clearly from the image's corner colour.
    corner = a.images[:, :, :1, :1].to(torch.int16)
    assert ((a.images.to(torch.int16) - corner).abs().amax(dim=(1, 2, 3)) > 60).all()
    again = load_images("shapes", channels=3, resolution=32, seed=1)
    assert torch.equal(a.images, again.images) and torch.equal(a.labels, again.labels)
    other = load_images("shapes", channels=3, resolution=32, seed=2)
    assert not torch.equal(a.images, other.images)


def test_shapes_test_split_limit_and_grey():
    train = load_images("shapes", channels=3, resolution=16, seed=0, limit=64)
    test = load_images("shapes", channels=3, resolution=16, seed=0, split="test")
    check_layout(test, 1024, 3, 16)
    assert not torch.equal(train.images, test.images[:64])
    full = load_images("shapes", channels=3, resolution=16, seed=0)
    assert torch.equal(train.images, full.images[:64]) and torch.equal(train.labels, full.labels[:64])
    grey = load_images("shapes", channels=1, resolution=16, seed=0, limit=64)
    check_layout(grey, 64, 1, 16)
    assert torch.equal(grey.images, transforms.to_channels(train.images, 1))


# ----------------------------------------------------------------------------- transforms


def test_channel_conversion():
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]],
                       dtype=torch.uint8).view(5, 3, 1, 1)
    grey = transforms.to_channels(rgb, 1)
    # 0.299*255=76.2, 0.587*255=149.7, 0.114*255=29.1, 0.299*10+0.587*20+0.114*30=18.15
    assert grey.flatten().tolist() == [76, 150, 29, 255, 18]
    back = transforms.to_channels(grey, 3)
    assert back.shape == (5, 3, 1, 1) and back.is_contiguous()
    assert (back == grey).all()
    assert transforms.to_channels(rgb, 3) is rgb


def test_resize_centre_crop_and_skip():
    # Three 10-pixel-wide vertical bands; the shorter side already matches, so only the crop acts.
    img = torch.zeros((2, 1, 10, 30), dtype=torch.uint8)
    img[:, :, :, 10:20] = 128
    img[:, :, :, 20:] = 255
    out = transforms.resize_square(img, 10)
    assert out.shape == (2, 1, 10, 10) and (out == 128).all()
    tall = img.transpose(2, 3).contiguous()
    assert (transforms.resize_square(tall, 10) == 128).all()
    same = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    assert transforms.resize_square(same, 8) is same


def test_resize_is_antialiased_and_rounded():
    # One bright column in every 8: point-sampling bilinear would miss it, averaging gives ~32.
    img = torch.zeros((1, 1, 64, 64), dtype=torch.uint8)
    img[..., ::8] = 255
    out = transforms.resize_square(img, 8)
    assert out.shape == (1, 1, 8, 8)
    assert 24 <= float(out.float().mean()) <= 40
    up = transforms.resize_square(torch.full((1, 1, 3, 3), 77, dtype=torch.uint8), 7)
    assert (up == 77).all()


def test_resize_chunking_matches_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (7, 3, 20, 26), dtype=torch.uint8, generator=g)
    whole = transforms.conform(img, 1, 12)
    monkeypatch.setattr(transforms, "_CHUNK_BYTES", 1)  # one image per chunk
    assert torch.equal(transforms.conform(img, 1, 12), whole)
    assert whole.shape == (7, 1, 12, 12)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), res=st.integers(1, 24), value=st.integers(0, 255))
def test_resize_any_shape_keeps_constant_images(h, w, res, value):
    out = transforms.resize_square(torch.full((2, 1, h, w), value, dtype=torch.uint8), res)
    assert out.shape == (2, 1, res, res) and out.dtype == torch.uint8
    assert (out == value).all()


# ----------------------------------------------------------------------------- image folders


def save(path, img: Image.Image, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def flat_folder(tmp_path):
    d = tmp_path / "flat"
    save(d / "a_rgb.png", Image.new("RGB", (20, 20), (255, 0, 0)))
    save(d / "b_grey.png", Image.new("L", (20, 20), 100))
    save(d / "c_rgba.png", Image.new("RGBA", (20, 20), (200, 100, 50, 128)))
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 0, 255] + [0] * 765)
    save(d / "d_palette.png", pal)
    save(d / "e_photo.JPG", Image.new("RGB", (30, 20), (0, 200, 0)), quality=95)
    # Three bands, 20 px each: the centre crop of the wide image is exactly the middle band.
    bands = np.zeros((20, 60, 3), dtype=np.uint8)
    bands[:, :20] = (255, 0, 0)
    bands[:, 20:40] = (0, 255, 0)
    bands[:, 40:] = (0, 0, 255)
    save(d / "f_wide.png", Image.fromarray(bands))
    save(d / "g_16bit.png", Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)))
    save(d / "h_cmyk.jpg", Image.new("CMYK", (20, 20), (0, 0, 0, 0)), quality=95)
    save(d / "sub" / "i_nested.webp", Image.new("RGB", (20, 20), (9, 9, 9)), lossless=True)
    (d / "z_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a real png")
    (d / "notes.txt").write_text("not an image")
    (d / "._hidden.png").write_bytes(b"macOS resource fork, not an image")
    return d


def test_folder_decodes_modes_and_skips_corrupt(flat_folder):
    warnings = []
    data = load_images(str(flat_folder), channels=3, resolution=10, warn=warnings.append)
    check_layout(data, 9, 3, 10)
    assert data.labels is None and data.name == f"folder {flat_folder} (9 images)"
    px = data.images[:, :, 5, 5].tolist()
    assert px[0] == [255, 0, 0]
    assert px[1] == [100, 100, 100]
    assert all(abs(a - b) <= 1 for a, b in zip(px[2], [100, 50, 25]))  # alpha 128 over black
    assert px[3] == [0, 0, 255]
    assert all(abs(a - b) <= 3 for a, b in zip(px[4], [0, 200, 0]))  # JPEG is lossy
    # Centre crop of the wide image: the green band. Lanczos looks a few pixels past the crop
    # (as scaling first, then cropping would), so only the outermost columns may tint slightly.
    wide = data.images[5].int()
    assert (wide[:, :, 3:7] == torch.tensor([0, 255, 0]).view(3, 1, 1)).all()
    assert wide[0].max() < 30 and wide[2].max() < 30 and wide[1].min() > 225
    assert px[6] == [128, 128, 128]  # 32896 / 257 = 128: 16-bit scaled, not clipped to white
    assert all(v >= 250 for v in px[7])  # CMYK all-zero ink is white
    assert px[8] == [9, 9, 9]
    assert len(warnings) == 2
    assert "z_corrupt.png" in warnings[0] and "\n" not in warnings[0]
    assert "skipped 1" in warnings[1]


def test_folder_class_subfolders_limit_and_test_split(tmp_path):
    d = tmp_path / "classes"
    for name, value in (("dogs", 50), ("cats", 150), ("birds", 250)):
        for i in range(3):
            save(d / name / f"{i}.png", Image.new("L", (16, 16), value))
    save(d / "cats" / "deeper" / "x.bmp", Image.new("RGB", (16, 16), (150, 150, 150)))
    data = load_images(str(d), channels=1, resolution=8)
    check_layout(data, 10, 1, 8)
    assert data.num_classes == 3 and data.name.endswith("(10 images, 3 classes)")
    # Sorted paths: birds, cats (including cats/deeper), dogs; labels follow sorted folder names.
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert data.images[:, 0, 0, 0].tolist() == [250] * 3 + [150] * 4 + [50] * 3
    test = load_images(str(d), channels=1, resolution=8, split="test")
    assert torch.equal(test.images, data.images)
    first = load_images(str(d), channels=1, resolution=8, limit=4)
    assert torch.equal(first.images, data.images[:4]) and first.labels.tolist() == [0, 0, 0, 1]
    said = []
    birds = load_images(str(d), channels=1, resolution=8, limit=3, warn=said.append)
    assert birds.labels.tolist() == [0, 0, 0] and len(said) == 1 and "from 1 of the folder's 3 classes (birds)" in said[0]


def test_folder_with_top_level_image_has_no_labels(tmp_path):
    d = tmp_path / "mixed"
    save(d / "a" / "1.png", Image.new("RGB", (8, 8)))
    save(d / "top.png", Image.new("RGB", (8, 8)))
    data = load_images(str(d), channels=3, resolution=8)
    assert data.labels is None and data.num_classes == 0


@pytest.mark.parametrize("lazy", [None, 0])
def test_a_loose_file_that_does_not_decode_still_means_no_labels_in_memory_as_streamed(tmp_path, lazy):
    """Streamed, a file is only decoded while training, so its place in the folder decides: held in memory,
    a broken file directly in the folder used to be dropped first, and the folder got labels there only."""
    d = tmp_path / "cls"
    for cls in ("a", "b"):
        for i in range(3):
            save(d / cls / f"{i}.png", Image.new("RGB", (8, 8)))
    # What a stat() already rules out is never listed streamed: it leaves the labels be, either way.
    (d / "empty.png").write_bytes(b"")
    (d / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    data = load_images(str(d), channels=3, resolution=8, cache=False, lazy_above_mb=lazy, warn=lambda s: None)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.class_names == ("a", "b")
    (d / "loose.png").write_bytes(b"junk, not a png")
    data = load_images(str(d), channels=3, resolution=8, cache=False, lazy_above_mb=lazy, warn=lambda s: None)
    assert data.labels is None and data.num_classes == 0
    # ... and the error a labelled model gives says what to do with such a file
    reason = unlabelled_reason(str(d))
    assert "loose.png, which is no readable image" in reason and "delete it" in reason and "move" not in reason
    (d / "loose.png").unlink()
    save(d / "good.png", Image.new("RGB", (8, 8)))
    assert "(e.g. good.png) next to its class subfolders: move them into one" in unlabelled_reason(str(d))
    flat = tmp_path / "flat"  # no class folders at all: nothing to move into, so nothing to say
    for i in range(3):
        save(flat / f"{i}.png", Image.new("RGB", (8, 8)))
    (flat / "empty.png").write_bytes(b"")
    assert unlabelled_reason(str(flat)) == ""


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match="no images"):
        load_images(str(empty), channels=3, resolution=8)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="could be read"):
        load_images(str(broken), channels=3, resolution=8, warn=lambda m: None)
    with pytest.raises(UsageError, match="shapes, mnist, fashion-mnist, cifar10"):
        load_images(str(tmp_path / "missing"), channels=3, resolution=8)
    with pytest.raises(UsageError, match="not a folder"):
        load_images(str(broken / "x.jpg"), channels=3, resolution=8)


def test_default_warning_goes_to_stderr(flat_folder, capsys):
    load_images(str(flat_folder), channels=3, resolution=8)
    captured = capsys.readouterr()
    assert "z_corrupt.png" in captured.err and captured.out == ""


# ----------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(folder, prefix: str, images: np.ndarray, labels: np.ndarray, compress=True) -> None:
    os.makedirs(folder, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        path = os.path.join(folder, f"{prefix}-{kind}-ubyte")
        if compress:
            with gzip.open(path + ".gz", "wb") as f:
                f.write(idx_bytes(arr))
        else:
            with open(path, "wb") as f:
                f.write(idx_bytes(arr))


@pytest.fixture
def idx_data():
    rng = np.random.default_rng(0)
    return {split: (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8))
            for split, n in (("train", 10), ("t10k", 6))}


def test_idx_folder_round_trip(tmp_path, idx_data):
    write_idx(tmp_path / "idx", "train", *idx_data["train"])
    write_idx(tmp_path / "idx", "t10k", *idx_data["t10k"])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_images(str(tmp_path / "idx"), channels=1, resolution=28, split=split)
        images, labels = idx_data[prefix]
        check_layout(data, len(images), 1, 28)
        assert np.array_equal(data.images[:, 0].numpy(), images)
        assert data.labels.tolist() == labels.tolist()
        assert data.num_classes == int(labels.max()) + 1
        assert data.name.startswith("IDX folder") and f"({split}, {len(images)} images)" in data.name
    resized = load_images(str(tmp_path / "idx"), channels=3, resolution=32, limit=3)
    check_layout(resized, 3, 3, 32)


def test_known_datasets_have_their_class_names(tmp_path):
    """`aigc info` and `sample --class dress` need them; an IDX folder of unknown data gets none."""
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8)
    for name in ("Fashion-MNIST-raw", "mnist", "kuzushiji"):
        write_idx(tmp_path / name, "train", images, labels)
    fashion = load_images(str(tmp_path / "Fashion-MNIST-raw"), channels=1, resolution=28)
    assert fashion.class_names[:2] == ("T-shirt/top", "Trouser") and len(fashion.class_names) == 10
    assert load_images(str(tmp_path / "mnist"), channels=1, resolution=28).class_names == tuple("0123456789")
    assert load_images(str(tmp_path / "kuzushiji"), channels=1, resolution=28).class_names == ()
    old = time.time() - 60  # folders changed in the last seconds are not cached yet
    for f in [tmp_path / "Fashion-MNIST-raw", *(tmp_path / "Fashion-MNIST-raw").iterdir()]:
        os.utime(f, (old, old))
    first = load_images(str(tmp_path / "Fashion-MNIST-raw"), channels=1, resolution=32)  # converted: cached
    again = load_images(str(tmp_path / "Fashion-MNIST-raw"), channels=1, resolution=32)
    assert again.cached and again.class_names == first.class_names == fashion.class_names


def test_mnist_and_fashion_mnist_are_told_apart_by_their_contents(tmp_path, monkeypatch):
    # Both name their files alike: `--data mnist --data-root <Fashion-MNIST's folder>` trained on
    # Fashion-MNIST under MNIST's name and digit class names. The real files' MD5s are not here, so the
    # table learns a generated test split's (10,000 images, as the real one has); identify() hashes what it
    # read, so this also checks that it hashes the file's bytes exactly.
    import hashlib

    from aigc_cli.data import torchvision_sources

    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (10_000, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10_000).astype(np.uint8)
    raw = tmp_path / "root" / "kuzushiji"  # found as root/<anything> only through --data-root root/kuzushiji
    write_idx(raw, "t10k", images, labels, compress=False)
    md5 = hashlib.md5((raw / "t10k-images-idx3-ubyte").read_bytes()).hexdigest()
    monkeypatch.setattr(torchvision_sources, "IMAGES_MD5", {md5: "fashion-mnist"})
    with pytest.raises(UsageError) as e:
        load_images("mnist", channels=1, resolution=28, root=str(raw), split="test")
    assert str(e.value) == (f"{raw} holds Fashion-MNIST, not MNIST (by its files' checksums); use --data fashion-mnist, "
                            "or --data-root where mnist is")
    fashion = load_images("fashion-mnist", channels=1, resolution=28, root=str(raw), split="test")
    assert fashion.class_names[0] == "T-shirt/top"
    # A folder given by path is named by what it holds, not by what it is called
    assert load_images(str(raw), channels=1, resolution=28, split="test").class_names[0] == "T-shirt/top"
    monkeypatch.setattr(torchvision_sources, "IMAGES_MD5", {md5: "mnist"})
    with pytest.raises(UsageError, match="holds MNIST, not Fashion-MNIST"):
        load_images("fashion-mnist", channels=1, resolution=32, root=str(raw), split="test")
    mnist = tmp_path / "Fashion-MNIST-copy"
    raw.rename(mnist)
    assert load_images(str(mnist), channels=1, resolution=28, split="test").class_names == tuple("0123456789")
    write_idx(mnist, "t10k", images[:9_999], labels[:9_999], compress=False)  # not the split whole: by its name
    assert load_images(str(mnist), channels=1, resolution=28, split="test").class_names[0] == "T-shirt/top"


def test_idx_uncompressed_and_wider_types(tmp_path, idx_data):
    write_idx(tmp_path, "train", *idx_data["train"], compress=False)
    data = load_images(str(tmp_path), channels=1, resolution=28)
    assert np.array_equal(data.images[:, 0].numpy(), idx_data["train"][0])
    values = np.array([[-5, 70000], [1, 2**31 - 1]], dtype=np.int32)
    (tmp_path / "ints.idx").write_bytes(idx_bytes(values))
    parsed = read_idx(str(tmp_path / "ints.idx"))
    assert parsed.dtype == np.int32 and np.array_equal(parsed, values)


def test_idx_bad_files(tmp_path, idx_data):
    images, labels = idx_data["train"]
    good = idx_bytes(images)
    cases = {  # file name: (contents, expected words in the message)
        "short": (good[:-1], "truncated"),              # one byte missing
        "long": (good + b"\0", "longer than"),          # trailing garbage
        "header": (good[:10], "header cut short"),       # dims cut off
        "magic": (b"\x01\x02" + good[2:], "bad magic"),
        "empty": (b"", "bad magic"),
        # dims whose product overflows int64 (2**31 * 2**31 * 4 wrapped to 0): not a reshape traceback
        "overflow": (b"\0\0\x08\x03" + struct.pack(">III", 2**31, 2**31, 4), "truncated.*needs 18446744073709551616"),
    }
    for name, (blob, words) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UsageError, match=f"{name}.*{words}"):
            read_idx(str(tmp_path / name))
    # A gzip stream cut in the middle.
    folder = tmp_path / "cut"
    write_idx(folder, "train", images, labels)
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-40])
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz"):
        load_images(str(folder), channels=1, resolution=28)
    # Label count that does not match the images.
    folder = tmp_path / "mismatch"
    write_idx(folder, "train", images, labels[:5])
    with pytest.raises(UsageError, match="labels"):
        load_images(str(folder), channels=1, resolution=28)
    # No test split in the folder.
    with pytest.raises(UsageError, match="t10k-images"):
        load_images(str(tmp_path / "mismatch"), channels=1, resolution=28, split="test")
    # No images at all: said as such, not as "fewer than the batch size"
    write_idx(tmp_path / "none", "train", images[:0], labels[:0])
    with pytest.raises(UsageError, match=r"train-images-idx3-ubyte.gz holds no images \(shape \(0, 28, 28\)\)"):
        load_images(str(tmp_path / "none"), channels=1, resolution=28)


def test_mnist_from_root_layouts(tmp_path, idx_data, monkeypatch):
    write_idx(tmp_path / "tv" / "MNIST" / "raw", "train", *idx_data["train"])
    data = load_images("mnist", channels=1, resolution=28, root=str(tmp_path / "tv"))
    check_layout(data, 10, 1, 28)
    assert data.num_classes == 10 and data.name == "mnist (train, 10 images)"
    assert np.array_equal(data.images[:, 0].numpy(), idx_data["train"][0])
    # Files directly in the root, found through $AIGC_DATA_ROOT when no root is passed.
    write_idx(tmp_path / "flat", "t10k", *idx_data["t10k"])
    monkeypatch.setenv("AIGC_DATA_ROOT", str(tmp_path / "flat"))
    test = load_images("fashion-mnist", channels=3, resolution=14, split="test")
    check_layout(test, 6, 3, 14)
    assert test.name == "fashion-mnist (test, 6 images)"


# ----------------------------------------------------------------------------- torchvision sources


def test_missing_torchvision_datasets_fail_without_network(tmp_path):
    with pytest.raises(UsageError) as err:
        load_images("mnist", channels=1, resolution=28, root=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "--download" in message and "--data-root" in message
    assert "\n" not in message
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        load_images("fashion-mnist", channels=1, resolution=28, root=str(tmp_path))
    with pytest.raises(UsageError, match="cifar-10-batches-bin.*--download"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    (tmp_path / "cifar-10-batches-py").mkdir()  # torchvision's layout: not read by aigc
    with pytest.raises(UsageError, match="--download"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))


def test_bad_arguments():
    assert BUILTIN_SOURCES == ("shapes", "mnist", "fashion-mnist", "cifar10")
    for kwargs, word in ((dict(channels=2, resolution=8), "channels"),
                         (dict(channels=3, resolution=2), "resolution"),
                         (dict(channels=3, resolution=8, split="val"), "split"),
                         (dict(channels=3, resolution=8, limit=-1), "limit")):
        with pytest.raises(UsageError, match=word):
            load_images("shapes", **kwargs)
    with pytest.raises(UsageError, match="folder"):
        load_images("no-such-source", channels=3, resolution=8)


def test_labelled_training_refuses_one_class_and_notes_label_gaps(tmp_path):
    from conftest import Silent, tiny

    from aigc_cli.training.loop import train

    one = tmp_path / "one class" / "cats"
    one.mkdir(parents=True)
    for i in range(20):
        Image.new("L", (16, 16), i * 10).save(one / f"{i}.png")
    for cfg, expect in ((tiny("classifier"), "holds 1 class; model 'classifier' needs at least 2"),
                        (tiny("dcgan", conditional=True), "a conditional model needs at least 2 (or train it with "
                                                          "model.conditional=false)")):
        with pytest.raises(UsageError, match=expect.replace("(", r"\(").replace(")", r"\)")):
            train(cfg.with_overrides({"data.source": str(tmp_path / "one class")}), tmp_path / "run", Silent())
        assert not (tmp_path / "run" / "checkpoints").exists()

    rng = np.random.default_rng(2)
    labels = np.array([0, 255] * 16, dtype=np.uint8)  # two classes, numbered 0 and 255
    write_idx(tmp_path / "gappy", "train", rng.integers(0, 256, (32, 28, 28), dtype=np.uint8), labels)
    cfg = tiny("classifier").with_overrides({"data.source": str(tmp_path / "gappy"), "train.steps": "2"})
    reporter = Silent()
    summary = train(cfg, tmp_path / "gappy run", reporter)
    # No t10k files: the classifier is trained and saved all the same, without a held-out accuracy.
    assert "test_accuracy" not in summary and Path(summary["checkpoint"]).is_file()
    assert any(n.startswith("held-out accuracy not measured: no t10k-images") for n in reporter.notes), reporter.notes
    assert ("the labels run from 0 to 255 but only 2 of those numbers occur: model 'classifier' gets 256 classes, "
            "254 of them never seen in training") in reporter.notes
    # t10k images without their labels (a copy cut short): the same note, not a traceback at the very end
    write_idx(tmp_path / "gappy", "t10k", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), labels[:8])
    os.remove(tmp_path / "gappy" / "t10k-labels-idx1-ubyte.gz")
    reporter = Silent()
    summary = train(cfg, tmp_path / "gappy run 2", reporter)
    assert "test_accuracy" not in summary and Path(summary["checkpoint"]).is_file()
    assert any(n.startswith("held-out accuracy not measured: the held-out images of IDX folder ")
               and n.endswith(" have no labels") for n in reporter.notes), reporter.notes


def test_held_out_accuracy_is_measured_without_autograd():
    from conftest import tiny

    from aigc_cli.training.loop import classifier_accuracy
    from aigc_cli.training.precision import Precision

    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return self.w.expand(len(x), 4)

    cfg = tiny("classifier")
    data = load_images("shapes", channels=1, resolution=16, limit=64)
    key, accuracy, count = classifier_accuracy(Recording(), cfg, Precision("fp32", torch.device("cpu")), data, print)
    assert key == "test_accuracy" and 0 <= accuracy <= 1 and count > 0 and seen and all(seen)


def test_training_accuracy_on_a_streamed_folder_says_a_file_it_replaced_and_strict_refuses(tmp_path):
    """The accuracy's fetch dropped the list of files it had replaced: no warning, and --strict was ignored."""
    from conftest import tiny, write_image_folder

    from aigc_cli.data.lazy import LazyFolder
    from aigc_cli.training.loop import classifier_accuracy
    from aigc_cli.training.precision import Precision

    folder = write_image_folder(tmp_path / "imgs", n_per_class=6, size=16)
    bad = sorted(folder.rglob("*.png"))[3]
    bad.write_bytes(b"junk, not a png")
    data = load_images(str(folder), channels=1, resolution=16, lazy_above_mb=0)
    assert isinstance(data.images, LazyFolder) and not data.held_out
    C = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 2))
    amp, said = Precision("fp32", torch.device("cpu")), []
    cfg = tiny("classifier").with_overrides({"data.source": str(folder)})
    key, _, count = classifier_accuracy(C, cfg, amp, data, said.append)
    assert key == "train_accuracy" and count == 12
    assert [w for w in said if w.startswith(f"skipping {bad.parent.name}/{bad.name}: ")], said
    with pytest.raises(UsageError, match="stopped by --strict"):
        classifier_accuracy(C, cfg.with_overrides({"data.strict": "true"}), amp, data, said.append)


def test_a_class_folder_with_no_readable_image_keeps_the_numbering_in_memory_and_streamed(tmp_path):
    """Streamed (decoded on demand), a bad file is found only while training, so its class folder stays
    numbered; in memory the class used to vanish and the others moved down one: --class K meant another
    class once a folder grew past data.device_max_mb."""
    root = tmp_path / "cls"
    for name, colour in (("a_bad", None), ("b_red", (255, 0, 0)), ("c_blue", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            path = root / name / f"{i}.png"
            if colour is None:
                path.write_bytes(b"not a png at all")
            else:
                Image.new("RGB", (8, 8), colour).save(path)
    warnings = []
    memory = load_images(str(root), channels=3, resolution=8, cache=False, warn=warnings.append)
    streamed = load_images(str(root), channels=3, resolution=8, cache=False, lazy_above_mb=0, warn=print)
    assert memory.class_names == streamed.class_names == ("a_bad", "b_red", "c_blue")
    assert memory.num_classes == streamed.num_classes == 3
    assert memory.labels.tolist() == [1] * 4 + [2] * 4
    assert any("class folder a_bad: none of its images could be read" in w for w in warnings), warnings
    from aigc_cli.training.streaming import StreamBatches  # streamed, it is said once all its files have failed

    said = []
    batches = StreamBatches(streamed.images, 4, torch.device("cpu"), 0, warn=said.append)
    for _ in range(3):
        batches.next()
    assert sum("skipping a_bad" in w for w in said) == 4, said
    assert sum("class folder a_bad: none of its images could be read" in w for w in said) == 1, said


def test_a_classifier_trained_on_a_streamed_folder_says_a_bad_file_once_and_strict_skips_the_accuracy(tmp_path):
    """Training and the accuracy at the end both met the file: said twice. With --strict the note said "held-out"
    of an accuracy on the training images."""
    from conftest import Silent, tiny, write_image_folder

    from aigc_cli.training import loop

    folder = write_image_folder(tmp_path / "imgs", n_per_class=6, size=16)
    bad = sorted(folder.rglob("*.png"))[3]
    bad.write_bytes(b"junk, not a png")
    cfg = tiny("classifier", channels=3).with_overrides({
        "data.source": str(folder), "train.steps": "3", "train.batch_size": "6", "data.device_max_mb": "0",
        "data.workers": "0"})
    rep = Silent()
    summary = loop.train(cfg, tmp_path / "run", rep)
    assert "train_accuracy" in summary
    assert sum(n.startswith(f"skipping {bad.parent.name}/{bad.name}: ") for n in rep.notes) == 1, rep.notes
    rep = Silent()
    summary = loop.train(cfg.with_overrides({"train.steps": "1", "train.batch_size": "2", "data.strict": "true"}),
                         tmp_path / "strict", rep)
    assert "train_accuracy" not in summary
    assert [n for n in rep.notes if n.startswith("training accuracy not measured: cannot use image file ")], rep.notes


@pytest.mark.parametrize("streamed", [False, True])
def test_a_classifier_on_a_folder_reports_training_accuracy_without_loading_it_again(tmp_path, monkeypatch, streamed):
    """A folder has no held-out split: the accuracy is on (a subset of) the training images and says so,
    and a folder large enough to stream is not decoded whole into memory at the end."""
    from conftest import Silent, tiny, write_image_folder

    from aigc_cli.training import loop

    folder = write_image_folder(tmp_path / "imgs", n_per_class=12, size=16)
    cfg = tiny("classifier", channels=3).with_overrides({
        "data.source": str(folder), "train.steps": "2", "train.batch_size": "8",
        "data.device_max_mb": "0" if streamed else "4096", "data.workers": "0"})
    loads, real = [], loop.load_data
    monkeypatch.setattr(loop, "load_data", lambda cfg, split, warn: loads.append(split) or real(cfg, split, warn))
    summary = loop.train(cfg, tmp_path / "run", Silent())
    assert loads == ["train"]  # no second load of the folder for a "test" split it does not have
    assert "test_accuracy" not in summary and 0 <= summary["train_accuracy"] <= 1
    assert summary["accuracy_images"] == 24
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 2, "train_accuracy": summary["train_accuracy"]}


def test_a_folder_above_an_idx_folder_points_at_it(tmp_path, idx_data):
    images, labels = idx_data["train"]
    write_idx(tmp_path / "datasets" / "fashion", "train", images, labels)
    with pytest.raises(UsageError, match=r"no images .* found under .*datasets; point at a folder that holds images; "
                                         r".*datasets/fashion holds IDX files: pass that folder as --data"):
        load_images(str(tmp_path / "datasets"), channels=1, resolution=28)


@pytest.mark.parametrize("lazy", [None, 0])
def test_a_limit_that_keeps_only_some_classes_is_said_in_memory_and_streamed(tmp_path, lazy):
    root = tmp_path / "cls"
    for k, name in enumerate(("a", "b", "c")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (60 * k, i, 0)).save(root / name / f"{i}.png")
    said = []
    data = load_images(str(root), channels=3, resolution=8, cache=False, limit=5, lazy_above_mb=lazy, warn=said.append)
    assert data.class_names == ("a", "b") and len(data.images) == 5
    assert [w for w in said if "data.limit=5 keeps the first 5 images" in w and "from 2 of the folder's 3 classes" in w], said


def test_a_class_folder_of_empty_files_is_said_at_once_when_streamed(tmp_path):
    root = tmp_path / "cls"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            if name == "a":
                Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i}.png")
            else:
                (root / name / f"{i}.png").write_bytes(b"")  # a stat() rejects these before any decoding
    said = []
    data = load_images(str(root), channels=3, resolution=8, cache=False, lazy_above_mb=0, warn=said.append)
    assert data.class_names == ("a", "b")
    assert any("class folder b: none of its images could be read" in w for w in said), said


def test_one_image_is_one_image(tmp_path):
    from aigc_cli.config import config_from_dict
    from aigc_cli.training.loop import train
    from conftest import Silent

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "only.png")
    data = load_images(str(tmp_path), channels=3, resolution=8, warn=print)
    assert data.name == f"folder {tmp_path} (1 image)"
    cfg = config_from_dict({"model": {"kind": "dcgan", "resolution": 16, "channels": 3},
                            "data": {"source": str(tmp_path)}, "train": {"batch_size": 4}})
    with pytest.raises(UsageError, match=r"^data has 1 image, fewer than --batch-size 4; pass --batch-size 1 "):
        train(cfg, tmp_path / "run", Silent())
