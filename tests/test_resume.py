"""Exact resume: K steps + resume to N equals N steps in one go, bit for bit, for a GAN and a VAE."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.errors import Interrupted, UsageError
from aigc_cli.training.loop import train
from aigc_cli.training.state import find_resume
from conftest import Silent, StopsAt, tiny


def final_tensors(run):
    ck = ckpt_io.load(run)
    return {k: v for k, v in ck.tensors.items() if not k.startswith("rng.")}, ck


AIDS = {"loss.gan": "hinge", "model.conditional": "true", "train.n_critic": "2", "train.ema_decay": "0.9",
        "train.ema_start": "3", "train.diffaugment": "translation,cutout,color", "train.lr_warmup": "3",
        "train.lr_decay": "cosine"}


def run_cfg(kind, steps, extra=None):
    # log and checkpoint intervals that do not divide the stop step, so the resume starts mid-interval
    return tiny(kind).with_overrides({"train.steps": str(steps), "train.log_every": "4", "train.ckpt_every": "6",
                                      "train.sample_every": "100", **(extra or {})})


@pytest.mark.parametrize("kind, extra", [("dcgan", None), ("vae", None), ("resnet_gan", AIDS),
                                         ("vae", {"model.conditional": "true", "loss.kl_warmup": "8"})])
def test_stop_and_resume_is_bit_identical(kind, extra, tmp_path):
    cfg = run_cfg(kind, 13, extra)
    train(cfg, tmp_path / "whole", Silent())
    with pytest.raises(Interrupted) as stopped:
        train(cfg, tmp_path / "split", StopsAt(5))
    assert stopped.value.exit_code == 143
    rep = Silent()
    resume = find_resume("auto", tmp_path / "split", rep.note)
    assert resume is not None and resume.step == 5
    summary = train(cfg, tmp_path / "split", rep, resume=resume)
    assert summary["start_step"] == 5 and summary["steps"] == 13
    assert any("resumed from" in n for n in rep.notes)

    whole, ck_whole = final_tensors(tmp_path / "whole")
    split, ck_split = final_tensors(tmp_path / "split")
    assert whole.keys() == split.keys() and len(whole) > 10
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    assert ck_whole.images_seen == ck_split.images_seen == 13 * 16 * cfg.train.n_critic
    png = "samples/step-0000013.png"
    assert (tmp_path / "whole" / png).read_bytes() == (tmp_path / "split" / png).read_bytes()
    logged = {name: [json.loads(s) for s in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("whole", "split")}
    assert [r["step"] for r in logged["whole"]] == [r["step"] for r in logged["split"]] == [4, 8, 12, 13]
    # the same averages too: the losses summed since step 4 went into the step-5 checkpoint (before, the
    # line at step 8 averaged steps 6 to 8 only)
    timing = ("img_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in logged["whole"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in logged["split"]]


@pytest.mark.parametrize("before, after", [("1", "0"), ("0", "1")])
def test_a_resume_that_turns_a_penalty_on_or_off_logs_means_over_its_own_steps(before, after, tmp_path):
    """The sums saved at the stop went on into the next line: turned off, r1's sum was dropped and the
    stop's loss_d and loss_g mixed in; turned on, r1's sum was divided by steps that had none (2 of 5)."""
    cfg = run_cfg("dcgan", 9, {"model.d_norm": "none", "loss.r1_gamma": before})
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "run", StopsAt(5))
    shutil.copytree(tmp_path / "run", tmp_path / "each")  # for the same resume, logging every step
    changed = {"loss.r1_gamma": after, "train.steps": "7"}
    for run, extra in (("run", {}), ("each", {"train.log_every": "1"})):
        train(cfg.with_overrides({**changed, **extra}), tmp_path / run, Silent(),
              resume=find_resume("auto", tmp_path / run, print))

    def lines(run):
        return {r["step"]: r for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())}

    line, each = lines("run")[7], lines("each")
    assert ("r1" in line) == (after == "1") and ("r1" in lines("run")[4]) == (before == "1")
    for key in ("loss_d", "loss_g", "r1")[: 2 + (after == "1")]:
        assert line[key] == pytest.approx((each[6][key] + each[7][key]) / 2, abs=2e-6), key


def test_architecture_change_is_refused_and_harmless_change_allowed(tmp_path):
    train(run_cfg("dcgan", 4), tmp_path / "r", Silent())
    resume = find_resume("auto", tmp_path / "r", print)
    with pytest.raises(UsageError, match=r"model\.g_width 8 -> 16.*architecture|architecture.*model\.g_width 8 -> 16"):
        train(run_cfg("dcgan", 6).with_overrides({"model.g_width": "16"}), tmp_path / "r", Silent(), resume=resume)
    rep = Silent()
    summary = train(run_cfg("dcgan", 6).with_overrides({"train.log_every": "3"}), tmp_path / "r", rep, resume=resume)
    assert summary["steps"] == 6
    assert any("train.log_every 4 -> 3" in n for n in rep.notes)


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path):
    train(run_cfg("dcgan", 12), tmp_path / "r", Silent())
    newest = tmp_path / "r" / "checkpoints" / "step-0000012.safetensors"
    (tmp_path / "r" / "checkpoints" / "last.safetensors").unlink()
    newest.write_bytes(newest.read_bytes()[:1000])
    notes = []
    resume = find_resume("auto", tmp_path / "r", notes.append)
    assert resume.step == 6 and any("step-0000012" in n for n in notes)
    assert find_resume("auto", tmp_path / "empty", notes.append) is None


def test_exported_generator_cannot_be_resumed(tmp_path):
    from aigc_cli.export import export_generator

    train(run_cfg("dcgan", 3), tmp_path / "r", Silent())
    export_generator(ckpt_io.load(tmp_path / "r"), tmp_path / "g.safetensors", "fp32")
    with pytest.raises(UsageError, match="no training state"):
        find_resume(str(tmp_path / "g.safetensors"), tmp_path / "r", print)


def test_a_changed_learning_rate_on_resume_takes_effect(tmp_path):
    train(run_cfg("dcgan", 4), tmp_path / "r", Silent())
    resume = find_resume("auto", tmp_path / "r", print)
    changed = run_cfg("dcgan", 6).with_overrides({"train.lr_g": "1e-5", "train.beta1": "0.0"})
    train(changed, tmp_path / "r", Silent(), resume=resume)
    groups = {name: json.loads(ckpt_io.load(tmp_path / "r").meta[f"aigc.opt.{name}.param_groups"])[0]
              for name in ("G", "D")}
    assert groups["G"]["lr"] == 1e-5 and groups["D"]["lr"] == 2e-4
    assert groups["G"]["betas"] == [0.0, 0.999] and groups["D"]["betas"] == [0.0, 0.999]


def ckpt_names(run):
    return sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))


def test_resuming_from_an_earlier_checkpoint_of_the_run_starts_a_branch_and_keeps_the_rest(tmp_path):
    run = tmp_path / "r"
    base = {"train.ckpt_every": "5", "train.log_every": "5", "train.sample_every": "100", "train.keep_checkpoints": "3"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "20"}), run, Silent())
    assert ckpt_names(run) == ["last.safetensors", "step-0000010.safetensors", "step-0000015.safetensors",
                               "step-0000020.safetensors"]
    rep = Silent()
    train(tiny("dcgan").with_overrides({**base, "train.steps": "15", "train.lr_g": "1e-4"}), run, rep,
          resume=ckpt_io.load(run / "checkpoints" / "step-0000010.safetensors"))
    aside = run / "checkpoints" / "after-step-0000010"
    assert any(str(aside) in n for n in rep.notes), rep.notes
    # The resume source is not pruned; the abandoned branch is set aside whole, with its metrics lines.
    assert ckpt_names(run) == ["last.safetensors", "step-0000010.safetensors", "step-0000015.safetensors"]
    assert sorted(p.name for p in aside.iterdir()) == ["last.safetensors", "metrics.jsonl", "samples",
                                                       "step-0000015.safetensors", "step-0000020.safetensors"]
    assert [p.name for p in (aside / "samples").iterdir()] == ["step-0000020.png"]  # the new branch wrote its own 15
    assert [json.loads(s)["step"] for s in (aside / "metrics.jsonl").read_text().splitlines()] == [15, 20]
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [5, 10, 15]
    found = find_resume("auto", run, warn=lambda m: None)
    assert found.step == 15 and json.loads(found.meta["aigc.opt.G.param_groups"])[0]["lr"] == 1e-4  # the new branch
    rep = Silent()
    # A resume that trains nothing moves nothing (but the lock, which names the process holding it).
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".aigc-train.lock"}
    summary = train(tiny("dcgan").with_overrides({**base, "train.steps": "12"}), run, rep, resume=found)
    assert summary["steps"] == 15 and any("nothing to train" in n for n in rep.notes), rep.notes
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".aigc-train.lock"} == before
    # the summary names the step file, also when the resume was from last.safetensors, which moves on
    again = train(tiny("dcgan").with_overrides({**base, "train.steps": "12"}), run, Silent(),
                  resume=ckpt_io.load(run / "checkpoints" / "last.safetensors"))
    assert again["checkpoint"] == str((run / "checkpoints" / "step-0000015.safetensors").resolve()), again


def test_a_branch_from_best_survives_a_crash_before_its_first_save(tmp_path):
    run = tmp_path / "r"
    base = {"train.ckpt_every": "5", "train.log_every": "5", "train.sample_every": "100"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "10"}), run, Silent())
    ckdir = run / "checkpoints"
    (ckdir / "best.safetensors").unlink(missing_ok=True)
    (ckdir / "best.safetensors").hardlink_to(ckdir / "step-0000005.safetensors")
    (ckdir / "step-0000005.safetensors").unlink()  # as pruning leaves an early best

    class Crash(Silent):
        def advance(self, step):
            raise RuntimeError("killed before the first save")

    with pytest.raises(RuntimeError):
        train(tiny("dcgan").with_overrides({**base, "train.steps": "20"}), run, Crash(),
              resume=ckpt_io.load(ckdir / "best.safetensors"))
    assert ckpt_names(run) == ["best.safetensors", "last.safetensors"]  # step-10 and the old last set aside
    found = find_resume("auto", run, warn=lambda m: None)
    assert found is not None and found.step == 5


def test_the_only_checkpoint_left_may_be_best(tmp_path):
    run = tmp_path / "r"
    train(tiny("dcgan").with_overrides({"train.steps": "10", "train.ckpt_every": "5", "train.best_metric": "loss_g"}),
          run, Silent())
    for p in (run / "checkpoints").glob("*.safetensors"):
        if p.name != "best.safetensors":
            p.unlink()
    assert find_resume("auto", run, warn=lambda m: None).step == ckpt_io.load(run / "checkpoints" / "best.safetensors").step


def test_starting_over_after_unloadable_checkpoints_keeps_them_and_their_metrics(tmp_path):
    run = tmp_path / "r"
    cfg = tiny("dcgan").with_overrides({"train.steps": "10", "train.ckpt_every": "5", "train.log_every": "5"})
    train(cfg, run, Silent())
    for p in (run / "checkpoints").glob("*.safetensors"):
        p.write_bytes(b"garbage")
    assert find_resume("auto", run, warn=lambda m: None) is None
    rep = Silent()
    train(cfg.with_overrides({"train.steps": "5"}), run, rep)  # what `--resume auto` does when nothing loads
    aside = run / "checkpoints" / "after-step-0000000"
    assert any("starting over" in n and str(aside) in n for n in rep.notes), rep.notes
    assert ckpt_names(run) == ["last.safetensors", "step-0000005.safetensors"]  # not pruned by stale step-10
    assert len((aside / "metrics.jsonl").read_text().splitlines()) == 2 and (aside / "step-0000010.safetensors").exists()


def test_a_fresh_start_drops_metrics_left_by_a_run_killed_before_its_first_checkpoint(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 2, "loss_d": 1}\n{"step": 400, "loss_d": 1}\n{"junk": 1}\n')
    train(tiny("dcgan").with_overrides({"train.steps": "10", "train.log_every": "5"}), run, Silent())
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_resuming_another_runs_checkpoint_into_an_existing_run_is_refused(monkeypatch, capsys, tmp_path):
    from conftest import run_cli

    for name in ("a", "b"):
        train(tiny("dcgan").with_overrides({"train.steps": "5", "train.ckpt_every": "5"}), tmp_path / name, Silent())
    before = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", tmp_path / "b", "--out", tmp_path / "a",
                           "--steps", "8")
    assert code == 2 and "another one" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()} == before
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", tmp_path / "b", "--out", tmp_path / "c",
                           "--steps", "8", "--quiet")
    assert code == 0 and ckpt_io.load(tmp_path / "c").step == 8, err  # into a new folder: a fork, allowed


def test_a_set_aside_branch_is_forked_not_mixed_back_in(monkeypatch, capsys, tmp_path):
    from conftest import run_cli

    run = tmp_path / "r"
    base = {"train.ckpt_every": "5", "train.log_every": "5", "train.sample_every": "100"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "15"}), run, Silent())
    train(tiny("dcgan").with_overrides({**base, "train.steps": "10"}), run, Silent(),
          resume=ckpt_io.load(run / "checkpoints" / "step-0000005.safetensors"))
    old_branch = run / "checkpoints" / "after-step-0000005" / "step-0000015.safetensors"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".aigc-train.lock"}
    for where in (old_branch, old_branch.parent):  # its run is r, which holds the other branch: refused
        code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", where, "--steps", "20")
        assert code == 2 and "a branch set aside from it" in err and "new --out" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != ".aigc-train.lock"} == before
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", old_branch, "--out", tmp_path / "fork",
                           "--steps", "20", "--quiet")
    assert code == 0 and ckpt_io.load(tmp_path / "fork").step == 20, err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run / "checkpoints", "--steps", "12", "--quiet")
    assert code == 0 and ckpt_io.load(run).step == 12 and not (run / "checkpoints" / "checkpoints").exists(), err


def test_going_back_keeps_best_on_the_checkpoint_that_set_it(tmp_path):
    run = tmp_path / "r"
    base = {"train.ckpt_every": "5", "train.log_every": "5", "train.sample_every": "100", "train.best_metric": "loss_d"}
    train(tiny("dcgan").with_overrides({**base, "train.steps": "30"}), run, Silent())
    ck = ckpt_io.load(run / "checkpoints" / "step-0000020.safetensors")
    best_then = json.loads(ck.meta["aigc.best_value"])
    setter = min((p for p in (run / "checkpoints").glob("step-*.safetensors")
                  if json.loads(ckpt_io.read_meta(p)["aigc.best_value"]) == best_then), key=lambda p: p.name)
    summary = train(tiny("dcgan").with_overrides({**base, "train.steps": "20"}), run, Silent(), resume=ck)  # no-op
    summary = train(tiny("dcgan").with_overrides({**base, "train.steps": "22", "train.ckpt_every": "100"}), run,
                    Silent(), resume=ck)
    best = run / "checkpoints" / "best.safetensors"
    assert best.exists() and summary["best"]["path"] == str(best)
    assert ckpt_io.load(best).step <= 22 and (ckpt_io.load(best).step == 22 or best.samefile(setter))


def test_checkpoints_past_ten_million_steps_sort_by_number(tmp_path):
    from aigc_cli.training.run_folder import RunFolder

    run = RunFolder(tmp_path / "r", keep=1)
    for step in (9_999_999, 10_000_000):
        (run.checkpoints / f"step-{step:07d}.safetensors").write_bytes(b"x")
    run.prune()
    assert ckpt_names(tmp_path / "r") == ["step-10000000.safetensors"]


def test_a_users_files_named_like_step_files_are_never_pruned_resumed_or_set_aside(tmp_path):
    """`step-*.safetensors` also matches a user's copy (step-0000004-copy) or step-best: such names are not aigc's
    step files. Pruning sorted them first (step -1) and deleted them; resume auto warned about their step."""
    cfg = run_cfg("dcgan", 8, {"train.ckpt_every": "2", "train.keep_checkpoints": "1"})
    run = tmp_path / "r"
    train(cfg.with_overrides({"train.steps": "4"}), run, Silent())
    folder = run / "checkpoints"
    mine = [folder / "step-0000004-copy.safetensors", folder / "step-best.safetensors", folder / "step-9.safetensors.safetensors"]
    for path in mine:
        shutil.copyfile(folder / "step-0000004.safetensors", path)
    rep = Silent()
    resume = find_resume("auto", run, rep.note)
    assert resume.path.name in ("last.safetensors", "step-0000004.safetensors") and resume.step == 4 and not rep.notes
    train(cfg, run, rep, resume=resume)
    assert [p.name for p in ckpt_io.step_files(folder)] == ["step-0000008.safetensors"] and all(p.is_file() for p in mine)
    train(cfg, run, Silent(), resume=ckpt_io.load(mine[0]))  # going back to step 4 sets aside step 8, not the copies
    assert all(p.is_file() for p in mine) and (folder / "after-step-0000004" / "step-0000008.safetensors").is_file()


def test_grids_of_a_run_killed_before_its_first_checkpoint_go_and_a_users_pngs_stay(tmp_path):
    from aigc_cli.training.run_folder import RunFolder

    run = RunFolder(tmp_path / "r", keep=1)
    run.samples.mkdir()
    ours, theirs = ["step-0000005.png", "recon-step-0000005.png"], ["my-step-0000005.png", "step-5-copy.png", "cover.png"]
    for name in ours + theirs:
        (run.samples / name).write_bytes(b"png")
    run.remove_grids()
    assert sorted(p.name for p in run.samples.iterdir()) == sorted(theirs)
    for name in ours:  # a branch set aside takes aigc's grids after its step, and no user's PNG either
        (run.samples / name.replace("5", "9")).write_bytes(b"png")
    (run.checkpoints / "step-0000009.safetensors").write_bytes(b"a later checkpoint")
    aside = run.set_aside_after(4)
    assert sorted(p.name for p in (aside / "samples").iterdir()) == ["recon-step-0000009.png", "step-0000009.png"]
    assert sorted(p.name for p in run.samples.iterdir()) == sorted(theirs)


def test_going_back_sets_aside_a_last_or_best_that_cannot_be_read(tmp_path):
    """Their step unknown, they may hold the branch left behind: moved with it, not kept as this branch's."""
    cfg = run_cfg("dcgan", 4, {"train.ckpt_every": "2", "train.keep_checkpoints": "0"})
    train(cfg, tmp_path / "run", Silent())
    folder = tmp_path / "run" / "checkpoints"
    (folder / "best.safetensors").write_bytes(b"damaged")
    (folder / "last.safetensors").unlink()
    (folder / "last.safetensors").write_bytes(b"damaged too")
    train(cfg, tmp_path / "run", Silent(), resume=ckpt_io.load(folder / "step-0000002.safetensors"))
    aside = folder / "after-step-0000002"
    assert (aside / "best.safetensors").read_bytes() == b"damaged" and (aside / "last.safetensors").read_bytes() == b"damaged too"
    assert ckpt_io.load(tmp_path / "run").step == 4  # the new branch's own


