"""On-disk cache of decoded data sets, so a rerun on the same files starts at once.

One safetensors file per (file contents, conversion) pair under $AIGC_CACHE_DIR/decoded (default
~/.cache/aigc/decoded): tensors "images" (uint8 N,C,H,W) and, when labelled, "labels" (int64 N),
with the rest (class count and names, the description, the warnings the decode printed) as JSON in
the metadata. The file name is a SHA-256 over the files' relative names and the SHA-256 of their bytes
(under data.limit, of the first files only; the others by their size, times and inode), plus the
conversion parameters: changing, adding or removing a file changes the key, and the stale
entry is simply never read again, while a copy of the same files elsewhere (a job's local scratch
disk, say) or files merely touched still find it.

Hashing reads every file, which decoding would do anyway but a warm start should not: a small index
($AIGC_CACHE_DIR/decoded-index) maps a listing (the folder, each file's name, size, mtime, ctime and inode, as
git's index does) to the content key, so an unchanged folder costs one stat per file.

The cache is an optimisation only: a damaged entry is ignored with a warning and rebuilt, and a
cache folder that cannot be written gives one warning and the run goes on without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import safetensors_file
from ..files import atomic_write, remove_dead_temps_in
from ..errors import first_line

# Bump whenever decoding or conversion changes what a given file turns into, so that entries
# written by an older aigc are not reused. 3: a class folder none of whose files decode keeps its number.
# 4: a file directly in the folder that does not decode still means no labels.
FORMAT = 4
# A file modified this close to (or after) the moment it was listed could be modified again within
# the same timestamp tick (file systems keep mtimes at jiffy, not nanosecond, resolution) without
# its size or mtime changing; such listings are not cached ("racy git" problem, same remedy).
RACY_NS = 2_000_000_000
_META_KEY = "aigc.decoded"
ENTRY_NAME = r"[0-9a-f]{64}\.safetensors"  # _path's names: what room_for may remove from decoded_dir()


def cache_root() -> str:
    """$AIGC_CACHE_DIR, else ~/.cache/aigc; decoded data sets go in its "decoded" folder, statistics in
    "stats". A "~" the shell left (a quoted or `VAR=~/x` value) is the home folder, not a folder named "~"."""
    return os.path.expanduser(os.environ.get("AIGC_CACHE_DIR") or os.path.join("~", ".cache", "aigc"))


# Each cache folder (decoded images; eval's statistics) is kept under this many GiB ($AIGC_CACHE_MAX_GB;
# 0: no limit); the entries used longest ago go first. A decoded image folder is up to data.device_max_mb (4 GB
# by default; IDX and CIFAR-10 files are smaller), and a folder that changes between runs (a data set still
# growing) adds one per run: on a cluster's home quota the cache would otherwise fill it unseen.
DEFAULT_MAX_GB = 20.0


def max_bytes() -> int | None:
    """A cache folder's size limit in bytes (None: no limit); a value that is no size is a UsageError."""
    from ..errors import UsageError  # noqa: PLC0415

    raw = os.environ.get("AIGC_CACHE_MAX_GB", "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):  # NaN fails >= too
        raise UsageError(f"AIGC_CACHE_MAX_GB={raw!r}: expected a size in GB, e.g. 20 (0: no limit)")
    return int(gb * 2**30) if gb else None


def decoded_dir() -> str:
    return os.path.join(cache_root(), "decoded")


def index_dir() -> str:
    return os.path.join(cache_root(), "decoded-index")


@dataclass
class Key:
    digest: str      # hex SHA-256 of the contents and conversion: the entry's file name
    cacheable: bool  # False when a file is too fresh to trust its mtime (see RACY_NS): read, never write
    # True while the source is still the files the digest was made from (same names, sizes, mtimes):
    # store() writes nothing when a file changed, or appeared, while the entry was being decoded.
    unchanged: Callable[[], bool] = lambda: True


def _record(h, rel: str, entry: str) -> None:
    # Separators that cannot occur in a path component keep distinct lists distinct.
    h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + entry.encode() + b"\n")


def file_digest(path: str) -> str:
    """SHA-256 of a regular file's bytes; anything else (a FIFO, a device, a missing file or a
    dangling link) is named for what it is and never read, so it cannot block or hang."""
    try:
        # O_NONBLOCK: a file swapped for a FIFO after listing must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        return f"error:{e.errno}"
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder ("4: Is a directory")
        os.close(fd)
        return "not-a-file"
    with os.fdopen(fd, "rb") as f:
        h = hashlib.sha256()
        try:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        except OSError as e:
            return f"error:{e.errno}"
        return h.hexdigest()


