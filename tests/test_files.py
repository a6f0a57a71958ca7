"""Atomic writes (the umask is respected, errors name the target, nothing is left behind), strict JSON,
and the one-line errors for running out of memory."""

from __future__ import annotations

import json
import os
import stat

import pytest
import typer

from aigc_cli.cli.output import handles_errors
from aigc_cli import files
from aigc_cli.files import atomic_write, json_line


@pytest.fixture
def umask():
    def set_umask(m):
        os.umask(m)
        files._umask.cache_clear()  # aigc reads it once per process

    old = os.umask(0o022)
    yield set_umask
    set_umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_mode_open_would_give_them(tmp_path, umask):
    for mask, expected in ((0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o222, 0o444)):
        umask(mask)
        target = tmp_path / f"m{mask:o}.bin"
        with atomic_write(target) as tmp:
            tmp.unlink()  # as a library that writes a file of its own does (owner-only)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
            tmp.write_bytes(b"x")  # also under a umask without owner write (0o222), as open() allows
        assert mode(target) == expected and target.read_bytes() == b"x"


def test_replacing_a_file_keeps_its_mode_as_open_does(tmp_path, umask):
    target = tmp_path / "shared.png"
    target.write_bytes(b"old")
    os.chmod(target, 0o664)  # the user made it group-writable
    with atomic_write(target, durable=False) as tmp:
        tmp.write_bytes(b"new")
    assert mode(target) == 0o664 and target.read_bytes() == b"new"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise ValueError("disk full, say")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_stop_raised_as_the_temporary_file_is_created_removes_it(tmp_path, monkeypatch, stop):
    """Python runs a signal's handler right after a call returns: Ctrl-C or SIGTERM (raised as an exception) landing
    as os.open created the temporary file, before the block that removes it, left it behind."""
    real = os.open

    def open_then_stop(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise stop()

    class Os:  # only files.py's os.open: pytest's own file writes go on as they are
        open = staticmethod(open_then_stop)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(files, "os", Os())
    with pytest.raises(stop), atomic_write(tmp_path / "sub" / "f.png", ".png") as tmp:
        tmp.write_bytes(b"never")
    assert not (tmp_path / "sub").exists()  # the temporary file gone, and the folder made for it


def test_a_full_disk_while_writing_through_an_open_file_names_the_target(tmp_path):
    import errno

    target = tmp_path / "ref.npz"
    with pytest.raises(OSError) as e:
        with atomic_write(target) as tmp, open(tmp, "wb"):
            raise OSError(errno.ENOSPC, "No space left on device")  # as f.write() raises it: no file name
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_errors_name_the_target_not_the_temporary(tmp_path):
    with pytest.raises(OSError) as e:
        with atomic_write("/proc/x.png"):
            pass
    assert e.value.filename == "/proc/x.png"
    (tmp_path / "a.png").write_text("a file")
    with pytest.raises(NotADirectoryError) as e:
        with atomic_write(tmp_path / "a.png" / "x.png"):
            pass
    assert e.value.filename == str(tmp_path / "a.png") and e.value.strerror == "is a file, not a folder"


def test_json_has_no_nan():
    line = json_line({"bpd": float("nan"), "fid": 3.5, "xs": [float("inf"), 1], "inner": {"k": float("-inf")}})
    assert json.loads(line) == {"bpd": None, "fid": 3.5, "xs": [None, 1], "inner": {"k": None}}
    assert "NaN" not in line and "Infinity" not in line


@pytest.mark.parametrize("error", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 256 GB"),
                                   MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_running_out_of_memory_is_one_line_exit_2(capsys, error):
    @handles_errors
    def command():
        raise error

    with pytest.raises(typer.Exit) as e:
        command()
    err = capsys.readouterr().err
    assert e.value.exit_code == 2 and err.count("\n") == 1 and err.startswith("error: out of memory") and "--batch-size" in err


def test_other_runtime_errors_stay_bugs():
    @handles_errors
    def command():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        command()


def _backdate(path, seconds=3600):
    t = os.stat(path).st_mtime - seconds
    os.utime(path, (t, t))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_and_a_live_ones_is_not(tmp_path):
    """kill -9 (the OOM killer) during an export or a cache write left a hidden file as large as the
    data, for good. A live writer holds a lock on its temporary file, which dies with its process."""
    import signal
    import subprocess
    import sys

    target = tmp_path / "gen.safetensors"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom aigc_cli.files import atomic_write\n"
         "w = atomic_write(sys.argv[1]); tmp = w.__enter__(); tmp.write_bytes(b'x' * 1000)\n"
         "print(tmp.name, flush=True); time.sleep(120)", str(target)],
        stdout=subprocess.PIPE, text=True)
    try:
        live = tmp_path / writer.stdout.readline().strip()
        _backdate(live)  # old enough: only the lock keeps it
        files.remove_dead_temps(target)
        assert live.exists()  # still being written
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    young = tmp_path / ".gen.safetensors.0123abcd.tmp"  # unlocked, but just made: left for a minute
    young.write_bytes(b"y")
    others = [tmp_path / n for n in (".gen.safetensors.notahex.tmp", ".other.safetensors.0123abcd.tmp", "keep.tmp")]
    for p in others:
        p.write_bytes(b"z")
        _backdate(p)
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert not live.exists()  # the killed writer's
    assert young.exists() and all(p.exists() for p in others)
    assert target.read_bytes() == b"new"


def test_a_dead_writers_temporary_file_of_a_long_name_is_swept_and_a_fifo_is_left(tmp_path):
    """Temporary names keep the first 80 characters of the target's (NAME_MAX is 255); the sweep matches the same
    prefix. A FIFO of a temporary's name is no file of ours: opening it would block."""
    target = tmp_path / ("g" * 120 + ".safetensors")
    dead = tmp_path / f".{target.name[:80]}.0123abcd.tmp"
    dead.write_bytes(b"x")
    _backdate(dead)
    fifo = tmp_path / ".gen.safetensors.0123abcd.tmp"
    os.mkfifo(fifo)
    _backdate(fifo)
    assert files.remove_dead_temps(target) == 1 and not dead.exists()
    assert files.remove_dead_temps(tmp_path / "gen.safetensors") == 0 and fifo.exists()


@pytest.mark.parametrize("raised", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_removes_the_folders_it_made(tmp_path, raised):
    """`aigc export --out new/dir/m.onnx` stopped by SIGTERM (or failing) left new/dir behind, empty."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other").write_text("x")
    with pytest.raises(type(raised)):
        with atomic_write(tmp_path / "kept" / "new" / "dir" / "f.bin") as tmp:
            tmp.write_bytes(b"half")
            raise raised
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["other"]  # only what it made is gone
    with atomic_write(tmp_path / "kept" / "new" / "f.bin") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "kept" / "new" / "f.bin").read_bytes() == b"whole"