def test_trimming_metrics_keeps_records_with_a_step_number_only(tmp_path):
    """Lines that are no aigc record (a string step, a JSON list, a torn line) go; they broke the step comparison."""
    from aigc_cli.training.run_folder import RunFolder

    run = RunFolder(tmp_path / "r", keep=1)
    (tmp_path / "r" / "metrics.jsonl").write_text('{"step": 1}\n{"step": "2"}\n[1, 2]\n{"step": 3\n{"step": 3}\n{"step": 9}\n')
    run.trim_metrics(5)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 3}\n'


def test_metrics_with_bytes_cut_mid_character_by_a_crash_are_trimmed_not_a_traceback(tmp_path):
    from aigc_cli.training.run_folder import RunFolder

    run = RunFolder(tmp_path / "r", keep=1)
    for step in (5, 10, 15):
        run.append_metrics({"step": step, "loss": 1.0})
    with open(tmp_path / "r" / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 20, "note": "caf\xc3')  # the crash cut a two-byte character in half
    run.trim_metrics(10)
    assert [json.loads(s)["step"] for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [5, 10]


def test_one_training_process_a_run_folder(tmp_path, monkeypatch, capsys):
    """Two jobs into one --out (a job array's slip, a job resubmitted while the first still runs) pruned and
    overwrote each other's checkpoints. The second is refused: at once by the command, and by the run itself
    where both started together (the command's check passed for both)."""
    from aigc_cli.training.run_folder import LOCK_NAME, run_lock
    from conftest import run_cli

    out = tmp_path / "run"
    train(run_cfg("dcgan", 2), out, Silent())
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with run_lock(out):  # another process's lock, as far as flock is concerned (another open file)
        assert (out / LOCK_NAME).read_text() == str(os.getpid())
        code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", out, "--resume", "auto")
        assert code == 2 and f"another `aigc train` (pid {os.getpid()}) is training in this run folder" in err, err
        with pytest.raises(UsageError, match="is training in this run folder"):
            train(run_cfg("dcgan", 4), out, Silent(), resume=find_resume("auto", out, print))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing touched
    train(run_cfg("dcgan", 4), out, Silent(), resume=find_resume("auto", out, print))  # released: it goes on
    assert ckpt_io.load(out).step == 4


def test_a_resume_removes_the_temporary_files_of_a_killed_run(tmp_path):
    """A kill -9 (the OOM killer, a node failure) during a checkpoint write leaves a checkpoint-sized hidden
    temporary file; the next run in the folder, holding the run lock, removes such leftovers and no others."""
    import subprocess
    import sys

    out = tmp_path / "run"
    train(run_cfg("dcgan", 6), out, Silent())
    for target, suffix in ((out / "checkpoints" / "step-0000012.safetensors", ".tmp"),
                           (out / "config.toml", ".tmp"), (out / "samples" / "step-0000012.png", ".png")):
        killed = subprocess.run([sys.executable, "-c", "import os, sys\nfrom aigc_cli.files import atomic_write\n"
                                 "with atomic_write(sys.argv[1], sys.argv[2]) as tmp:\n"
                                 "    tmp.write_bytes(bytes(100000)); os.kill(os.getpid(), 9)", target, suffix])
        assert killed.returncode == -signal.SIGKILL
    (out / "checkpoints" / ".last.safetensors.link.tmp").hardlink_to(out / "checkpoints" / "last.safetensors")
    leftovers = {p for p in out.rglob(".*") if p.name.endswith((".tmp", ".png"))}
    assert len(leftovers) == 4
    # not training's names: a user's files, or an `aigc export`/`sample` writing into the folder meanwhile
    kept = [out / "checkpoints" / ".notes.tmp", out / "samples" / ".mine.png", out / "keep.12345678.tmp",
            out / ".g.safetensors.0123abcd.tmp", out / "samples" / ".preview.png.0123abcd.png"]
    for path in kept:
        path.write_text("the user's")
    train(run_cfg("dcgan", 8), out, Silent(), resume=find_resume("auto", out, print))
    assert ckpt_io.load(out).step == 8
    assert not any(p.exists() for p in leftovers) and all(p.read_text() == "the user's" for p in kept)


@pytest.mark.parametrize("make_file", ["checkpoints", "samples", ""])
def test_a_run_folder_that_cannot_be_written_is_refused_before_the_data_loads(make_file, tmp_path, monkeypatch, capsys):
    """Found at the first save, it cost the data load and a checkpoint interval's training."""
    from conftest import run_cli

    out = tmp_path / "run" / "sub"
    blocker = out / make_file if make_file else out.parent  # "": a file on the way to --out
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", out, "--steps", "2")
    assert (code, err) == (2, f"error: --out {out}: {blocker} is a file, not a folder\n")


def test_a_run_folder_without_write_permission_is_refused_at_once(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    real_access = os.access
    # as a user without write permission sees it (these tests may run as root, whom permissions do not stop)
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == out / "checkpoints" else real_access(p, mode))
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", out, "--steps", "2")
    assert (code, err) == (2, f"error: --out {out}: cannot write in {out / 'checkpoints'} (permission denied)\n")
    assert list((out / "checkpoints").iterdir()) == []


class SignalsAt(Silent):
    def __init__(self, k: int, sig):
        super().__init__()
        self.k, self.sig = k, sig

    def advance(self, step):
        if step == self.k:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("kind", ["dcgan", "classifier"])
def test_a_signal_at_the_last_step_ends_the_run_as_complete(kind, tmp_path):
    """Nothing is left to resume: exit 0 (a batch script's requeue loop must not run it again), and nothing
    long starts after the stop was asked for (a classifier's held-out accuracy)."""
    rep = SignalsAt(6, signal.SIGTERM)
    summary = train(run_cfg(kind, 6), tmp_path / "run", rep)
    assert summary["steps"] == 6 and ckpt_io.load(tmp_path / "run").step == 6 and "test_accuracy" not in summary
    assert rep.notes[-1] == "SIGTERM came at the last step, 6: the run is complete" + (
        "; skipped the held-out accuracy" if kind == "classifier" else "")
    rep = SignalsAt(8, signal.SIGUSR1)  # --exit-on-usr1 asks for a requeue: none is needed either
    summary = train(run_cfg(kind, 8), tmp_path / "run", rep, resume=find_resume("auto", tmp_path / "run", print),
                    exit_on_usr1=True)
    assert summary["steps"] == 8 and rep.notes[-1].startswith("SIGUSR1: saved ")


@pytest.mark.parametrize("kind", ["dcgan", "vae"])
def test_a_sample_grid_that_cannot_be_written_stops_the_run_after_saving_that_step(kind, tmp_path):
    out = tmp_path / "run"
    (out / "samples" / "step-0000004.png").mkdir(parents=True)  # the grid cannot take its place
    cfg = run_cfg(kind, 10, {"train.sample_every": "4", "train.ckpt_every": "100"})
    with pytest.raises(UsageError) as e:
        train(cfg, out, Silent())
    assert str(e.value) == (f"cannot write sample grid {out / 'samples' / 'step-0000004.png'}: Is a directory; "
                            f"saved {out / 'checkpoints' / 'step-0000004.safetensors'}; resume with --resume auto")
    assert ckpt_io.load(out).step == 4
    (out / "samples" / "step-0000004.png").rmdir()
    (out / "samples" / "step-0000010.png").mkdir()  # at the last step: nothing to resume
    with pytest.raises(UsageError, match=r"saved .*step-0000010.safetensors; the run is complete \(`aigc sample`"):
        train(cfg, out, Silent(), resume=find_resume("auto", out, print))
    assert ckpt_io.load(out).step == 10


def test_a_metrics_line_that_cannot_be_written_stops_the_run_after_saving_that_step(tmp_path, monkeypatch):
    """A full disk while logging: was `error: No space left on device`, no file named, no checkpoint tried."""
    import errno

    from aigc_cli.training.run_folder import RunFolder

    out, real = tmp_path / "run", RunFolder.append_metrics

    def full_at_step_4(self, record):
        if record["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record)

    monkeypatch.setattr(RunFolder, "append_metrics", full_at_step_4)
    cfg = run_cfg("dcgan", 10, {"train.log_every": "2", "train.ckpt_every": "100"})
    with pytest.raises(UsageError) as e:
        train(cfg, out, Silent())
    assert str(e.value) == (f"cannot write to {out / 'metrics.jsonl'}: No space left on device; "
                            f"saved {out / 'checkpoints' / 'step-0000004.safetensors'}; resume with --resume auto")
    assert ckpt_io.load(out).step == 4
    monkeypatch.setattr(RunFolder, "append_metrics", real)
    train(cfg, out, Silent(), resume=find_resume("auto", out, print))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 6, 8, 10]  # the line that failed is the one missing
    # A SIGTERM at the same step keeps its own exit code (a requeue script reads it); the failure is a note.
    monkeypatch.setattr(RunFolder, "append_metrics", full_at_step_4)
    rep = SignalsAt(4, signal.SIGTERM)
    with pytest.raises(Interrupted) as stopped:
        train(cfg, tmp_path / "run2", rep)
    assert stopped.value.exit_code == 143 and ckpt_io.load(tmp_path / "run2").step == 4
    assert rep.notes[-1] == f"cannot write to {tmp_path / 'run2' / 'metrics.jsonl'}: No space left on device"
    with pytest.raises(UsageError, match="No space left on device; saved .*; the run is complete"):
        train(run_cfg("dcgan", 4, {"train.log_every": "2"}), tmp_path / "run3", SignalsAt(4, signal.SIGTERM))


def test_a_resume_with_nothing_to_trim_leaves_metrics_jsonl_the_same_file(tmp_path):
    # every resume replaced it, and `tail -f` or a log shipper following it lost the rest of the run
    out = tmp_path / "run"
    train(run_cfg("dcgan", 6, {"train.log_every": "2"}), out, Silent())
    inode = (out / "metrics.jsonl").stat().st_ino
    train(run_cfg("dcgan", 10, {"train.log_every": "2"}), out, Silent(), resume=find_resume("auto", out, print))
    assert (out / "metrics.jsonl").stat().st_ino == inode
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8, 10]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "loss_d": 1.0}\n{"step": 1')  # a line past the checkpoint, and a torn one
    train(run_cfg("dcgan", 12, {"train.log_every": "2"}), out, Silent(), resume=find_resume("auto", out, print))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8, 10, 12]