def _listing(folder: str, rel_paths: list[str], params: dict) -> tuple[str, bool]:
    """(digest of the folder's stat listing, whether any file is too fresh to trust it)."""
    now = time.time_ns()
    h = hashlib.sha256(json.dumps({"format": FORMAT, "folder": os.path.abspath(folder), **params},
                                  sort_keys=True).encode())
    fresh = False
    for rel in rel_paths:
        entry = _stat_entry(os.path.join(folder, rel))
        mtime = entry.split(":")[1] if not entry.startswith("error:") else "0"
        fresh = fresh or int(mtime) > now - RACY_NS
        _record(h, rel, entry)
    return h.hexdigest(), fresh


def _stat_entry(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return f"error:{e.errno}"
    # ctime too, as git's index keeps it: a chmod that makes an unreadable file readable, or an edit
    # that put the old mtime back, changes only the ctime.
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def make_key(folder: str, rel_paths: Iterable[str], params: dict,
             relist: Callable[[], list[str]] | None = None, read_first: int = 0) -> Key:
    """Key for the files `rel_paths` under `folder` converted with `params` (JSON-able); `relist`
    lists the source again (a folder: its image files now), so that a file added later is noticed.

    An unchanged listing reads its key from the index (one stat per file); otherwise every file is
    hashed (regular files only) and the index remembers the result. A file that cannot be read is
    part of the key as such, so its later appearance changes the key too.
    read_first > 0 (data.limit): only the first files are read; the others enter the key by their stat
    (size, times, inode), since only a replacement for an unreadable one among the first is ever decoded:
    `limit=5000` on a folder of a million photos reads 5,000 of them, not the folder.
    """
    max_bytes()  # a bad AIGC_CACHE_MAX_GB is said now, not after decoding
    rel_paths = list(rel_paths)
    listing, fresh = _listing(folder, rel_paths, params)

    def unchanged() -> bool:
        return (relist is None or list(relist()) == rel_paths) and _listing(folder, rel_paths, params)[0] == listing

    index = os.path.join(index_dir(), listing)
    if not fresh:
        try:
            with open(index, encoding="ascii") as f:
                digest = f.read(65)
            if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                return Key(digest, True, unchanged)
        except (OSError, UnicodeDecodeError):
            pass
    h = hashlib.sha256(json.dumps({"format": FORMAT, **params}, sort_keys=True).encode())
    for i, rel in enumerate(rel_paths):
        path = os.path.join(folder, rel)
        _record(h, rel, file_digest(path) if not read_first or i < read_first else "stat:" + _stat_entry(path))
    # Files this fresh may change again within their mtime tick: an entry keyed by the bytes just read
    # may be read (it is what those bytes decode to) but neither it nor the index is written now.
    key = Key(h.hexdigest(), not fresh, unchanged)
    if key.cacheable and unchanged():  # nothing changed while it was hashed
        _write_atomic(index, key.digest.encode())
    return key


def _write_atomic(path: str, data: bytes) -> bool:
    """Write `data` to `path` by a temporary file and a rename; False (and nothing left) on failure."""
    try:
        with atomic_write(path, durable=False) as tmp:
            tmp.write_bytes(data)
        return True
    except OSError:
        return False


@dataclass
class Entry:
    images: torch.Tensor
    labels: torch.Tensor | None
    info: dict  # num_classes, class_names, name, details, folder, warnings


def _path(key: Key) -> str:
    return os.path.join(decoded_dir(), f"{key.digest}.safetensors")


def load(key: Key, warn: Callable[[str], None]) -> Entry | None:
    """The entry for `key`, or None when there is none or it is unusable (then with a warning)."""
    path = _path(key)
    if not os.path.isfile(path):
        return None
    try:
        tensors, meta = safetensors_file.read_whole(path)
        info = json.loads(meta[_META_KEY])
        if info.get("key") != key.digest or info.get("format") != FORMAT:
            raise ValueError("its metadata does not match its name")
        images, labels = tensors["images"], tensors.get("labels")
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images are {images.dtype} {tuple(images.shape)}, expected uint8 (N, C, H, W)")
        if labels is not None and (labels.dtype != torch.int64 or labels.shape != images.shape[:1]):
            raise ValueError(f"labels are {labels.dtype} {tuple(labels.shape)}, expected int64 ({images.shape[0]},)")
        if not all(isinstance(info.get(k), t) for k, t in (("warnings", list), ("details", str), ("folder", str),
                                                            ("num_classes", int))):
            raise ValueError("its metadata lacks the description, folder, warnings or class count")
        if labels is not None and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < info["num_classes"]:
            raise ValueError(f"labels outside 0..{info['num_classes'] - 1}")  # a model would train on classes it has not
    except FileNotFoundError:  # removed since the check: another run made room (AIGC_CACHE_MAX_GB)
        return None
    except Exception as e:  # noqa: BLE001 - a damaged cache file of any kind is rebuilt, never fatal
        warn(f"ignoring damaged decoded-image cache file {path} ({first_line(e)}); decoding again")
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    try:  # its last use, which the size limit goes by (access times are often not kept: relatime, noatime)
        os.utime(path)
    except OSError:  # a cache shared read-only: the entry is still good
        pass
    return Entry(images, labels, info)


def room_for(folder: str, needed: int, warn: Callable[[str], None], what: str,
             entries: str = ENTRY_NAME) -> bool:
    """Whether an entry of `needed` bytes may go into the cache `folder` under AIGC_CACHE_MAX_GB: the
    entries (names matching `entries`) used longest ago are removed first to make room, with a warning.
    False, with a warning, when it alone is over the limit (the caller then writes nothing)."""
    limit = max_bytes()
    if limit is None:
        return True
    shown = os.environ.get("AIGC_CACHE_MAX_GB") or f"{DEFAULT_MAX_GB:g} (the default)"
    if needed > limit:
        warn(f"not caching {what} ({needed / 2**30:.1f} GiB): more than AIGC_CACHE_MAX_GB={shown}")
        return False
    count, freed = _make_room(folder, needed, limit, entries)
    if count:
        warn(f"cache {folder}: removed {count} entr{'y' if count == 1 else 'ies'} used longest ago "
             f"({freed / 2**30:.2f} GiB) to stay under AIGC_CACHE_MAX_GB={shown}")
    return True


def _make_room(folder: str, needed: int, limit: int, entries: str = ENTRY_NAME) -> tuple[int, int]:
    """Remove the entries used longest ago until `needed` more bytes fit under `limit`; returns how
    many were removed and their bytes. Temporary files of live writers are not entries, and are left."""
    # What killed writers left (as large as an entry each) goes first: it is in no entry's place.
    remove_dead_temps_in(Path(folder), rf"\.{entries}\.")
    entry = re.compile(entries)
    found = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if entry.fullmatch(e.name):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:  # removed meanwhile (another run making room): not counted
                        continue
                    found.append((st.st_mtime, st.st_size, e.path))
    except OSError:
        return 0, 0
    total = sum(size for _, size, _ in found)
    count = freed = 0
    for _, size, path in sorted(found):
        if total + needed <= limit:
            break
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        count, freed = count + 1, freed + size
    return count, freed


def store(key: Key, entry: Entry, warn: Callable[[str], None]) -> None:
    """Write `entry` for `key` atomically (temporary file, then rename); failures only warn."""
    if not key.cacheable or not key.unchanged():  # what was decoded may not be what the key says
        return
    folder = decoded_dir()
    tensors = {"images": entry.images.contiguous()}
    if entry.labels is not None:
        tensors["labels"] = entry.labels.contiguous()
    if not room_for(folder, sum(t.numel() * t.element_size() for t in tensors.values()), warn, "the decoded images"):
        return
    meta = {_META_KEY: json.dumps({**entry.info, "key": key.digest, "format": FORMAT})}
    try:
        # A unique temporary name in the same folder: a concurrent run writing the same entry cannot
        # clobber it half-written, and the rename is atomic within one file system. Fsynced before the
        # rename: without it, a crash can leave some file systems (XFS) a file of the right size full
        # of zeros, which would pass every check of the entry and train on black images.
        with atomic_write(_path(key)) as tmp:
            safetensors_file.write(tmp, tensors, meta)
    except Exception as e:  # noqa: BLE001 - read-only home, full disk, ...: run without the cache
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
        warn(f"cannot write the decoded-image cache in {folder} ({reason.splitlines()[0]}); "
             "continuing without it (set AIGC_CACHE_DIR to a writable folder, or data.cache=false)")
