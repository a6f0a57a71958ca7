"""Writing files safely: atomic replacement (checkpoints, PNGs, statistics, caches) and strict JSON."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import re
import secrets
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def make_parent(path: Path) -> list[Path]:
    """Make the missing folders on the way to `path`; returns those it made, deepest first."""
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return made
    except FileExistsError:  # some folder on the way is a file: say which, not "File exists"
        for p in (path.parent, *path.parent.parents):
            if p.exists() and not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(p)) from None
        raise


NAME_MAX = 255  # bytes in one file or folder name, on every file system Linux and macOS use


def check_name_lengths(path: Path, what: str) -> None:
    """Names past NAME_MAX, said before any stat (which would fail with "File name too long" itself)."""
    from .errors import UsageError  # noqa: PLC0415

    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{what}: the name {part[:30]}... is {len(os.fsencode(part))} bytes long; file systems "
                             f"allow {NAME_MAX}")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail now, naming the option, where writing `path` after long work would fail: a name too long, a
    folder in its place, a file on the way to it, or a folder this user cannot write in."""
    from .errors import UsageError  # noqa: PLC0415

    path = Path(path)
    check_name_lengths(path, what)
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a folder; give a file name")
    nearest = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not nearest.is_dir():
        raise UsageError(f"{what} {path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write in {nearest} (permission denied)")
    if (why := write_refused(nearest)) is not None:
        raise UsageError(f"{what} {path}: cannot create files in {nearest} ({why})")


def write_refused(folder: Path) -> str | None:
    """Why a file cannot be made in `folder`, found by making one (root passes os.access, and a
    read-only mount or /proc shows only in a real write); None if it can. The file has no name (Linux's
    O_TMPFILE; elsewhere one removed at once): nothing to leave behind, nothing for a folder watcher."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return (e.strerror or str(e)).lower()
    return None


@functools.cache
def _umask() -> int:
    """The process's umask, read once (aigc never changes it; `aigc sample --individual` writes
    thousands of files)."""
    try:  # Linux: read it without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """What open(path, "w") would leave: an existing file keeps its mode, a new one gets 0o666 less
    the umask (the temporary file's 0o600, or mkstemp's, would make grids and checkpoints unreadable to
    the user's group)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp", *, durable: bool = True,
                 sweep: bool = True) -> Iterator[Path]:
    """Yield a new temporary path in `path`'s folder to write; when the block ends without an error the
    file gets the mode open() would give `path` and is renamed over it (fsynced first, and the rename
    made durable, unless durable=False), else removed. So `path` is always either its old self or
    complete, also after a crash or a full disk. Errors before the rename name `path`, not the
    temporary name. The temporary file is locked while it is written, so that a later writer of `path`
    can tell a killed writer's leftover from a live one's, and remove it (sweep; see remove_dead_temps)."""
    path = Path(path)
    made = make_parent(path)
    if sweep:
        remove_dead_temps(path, suffix)
    while True:
        tmp = path.parent / f".{path.name[:80]}.{secrets.token_hex(4)}{suffix}"
        try:  # owner read/write while it is written, whatever the umask; the final mode comes last
            lock = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue  # another writer's name: not ours to remove
        except OSError as e:
            remove_empty(made)
            raise OSError(e.errno, e.strerror, str(path)) from None
        except BaseException:  # Ctrl-C or SIGTERM raised as os.open returned (on a slow file system, often):
            tmp.unlink(missing_ok=True)  # the file is ours (a new random name), and was left behind
            remove_empty(made)
            raise
    try:
        with contextlib.suppress(OSError):  # a file system without locks: sweeps cannot lock either
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))  # after the fsync's open: the final mode may not allow reading
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        remove_empty(made)
        # Writes through an open file (np.savez, PIL) fail without a file name: this one is meant.
        if e.filename in (str(tmp), tmp) or (e.filename is None and e.errno is not None):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:  # a stop (SIGTERM) or an error: nothing of this write stays, folders it made neither
        tmp.unlink(missing_ok=True)
        remove_empty(made)
        raise
    finally:
        os.close(lock)
    if durable:
        try:  # the rename itself
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


def remove_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (deepest first) while it is empty."""
    for folder in folders:  # deepest first; one that something else has meanwhile filled stays
        try:
            folder.rmdir()
        except OSError:
            return


# A leftover younger than this is left alone even when unlocked: a writer locks its file a moment after
# creating it, and on NFS, where flock is emulated by POSIX locks, a writer's lock goes when it closes
# any other descriptor of the file (a writer's own, the fsync's): its last moments are unlocked.
_DEAD_AFTER_S = 60


def remove_dead_temps(path: Path, suffix: str = ".tmp") -> int:
    """Remove the temporary files that killed writers of `path` left (kill -9, the OOM killer, a node
    failure: for an export or a decoded-data cache entry, one hidden file as large as the data). A live
    writer holds a lock on its temporary file until the rename, and the lock goes with its process, so
    a lock we can take is a dead writer's. Returns how many were removed."""
    return remove_dead_temps_in(path.parent, re.escape(f".{path.name[:80]}."), suffix)


def remove_dead_temps_in(folder: Path, name: str, suffix: str = ".tmp") -> int:
    """remove_dead_temps for every file `name` (a regular expression) in `folder`: one sweep before a
    command writes thousands of files there, each then written without its own sweep."""
    pattern = re.compile(name + "[0-9a-f]{8}" + re.escape(suffix))
    removed = 0
    try:
        entries = [e for e in os.scandir(folder) if pattern.fullmatch(e.name)]
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < _DEAD_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
            try:  # shared: it conflicts with the writer's exclusive lock, and NFS grants it to a reader
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.unlink(entry.path)
                removed += 1
            finally:
                os.close(fd)
        except OSError:  # locked (a live writer), gone meanwhile, or not ours to remove
            continue
    return removed


def finite_or_none(obj):
    """NaN and infinities become None (JSON null), recursively: `json` would write NaN, which strict
    parsers (jq, JavaScript, most other languages) reject."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_line(obj, **kwargs) -> str:
    """One line of strict JSON (non-finite numbers as null)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