def test_the_lock_is_taken_on_a_full_disk_where_its_pid_cannot_be_written(tmp_path, monkeypatch):
    # a resume that prunes checkpoints is the documented way out of a full disk: writing the
    # holder's pid into the lock file refused it with a bare `No space left on device`
    import errno

    from aigc_cli.training import run_folder

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    tmp_path.joinpath("run").mkdir()
    monkeypatch.setattr(run_folder.os, "write", full)
    with run_folder.run_lock(tmp_path / "run"):
        monkeypatch.undo()
        with pytest.raises(UsageError, match="is training in this run folder"):  # and it still locks
            with run_folder.run_lock(tmp_path / "run"):
                pass


@pytest.mark.parametrize("schedule", [{"train.lr_decay": "linear"}, {"train.lr_warmup": "20"}])
def test_switching_the_schedule_off_on_resume_restores_the_full_rate(schedule, tmp_path):
    """The restored optimizer holds the rate where the schedule left it (decayed, or mid warm-up)."""
    out = tmp_path / "run"
    train(run_cfg("dcgan", 10, schedule), out, Silent())
    rep = Silent()
    off = {"train.lr_decay": "none", "train.lr_warmup": "0"}
    train(run_cfg("dcgan", 16, off), out, rep, resume=find_resume("auto", out, print))
    lr_g = run_cfg("dcgan", 1).train.lr_g
    assert [r["lr_G"] for r in rep.records] == [lr_g, lr_g], rep.records


