"""Who may write a run folder, decided before anything is read from it: `aigc train` holds the run lock
from before it picks a checkpoint to resume until its end; default folders are made when numbered; a lock
file follows the umask and works for a group; what resume picks when `last` is a copy."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil

import pytest
import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.cli.train import next_run_dir
from aigc_cli.training import loop
from aigc_cli.training import run_folder
from aigc_cli.training.loop import train
from aigc_cli.training.state import find_resume
from conftest import Silent, run_cli, tiny


def held_by_someone(folder) -> bool:
    """Whether another open file (another process, for flock) could take the run lock now."""
    fd = os.open(folder / run_folder.LOCK_NAME, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_the_command_holds_the_lock_before_it_loads_the_data(tmp_path, monkeypatch, capsys):
    """It used to take it after the data load, having already decided what to resume and that the folder
    held no run: a second command that finished its load after the first run ended took the run over."""
    out = tmp_path / "run"
    train(tiny("dcgan").with_overrides({"train.steps": "2"}), out, Silent())
    seen = []
    real = loop.load_data
    monkeypatch.setattr(loop, "load_data", lambda *a, **k: seen.append(held_by_someone(out)) or real(*a, **k))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--resume", "auto", "--steps", 3)
    assert code == 0 and seen == [True], (seen, err)
    assert ckpt_io.load(out).step == 3 and not held_by_someone(out)


def test_default_folders_are_made_when_numbered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (first, made), (second, _) = next_run_dir("qs"), next_run_dir("qs")
    assert (first.name, second.name) == ("qs-001", "qs-002") and first.is_dir() and second.is_dir()
    assert made == [first, first.parent]  # runs/ too: it was not there
    monkeypatch.setattr(type(tmp_path), "glob", lambda self, pattern: iter(()))  # a listing from before both
    assert next_run_dir("qs")[0].name == "qs-003"  # qs-001 and qs-002 exist: taken, not shared


def test_a_command_that_fails_before_training_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    few = tmp_path / "few"
    few.mkdir()
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(few / f"{i}.png")
    for out in ([], ["--out", tmp_path / "new" / "run"]):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--data", few, *out)
        assert code == 2 and "fewer than --batch-size" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few"]  # no runs/, no new/


def test_a_run_folder_inside_the_image_folder_it_trains_on_is_refused_and_not_made(tmp_path, monkeypatch, capsys):
    """Its sample grids joined the data: a resume listed them as images (a third class, `samples`)."""
    from PIL import Image
    data = tmp_path / "cls"
    for cls in ("cats", "dogs"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(data / cls / f"{i}.png")
    listing = sorted(data.rglob("*"))
    common = ["--preset", "quickstart", "--data", data, "--steps", "1", "-b", "4"]
    for out in (["--out", data], ["--out", data / "cats" / "run"], []):
        monkeypatch.chdir(data if not out else tmp_path)  # no --out: runs/ under the working folder
        code, _, err = run_cli(monkeypatch, capsys, "train", *common, *out)
        assert code == 2 and err.count("\n") == 1 and "is inside the image folder --data" in err, err
        assert sorted(data.rglob("*")) == listing  # no run folder or lock file left in the data
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(monkeypatch, capsys, "train", *common, "--out", tmp_path / "cls-run")  # a sibling: fine
    assert code == 0 and "(1 step, batch 4" in out and "done: 1 step in" in out, (out, err)


def test_the_lock_file_follows_the_umask_and_works_read_only(tmp_path, monkeypatch):
    old = os.umask(0o002)
    try:
        with run_folder.run_lock(tmp_path / "run"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "run" / run_folder.LOCK_NAME).stat().st_mode & 0o777 == 0o664  # a group can use it
    real_open = os.open

    def another_users_file(path, flags, *mode):  # root may write anything: refuse as the OS would a groupmate
        if str(path).endswith(run_folder.LOCK_NAME) and flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *mode)

    monkeypatch.setattr(run_folder.os, "open", another_users_file)
    with run_folder.run_lock(tmp_path / "run"):
        assert held_by_someone(tmp_path / "run")


def test_a_read_only_metrics_file_and_a_dangling_link_are_refused_up_front(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny("dcgan").with_overrides({"train.steps": "2"}), out, Silent())
    log = out / "metrics.jsonl"
    real_access = os.access
    monkeypatch.setattr(run_folder.os, "access", lambda p, mode: False if str(p) == str(log) else real_access(p, mode))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--out", out, "--resume", "auto", "--steps", 4)
    assert code == 2 and f"cannot write to {log}" in err, err
    monkeypatch.undo()
    (tmp_path / "gone").symlink_to(tmp_path / "purged")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", tmp_path / "gone")
    assert code == 2 and "is a symbolic link to" in err and "which does not exist" in err, err


def test_resume_auto_takes_an_intact_last_copy_over_older_step_files(tmp_path):
    out = tmp_path / "run"
    train(tiny("dcgan").with_overrides({"train.steps": "4", "train.ckpt_every": "2", "train.keep_checkpoints": "5"}),
          out, Silent())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # as `cp -r`: last is a file of its own now, no longer a link to step 4
    newest = copy / "checkpoints" / "step-0000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # damaged
    said = []
    ck = find_resume("auto", copy, said.append)
    assert ck.path.name == "last.safetensors" and ck.step == 4 and any("step-0000004" in s for s in said)
    (copy / "checkpoints" / "last.safetensors").unlink()
    assert find_resume("auto", copy, said.append).step == 2  # then the newest step file that loads


def test_a_refused_command_leaves_the_holders_folder_and_lock_alone(tmp_path):
    """Two jobs with the same new --out both saw it missing: the one refused removed the winner's lock file
    and folder (its cleanup ran although it never held the lock)."""
    root = tmp_path / "new"
    with run_folder.run_lock(root):
        with pytest.raises(run_folder.UsageError, match="is training in this run folder"):
            with run_folder.run_lock(root, made=[root]):
                pass
        assert held_by_someone(root)


def test_a_lock_file_removed_between_open_and_flock_is_taken_again(tmp_path, monkeypatch):
    root = tmp_path / "run"
    real = run_folder._lock_or_refuse
    calls = []

    def removed_meanwhile(fd, where):  # a failed command's cleanup, between this one's open and its flock
        calls.append(fd)
        if len(calls) == 1:
            (where / run_folder.LOCK_NAME).unlink()
        real(fd, where)

    monkeypatch.setattr(run_folder, "_lock_or_refuse", removed_meanwhile)
    with run_folder.run_lock(root):
        assert len(calls) == 2 and held_by_someone(root)  # the file that is there now, not the unlinked one


def test_a_run_that_fails_before_writing_anything_of_value_goes(tmp_path, monkeypatch, capsys):
    """Out of memory at the first step, say: config.toml and an empty checkpoints/ were left, and the next
    run took the next number."""
    from aigc_cli.cli import output

    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")

    def no_memory(self, *args):
        raise MemoryError

    monkeypatch.setattr(output.ConsoleReporter, "start", no_memory)
    for out in ([], ["--out", tmp_path / "a" / "run"], ["--out", tmp_path / "kept"]):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--steps", 2, *out)
        assert code == 2 and "out of memory" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no runs/, no a/
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"  # a folder it did not make: nothing removed


def test_a_dangling_runs_link_is_one_line_not_a_hang(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").symlink_to(tmp_path / "purged")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--steps", 1)
    assert code == 2 and "runs is a symbolic link to" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", tmp_path / "runs" / "x")
    assert code == 2 and "runs is a symbolic link to" in err, err


def test_a_lower_keep_checkpoints_frees_space_before_the_first_save(tmp_path, monkeypatch):
    """A full disk: resuming with a lower train.keep_checkpoints failed as before, since pruning came only
    after a successful save."""
    out = tmp_path / "run"
    base = {"train.ckpt_every": "1", "train.log_every": "1", "train.sample_every": "100"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "4", "train.keep_checkpoints": "5"}), out, Silent())
    seen = []
    real = run_folder.RunFolder.save_checkpoint

    def save(self, step, *args, **kwargs):
        seen.append(sorted(p.name for p in self.checkpoints.glob("step-*")))
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(run_folder.RunFolder, "save_checkpoint", save)
    train(tiny("dcgan").with_overrides({**base, "train.steps": "5", "train.keep_checkpoints": "2"}), out, Silent(),
          resume=find_resume("auto", out, print))
    assert seen[0] == ["step-0000003.safetensors", "step-0000004.safetensors"]
    assert ckpt_io.load(out).step == 5


def test_resume_auto_skips_a_checkpoint_whose_optimizer_state_is_damaged(tmp_path, capsys, monkeypatch):
    """load() checks the networks; a damaged optimizer moment was found only by the restore, after the data
    load, and ended the command although an older checkpoint was fine."""
    from safetensors.torch import save_file

    out = tmp_path / "run"
    train(tiny("dcgan").with_overrides({"train.steps": "4", "train.ckpt_every": "2", "train.keep_checkpoints": "5"}),
          out, Silent())
    (out / "checkpoints" / "last.safetensors").unlink()
    newest = ckpt_io.load(out / "checkpoints" / "step-0000004.safetensors")
    tensors = dict(newest.tensors)
    key = next(k for k in tensors if k.startswith("opt.D.") and k.endswith("exp_avg_sq"))
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(newest.path), metadata=newest.meta)
    said = []
    assert find_resume("auto", out, said.append).step == 2
    assert any(key in s and "step-0000004" in s for s in said), said


def test_a_resume_on_data_of_another_size_says_so(tmp_path):
    """Files removed from a folder between runs: the saved position could point past the new epoch's end,
    and the run went on in another order without a word."""
    out = tmp_path / "run"
    base = {"train.ckpt_every": "2", "train.log_every": "2", "train.sample_every": "100"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "2", "data.limit": "256"}), out, Silent())
    assert ckpt_io.load(out).meta["aigc.data_images"] == "256"
    same, fewer = Silent(), Silent()
    train(tiny("dcgan").with_overrides({**base, "train.steps": "3", "data.limit": "256"}), out, same,
          resume=find_resume("auto", out, print))
    train(tiny("dcgan").with_overrides({**base, "train.steps": "4", "data.limit": "128"}), out, fewer,
          resume=find_resume("auto", out, print))
    assert not any("images when" in n for n in same.notes)
    assert any("the data held 256 images when step-0000003.safetensors was saved and holds 128 now" in n
               for n in fewer.notes), fewer.notes


def test_a_sigterm_right_after_the_folder_is_made_removes_it_and_says_stopped(tmp_path, monkeypatch, capsys):
    """train had no SIGTERM handler until its training loop began: a stop just after the run folder and lock
    were made killed the process on the spot and left them behind."""
    import signal

    from aigc_cli import config

    monkeypatch.chdir(tmp_path)
    real = config.check_for_training

    def stopped_meanwhile(*args, **kwargs):  # the folder (with --out) and lock are made by now
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def unexpected(signum, frame):  # without the command's own handler, a failure here, not a killed test run
        raise AssertionError("SIGTERM reached the test's handler")

    monkeypatch.setattr(config, "check_for_training", stopped_meanwhile)
    old = signal.signal(signal.SIGTERM, unexpected)
    try:
        for out in ([], ["--out", tmp_path / "new"]):
            code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--steps", 1, *out)
            assert code == 143 and "stopped: SIGTERM" in err, err
        assert signal.getsignal(signal.SIGTERM) is unexpected  # handed back
    finally:
        signal.signal(signal.SIGTERM, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failure_removes_only_what_the_command_added_to_an_existing_folder(tmp_path, monkeypatch, capsys):
    from aigc_cli.cli import output

    def no_memory(self, *args):
        raise MemoryError

    monkeypatch.setattr(output.ConsoleReporter, "start", no_memory)  # after config.toml and checkpoints/
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (mine, empty):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--steps", 2, "--out", out)
        assert code == 2 and "out of memory" in err, err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and list(empty.iterdir()) == []


def test_sigterm_is_ignored_once_a_command_has_succeeded(monkeypatch):
    """A SIGTERM during the interpreter's shutdown turned a finished run's exit code 0 into 143 (a SIGHUP,
    a terminal closing then, into 129)."""
    import signal

    import aigc_cli
    from aigc_cli import cli

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for code, ignored in ((0, True), (2, False)):
            for s, h in before.items():
                signal.signal(s, h)
            monkeypatch.setattr(cli, "main", lambda code=code: (_ for _ in ()).throw(SystemExit(code)))
            with pytest.raises(SystemExit):
                aigc_cli.main()
            assert all(signal.getsignal(s) == (signal.SIG_IGN if ignored else h) for s, h in before.items())
    finally:  # an ignored SIGHUP left here would be inherited by every later test's subprocess (as nohup)
        for s, h in before.items():
            signal.signal(s, h)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def test_an_out_only_a_real_write_refuses_or_a_name_too_long_is_one_line_naming_out(tmp_path, monkeypatch, capsys):
    # /proc passes os.access for root (and its permission bits for no one say "no"): only a real write tells
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", "/proc/run")
    assert code == 2 and err.startswith("error: --out /proc/run: cannot create files in /proc (") and err.count("\n") == 1, err
    long = tmp_path / ("r" * 256)  # one byte past what file systems allow in a name
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", long)
    assert (code, err) == (2, f"error: --out: the name {'r' * 30}... is 256 bytes long; file systems allow 255\n")
    assert not list(tmp_path.iterdir())  # and the probe left nothing


def test_has_record_is_about_its_step(tmp_path):
    import json

    from aigc_cli.training.run_folder import RunFolder

    run = RunFolder(tmp_path / "r", 0)
    (tmp_path / "r" / "metrics.jsonl").write_text(json.dumps({"step": 10, "fid": 3.0}) + "\n"
                                                  + json.dumps({"step": 20, "loss_d": 1.0}) + "\n")
    assert run.has_record(10, "fid") and not run.has_record(20, "fid") and not run.has_record(10, "kid")


def test_a_dead_runs_lock_file_is_taken_and_names_this_process_alone(tmp_path):
    """A killed run leaves its lock file (the lock itself dies with it): the next run takes it, and the pid a
    refused command reads is this one's, not this one's followed by the rest of a longer dead pid."""
    from aigc_cli.training.run_folder import LOCK_NAME, run_lock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("99999999999")
    with run_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK_NAME).read_text() == str(os.getpid())
