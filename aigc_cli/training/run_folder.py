"""The run folder of DESIGN.md: config.toml, metrics.jsonl, samples/, checkpoints/ (step files, last, best)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from .. import checkpoint as ckpt_io
from ..config import Config
from ..errors import UsageError, not_utf8_shown
from ..files import check_name_lengths, make_parent, remove_empty, atomic_write, json_line, write_refused


LOCK_NAME = ".aigc-train.lock"
TRANSIENT_KEY = "aigc.saved_for"  # "time" in a checkpoint written by train.ckpt_minutes alone


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _busy(root: Path) -> UsageError:
    return UsageError(f"--out {root}: another `aigc train`{_holder(root / LOCK_NAME)} is training in this run "
                      "folder; wait for it to end, or choose another --out")


def _lock_or_refuse(fd: int, root: Path) -> None:
    import fcntl  # noqa: PLC0415 - POSIX only

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(root) from None
    except OSError:  # ENOLCK and the like: no locking here
        pass


@contextlib.contextmanager
def run_lock(root: Path, made: list[Path] | None = None) -> Iterator[None]:
    """One training process a run folder: two (a job array's slip, a resubmitted job while the first still
    runs) would prune and overwrite each other's checkpoints and interleave metrics.jsonl. An flock, so a
    crash or a kill -9 releases it; a file system without locks (some network mounts) goes unguarded.
    `aigc train` takes it before it looks into the folder (which checkpoint to resume, whether it holds a
    run), so that two commands cannot both decide on what they saw before either wrote.
    When the block fails, what it set up goes again (see _undo_setup; `made`: the folders the caller made
    for the run, deepest first)."""
    made = made if made is not None else make_parent(root / LOCK_NAME)
    lock = root / LOCK_NAME
    before = {p.name for p in root.iterdir()}
    fd = _take(lock, root)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            _undo_setup(root, made, before)
        raise
    finally:
        os.close(fd)  # releases the lock


def _take(lock: Path, root: Path) -> int:
    """The lock file open and flocked (refused at once when another process holds it)."""
    while True:
        try:  # 0o666: the umask decides, as for every other file of the run (a group's shared folder)
            fd, writable = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), True
        except PermissionError:  # another user's lock file: flock needs no write access
            try:
                fd, writable = os.open(lock, os.O_RDONLY), False
            except OSError as e:
                raise UsageError(f"--out {root}: cannot open {lock} ({e.strerror})") from None
        try:
            _lock_or_refuse(fd, root)
            # A failed command removes the lock file it made: one opened just before that guards nothing.
            try:
                current = os.stat(lock)
                mine = os.fstat(fd)
                same = (current.st_ino, current.st_dev) == (mine.st_ino, mine.st_dev)
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    if writable:
        try:  # the pid only tells a refused command who holds the lock: a full disk, where a resume that
            os.ftruncate(fd, 0)  # prunes checkpoints is the way out, must not refuse it
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass
    return fd


def _undo_setup(root: Path, made: list[Path], before: set[str]) -> None:
    """After a failure: the lock file, if this command made it; and, when no checkpoint, metrics line or
    grid is in the folder, the config.toml and empty checkpoints/ and samples/ this command added, and
    the folders it made. Nothing that was there before it began is touched."""
    entries = {p.name: p for p in root.iterdir()}
    ours = {name: p for name, p in entries.items() if name not in before}
    work = "metrics.jsonl" in entries or any(
        p.is_dir() and any(p.iterdir()) for name, p in entries.items() if name in ("checkpoints", "samples"))
    if not work:
        for name in ("config.toml", "checkpoints", "samples"):
            p = ours.get(name)
            if p is not None:
                p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
    if LOCK_NAME in ours:
        ours[LOCK_NAME].unlink(missing_ok=True)
    remove_empty(made)


def check_writable_run(root: Path) -> None:
    """Before any work: a run folder whose checkpoints/ or samples/ is a file, or that this user cannot
    write in, would otherwise fail at the first save, after the data load and the first interval's
    training."""
    try:
        str(root.absolute()).encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8: checkpoints could be written, never read back
        raise UsageError(f"--out {not_utf8_shown(root)}: its path is not valid UTF-8, and safetensors opens only UTF-8 "
                         "paths (its checkpoints could never be read back); choose another name") from None
    check_name_lengths(root, "--out")
    for path in (root, root / "checkpoints", root / "samples"):
        for p in (path, *path.parents):  # a link to nothing on the way: mkdir would say only "File exists"
            if p.is_symlink() and not p.exists():
                raise UsageError(f"--out {root}: {p} is a symbolic link to {os.readlink(p)}, which does not exist")
        nearest = next(p for p in (path, *path.parents) if p.exists())
        if not nearest.is_dir():
            raise UsageError(f"--out {root}: {nearest} is a file, not a folder")
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise UsageError(f"--out {root}: cannot write in {nearest} (permission denied)")
        # A real write where a folder is to be made (made anyway, so nothing a refused command should leave
        # alone changes); in an existing folder, its use so far vouches for it.
        if nearest != path and (why := write_refused(nearest)) is not None:
            raise UsageError(f"--out {root}: cannot create files in {nearest} ({why})")
    log = root / "metrics.jsonl"  # appended to: its own mode counts, not the folder's
    if log.exists() and not os.access(log, os.W_OK):
        raise UsageError(f"--out {root}: cannot write to {log} (permission denied)")


# What training's atomic writes leave behind when the process is killed mid-write (kill -9, the OOM killer,
# a node failure): `.<name>.<8 hex digits>.tmp` (grids: `.png`), and _link's `.<name>.link.tmp`. Only the
# names training writes: `aigc sample` or `export` may be writing other files here meanwhile.
_HEX = r"\.[0-9a-f]{8}"
_LEFTOVERS = {
    "": re.compile(rf"\.(config\.toml|metrics\.jsonl){_HEX}\.tmp"),
    "checkpoints": re.compile(rf"\.(step-\d+|last|best)\.safetensors({_HEX}|\.link)\.tmp"),
    "samples": re.compile(rf"\.(recon-)?step-\d+\.png{_HEX}\.png"),
}
# What a killed checkpoint write left through safetensors' save_file (before 2026-11-30: its own temporary
# file, which it then renamed over aigc's). Removed once an hour old: such names are not aigc's own, and a
# live writer keeps its file's time current.
_SAVE_FILE_LEFTOVER = re.compile(r"\.tmp[0-9A-Za-z]{6}")
_SAVE_FILE_DEAD_S = 3600


class RunFolder:
    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep
        # The newest checkpoint when it was written by time (train.ckpt_minutes): the next save replaces it,
        # and it does not count towards `keep`, so saves by time never push out those by steps.
        self.transient: Path | None = None
        self.samples = self.root / "samples"  # made by the first grid written (classifiers write none)
        self.checkpoints = self.root / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files of a killed run (a checkpoint-sized one each): under the run lock no other
        training writes here, so every one of these names is a dead process's."""
        for sub, pattern in _LEFTOVERS.items():
            folder = self.root / sub
            for path in (folder.iterdir() if folder.is_dir() else ()):
                if pattern.fullmatch(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
        for path in self.checkpoints.iterdir():
            with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                if (_SAVE_FILE_LEFTOVER.fullmatch(path.name) and path.is_file()
                        and time.time() - path.stat().st_mtime > _SAVE_FILE_DEAD_S):
                    path.unlink()

    def write_config(self, cfg: Config) -> None:
        with atomic_write(self.root / "config.toml") as tmp:
            tmp.write_text(cfg.to_toml(), encoding="utf-8")

    def append_metrics(self, record: dict) -> None:
        with open(self.root / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json_line(record) + "\n")

    def _metrics_lines(self, raw: bytes | None = None) -> list[tuple[int, str]]:
        """(step, line) of each aigc record in metrics.jsonl (or in `raw`, its bytes already read); torn
        lines from a crash and lines that are not records are left out (bytes that are not UTF-8 too: a
        crash can cut a character)."""
        path = self.root / "metrics.jsonl"
        if raw is None:
            raw = path.read_bytes() if path.exists() else b""
        out = []
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                record_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(record_step, int):
                out.append((record_step, line))
        return out

    def trim_metrics(self, step: int) -> None:
        """Keep the lines logged up to `step` (on resume or rollback: what the restored state had seen;
        0 for a fresh start)."""
        path = self.root / "metrics.jsonl"
        if not path.exists():
            return
        raw = path.read_bytes()
        kept = "".join(line + "\n" for logged, line in self._metrics_lines(raw) if logged <= step)
        if raw == kept.encode("utf-8"):
            return  # nothing to trim: the file stays the one `tail -f` and log shippers follow
        with atomic_write(path) as tmp:
            tmp.write_text(kept, encoding="utf-8")

    def set_aside_after(self, step: int, source=None) -> Path | None:
        """A resume from an earlier checkpoint of this run (`source`, at `step`) starts a new branch;
        a fresh start (step 0, no source) in a folder whose checkpoints all failed to load starts
        over. Either way the later checkpoints (and last/best when they hold a later step, or cannot
        be read) move to checkpoints/after-step-N/, with their metrics lines (written there before
        metrics.jsonl is trimmed) and sample grids, so that `--resume auto` and pruning follow the
        new branch and nothing is deleted. last.safetensors then points at the source until the next
        save. Returns that folder (None when nothing was later)."""
        later = [p for p in ckpt_io.step_files(self.checkpoints) if ckpt_io.step_of(p) > step]
        for name in ("last.safetensors", "best.safetensors"):
            path = self.checkpoints / name
            saved = (ckpt_io.read_meta(path) or {}).get("aigc.step", "") if path.is_file() else "0"
            if not saved.isdigit() or int(saved) > step:
                later.append(path)
        if not later:
            return None
        aside, k = self.checkpoints / f"after-step-{step:07d}", 1
        while aside.exists():
            k += 1
            aside = self.checkpoints / f"after-step-{step:07d}-{k}"
        aside.mkdir()
        dropped = [line for logged, line in self._metrics_lines() if logged > step]
        if dropped:
            with atomic_write(aside / "metrics.jsonl") as tmp:
                tmp.write_text("".join(s + "\n" for s in dropped), encoding="utf-8")
        grids = [p for p in self.samples.glob("*step-*.png")  # aigc's grid names only, as remove_grids
                 if (m := re.fullmatch(r"(recon-)?step-(\d+)\.png", p.name)) and int(m.group(2)) > step]
        if grids:
            (aside / "samples").mkdir()
            for path in grids:
                path.rename(aside / "samples" / path.name)
        for path in later:
            path.rename(aside / path.name)
        if source is not None and not (self.checkpoints / "last.safetensors").exists():
            # e.g. resumed from best.safetensors whose step file was pruned: a crash before the next
            # save must still find this branch's newest state
            self._link(Path(source.path), "last.safetensors", source.tensors, source.meta)
        return aside

    def relink_best(self, best_value, best_step: int | None = None) -> bool:
        """After the best moved aside: point best.safetensors at this branch's checkpoint that set
        `best_value`, if it is still here: the one at best_step. Checkpoints from before best_step was
        recorded: the first one carrying the value (a later one, when pruning took the one that set it)."""
        if best_value is None:
            return False
        if best_step is not None:
            candidates = [self.checkpoints / f"step-{best_step:07d}.safetensors"]
        else:
            candidates = ckpt_io.step_files(self.checkpoints)[::-1]
        for path in candidates:
            meta = (ckpt_io.read_meta(path) or {}) if path.is_file() else {}
            if meta.get("aigc.best_value") == json.dumps(best_value):
                self._link(path, "best.safetensors", None, None)
                return True
        return False

    def has_record(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl holds a line of `step` with `key` (an evaluation's, say)."""
        for logged, line in self._metrics_lines():
            if logged == step and key in json.loads(line):
                return True
        return False

    def remove_grids(self) -> None:
        """Sample grids of a run that left no checkpoint here (killed before its first): they would be
        taken for this run's."""
        for path in (self.samples.glob("*step-*.png") if self.samples.is_dir() else ()):
            if re.fullmatch(r"(recon-)?step-\d+\.png", path.name) and path.is_file():
                with contextlib.suppress(OSError):  # not ours to remove: the grid's write will say so
                    path.unlink()

    def _link(self, target: Path, name: str, tensors: dict | None, meta: dict | None) -> None:
        """Point checkpoints/<name> at target: a hard link costs no second write, and the rename keeps
        the old file valid until the new one is in place."""
        tmp = self.checkpoints / f".{name}.link.tmp"
        tmp.unlink(missing_ok=True)
        try:
            tmp.hardlink_to(target)
            tmp.replace(self.checkpoints / name)
        except OSError:  # no hard links here: write it again (tensors None: copy the file)
            tmp.unlink(missing_ok=True)
            if tensors is None:
                with atomic_write(self.checkpoints / name) as copy:
                    shutil.copyfile(target, copy)
            else:
                ckpt_io.write_atomic(self.checkpoints / name, tensors, meta)

    def save_checkpoint(self, step: int, tensors: dict, meta: dict, best: bool = False, transient: bool = False) -> Path:
        path = self.checkpoints / f"step-{step:07d}.safetensors"
        meta = {**meta, TRANSIENT_KEY: "time"} if transient else meta  # last's copy too, where links fail
        try:
            ckpt_io.write_atomic(path, tensors, meta)
            self._link(path, "last.safetensors", tensors, meta)
            if best:
                self._link(path, "best.safetensors", tensors, meta)
        except OSError as e:
            previous = self.checkpoints / "last.safetensors"
            kept = f"; the previous checkpoint {previous} is intact" if previous.exists() else ""
            raise UsageError(f"cannot write checkpoint {path}: {e.strerror or e}{kept}") from None
        replaced, self.transient = self.transient, path if transient else None
        if replaced is not None and replaced != path:
            replaced.unlink(missing_ok=True)  # a best.safetensors linked to it keeps its data
        self.prune()
        return path

    def adopt_transient(self) -> None:
        """A resumed run's newest checkpoint, when written by time, is replaced by the next save as it would
        have been had the run gone on. An older one written by time is a leftover: a kill came between the
        save after it and its removal. It goes now, or it would count towards `keep` from here on."""
        steps = ckpt_io.step_files(self.checkpoints)[::-1]
        timed = [p for p in steps if (ckpt_io.read_meta(p) or {}).get(TRANSIENT_KEY) == "time"]
        self.transient = steps[-1] if timed and timed[-1] == steps[-1] else None
        for leftover in timed:
            if leftover != self.transient:
                leftover.unlink(missing_ok=True)

    def prune(self) -> None:
        """Only the newest `keep` step files stay (keep <= 0: all). After each save, and when a run
        (re)starts: a resume with a lower train.keep_checkpoints frees the space before its first save,
        which a full disk may need."""
        if self.keep <= 0:
            return
        steps = [p for p in ckpt_io.step_files(self.checkpoints)[::-1] if p != self.transient]
        for old in steps[:-self.keep]:
            old.unlink(missing_ok=True)  # best/last are hard links: their data stays