def test_a_longer_resume_of_a_decayed_run_says_the_rate_jumps(tmp_path):
    """The schedule spans the new length, so the rate rose at once from its last value, unannounced."""
    out, cosine = tmp_path / "run", {"train.lr_decay": "cosine", "train.lr_warmup": "2"}
    with pytest.raises(Interrupted):
        train(run_cfg("dcgan", 10, cosine), out, StopsAt(3))  # mid warm-up: a resume as long says nothing
    same = Silent()
    train(run_cfg("dcgan", 10, cosine), out, same, resume=find_resume("auto", out, print))
    assert not [n for n in same.notes if "schedule" in n], same.notes
    longer = Silent()
    train(run_cfg("dcgan", 20, cosine), out, longer, resume=find_resume("auto", out, print))
    [note] = [n for n in longer.notes if "schedule" in n]
    from aigc_cli.training.schedule import lr_factor

    last = same.records[-1]["lr_G"] / run_cfg("dcgan", 1).train.lr_g  # step 10's, of 10: near the end
    assert last == pytest.approx(lr_factor(9, 10, 2, "cosine")) and last < 0.05
    assert note == (f"the learning-rate schedule now spans 20 steps: the rates move from {last:.3g} to "
                    f"{lr_factor(10, 20, 2, 'cosine'):.3g} of their base at step 11"), note


