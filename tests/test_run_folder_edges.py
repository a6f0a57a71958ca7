"""Run folders and resume state, from a mutation review of training/run_folder.py and training/state.py: a failed
command keeps its config once it logged metrics, lock files replaced or unsupported, going back (grids, twice to one
step), relinking best, timed checkpoints, old data positions and absurd image counts. Each pins one behaviour the
suite let change."""

from __future__ import annotations

import errno
import fcntl
import json

import pytest
import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.training import run_folder
from aigc_cli.training.run_folder import RunFolder


def _ckpt(run: RunFolder, step: int, **meta) -> None:
    ckpt_io.write_atomic(run.checkpoints / f"step-{step:07d}.safetensors", {"w": torch.zeros(1)},
                         {"aigc.step": str(step), **meta})


def test_a_failed_command_keeps_its_config_once_it_logged_metrics(tmp_path):
    """metrics.jsonl alone is work: the config.toml that explains it stays (checkpoints/ and samples/ empty)."""
    root = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with run_folder.run_lock(root):
            (root / "config.toml").write_text("x = 1\n")
            (root / "metrics.jsonl").write_text('{"step": 1}\n')
            raise RuntimeError("failed after its first log line")
    assert (root / "config.toml").is_file() and (root / "metrics.jsonl").is_file()
    assert not (root / run_folder.LOCK_NAME).exists()


def test_a_lock_file_replaced_between_open_and_flock_is_taken_again(tmp_path, monkeypatch):
    """Another command's fresh lock file in place of the one opened: the flock on the unlinked one guards nothing."""
    root = tmp_path / "run"
    real, calls = run_folder._lock_or_refuse, []

    def replaced_meanwhile(fd, where):
        calls.append(fd)
        if len(calls) == 1:
            (where / run_folder.LOCK_NAME).unlink()
            (where / run_folder.LOCK_NAME).write_text("")
        real(fd, where)

    monkeypatch.setattr(run_folder, "_lock_or_refuse", replaced_meanwhile)
    with run_folder.run_lock(root):
        assert len(calls) == 2
        fd = open(root / run_folder.LOCK_NAME)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            fd.close()


def test_a_file_system_without_locks_goes_unguarded(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with run_folder.run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / run_folder.LOCK_NAME).is_file()


def test_going_back_keeps_the_grid_of_the_step_resumed_from(tmp_path):
    run = RunFolder(tmp_path / "r", keep=0)
    for step in (2, 4):
        _ckpt(run, step)
    run.samples.mkdir()
    for name in ("step-0000002.png", "recon-step-0000002.png", "step-0000004.png"):
        (run.samples / name).write_bytes(b"png")
    aside = run.set_aside_after(2)
    assert sorted(p.name for p in run.samples.iterdir()) == ["recon-step-0000002.png", "step-0000002.png"]
    assert [p.name for p in (aside / "samples").iterdir()] == ["step-0000004.png"]


def test_going_back_twice_to_one_step_keeps_both_branches(tmp_path):
    run = RunFolder(tmp_path / "r", keep=0)
    _ckpt(run, 2)
    _ckpt(run, 4)
    first = run.set_aside_after(2)
    _ckpt(run, 4)  # the new branch's own step 4
    second = run.set_aside_after(2)
    assert first.name == "after-step-0000002" and second.name == "after-step-0000002-2"
    assert (first / "step-0000004.safetensors").is_file() and (second / "step-0000004.safetensors").is_file()


def test_relink_best_without_its_step_takes_the_first_checkpoint_carrying_the_value(tmp_path):
    run = RunFolder(tmp_path / "r", keep=0)
    for step in (2, 4, 6):
        _ckpt(run, step, **{"aigc.best_value": json.dumps(0.5)})
    assert run.relink_best(0.5)
    assert (run.checkpoints / "best.safetensors").samefile(run.checkpoints / "step-0000002.safetensors")


def test_an_older_timed_checkpoint_goes_and_a_newer_one_by_steps_is_not_replaced(tmp_path):
    """Only the newest checkpoint, when written by time, is the one the next save replaces."""
    run = RunFolder(tmp_path / "r", keep=0)
    _ckpt(run, 2, **{run_folder.TRANSIENT_KEY: "time"})
    _ckpt(run, 4)
    run.adopt_transient()
    assert run.transient is None
    assert [p.name for p in ckpt_io.step_files(run.checkpoints)] == ["step-0000004.safetensors"]
    run.save_checkpoint(6, {"w": torch.zeros(1)}, {"aigc.step": "6"})
    assert [p.name for p in ckpt_io.step_files(run.checkpoints)] == ["step-0000006.safetensors", "step-0000004.safetensors"]


# aigc_cli/training/state.py

def test_an_old_checkpoints_data_position_in_batches_becomes_images():
    from aigc_cli.training.state import data_position

    meta = {"aigc.data_position": json.dumps({"epoch": 1, "index": 3}),
            "aigc.config": json.dumps({"train": {"batch_size": 8}})}
    assert data_position(meta) == {"epoch": 1, "image": 24}


def test_an_absurd_recorded_image_count_reads_as_not_recorded():
    from types import SimpleNamespace

    from aigc_cli.training.state import data_images_then

    assert data_images_then(SimpleNamespace(meta={"aigc.data_images": "120"})) == 120
    assert data_images_then(SimpleNamespace(meta={"aigc.data_images": "9" * 19})) is None
    assert data_images_then(SimpleNamespace(meta={})) is None


def test_relink_best_with_no_best_value_links_nothing(tmp_path):
    """Checkpoints saved before any evaluation record aigc.best_value "null": none of them is a best."""
    run = RunFolder(tmp_path / "r", keep=0)
    _ckpt(run, 2, **{"aigc.best_value": json.dumps(None)})
    assert not run.relink_best(None)
    assert not (run.checkpoints / "best.safetensors").exists()
