"""Writing files safely: atomic replacement (checkpoints, PNGs, statistics, caches) and strict JSON."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # some folder on the way is a file: say which, not "File exists"
        for p in (path.parent, *path.parent.parents):
            if p.exists() and not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "is a file, not a folder", str(p)) from None
        raise


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Fail now, naming the option, where writing `path` after long work would fail: a folder in its
    place, a file on the way to it, or a folder this user cannot write in."""
    from .errors import UsageError  # noqa: PLC0415

    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a folder; give a file name")
    nearest = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not nearest.is_dir():
        raise UsageError(f"{what} {path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: cannot write in {nearest} (permission denied)")


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
    the umask (mkstemp's 0o600, or safetensors' own, would make grids and checkpoints unreadable to
    the user's group)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_write(path: str | os.PathLike, suffix: str = ".tmp", *, durable: bool = True) -> Iterator[Path]:
    """Yield a new temporary path in `path`'s folder to write; when the block ends without an error the
    file gets the mode open() would give `path` and is renamed over it (fsynced first, and the rename
    made durable, unless durable=False), else removed. So `path` is always either its old self or
    complete, also after a crash or a full disk. Errors before the rename name `path`, not the
    temporary name."""
    path = Path(path)
    _make_parent(path)
    while True:
        tmp = path.parent / f".{path.name[:80]}.{secrets.token_hex(4)}{suffix}"
        try:  # owner read/write while it is written, whatever the umask; the final mode comes last
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        yield tmp
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, _final_mode(path))  # after the fsync's open: the final mode may not allow reading
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # Writes through an open file (np.savez, PIL) fail without a file name: this one is meant.
        if e.filename in (str(tmp), tmp) or (e.filename is None and e.errno is not None):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        try:  # the rename itself
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass


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