def test_a_model_without_labels_carries_no_class_count(tmp_path):
    """A conditional run's config used with conditional=false kept num_classes = 4: `aigc info` listed
    classes for an unconditional model, and a resume without the stale count was refused as an
    architecture change."""
    from aigc_cli.training.state import check_compatible

    cond = tiny("dcgan", conditional=True)
    train(cond.with_overrides({"train.steps": "2"}), tmp_path / "cond", Silent())
    stale = ckpt_io.load(tmp_path / "cond").config.with_overrides({"model.conditional": "false"})
    assert stale.model.num_classes == 4
    train(stale.with_overrides({"train.steps": "2"}), tmp_path / "plain", Silent())
    ck = ckpt_io.load(tmp_path / "plain")
    assert ck.config.model.num_classes == 0 and ck.class_names == [] and "num_classes = 0" in (
        tmp_path / "plain" / "config.toml").read_text()
    assert check_compatible(stale, ck.config, "old") == []  # an older run's stale count is no architecture
    with pytest.raises(UsageError, match="model.num_classes"):
        check_compatible(ckpt_io.load(tmp_path / "cond").config, cond.with_overrides({"model.num_classes": "5"}), "x")


def test_resuming_on_renamed_or_added_class_folders_is_refused(tmp_path):
    """Class folders are numbered in name order: `red` renamed `aaa_red` made it class 0, and the resume
    went on teaching class 0 (until then `blue`) as red, silently. A third folder was refused as an
    override the user had not made."""
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", n_per_class=8, size=16, classes=("blue", "red"))
    cfg = tiny("dcgan", conditional=True, channels=3).with_overrides({"data.source": str(folder), "train.steps": "2",
                                                                      "train.batch_size": "8"})
    train(cfg, tmp_path / "run", Silent())
    more = cfg.with_overrides({"train.steps": "4"})
    (folder / "red").rename(folder / "aaa_red")
    with pytest.raises(UsageError, match=r"the data's classes are 0 aaa_red, 1 blue; the model learnt 0 blue, 1 red"):
        train(more, tmp_path / "run", Silent(), resume=find_resume("auto", tmp_path / "run", print))
    (folder / "aaa_red").rename(folder / "red")
    write_image_folder(folder, n_per_class=8, size=16, classes=("green",))
    with pytest.raises(UsageError, match=r"the data's classes are 0 blue, 1 green, 2 red; the model learnt 0 blue"):
        train(more, tmp_path / "run", Silent(), resume=find_resume("auto", tmp_path / "run", print))
    shutil.rmtree(folder / "green")
    assert train(more, tmp_path / "run", Silent(), resume=find_resume("auto", tmp_path / "run", print))["steps"] == 4


