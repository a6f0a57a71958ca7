"""Checkpoint files: full round trip, atomic writes, and clean errors for files that are not ours."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from aigc_cli import checkpoint as ck
from aigc_cli.config import load_preset
from aigc_cli.errors import UsageError
from aigc_cli.models import build_nets
from aigc_cli.training import state
from aigc_cli.training.batches import DeviceBatches
from aigc_cli.training.precision import Precision
from aigc_cli.training.steps import make_optimizers


@pytest.fixture
def saved(tmp_path):
    cfg = load_preset("quickstart").with_overrides({"model.g_width": "8", "model.d_width": "8"})
    torch.manual_seed(0)
    nets = build_nets(cfg.model)
    opts = make_optimizers("gan", nets, cfg.train)
    for opt, net in ((opts["G"], nets["G"]), (opts["D"], nets["D"])):
        net(torch.randn(2, cfg.model.latent_dim) if net is nets["G"] else torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
    amp = Precision("fp16", torch.device("cpu"))
    rng = torch.get_rng_state()
    batches = DeviceBatches(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), None, 2, torch.device("cpu"), 0)
    tensors, meta = state.capture(cfg, nets, opts, amp, batches, 12, 768, {"aigc.extra": "1"})
    path = tmp_path / "c.safetensors"
    ck.write_atomic(path, tensors, meta)
    return cfg, nets, opts, path, rng


def test_round_trip_restores_weights_and_optimizer(saved):
    cfg, nets, opts, path, rng = saved
    loaded = ck.load(path)
    assert loaded.config == cfg and loaded.step == 12 and loaded.images_seen == 768 and loaded.kind == "checkpoint"
    fresh = build_nets(cfg.model)
    loaded.load_net("G", fresh["G"])
    for a, b in zip(fresh["G"].state_dict().values(), nets["G"].state_dict().values()):
        assert torch.equal(a, b)
    fresh_opts = make_optimizers("gan", fresh, cfg.train)
    fresh_batches = DeviceBatches(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), None, 2, torch.device("cpu"), 0)
    fresh_amp = Precision("fp16", torch.device("cpu"))
    torch.manual_seed(123)  # restore() must put the saved RNG state back
    assert state.restore(loaded.tensors, loaded.meta, fresh, fresh_opts, fresh_amp, fresh_batches, path) == (12, 768)
    assert torch.equal(torch.get_rng_state(), rng)
    want, got = opts["D"].state_dict(), fresh_opts["D"].state_dict()
    assert got["param_groups"] == json.loads(json.dumps(want["param_groups"]))
    for idx, per_param in want["state"].items():
        for key, value in per_param.items():
            assert torch.equal(got["state"][idx][key], value)
    assert torch.equal(loaded.tensors["rng.torch"], rng)
    assert "scale" in json.loads(loaded.meta["aigc.scaler"])


def test_created_is_rfc3339_local_time_with_its_offset(saved):
    created = ck.load(saved[3]).meta["aigc.created"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", created), created
    when = datetime.fromisoformat(created)
    assert when.utcoffset() is not None and abs(datetime.now(timezone.utc) - when) < timedelta(minutes=5)


def test_class_names_that_could_be_misread_in_the_list_are_quoted():
    from types import SimpleNamespace

    from aigc_cli.cli.sample import parse_classes

    names = ["2", "Dogs", "a,b", " dog", "it's", "T-shirt/top", "x" * 70, "-3"]
    listed = ck.Checkpoint.numbered_classes(SimpleNamespace(class_names=names))
    assert listed == "0 '2', 1 Dogs, 2 'a,b', 3 ' dog', 4 \"it's\", 5 T-shirt/top, 6 " + "x" * 57 + "..., 7 '-3'"
    with pytest.raises(UsageError) as e:  # --class's messages show them the same way
        parse_classes("cats", names)
    assert "this model's classes are '2', Dogs, 'a,b', ' dog', \"it's\", T-shirt/top, xxx" in str(e.value)


def test_run_folder_resolves_to_newest(tmp_path, saved):
    path = saved[3]
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for step in (5, 40, 7):
        (run / f"step-{step:07d}.safetensors").write_bytes(path.read_bytes())
    assert ck.resolve(tmp_path / "run").name == "step-0000040.safetensors"
    (run / "last.safetensors").write_bytes(path.read_bytes())
    assert ck.resolve(tmp_path / "run").name == "last.safetensors"
    for f in run.iterdir():  # all that was kept of a run: its best ("no checkpoint found" before)
        f.rename(run / "best.safetensors") if f.name == "step-0000040.safetensors" else f.unlink()
    assert ck.resolve(tmp_path / "run").name == "best.safetensors"
    (run / "best.safetensors").unlink()
    with pytest.raises(UsageError, match="no checkpoint found in this folder"):
        ck.resolve(tmp_path / "run")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign", "bad-config", "bad-format", "mismatch",
                                    "no-step", "no-config"])
def test_bad_files_give_usage_errors(tmp_path, saved, damage):
    cfg, path = saved[0], saved[3]
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "foreign":
        save_file({"w": torch.zeros(3)}, str(bad), metadata={"format": "pt"})
    else:
        loaded = ck.load(path)
        meta = dict(loaded.meta)
        if damage == "bad-config":
            meta["aigc.config"] = "{not json"
        elif damage == "bad-format":
            meta["aigc.format"] = "99"
        elif damage == "no-step":  # `info` said step 0, a resume failed on a KeyError
            del meta["aigc.step"]
        elif damage == "no-config":  # said "its stored config is invalid (Expecting value: line 1 column 1)"
            del meta["aigc.config"]
        tensors = dict(loaded.tensors)
        if damage == "mismatch":
            key = next(k for k in tensors if k.startswith("G.") and tensors[k].dim() == 4)
            tensors[key] = torch.zeros(1, 1, 1, 1)
        save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(UsageError) as e:
        loaded = ck.load(bad)
        loaded.load_net("G", build_nets(cfg.model)["G"])
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    if damage == "no-config":
        assert "aigc.config is missing" in str(e.value)


def test_failed_write_keeps_previous_file(tmp_path, saved, monkeypatch):
    path = saved[3]
    before = path.read_bytes()

    def disk_full(tmp, *args, **kwargs):
        with open(tmp, "wb") as f:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # from a write: no file name

    monkeypatch.setattr(ck.safetensors_file, "write", disk_full)
    with pytest.raises(OSError) as e:
        ck.write_atomic(path, {"x": torch.zeros(1)}, {"aigc.format": "1"})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_disk_full_during_training_stops_cleanly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from conftest import Silent, tiny

    from aigc_cli.training.loop import train

    real, calls = ck.safetensors_file.write, {"n": 0}

    def fails_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck.safetensors_file, "write", fails_second_time)
    cfg = tiny("dcgan").with_overrides({"train.steps": "10", "train.ckpt_every": "5"})
    with pytest.raises(UsageError) as e:
        train(cfg, tmp_path / "r", Silent())
    message = str(e.value)
    assert "No space left on device" in message and "step-0000010" in message and "is intact" in message
    assert ck.load(tmp_path / "r").step == 5
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 10**6), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4),
       prefix=st.binary(max_size=64))
def test_fuzzed_checkpoint_bytes_load_or_fail_cleanly(tmp_path, saved, cut, flips, prefix):
    """Truncated, bit-flipped and garbage-prefixed files: a Checkpoint or a one-line UsageError."""
    data = bytearray(saved[3].read_bytes())
    data = data[: cut % (len(data) + 1)]
    for pos, bits in flips:
        if data:
            data[pos % len(data)] ^= bits
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(prefix) + bytes(data))
    try:
        loaded = ck.load(bad)
        loaded.load_net("G", build_nets(loaded.config.model)["G"])
    except UsageError as e:
        assert "\n" not in str(e)


def test_a_checkpoint_that_does_not_fit_is_one_usage_error_and_the_previous_one_stays(tmp_path):
    import resource

    from conftest import Silent, tiny

    from aigc_cli.errors import UsageError
    from aigc_cli.training.loop import train

    cfg = tiny("dcgan").with_overrides({"train.steps": "4", "train.ckpt_every": "2", "train.sample_every": "100"})
    train(cfg, tmp_path / "r", Silent())
    size = (tmp_path / "r" / "checkpoints" / "last.safetensors").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))  # writes past it fail with EFBIG, as on a full disk
    try:
        with pytest.raises(UsageError, match="cannot write checkpoint .*step-0000006.safetensors: File too large; "
                                             "the previous checkpoint .* is intact"):
            train(cfg.with_overrides({"train.steps": "6"}), tmp_path / "r", Silent(),
                  resume=ck.load(tmp_path / "r" / "checkpoints" / "last.safetensors"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert ck.load(tmp_path / "r").step == 4
    assert not [p for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.startswith(".")]


class _Watching:
    """Mixed into conftest.Timed: the step files in the run folder as each step begins (after the last
    step's save), and a crash at step `crash_at`."""

    def __init__(self, run, minutes, crash_at=None):
        super().__init__(minutes)
        self.run, self.crash_at, self.seen = run, crash_at, {}

    def advance(self, step):
        super().advance(step)
        self.seen[step] = _step_files(self.run)
        if step == self.crash_at:
            raise RuntimeError("killed")


def _step_files(run):
    return sorted(ck.step_of(p) for p in (run / "checkpoints").glob("step-*.safetensors"))


def _timed_cfg(**extra):
    from conftest import tiny

    return tiny("dcgan").with_overrides({"train.steps": 10, "train.ckpt_every": 5, "train.sample_every": 100,
                                         "train.ckpt_minutes": 20, **extra})


def test_a_checkpoint_by_time_is_replaced_by_the_next_save_and_pushes_none_out(tmp_path, monkeypatch):
    """train.ckpt_minutes=20 at 7 minutes a step (ckpt_every 5, keep 1): by time at 3 and 8, by steps at 5
    and 10. Each save by time is the resume point until the next save replaces it, and never counts
    towards keep_checkpoints."""
    from conftest import Timed

    from aigc_cli.training.loop import train

    run = tmp_path / "r"
    rep = type("Watch", (_Watching, Timed), {})(run, 7).on(monkeypatch)
    train(_timed_cfg(**{"train.keep_checkpoints": 1}), run, rep)
    assert {s: rep.seen[s] for s in (4, 6, 9)} == {4: [3], 6: [5], 9: [5, 8]}
    assert _step_files(run) == [10]
    assert ck.load(run).step == 10


def test_a_run_killed_after_a_checkpoint_by_time_resumes_from_it_and_the_next_save_replaces_it(tmp_path, monkeypatch,
                                                                                                capsys):
    from conftest import Silent, Timed, run_cli

    from aigc_cli.training.loop import train

    run = tmp_path / "r"
    rep = type("Watch", (_Watching, Timed), {})(run, 7, crash_at=9).on(monkeypatch)
    cfg = _timed_cfg(**{"train.keep_checkpoints": 2})
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, run, rep)
    assert _step_files(run) == [5, 8]
    assert ck.read_meta(run / "checkpoints" / "step-0000008.safetensors")["aigc.saved_for"] == "time"
    assert "aigc.saved_for" not in ck.read_meta(run / "checkpoints" / "step-0000005.safetensors")
    code, out, _ = run_cli(monkeypatch, capsys, "info", run)  # the run folder: its newest, step 8
    assert code == 0 and "written by train.ckpt_minutes: the run's next checkpoint deletes this step file" in out
    code, out, _ = run_cli(monkeypatch, capsys, "info", run / "checkpoints" / "step-0000005.safetensors", "--json")
    assert code == 0 and "saved_for" not in json.loads(out)
    os.link(run / "checkpoints" / "step-0000008.safetensors", run / "checkpoints" / "best.safetensors")  # as a best found then
    code, out, _ = run_cli(monkeypatch, capsys, "info", run / "checkpoints" / "best.safetensors")
    assert code == 0 and "written by train.ckpt_minutes: the run's next checkpoint deletes its step file; best.safetensors " \
                         "stays" in out, out  # it said "deletes this step file" of best.safetensors
    os.remove(run / "checkpoints" / "best.safetensors")
    # A kill between a save and the removal of the transient before it leaves that one behind (made here
    # by copying): the resume removes it, or it would count towards keep and push step 5 out.
    shutil.copyfile(run / "checkpoints" / "step-0000008.safetensors", run / "checkpoints" / "step-0000007.safetensors")
    resumed = Silent()
    train(cfg, run, resumed, resume=ck.load(run))  # as --resume auto: the newest, step 8
    assert resumed.info["start_step"] == 8
    assert _step_files(run) == [5, 10]  # 8 replaced by the final save, 7 gone, 5 kept (keep 2)


