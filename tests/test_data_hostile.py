"""Hostile inputs for aigc_cli.data: broken, odd and malicious image files, and CIFAR-10 binary files.

Every file is generated here. Each image kind is either decoded correctly or skipped with exactly
one warning that names it; nothing may raise anything but UsageError, hang, or allocate GBs.
"""

from __future__ import annotations

import io
import os
import re
import resource
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from aigc_cli.data import cifar, folder, load_images
from aigc_cli.errors import UsageError

RES = 8


pytestmark = pytest.mark.usefixtures("no_network")  # data loading must stay offline


# ----------------------------------------------------------------------------- file makers


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A ~100-byte 1-bit PNG that declares width x height (only a few rows of data follow)."""
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * 4)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows)
            + png_chunk(b"IEND", b""))


def jpeg_bomb(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare width x height."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_bomb(width: int, height: int) -> bytes:
    """A WebP (VP8X) header declaring a width x height canvas."""
    vp8x = (b"VP8X" + struct.pack("<I", 10) + b"\0" * 4
            + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"))
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


@pytest.mark.parametrize("options", [{"lossless": True}, {"quality": 80}, {"quality": 80, "icc_profile": b"x" * 20}],
                         ids=["VP8L", "VP8", "VP8X"])
def test_the_webp_size_read_before_decoding_is_the_images(options):
    """The canvas size checked against the pixel limit before PIL opens a WebP, in each of its three headers;
    a wrong bit offset would pass bombs or refuse good files."""
    from aigc_cli.data.folder import _webp_size

    data = encode(Image.new("RGB", (37, 23), (1, 2, 3)), "WEBP", **options)
    assert _webp_size(data[:30]) == (37, 23)


def gif_bomb() -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    return bytes(data)


def noise(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def animated(fmt: str, **kw) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    return buf.getvalue()


def palette_png(transparency) -> bytes:
    """Left half palette index 0 (red), right half index 1 (green); `transparency` as PIL takes it."""
    img = Image.new("P", (16, 16), 0)
    img.paste(1, (8, 0, 16, 16))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    return encode(img, "PNG", **({} if transparency is None else {"transparency": transparency}))


def la_png() -> bytes:
    return encode(Image.new("LA", (16, 16), (200, 128)), "PNG")


def gray16_png() -> bytes:
    return encode(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)), "PNG")


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


# Kinds that decode: file name -> (bytes, expected RGB at the centre, tolerance)
DECODED = {
    "cmyk.jpg": (lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
                 (255, 0, 0), 6),  # cyan 0, magenta+yellow full ink: red (PIL stores Adobe-inverted)
    "cmyk_white.jpg": (lambda: encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", quality=95),
                       (255, 255, 255), 4),
    "palette.png": (lambda: palette_png(None), None, 0),             # checked by column below
    "palette_trns_index.png": (lambda: palette_png(0), None, 0),     # index 0 fully transparent
    "palette_trns_alpha.png": (lambda: palette_png(b"\x00\x80"), None, 0),  # per-index alpha
    "gray16.png": (gray16_png, (156, 156, 156), 0),                  # 40000 / 257 = 155.6
    "rgba.png": (lambda: encode(Image.new("RGBA", (16, 16), (200, 100, 50, 128)), "PNG"), (100, 50, 25), 1),
    "la.png": (la_png, (100, 100, 100), 1),
    "rgb_trns.png": (lambda: encode(Image.new("RGB", (16, 16), (10, 20, 30)), "PNG", transparency=(10, 20, 30)),
                     (0, 0, 0), 0),  # tRNS colour key: the whole image is transparent -> black
    "anim.gif": (lambda: animated("GIF"), (255, 0, 0), 0),
    "anim.webp": (lambda: animated("WEBP", lossless=True), (255, 0, 0), 0),
    "anim.png": (lambda: animated("PNG"), (255, 0, 0), 0),
    "mpo.jpg": (lambda: animated("MPO"), (255, 0, 0), 3),           # camera multi-picture JPEG
    "jpeg_named.png": (lambda: encode(Image.new("RGB", (16, 16), (0, 0, 200)), "JPEG", quality=95),
                       (0, 0, 200), 4),  # content decides, not the extension
    "one_bit.bmp": (lambda: encode(Image.new("1", (16, 16), 1), "BMP"), (255, 255, 255), 0),
    "png_without_iend.png": (lambda: encode(noise(), "PNG")[:-12], None, 0),  # all pixels present
}

# Kinds that are skipped: file name -> (bytes, regex the warning's reason must match)
SKIPPED = {
    "corrupt.png": (lambda: b"\x89PNG\r\n\x1a\n this is not a real png", "not a PNG"),
    "random_bytes.jpg": (lambda: np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                         "not a PNG"),
    "corrupt_idat.png": (lambda: (lambda d: d[:d.index(b"IDAT") + 100] + b"\xff" * 20
                                  + d[d.index(b"IDAT") + 120:])(encode(noise(), "PNG")), "."),
    "truncated.png": (lambda: truncated(encode(noise(), "PNG")), "truncated"),
    "truncated.jpg": (lambda: truncated(encode(noise(), "JPEG", quality=90)), "truncated"),
    "zero_bytes.png": (lambda: b"", "empty file"),
    "text.jpg": (lambda: b"just some notes, not a picture\n" * 10, "not a PNG"),
    "postscript.png": (lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "not a PNG"),
    "tiff_inside.png": (lambda: encode(noise(), "TIFF"), "not a PNG"),
    "bomb.png": (lambda: png_bomb(30000, 30000), "decompression bomb"),
    "bomb_between_limits.png": (lambda: png_bomb(10000, 10000), "10000x10000.*decompression bomb"),
    "bomb.jpg": (lambda: jpeg_bomb(30000, 30000), "decompression bomb"),
    "bomb.webp": (lambda: webp_bomb(12000, 10000), "12000x10000.*decompression bomb"),
    "bomb.gif": (gif_bomb, "decompression bomb"),
}


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def load(path: Path, **kw):
    got: list[str] = []
    data = load_images(str(path), channels=3, resolution=RES, warn=got.append, **kw)
    return data, got


def centre(data, i=0) -> list[int]:
    return data.images[i, :, RES // 2, RES // 2].tolist()


def close(actual, expected, tol) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(actual, expected))


# ----------------------------------------------------------------------------- decoded kinds


@pytest.mark.parametrize("name", sorted(DECODED))
def test_decoded_kinds(tmp_path, name):
    make, expected, tol = DECODED[name]
    write(tmp_path / "d" / name, make())
    data, got = load(tmp_path / "d")
    assert got == [] and data.images.shape == (1, 3, RES, RES)
    if expected is not None:
        assert close(centre(data), expected, tol), centre(data)


def test_palette_transparency_is_composited(tmp_path):
    for name in ("palette.png", "palette_trns_index.png", "palette_trns_alpha.png"):
        write(tmp_path / name / name, DECODED[name][0]())
    columns = {}
    for name in ("palette.png", "palette_trns_index.png", "palette_trns_alpha.png"):
        data = load_images(str(tmp_path / name), channels=3, resolution=16)  # native size: no resampling
        columns[name] = (data.images[0, :, 8, 2].tolist(), data.images[0, :, 8, 13].tolist())
    assert columns["palette.png"] == ([255, 0, 0], [0, 255, 0])
    assert columns["palette_trns_index.png"] == ([0, 0, 0], [0, 255, 0])    # index 0 transparent
    left, right = columns["palette_trns_alpha.png"]
    assert left == [0, 0, 0] and close(right, [0, 128, 0], 1)            # alpha 128 over black


def test_16bit_grey_keeps_its_range(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)       # 0 .. 65520
    write(tmp_path / "g" / "ramp16.png", encode(Image.fromarray(ramp), "PNG"))
    data = load_images(str(tmp_path / "g"), channels=1, resolution=8)
    assert np.array_equal(data.images[0, 0].numpy(), np.rint(ramp / 257).astype(np.uint8))


def test_png_missing_only_its_end_marker_is_exact(tmp_path):
    img = noise((8, 8), seed=3)
    write(tmp_path / "p" / "x.png", encode(img, "PNG")[:-12])
    data, got = load(tmp_path / "p")
    assert got == [] and np.array_equal(data.images[0].permute(1, 2, 0).numpy(), np.asarray(img))


# ----------------------------------------------------------------------------- skipped kinds


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_skipped_kinds(tmp_path, name):
    make, reason = SKIPPED[name]
    write(tmp_path / "d" / name, make())
    write(tmp_path / "d" / "ok.png", encode(Image.new("RGB", (8, 8), (1, 2, 3)), "PNG"))
    data, got = load(tmp_path / "d")
    assert data.images.shape == (1, 3, RES, RES) and centre(data) == [1, 2, 3]
    assert len(got) == 2, got
    assert got[0].startswith(f"skipping {name}: ") and re.search(reason, got[0]), got[0]
    assert str(tmp_path) not in got[0]  # relative path only
    assert "skipped 1 of 2 files" in got[1]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bombs_are_rejected_from_the_header(tmp_path):
    for name in ("bomb.png", "bomb_between_limits.png", "bomb.jpg", "bomb.webp", "bomb.gif"):
        write(tmp_path / "b" / name, SKIPPED[name][0]())
        assert (tmp_path / "b" / name).stat().st_size < 2000  # small file, huge image
    write(tmp_path / "b" / "ok.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    filters = list(warnings.filters)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    data, got = load(tmp_path / "b")
    # Decoding any of them would need 100 MB - 4 GB; the peak must not move anywhere near that.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024
    assert data.images.shape[0] == 1 and len(got) == 6
    assert all("decompression bomb" in line for line in got[:5])
    assert "skipped 5 of 6 files" in got[5]
    assert warnings.filters == filters  # no global warning filters touched (threads)


def test_own_pixel_limit_applies_below_pils(tmp_path, monkeypatch):
    monkeypatch.setattr(folder, "MAX_IMAGE_PIXELS", 100)
    write(tmp_path / "d" / "big.png", encode(Image.new("RGB", (11, 10)), "PNG"))
    write(tmp_path / "d" / "small.png", encode(Image.new("RGB", (10, 10)), "PNG"))
    data, got = load(tmp_path / "d")
    assert data.images.shape[0] == 1
    assert got[0].startswith("skipping big.png: declares 11x10 = 110 pixels, over the limit of 100")


def test_special_files_are_skipped_not_waited_on(tmp_path):
    d = tmp_path / "d"
    write(d / "ok.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    os.symlink(tmp_path / "nowhere.png", d / "dangling.png")
    if hasattr(os, "mkfifo"):
        os.mkfifo(d / "fifo.png")  # open() on a FIFO would block forever
    data, got = load(d)
    assert data.images.shape[0] == 1
    assert any(line.startswith("skipping dangling.png: ") for line in got)
    if hasattr(os, "mkfifo"):
        assert "skipping fifo.png: not a regular file" in got


def test_every_bad_file_gets_exactly_one_line_and_a_count(tmp_path):
    d = tmp_path / "all"
    for name, (make, _) in SKIPPED.items():
        write(d / name, make())
    for name, (make, _, _) in DECODED.items():
        write(d / name, make())
    for i in range(30):  # more bad files than any cap on warning lines would allow
        write(d / "many" / f"bad{i:02d}.png", b"")
    write(d / "bad\nname.png", b"junk")  # a newline in a file name must not split the line
    bad = sorted(list(SKIPPED) + [f"many{os.sep}bad{i:02d}.png" for i in range(30)] + ["bad\\nname.png"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        data, got = load(d)
    assert data.images.shape == (len(DECODED), 3, RES, RES)
    assert len(got) == len(bad) + 1 and all("\n" not in line for line in got)
    named = [re.match(r"skipping (.*?): ", line).group(1) for line in got[:-1]]
    assert named == bad  # one line each, in sorted order
    assert got[-1] == f"skipped {len(bad)} of {len(bad) + len(DECODED)} files under {d} (unreadable or not images)"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_limit_stops_judging_files_once_enough_decode(tmp_path):
    d = tmp_path / "d"
    for i in range(5):
        write(d / f"{i}_ok.png", encode(Image.new("L", (8, 8), i), "PNG"))
    write(d / "9_bad.png", b"")
    data, got = load(d, limit=3)
    assert data.images.shape[0] == 3 and got == []


# ----------------------------------------------------------------------------- strict and all-bad


def test_strict_raises_on_the_first_bad_file(tmp_path):
    d = tmp_path / "d"
    write(d / "a_ok.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    write(d / "b_truncated.jpg", truncated(encode(noise(), "JPEG")))
    write(d / "c_empty.png", b"")
    got: list[str] = []
    with pytest.raises(UsageError) as err:
        load_images(str(d), channels=3, resolution=RES, warn=got.append, strict=True)
    message = str(err.value)
    assert "b_truncated.jpg" in message and "truncated" in message and "--strict" in message
    assert "c_empty.png" not in message and "\n" not in message and got == []
    good = tmp_path / "good"
    write(good / "x.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    assert load_images(str(good), channels=3, resolution=RES, strict=True).images.shape[0] == 1


def test_all_bad_folder_is_a_usage_error(tmp_path):
    d = tmp_path / "d"
    for name in ("a.png", "b.jpg", "c.webp"):
        write(d / name, b"not an image")
    got: list[str] = []
    with pytest.raises(UsageError, match=r"none of the 3 image files .* could be read \(all 3 rejected"):
        load_images(str(d), channels=3, resolution=RES, warn=got.append)
    assert len(got) == 4 and "skipped 3 of 3" in got[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="no images"):
        load_images(str(empty), channels=3, resolution=RES)


def test_unicode_and_space_paths(tmp_path):
    d = tmp_path / "my data"
    write(d / "café ünïcode" / "🙂 cat.png", encode(Image.new("RGB", (12, 12), (10, 200, 30)), "PNG"))
    write(d / "with space" / "a b.jpg", encode(Image.new("RGB", (12, 12), (200, 10, 30)), "JPEG", quality=95))
    write(d / "with space" / "ünï bad.png", b"")
    data, got = load(d)
    assert data.images.shape[0] == 2 and data.num_classes == 2 and data.labels.tolist() == [0, 1]
    assert centre(data, 0) == [10, 200, 30] and close(centre(data, 1), [200, 10, 30], 4)
    assert got[0] == f"skipping with space{os.sep}ünï bad.png: empty file (0 bytes)"


# ----------------------------------------------------------------------------- CIFAR-10 binary


@pytest.fixture
def small_cifar(monkeypatch):
    """Batch files of 4 records (the real ones hold 10000): random pixels and labels."""
    monkeypatch.setattr(cifar, "RECORDS_PER_FILE", 4)
    rng = np.random.default_rng(7)
    return {name: rng.integers(0, 256, (4, cifar.RECORD_BYTES), dtype=np.uint8)
            for names in cifar.FILES.values() for name in names}


def write_cifar(folder: Path, records: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, recs in records.items():
        recs = recs.copy()
        recs[:, 0] %= 10
        (folder / name).write_bytes(recs.tobytes())
    return folder


def expected_cifar(records, split):
    recs = np.concatenate([records[name] for name in cifar.FILES[split]])
    return recs[:, 1:].reshape(-1, 3, 32, 32), (recs[:, 0] % 10).astype(np.int64)


def test_cifar_binary_exact_pixels_and_labels(tmp_path, small_cifar):
    write_cifar(tmp_path / "cifar-10-batches-bin", small_cifar)
    for split, n in (("train", 20), ("test", 4)):
        data = load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split=split)
        images, labels = expected_cifar(small_cifar, split)
        assert data.images.shape == (n, 3, 32, 32) and data.images.is_contiguous()
        assert np.array_equal(data.images.numpy(), images)
        assert data.labels.tolist() == labels.tolist() and data.num_classes == 10
        assert data.name == f"cifar10 ({split}, {n} images)"
    # The R plane comes first: a record whose first 1024 pixel bytes are 255 is pure red.
    red = np.zeros((4, cifar.RECORD_BYTES), dtype=np.uint8)
    red[:, 1:1025] = 255
    write_cifar(tmp_path / "red" / "cifar10" / "cifar-10-batches-bin", {**small_cifar, "test_batch.bin": red})
    data = load_images("cifar10", channels=3, resolution=16, root=str(tmp_path / "red"), split="test")
    assert (data.images[:, 0] == 255).all() and (data.images[:, 1:] == 0).all()


def test_cifar_binary_folder_as_source(tmp_path, small_cifar):
    d = write_cifar(tmp_path / "anywhere" / "cifar-10-batches-bin", small_cifar)
    data = load_images(str(d), channels=1, resolution=16, split="test", limit=3)
    assert data.images.shape == (3, 1, 16, 16) and data.num_classes == 10
    assert data.name == f"CIFAR-10 folder {d} (test, 3 images)"
    full = load_images(str(d), channels=3, resolution=32)
    assert np.array_equal(full.images.numpy(), expected_cifar(small_cifar, "train")[0])


def test_cifar_binary_damaged_files(tmp_path, small_cifar):
    d = write_cifar(tmp_path / "cifar-10-batches-bin", small_cifar)
    path = d / "data_batch_3.bin"
    good = path.read_bytes()
    for blob, words in ((good[:-1], "truncated"), (good[:100], "truncated"), (b"", "truncated"),
                        (good + b"\0", "longer than expected")):
        path.write_bytes(blob)
        with pytest.raises(UsageError, match=f"data_batch_3.bin is {words}.*--download"):
            load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    bad_label = bytearray(good)
    bad_label[cifar.RECORD_BYTES] = 10  # second record's label
    path.write_bytes(bytes(bad_label))
    with pytest.raises(UsageError, match="data_batch_3.bin has label 10"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    path.unlink()
    with pytest.raises(UsageError, match="lacks data_batch_3.bin"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    path.mkdir()  # a folder by that name: the same, where the cache key's hashing said "4: Is a directory"
    with pytest.raises(UsageError, match="lacks data_batch_3.bin"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    path.rmdir()
    # The test split needs only test_batch.bin.
    assert load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split="test").images.shape[0] == 4


def test_cifar_python_version_only_is_explained(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04 not to be loaded")
    with pytest.raises(UsageError) as err:
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path))
    message = str(err.value)
    assert str(py) in message and "binary version" in message and "--download" in message
    assert "cifar-10-binary.tar.gz" in message and f"into {tmp_path}" in message and "\n" not in message


def test_cifar_download_fetches_the_binary_archive(tmp_path, small_cifar, monkeypatch):
    calls = []

    def fake_fetch(url, root, filename, md5):
        calls.append((url, root, filename, md5))
        write_cifar(Path(root) / "cifar-10-batches-bin", small_cifar)

    monkeypatch.setattr(cifar, "_fetch", fake_fetch)
    (tmp_path / "cifar-10-batches-py").mkdir()  # ignored: the binary version is fetched instead
    data = load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=True)
    assert data.images.shape[0] == 20
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", str(tmp_path),
                      "cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530")]
    load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=True)
    assert len(calls) == 1  # already there: nothing fetched
    # What a cut-short unpacking leaves (a batch missing, one truncated): --download repairs it. It used to
    # say "lacks data_batch_2.bin; fetch the data set (`--data cifar10 --download`)", the command just run.
    batches = tmp_path / "cifar-10-batches-bin"
    (batches / "data_batch_2.bin").unlink()
    for download in (False, True):
        if not download:
            with pytest.raises(UsageError, match="lacks data_batch_2.bin"):
                load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=False)
        else:
            assert load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), download=True).images.shape[0] == 20
    assert len(calls) == 2
    (batches / "test_batch.bin").write_bytes(b"cut")
    assert load_images("cifar10", channels=3, resolution=32, root=str(tmp_path), split="test", download=True).images.shape[0] == 4
    assert len(calls) == 3

    def failing_fetch(url, root, filename, md5):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(cifar, "_fetch", failing_fetch)
    with pytest.raises(UsageError, match="could not download cifar10 .*File not found or corrupted"):
        load_images("cifar10", channels=3, resolution=32, root=str(tmp_path / "fresh" / "data"), download=True)
    assert not (tmp_path / "fresh").exists()  # the folders made for the download went with it


def test_a_failed_mnist_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    (tmp_path / "mine").mkdir()
    with pytest.raises(UsageError, match="could not download mnist file .*name resolution"):
        load_images("mnist", channels=1, resolution=28, root=str(tmp_path / "mine" / "root"), download=True)
    assert os.listdir(tmp_path / "mine") == []  # root/MNIST/raw was left behind; the user's folder stays


def test_mnist_download_fetches_only_what_is_missing_or_cut_short(tmp_path, monkeypatch):
    # An interrupted download (a file missing, one cut short) used to stay broken: --download saw the folder
    # and fetched nothing, and the read error said to re-download.
    import gzip

    import torchvision.datasets.utils as tv_utils

    from aigc_cli.data import torchvision_sources
    from aigc_cli.data.idx import intact
    from test_data import idx_bytes

    rng = np.random.default_rng(4)
    contents = {"train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
                "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
                "train-labels-idx1-ubyte": rng.integers(0, 10, 6).astype(np.uint8),
                "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3).astype(np.uint8)}
    fetched = []

    def fake(url, download_root, filename, md5):  # torchvision's: fetch (when the .gz is not intact) and unpack
        fetched.append(filename)
        name = filename.removesuffix(".gz")
        with gzip.open(os.path.join(download_root, filename), "wb") as f:
            f.write(idx_bytes(contents[name]))
        Path(download_root, name).write_bytes(idx_bytes(contents[name]))

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake)
    raw = tmp_path / "MNIST" / "raw"
    assert load_images("mnist", channels=1, resolution=28, root=str(tmp_path), download=True).images.shape[0] == 6
    assert sorted(fetched) == sorted(f"{name}.gz" for name in torchvision_sources.UNPACKED)
    fetched.clear()
    load_images("mnist", channels=1, resolution=28, root=str(tmp_path), download=True)
    assert fetched == []  # all there and whole
    for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte"):
        (raw / name).unlink()  # a file gone both ways, and one whose .gz is left
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes((raw / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-9])  # cut short
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(contents["t10k-images-idx3-ubyte"])[:-1])  # its .gz whole
    assert not intact(str(raw / "t10k-images-idx3-ubyte")) and intact(str(raw / "train-images-idx3-ubyte"))
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte is truncated"):
        load_images("mnist", channels=1, resolution=28, root=str(tmp_path), split="test")
    data = load_images("mnist", channels=1, resolution=28, root=str(tmp_path), download=True, split="test")
    assert data.images.shape[0] == 3 and data.labels.tolist() == contents["t10k-labels-idx1-ubyte"].tolist()
    assert sorted(fetched) == ["t10k-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert not (raw / "t10k-images-idx3-ubyte").exists()  # the cut-short unpacking went; its whole .gz is read
    # Only .gz files, whole (Debian's recompressed ones, whose MD5s are not torchvision's): used as they are
    fetched.clear()
    for name in torchvision_sources.UNPACKED:
        (raw / name).unlink(missing_ok=True)
    assert load_images("mnist", channels=1, resolution=28, root=str(tmp_path), download=True).images.shape[0] == 6
    assert fetched == []


def test_builtin_sources_stay_offline_without_download(tmp_path):
    # The autouse fixture makes any connection attempt fail the test.
    for source in ("mnist", "cifar10"):
        with pytest.raises(UsageError, match="--download"):
            load_images(source, channels=1, resolution=28, root=str(tmp_path), download=False)


def test_data_package_never_unpickles():
    data_dir = Path(cifar.__file__).parent
    for path in data_dir.glob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "pickle" in line:
                assert "#" in line and line.index("#") < line.index("pickle"), f"{path}:{number}: {line}"
            assert not re.search(r"torch\.load\(|datasets\.CIFAR10|CIFAR10\(", line), f"{path}:{number}: {line}"


# ----------------------------------------------------------------------------- folders


def test_pils_bomb_warning_between_its_limits_is_not_printed(tmp_path):
    import subprocess
    import sys

    # In a process of its own: pytest resets warning filters around every test, a real run does not.
    write(tmp_path / "b" / "bomb_between_limits.png", png_bomb(10000, 9500))
    write(tmp_path / "b" / "ok.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    code = ("import sys; from aigc_cli.data import load_images; "
            f"d = load_images({str(tmp_path / 'b')!r}, channels=3, resolution=8, cache=False, "
            "warn=lambda m: print('warning:', m, file=sys.stderr)); print(len(d.images))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "1\n", r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "decompression bomb" in lines[0] and "skipped 1 of 2" in lines[1], r.stderr


def test_16bit_grey_transparency_key_is_composited_on_black(tmp_path):
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 30000
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", transparency=65535)
    write(tmp_path / "g" / "trns16.png", buf.getvalue())
    data = load_images(str(tmp_path / "g"), channels=1, resolution=8)
    assert data.images[0, 0, 0].tolist() == [117] * 4 + [0] * 4  # 30000/257 kept, the key's pixels black


def test_linked_class_folders_are_followed_once_and_loops_end(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "cats"
    for i in range(2):
        write(elsewhere / f"{i}.png", encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"))
    d = tmp_path / "d"
    write(d / "dogs" / "0.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    os.symlink(elsewhere, d / "cats")
    os.symlink(d, d / "dogs" / "loop")  # back to the top: listed once, then noted
    data, got = load(d)
    assert data.class_names == ("cats", "dogs") and data.labels.tolist() == [0, 0, 1]
    assert got == ["skipping folder dogs/loop/: the same folder as one listed already (through a link)"]
    assert load(d, strict=True)[0].class_names == ("cats", "dogs")  # a folder seen twice is no bad file
    # Two paths to one folder: the real one is kept whatever order the file system lists them in.
    for name in ("a_link", "z_link"):
        os.symlink(d / "dogs", d / name)
    data, got = load(d)
    assert data.class_names == ("cats", "dogs") and len(got) == 3 and all("(through a link)" in g for g in got)
    assert {g.split(":")[0] for g in got} == {"skipping folder dogs/loop/", "skipping folder a_link/",
                                              "skipping folder z_link/"}


def test_a_link_in_one_class_folder_never_moves_another_class_images_into_it(tmp_path):
    # a/shortcut -> ../z/inner: depth-first, a/shortcut came before z/inner, so z's images were labelled a
    d = tmp_path / "d"
    write(d / "a" / "a1.png", encode(Image.new("RGB", (8, 8), (1, 0, 0)), "PNG"))
    write(d / "z" / "z1.png", encode(Image.new("RGB", (8, 8), (2, 0, 0)), "PNG"))
    for i in (3, 4):
        write(d / "z" / "inner" / f"z{i}.png", encode(Image.new("RGB", (8, 8), (i, 0, 0)), "PNG"))
    os.symlink(d / "z" / "inner", d / "a" / "shortcut")
    data, got = load(d)
    assert data.class_names == ("a", "z")
    assert data.images[:, 0, 0, 0].tolist() == [1, 3, 4, 2] and data.labels.tolist() == [0, 1, 1, 1]  # by path
    assert got == ["skipping folder a/shortcut/: the same folder as one listed already (through a link)"]


def test_unreadable_subfolders_are_named_and_strict_stops(tmp_path, monkeypatch):
    d = tmp_path / "d"
    for cls in ("cats", "dogs"):
        write(d / cls / "0.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    real = os.scandir

    def scandir(path="."):  # what a folder without read permission gives (root would read it anyway)
        if not isinstance(path, int) and os.fspath(path).endswith("dogs"):  # an int: rmtree's own, by descriptor
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    data, got = load(d, cache=False)
    assert data.class_names == ("cats",) and got == ["skipping folder dogs/: Permission denied"]
    with pytest.raises(UsageError, match="cannot use folder dogs/: Permission denied"):
        load(d, cache=False, strict=True)
    with pytest.raises(UsageError, match="cannot read the image folder .*/d/dogs: Permission denied"):
        load(d / "dogs", cache=False)


def test_evaluation_folders_skip_a_fifo_instead_of_waiting_on_it(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "fakes"
    for i in range(3):
        write(d / f"{i}.png", encode(Image.new("RGB", (8, 8), (i, i, i)), "PNG"))
    os.mkfifo(d / "zz.png")
    code = ("import sys; from aigc_cli.data.native import load_folder_native; "
            f"x = load_folder_native({str(d)!r}, warn=lambda m: print(m, file=sys.stderr)); print(len(x))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "3\n", r.stderr
    assert r.stderr.splitlines() == ["skipping zz.png: not a regular file",
                                     f"skipped 1 of 4 files under {d} (unreadable or not images)"], r.stderr


def test_images_of_types_aigc_does_not_read_are_said_not_silently_left_out(tmp_path):
    d = tmp_path / "d"
    for name in ("a.png", "b.JFIF", "c.jpe"):
        write(d / name, encode(Image.new("RGB", (8, 8), (9, 0, 0)), "JPEG" if name != "a.png" else "PNG"))
    for name in ("scan.tif", "sub/photo.HEIC", "sub/x.tiff", "notes.txt"):
        write(d / name, b"whatever")
    data, got = load(d)
    assert len(data.images) == 3  # .jfif and .jpe are JPEG
    assert got == ["left out 3 files of types aigc does not read (.heic, .tif, .tiff); convert them to PNG or JPEG"]
    with pytest.raises(UsageError, match=r"^cannot use image file scan.tif: aigc does not read .tif files; convert"):
        load(d, strict=True)
    only = tmp_path / "only"
    write(only / "x.tif", b"whatever")
    got = []
    with pytest.raises(UsageError, match="no images"):
        load_images(str(only), channels=3, resolution=8, warn=got.append)
    assert got == ["left out 1 file of a type aigc does not read (.tif); convert it to PNG or JPEG"]


def test_exif_orientation_is_applied(tmp_path):
    # A phone photo stored landscape with Orientation=6 (rotate 90 degrees clockwise to view): without
    # exif_transpose it would train sideways.
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 16, 16))  # red on the left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=100)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "photo.jpg").write_bytes(buf.getvalue())
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert expected.shape == (32, 16, 3)  # upright: taller than wide, red on top
    data = load_images(str(tmp_path / "d"), channels=3, resolution=16, warn=lambda s: None)
    red = data.images[0, 0].float()
    assert red[:8].mean() > 200 and red[8:].mean() < 50  # the centre crop of the upright image: red above


def test_hidden_subfolders_are_left_out(tmp_path):
    for folder in ("cats", "dogs", ".ipynb_checkpoints", "cats/.thumbs"):
        (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / folder / "x.png")
    data = load_images(str(tmp_path / "d"), channels=3, resolution=8, warn=lambda s: None)
    assert data.class_names == ("cats", "dogs") and len(data.images) == 2