def test_resuming_on_labels_of_another_class_count_without_class_names_is_refused(tmp_path):
    """IDX labels carry no class names: only the count tells the data changed under the model."""
    import numpy as np

    from test_data import write_idx

    rng = np.random.default_rng(0)
    write_idx(tmp_path / "two", "train", rng.integers(0, 256, (32, 16, 16), dtype=np.uint8), np.arange(32, dtype=np.uint8) % 2)
    write_idx(tmp_path / "three", "train", rng.integers(0, 256, (32, 16, 16), dtype=np.uint8), np.arange(32, dtype=np.uint8) % 3)
    cfg = tiny("dcgan", conditional=True).with_overrides({"data.source": str(tmp_path / "two"), "train.steps": "2",
                                                          "train.batch_size": "8"})
    train(cfg, tmp_path / "run", Silent())
    more = cfg.with_overrides({"train.steps": "4", "data.source": str(tmp_path / "three")})
    with pytest.raises(UsageError, match="the data has 3 classes, the model learnt 2"):
        train(more, tmp_path / "run", Silent(), resume=find_resume("auto", tmp_path / "run", print))


def test_going_back_does_not_crown_a_checkpoint_that_never_set_the_best(tmp_path):
    """best.safetensors after going back: the checkpoint that set the best value known there, when it
    is still here. Every later checkpoint carries that same best-so-far value, so with the setter pruned
    a later one was linked (and labelled with a value it never reached)."""
    from aigc_cli.training.run_folder import RunFolder

    cfg = run_cfg("classifier", 40, {"train.log_every": "10", "train.ckpt_every": "10", "train.keep_checkpoints": "2",
                                     "train.best_metric": "lr_C", "train.lr_warmup": "20", "train.lr_decay": "linear"})
    train(cfg, tmp_path / "r", Silent())  # lr_C logged 10: lowest so far (warm-up), 20 and 30 higher, 40 lowest
    ckpts = tmp_path / "r" / "checkpoints"
    metas = {p.name: ckpt_io.read_meta(p) for p in sorted(ckpts.glob("step-*.safetensors"))}
    assert list(metas) == ["step-0000030.safetensors", "step-0000040.safetensors"]  # step 10 pruned
    assert json.loads(metas["step-0000030.safetensors"]["aigc.best_step"]) == 10
    assert json.loads(metas["step-0000040.safetensors"]["aigc.best_step"]) == 40

    class Checks(Silent):
        def start(self, total_steps, info):
            self.best_at_start = (ckpts / "best.safetensors").exists()

    rep = Checks()
    back = find_resume(str(ckpts / "step-0000030.safetensors"), tmp_path / "r", print)
    train(cfg.with_overrides({"train.steps": "35"}), tmp_path / "r", rep, resume=back)
    assert not rep.best_at_start  # step 10 is gone, and 30 never had the value: no best until the branch sets one
    assert ckpt_io.read_meta(ckpts / "best.safetensors")["aigc.step"] == "35"
    # checkpoints from before best_step was recorded: the first one carrying the value, as before
    folder = RunFolder(tmp_path / "r", keep=0)
    (ckpts / "best.safetensors").unlink()
    assert not folder.relink_best(json.loads(metas["step-0000030.safetensors"]["aigc.best_value"]), 10)
    assert folder.relink_best(json.loads(metas["step-0000030.safetensors"]["aigc.best_value"]), None)