def test_without_checkpoints_by_time_only_those_by_steps(tmp_path, monkeypatch):
    from conftest import Timed

    from aigc_cli.training.loop import train

    train(_timed_cfg(**{"train.ckpt_minutes": 0, "train.keep_checkpoints": 0}), tmp_path / "r",
          Timed(7).on(monkeypatch))
    assert _step_files(tmp_path / "r") == [5, 10]


def test_checkpoint_minutes_default_and_bad_values():
    from conftest import tiny

    assert tiny("dcgan").train.ckpt_minutes == 30
    with pytest.raises(UsageError, match=r"train.ckpt_minutes must be >= 0 \(0: checkpoints by steps only\), got -1.0"):
        tiny("dcgan").with_overrides({"train.ckpt_minutes": "-1"})
    with pytest.raises(UsageError, match="train.ckpt_minutes must be a finite number, got nan"):
        tiny("dcgan").with_overrides({"train.ckpt_minutes": "nan"})


def test_a_damaged_file_named_by_its_path_is_the_error_not_swapped_for_another(tmp_path):
    """Only a run folder falls back to its newest step file that reads; a file the user named is that file."""
    from conftest import Silent, tiny

    from aigc_cli.training.loop import train

    train(tiny("dcgan").with_overrides({"train.steps": "4", "train.ckpt_every": "2"}), tmp_path / "r", Silent())
    newest = tmp_path / "r" / "checkpoints" / "step-0000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    said = []
    with pytest.raises(UsageError):
        ck.load(newest, warn=said.append)
    assert ck.load(tmp_path / "r", warn=said.append).step == 2 and len(said) == 1


