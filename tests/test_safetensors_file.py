"""aigc writes its safetensors files itself (and reads cache entries whole): the bytes safetensors writes, into the temporary file aigc
made and locked, so a kill mid-write leaves nothing that aigc's sweeps do not find."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from aigc_cli import checkpoint as ckpt_io
from aigc_cli import safetensors_file

TENSORS = {"b.w": torch.randn(3, 4), "a.h": torch.randn(5).half(), "c": torch.randn(2, 2).bfloat16(),
           "n": torch.tensor(3), "u": torch.arange(7, dtype=torch.uint8), "z": torch.zeros(0, 3),
           "flag": torch.tensor([True, False, True]), "i8": torch.tensor([-1, 2], dtype=torch.int8),
           "i16": torch.tensor([5], dtype=torch.int16), "i32": torch.tensor([7], dtype=torch.int32),
           "d": torch.randn(2, dtype=torch.float64), "A": torch.randn(1)}


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_the_bytes_are_safetensors_own(tmp_path):
    for meta in ({"x": 'ü"\\/\n'}, None):
        safetensors_file.write(tmp_path / "f.safetensors", TENSORS, meta)
        assert (tmp_path / "f.safetensors").read_bytes() == save(TENSORS, metadata=meta)
    meta = {"aigc.format": "1", "aigc.config": "{}", "b": "2"}  # safetensors orders these by chance
    safetensors_file.write(tmp_path / "f.safetensors", TENSORS, meta)
    assert split((tmp_path / "f.safetensors").read_bytes()) == split(save(TENSORS, metadata=meta))


def test_read_whole_gives_back_what_was_written(tmp_path):
    kept = {k: v for k, v in TENSORS.items() if v.numel()}  # read_whole refuses empty tensors (cache entries)
    safetensors_file.write(tmp_path / "f.safetensors", kept, {"m": "v"})
    back, meta = safetensors_file.read_whole(tmp_path / "f.safetensors")
    assert meta == {"m": "v"} and back.keys() == kept.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in kept.items())


def test_views_and_shared_memory_are_written_as_their_values(tmp_path):
    """safetensors refuses both (aigc used to clone every tensor first)."""
    base = torch.randn(4, 6)
    tensors = {"t": base.t(), "row": base[1], "same": base, "again": base}
    safetensors_file.write(tmp_path / "f.safetensors", tensors)
    back = load_file(tmp_path / "f.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("tensors, meta", [({"w": torch.zeros(1)}, {"a": 1}), ({"__metadata__": torch.zeros(1)}, None),
                                           ({"w": torch.zeros(1, dtype=torch.complex64)}, None)])
def test_what_safetensors_refuses_is_refused_not_written_unreadable(tmp_path, tensors, meta):
    with pytest.raises(TypeError):
        safetensors_file.write(tmp_path / "f.safetensors", tensors, meta)


def written(folder: Path) -> bool:
    """Whether any file in `folder` has data (one renamed meanwhile is looked at again next time)."""
    for f in folder.iterdir():
        try:
            if f.stat().st_size:
                return True
        except FileNotFoundError:
            pass
    return False


WRITER = """
import sys, torch
from pathlib import Path
from aigc_cli import checkpoint
checkpoint.write_atomic(Path(sys.argv[1]), {"big": torch.ones(int(sys.argv[2]) * 2**18)}, {"a": "b"})
"""


def test_a_kill_mid_write_leaves_only_what_the_next_write_sweeps(tmp_path):
    """safetensors' save_file wrote its own `.tmpXXXXXX` file and renamed it over aigc's: a SIGKILL
    (after a batch system's grace period) left a checkpoint-sized file that nothing removed."""
    folder, script = tmp_path / "checkpoints", tmp_path / "writer.py"
    folder.mkdir()
    script.write_text(WRITER)
    target = folder / "step-0000002.safetensors"
    for mb in (100, 400, 1200):  # until the kill lands while data is written
        p = subprocess.Popen([sys.executable, str(script), str(target), str(mb)],
                             env={**os.environ, "PYTHONPATH": str(Path(ckpt_io.__file__).parents[1])})
        while p.poll() is None and not written(folder):
            time.sleep(0.0005)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not target.exists():
            break
        target.unlink()
    assert not target.exists() and written(folder)  # killed mid-write
    for f in folder.iterdir():  # from a job before this one: a younger unlocked file may be a live writer's
        os.utime(f, (time.time() - 3600, time.time() - 3600))
    ckpt_io.write_atomic(target, {"w": torch.zeros(2)}, {"a": "b"})
    assert [f.name for f in folder.iterdir()] == [target.name]


def test_a_run_folder_removes_what_save_file_left_an_hour_ago(tmp_path):
    from aigc_cli.training.run_folder import RunFolder

    folder = tmp_path / "r" / "checkpoints"
    folder.mkdir(parents=True)
    old, fresh, other = (folder / name for name in (".tmpAb3xYz", ".tmpQw9rTy", ".tmp_notes"))
    for f in (old, fresh, other):
        f.write_bytes(b"\0" * 64)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(other, (time.time() - 7200, time.time() - 7200))
    RunFolder(tmp_path / "r", keep=1)
    assert sorted(f.name for f in folder.iterdir()) == [".tmpQw9rTy", ".tmp_notes"]


def forged(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("spec", [
    {"dtype": "U8", "shape": [4], "data_offsets": [0, 2]},     # shape needs 4 bytes, offsets give 2
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]},    # offsets span two floats for one
    {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]},    # before the data: header bytes as pixels
    {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
    {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},    # past the end of the file
])
def test_tensors_that_do_not_fit_their_offsets_are_refused(tmp_path, spec):
    forged(tmp_path / "f.safetensors", {"t": spec}, bytes(range(8)))
    with pytest.raises(ValueError, match="does not fit the file"):
        safetensors_file.read_whole(tmp_path / "f.safetensors")