def test_a_fork_finds_its_own_best_and_drops_a_dead_runs_lines_and_grids(tmp_path):
    """A fork (a checkpoint resumed into a new --out) kept the parent's best value without its file, so
    it might never write a best.safetensors; and a folder left by a run killed before its first
    checkpoint kept that run's metrics lines and grids beside the fork's."""
    cfg = run_cfg("vae", 8)  # best by neg_elbo
    train(cfg, tmp_path / "parent", Silent())
    parent = ckpt_io.read_meta(tmp_path / "parent" / "checkpoints" / "step-0000006.safetensors")
    assert json.loads(parent["aigc.best_value"]) is not None
    fork = tmp_path / "fork"
    (fork / "samples").mkdir(parents=True)
    (fork / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (2, 4, 6)))
    (fork / "samples" / "step-0000004.png").write_bytes(b"stale")
    start = find_resume(str(tmp_path / "parent" / "checkpoints" / "step-0000006.safetensors"), fork, print)
    summary = train(cfg.with_overrides({"train.steps": "10"}), fork, Silent(), resume=start)
    assert summary["best"]["path"] == str(fork / "checkpoints" / "best.safetensors")
    assert (fork / "checkpoints" / "best.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert steps == [8, 10]
    assert not (fork / "samples" / "step-0000004.png").exists()


def test_going_back_without_steps_continues_to_the_runs_current_length(tmp_path, monkeypatch, capsys):
    """A run trained to 8, then resumed to 16: going back to step 8 without --steps trained nothing
    ("already at step 8 of 8"), the older checkpoint's own length."""
    from conftest import run_cli

    out = tmp_path / "r"
    small = ["--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "data.limit=64", "--set",
             "train.ckpt_every=8", "--set", "train.sample_every=100", "--batch-size", "16", "-q", "--json"]
    assert run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", out, "--steps", "8", *small)[0] == 0
    assert run_cli(monkeypatch, capsys, "train", "--resume", "auto", "--out", out, "--steps", "16", *small)[0] == 0
    code, stdout, err = run_cli(monkeypatch, capsys, "train", "--resume", out / "checkpoints" / "step-0000008.safetensors",
                                "-q", "--json")
    assert code == 0 and json.loads(stdout)["steps"] == 16 and json.loads(stdout)["start_step"] == 8, err
    assert (out / "checkpoints" / "after-step-0000008" / "step-0000016.safetensors").is_file()


def test_an_ema_switched_on_at_a_resume_starts_from_the_trained_g(tmp_path):
    """Not from the fresh process's random initialisation, which a 0.999 average would keep for thousands of steps."""
    cfg = tiny("dcgan").with_overrides({"train.steps": "10", "train.lr_g": "0.01", "train.ckpt_every": "10"})
    train(cfg, tmp_path, Silent())
    before = ckpt_io.load(tmp_path).net_state("G")
    train(cfg.with_overrides({"train.steps": "11", "train.ema_decay": "0.999"}), tmp_path, Silent(),
          resume=find_resume("auto", tmp_path, print))
    ck = ckpt_io.load(tmp_path)
    after, ema = ck.net_state("G"), ck.net_state("G_ema")
    weights = [k for k in after if after[k].is_floating_point() and "running" not in k]
    assert ck.step == 11 and weights
    for k in weights:  # the average of steps 10 and 11: between them
        lo, hi = torch.minimum(before[k], after[k]), torch.maximum(before[k], after[k])
        assert bool(((ema[k] >= lo - 1e-6) & (ema[k] <= hi + 1e-6)).all()), k


def test_an_fp16_resume_carries_the_grad_scaler_on(tmp_path):
    """Its scale and growth count, as an uninterrupted run has them (fp16 runs here on the CPU too)."""
    cfg = tiny("dcgan").with_overrides({"train.steps": "6", "train.precision": "fp16", "train.ckpt_every": "6"})
    train(cfg, tmp_path / "whole", Silent())
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut", StopsAt(3))
    train(cfg, tmp_path / "cut", Silent(), resume=find_resume("auto", tmp_path / "cut", print))
    whole, cut = ckpt_io.load(tmp_path / "whole"), ckpt_io.load(tmp_path / "cut")
    assert cut.step == whole.step == 6
    assert json.loads(cut.meta["aigc.scaler"]) == json.loads(whole.meta["aigc.scaler"])
    assert json.loads(whole.meta["aigc.scaler"])["_growth_tracker"] == 12  # two optimizer steps a step


def test_going_back_in_a_run_whose_checkpoints_folder_is_a_link_continues_that_run(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    # checkpoints/ linked to a bigger disk: `--resume run/checkpoints/step-N` resolved the link first and
    # trained a new run inside the link's target (config.toml, samples/ and a nested checkpoints/ there).
    run, disk = tmp_path / "r", tmp_path / "disk" / "ck"
    train(tiny("dcgan").with_overrides({"train.ckpt_every": "5", "train.steps": "10"}), run, Silent())
    disk.parent.mkdir()
    shutil.move(run / "checkpoints", disk)
    (run / "checkpoints").symlink_to(disk)
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run / "checkpoints" / "step-0000005.safetensors", "-q")
    assert code == 0, err
    assert sorted(p.name for p in disk.iterdir()) == ["after-step-0000005", "last.safetensors", "step-0000005.safetensors",
                                                      "step-0000010.safetensors"]
    assert ckpt_io.load(run).step == 10 and not (disk / "config.toml").exists()
