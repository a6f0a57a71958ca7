"""The decoded-image cache: a rerun reads instead of decoding; any change to the files or the
conversion misses; damaged entries are rebuilt; an unwritable cache only warns; cache=False."""

from __future__ import annotations

import gzip
import io
import os
import struct
import time

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_cli.data import cache, folder, idx, load_images
from aigc_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("no_network")

RES = 8
OLD = time.time() - 3600  # files written an hour ago: not "racy" (see cache.RACY_NS)


def age(path, when=OLD):
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for i in range(6):
        sub = d / ("cats" if i < 4 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (d / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    age(d)
    return d


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of the folder decoder."""
    calls = []
    real = folder.decode

    def counting(path, resolution):
        calls.append(os.path.basename(path))
        return real(path, resolution)

    monkeypatch.setattr(folder, "decode", counting)
    return calls


def entries():
    d = cache.decoded_dir()
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def load(path, **kw):
    warnings = []
    data = load_images(str(path), channels=kw.pop("channels", 3), resolution=RES, warn=warnings.append, **kw)
    return data, warnings


def test_second_load_reads_the_cache_and_replays_warnings(photos, monkeypatch, private_cache_dir):
    first, warned = load(photos)
    assert not first.cached and len(entries()) == 1
    assert entries()[0].endswith(".safetensors") and cache.decoded_dir().startswith(str(private_cache_dir))
    assert len(warned) == 2 and "broken.png" in warned[0] and "skipped 1 of 7" in warned[1]

    def no_decoding(path, resolution):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "decode", no_decoding)
    second, warned_again = load(photos)
    assert second.cached and warned_again == warned
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)
    assert (second.name, second.num_classes, second.class_names) == (first.name, 2, ("cats", "dogs"))
    assert second.images.dtype == torch.uint8 and second.images.is_contiguous()
    # "test" of a folder is the same images: it shares the entry
    assert load(photos, split="test")[0].cached
    # The images were read into memory, not mapped: another process truncating or replacing the
    # entry now cannot touch them (a mapped file would kill this process with SIGBUS here).
    open(os.path.join(cache.decoded_dir(), entries()[0]), "wb").close()
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)


def test_changed_added_removed_file_or_other_conversion_misses(photos, decodes):
    load(photos)
    assert len(decodes) == 7
    changes = {
        "changed": lambda: (Image.new("RGB", (12, 10), (1, 2, 3)).save(photos / "dogs" / "5.png"),
                            age(photos / "dogs" / "5.png", OLD + 10)),
        "added": lambda: (Image.new("RGB", (9, 9), (7, 7, 7)).save(photos / "dogs" / "6.png"), age(photos)),
        "removed": lambda: (photos / "cats" / "0.png").unlink(),
    }
    for what, change in changes.items():
        decodes.clear()
        change()
        data, _ = load(photos)
        assert not data.cached and decodes, what
        assert load(photos)[0].cached, what  # and the new state is cached in turn
    assert len(data.images) == 6 and data.images[-1, :, 0, 0].tolist() == [7, 7, 7]
    for other in ({"channels": 1}, {"limit": 3}):
        assert not load(photos, **other)[0].cached, other
    assert len(entries()) == 6


def test_damaged_entry_is_ignored_with_a_warning_and_rebuilt(photos):
    good, _ = load(photos)
    (name,) = entries()
    path = os.path.join(cache.decoded_dir(), name)
    whole = open(path, "rb").read()
    for damage in (whole[:len(whole) // 2], b"not safetensors at all", b""):
        with open(path, "wb") as f:
            f.write(damage)
        data, warned = load(photos)
        assert not data.cached and torch.equal(data.images, good.images)
        assert warned[0].startswith(f"ignoring damaged decoded-image cache file {path} (")
        assert "\n" not in warned[0]
        assert load(photos)[0].cached  # rebuilt


def test_entry_with_wrong_contents_is_rebuilt(photos):
    load(photos)
    (name,) = entries()
    from safetensors.torch import save_file

    # a well-formed file under the right name whose metadata belongs to another entry
    save_file({"images": torch.zeros(1, 3, RES, RES, dtype=torch.uint8)},
              os.path.join(cache.decoded_dir(), name), metadata={"aigc.decoded": '{"key": "other"}'})
    data, warned = load(photos)
    assert not data.cached and len(data.images) == 6 and "does not match" in warned[0]


@pytest.mark.parametrize("label", [2, -1])
def test_an_entry_with_labels_outside_its_classes_is_rebuilt(photos, label):
    """Well formed, so it passed every check: a 2-class folder trained as 8 classes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    good, _ = load(photos)
    path = os.path.join(cache.decoded_dir(), entries()[0])
    with safe_open(path, "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["labels"][3] = label
    save_file(tensors, path, metadata=meta)
    data, warned = load(photos)
    assert not data.cached and torch.equal(data.labels, good.labels) and data.num_classes == 2
    assert "labels outside 0..1" in warned[0]


def test_cache_false_neither_reads_nor_writes(photos, decodes):
    load(photos, cache=False)
    assert entries() == []
    load(photos)
    decodes.clear()
    assert not load(photos, cache=False)[0].cached and len(decodes) == 7


def test_unwritable_cache_folder_only_warns(photos, monkeypatch, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("the cache folder cannot be created under a file")
    monkeypatch.setenv("AIGC_CACHE_DIR", str(blocker))
    data, warned = load(photos)
    assert len(data.images) == 6 and not data.cached
    assert warned[-1].startswith(f"cannot write the decoded-image cache in {blocker}") and "\n" not in warned[-1]


def test_the_cache_stays_under_its_size_limit_removing_what_was_used_longest_ago(tmp_path, monkeypatch, decodes):
    rng = np.random.default_rng(1)
    folders = []
    for name in "abcd":
        d = tmp_path / name
        d.mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(d / f"{i}.png")
        age(d)
        folders.append(d)
    a, b, c, d = folders
    load(a)
    size = os.path.getsize(os.path.join(cache.decoded_dir(), entries()[0]))
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", repr(2.5 * size / 2**30))  # room for two entries, not three
    load(b)
    assert len(entries()) == 2
    for i, path in enumerate(os.path.join(cache.decoded_dir(), e) for e in entries()):
        os.utime(path, (OLD + i, OLD + i))  # distinct last uses, whatever the clock's resolution
    first_of_a = load(a)[0]  # a hit marks a as used now: b, used before it, goes first
    assert first_of_a.cached
    _, warned = load(c)
    assert len(entries()) == 2 and any("removed 1 entry used longest ago" in w and "AIGC_CACHE_MAX_GB=" in w
                                       for w in warned), warned
    decodes.clear()
    assert load(a)[0].cached and not load(b)[0].cached and decodes  # b was decoded again
    # An entry larger than the whole limit is not written (nor does it empty the cache for nothing).
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", repr(0.5 * size / 2**30))
    before = entries()
    _, warned = load(d)
    assert entries() == before and any("not caching the decoded images" in w for w in warned), warned
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", "0")  # no limit
    load(d)
    assert len(entries()) == len(before) + 1


def test_making_room_counts_past_an_entry_another_run_removed_and_clears_killed_writes(tmp_path, monkeypatch):
    folder = tmp_path / "decoded"
    folder.mkdir()
    for i in range(5):
        f = folder / f"{i:064x}.safetensors"
        f.write_bytes(b"x" * 1000)
        os.utime(f, (OLD + i, OLD + i))
    dead = folder / f".{5:064x}.safetensors.0123abcd.tmp"  # a kill -9 during a write: as large as an entry
    dead.write_bytes(b"x" * 1000)
    age(dead)
    real_scandir = os.scandir

    class Gone:  # listed, then removed by another run before its stat
        name, path = f"{9:064x}.safetensors", str(folder / f"{9:064x}.safetensors")

        def stat(self, follow_symlinks=True):
            raise FileNotFoundError(2, "No such file or directory", self.path)

    class Listing:
        def __init__(self, path):
            with real_scandir(path) as it:
                self.entries = [Gone(), *it]

        def __iter__(self):
            return iter(self.entries)

        def __enter__(self):
            return self.entries

        def __exit__(self, *exc):
            pass

    with monkeypatch.context() as m:  # os.scandir of every module: only around the call
        m.setattr(cache.os, "scandir", Listing)
        count, freed = cache._make_room(str(folder), 1000, 3000)  # room for 2 of the 5, and the new one
    assert (count, freed) == (3, 3000) and not dead.exists()
    assert sorted(p.name for p in folder.iterdir()) == [f"{3:064x}.safetensors", f"{4:064x}.safetensors"]


def test_an_entry_removed_by_another_run_between_check_and_read_is_a_quiet_miss(photos, monkeypatch):
    load(photos)
    real_read = cache.safetensors_file.read_whole

    def removed_first(path):
        os.unlink(path)  # another run making room, just after this one saw the file
        return real_read(path)

    monkeypatch.setattr(cache.safetensors_file, "read_whole", removed_first)
    data, warned = load(photos)
    assert not data.cached and not any("damaged" in w for w in warned), warned


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_cache_size_limit_that_is_no_size_is_one_error_before_decoding(photos, monkeypatch, decodes, value):
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", value)
    with pytest.raises(UsageError, match="AIGC_CACHE_MAX_GB=.*expected a size in GB"):
        load(photos)
    assert decodes == []


def test_files_modified_just_now_are_not_cached(photos):
    Image.new("RGB", (8, 8)).save(photos / "dogs" / "new.png")  # mtime: now
    load(photos)
    assert entries() == []
    age(photos)
    load(photos)
    assert len(entries()) == 1


@pytest.fixture
def hashes(monkeypatch):
    """Counts the files whose bytes the cache key reads."""
    calls = []
    real = cache.file_digest

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(cache, "file_digest", counting)
    return calls


def test_unchanged_folder_is_looked_up_without_reading_a_file(photos, hashes):
    load(photos)
    assert len(hashes) == 7  # first sight: every file is read once for its hash
    hashes.clear()
    assert load(photos)[0].cached and hashes == []  # the index: one stat per file


def test_copied_or_touched_files_still_find_the_entry(photos, decodes, hashes, tmp_path):
    import shutil

    first, warned = load(photos)
    elsewhere = tmp_path / "scratch" / "copy of photos"
    shutil.copytree(photos, elsewhere, copy_function=shutil.copyfile)  # new inodes and mtimes
    age(elsewhere, OLD + 50)
    decodes.clear(), hashes.clear()
    copy, warned_copy = load(elsewhere)
    assert copy.cached and decodes == [] and len(hashes) == 7 and len(entries()) == 1
    assert torch.equal(copy.images, first.images) and torch.equal(copy.labels, first.labels)
    assert copy.name == f"folder {elsewhere} (6 images, 2 classes)"  # this folder, not the first one
    assert warned_copy[0] == warned[0] and warned_copy[1] == f"skipped 1 of 7 files under {elsewhere} (unreadable or not images)"
    age(photos, OLD + 100)  # `touch`: same bytes
    decodes.clear()
    assert load(photos)[0].cached and decodes == []


def test_replayed_warnings_change_only_the_folder_in_the_summary(tmp_path, monkeypatch, photos):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(photos, tmp_path / "a")  # relative names that also occur inside file names
    age(tmp_path / "a")
    _, first = load("a")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    age(tmp_path / "c", OLD + 5)
    copy, replayed = load("c")
    assert copy.cached
    assert replayed == [first[0], "skipped 1 of 7 files under c (unreadable or not images)"]
    assert first[0] == "skipping cats/broken.png: " + first[0].split(": ", 1)[1]


def test_fresh_copy_reads_the_entry_but_writes_nothing(photos, decodes, tmp_path):
    import shutil

    load(photos)
    before = (entries(), sorted(os.listdir(cache.index_dir())))
    shutil.copytree(photos, tmp_path / "fresh", copy_function=shutil.copyfile)  # mtimes: now
    decodes.clear()
    assert load(tmp_path / "fresh")[0].cached and decodes == []
    assert (entries(), sorted(os.listdir(cache.index_dir()))) == before


def test_a_file_changed_while_decoding_is_not_stored(photos, monkeypatch):
    real = folder.decode
    changed = []

    def racing(path, resolution):
        if not changed:  # another process rewrites a file after it was hashed, before the entry is written
            target = photos / "dogs" / "5.png"
            Image.new("RGB", (12, 10), (9, 9, 9)).save(target)
            age(target, OLD + 20)
            changed.append(target)
        return real(path, resolution)

    monkeypatch.setattr(folder, "decode", racing)
    load(photos)
    assert changed and entries() == []
    monkeypatch.setattr(folder, "decode", real)
    load(photos)  # a quiet second run stores it
    assert len(entries()) == 1


def test_a_file_added_after_the_key_was_made_is_not_stored(photos, monkeypatch):
    """A file that appears after the key was made is not decoded (the decoder takes the key's listing, not a
    second one), and the entry is not stored: the listing no longer matches the folder. Decoding a second
    listing made an entry whose key did not cover that file (it came back after the file was deleted)."""
    real = cache.make_key

    def then_add(*args, **kwargs):
        key = real(*args, **kwargs)
        Image.new("RGB", (12, 10), (9, 9, 9)).save(photos / "dogs" / "7.png")
        age(photos)
        return key

    monkeypatch.setattr(cache, "make_key", then_add)
    data, _ = load(photos)
    assert len(data.images) == 6 and entries() == []
    monkeypatch.setattr(cache, "make_key", real)
    data, _ = load(photos)  # the next run sees it, and stores it
    assert len(data.images) == 7 and len(entries()) == 1


def test_damaged_index_falls_back_to_hashing(photos, decodes):
    load(photos)
    for name in os.listdir(cache.index_dir()):
        with open(os.path.join(cache.index_dir(), name), "w") as f:
            f.write("not a digest")
    decodes.clear()
    assert load(photos)[0].cached and decodes == []


def test_fifo_in_a_folder_is_never_opened_for_its_hash(photos):
    os.mkfifo(photos / "cats" / "pipe.png")
    assert cache.file_digest(str(photos / "cats" / "pipe.png")) == "not-a-file"  # returns: did not block
    assert cache.file_digest(str(photos / "cats" / "absent.png")).startswith("error:")


def test_strict_does_not_trust_an_entry_with_skipped_files(photos):
    load(photos)
    with pytest.raises(UsageError, match="broken.png"):
        load(photos, strict=True)


def idx_folder(path, n=5):
    path.mkdir()
    rng = np.random.default_rng(3)
    for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                      ("labels-idx1", np.arange(n, dtype=np.uint8))):
        header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(path / f"train-{kind}-ubyte.gz", "wb") as f:
            f.write(header + arr.tobytes())
    age(path)
    return path


def test_idx_is_cached_only_when_converted(tmp_path, monkeypatch):
    d = idx_folder(tmp_path / "idx")
    plain = load_images(str(d), channels=1, resolution=28)
    assert entries() == [] and not plain.cached  # reading the files is as fast as a cache would be
    big = load_images(str(d), channels=3, resolution=32)
    assert len(entries()) == 1

    def no_parsing(path):
        raise AssertionError("parsed although cached")

    monkeypatch.setattr(idx, "read_idx", no_parsing)
    again = load_images(str(d), channels=3, resolution=32)
    assert again.cached and torch.equal(again.images, big.images) and again.labels.tolist() == [0, 1, 2, 3, 4]
    assert again.name == big.name == f"IDX folder {d} (train, 5 images)"


def test_a_file_rewritten_in_place_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    # What a chmod that makes an unreadable file readable looks like too: only the ctime changes.
    d = tmp_path / "bmps"
    d.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a.bmp")
    Image.new("RGB", (8, 8), (0, 0, 0)).save(d / "b.bmp")
    age(d)
    first, _ = load(d)
    assert load(d)[0].cached and first.images[0, :, 0, 0].tolist() == [10, 20, 30]
    st = os.stat(d / "a.bmp")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buf, format="BMP")
    assert len(buf.getvalue()) == st.st_size
    with open(d / "a.bmp", "r+b") as f:  # same inode, same size
        f.write(buf.getvalue())
    os.utime(d / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime put back
    again, _ = load(d)
    assert not again.cached and again.images[0, :, 0, 0].tolist() == [200, 100, 50]


def test_a_limited_load_reads_only_the_files_it_uses_for_its_key(tmp_path, monkeypatch, decodes):
    """data.limit=N on a huge folder: the cache key hashed every file's bytes before the N were decoded."""
    d = tmp_path / "many"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    age(d)
    hashed = []
    real = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda path: hashed.append(os.path.basename(path)) or real(path))
    first = load_images(str(d), channels=3, resolution=RES, limit=5, warn=print)
    assert sorted(hashed) == [f"{i:02d}.png" for i in range(5)]
    assert load_images(str(d), channels=3, resolution=RES, limit=5, warn=print).cached
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(d / "29.png")  # beyond the limit
    age(d / "29.png", OLD + 10)
    again = load_images(str(d), channels=3, resolution=RES, limit=5, warn=print)
    assert not again.cached and torch.equal(again.images, first.images)  # its stat is in the key: decoded anew


def test_a_tilde_left_in_the_cache_and_data_variables_is_the_home_folder(monkeypatch, tmp_path):
    """`AIGC_CACHE_DIR="~/x"` (quoted, so the shell kept the ~) made a folder named "~" in the current one."""
    from aigc_cli.data.cache import cache_root
    from aigc_cli.data.torchvision_sources import default_root
    from aigc_cli.metrics.reference import default_stats_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AIGC_CACHE_DIR", "~/cache")
    monkeypatch.setenv("AIGC_DATA_ROOT", "~/data")
    assert cache_root() == str(tmp_path / "cache") and default_stats_dir() == tmp_path / "cache" / "stats"
    assert default_root() == str(tmp_path / "data")
    monkeypatch.delenv("AIGC_CACHE_DIR")
    assert cache_root() == str(tmp_path / ".cache" / "aigc")