def test_step_files_sort_by_step_also_past_seven_digits(tmp_path):
    for step in (9_999_999, 10_000_000, 500):
        (tmp_path / f"step-{step:07d}.safetensors").write_bytes(b"")
    assert [ck.step_of(p) for p in ck.step_files(tmp_path)] == [10_000_000, 9_999_999, 500]


def test_info_says_the_runs_best_when_the_checkpoint_was_saved(tmp_path, monkeypatch, capsys):
    from conftest import Silent, run_cli, tiny

    from aigc_cli.training.loop import train

    run = tmp_path / "r"
    train(tiny("dcgan").with_overrides({"train.steps": 15, "train.ckpt_every": 5, "train.log_every": 5,
                                        "train.best_metric": "loss_g"}), run, Silent())
    losses = {json.loads(line)["step"]: json.loads(line)["loss_g"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    for step in (5, 10, 15):
        code, out, _ = run_cli(monkeypatch, capsys, "info", run / "checkpoints" / f"step-{step:07d}.safetensors", "--json")
        best_step = min((s for s in losses if s <= step), key=losses.get)
        assert json.loads(out)["best"] == {"metric": "loss_g", "value": losses[best_step], "step": best_step}
        code, out, _ = run_cli(monkeypatch, capsys, "info", run / "checkpoints" / f"step-{step:07d}.safetensors")
        said = "(this checkpoint)" if best_step == step else f"at step {best_step}"
        assert f"the run's best when this was saved: loss_g {losses[best_step]:.6g} {said}\n" in out, out
    code, out, _ = run_cli(monkeypatch, capsys, "info", run / "checkpoints" / "best.safetensors")
    assert "(this checkpoint)" in out
