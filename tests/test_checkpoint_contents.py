"""What a checkpoint's tensors and metadata say is checked before anything uses them: weights that do
not fit their config, non-finite values, odd metadata and tampered training state are one-line errors,
never black images, wrong scores, a silently different resume or a traceback."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from aigc_cli import checkpoint as ck
from aigc_cli.errors import UsageError
from aigc_cli.training import state
from aigc_cli.training.loop import train
from conftest import Silent, run_cli, tiny


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A real 2-step DCGAN checkpoint (BN buffers, Adam state, RNG, data position) and its export."""
    root = tmp_path_factory.mktemp("contents")
    cfg = tiny("dcgan").with_overrides({"train.steps": "2", "train.ckpt_every": "2", "train.ema_decay": "0.9"})
    train(cfg, root / "run", Silent())
    path = root / "run" / "checkpoints" / "last.safetensors"
    return cfg, ck.load(path)


def tampered(tmp_path, loaded, tensors=None, meta=None, name="bad.safetensors"):
    out = tmp_path / name
    t = dict(loaded.tensors)
    t.update(tensors or {})
    t = {k: v for k, v in t.items() if v is not None}
    save_file(t, str(out), metadata={**loaded.meta, **(meta or {})})
    return out


def g_key(loaded, dims=4):
    return next(k for k, v in loaded.tensors.items() if k.startswith("G.") and v.dim() == dims)


def config_with(loaded, section, key, value):
    c = json.loads(loaded.meta["aigc.config"])
    c[section][key] = value
    return {"aigc.config": json.dumps(c)}


@pytest.mark.parametrize("case, expect", [
    ("nan weight", "holds NaN or infinite values"),
    ("inf buffer", "holds NaN or infinite values"),  # BN running_var: a black image all the same
    ("negative variance", "holds negative variances"),  # sqrt of it: NaN, black images again
    ("wrong shape", "weights do not fit the model in its config"),
    ("missing key", "(missing G."),
    ("extra key", "(unexpected G.extra"),
    ("int weights", "has dtype int32"),
    ("superscript step", "aigc.step is not a non-negative integer"),  # "²".isdigit() is True
    ("arabic-indic step", "aigc.step is not a non-negative integer"),
    ("deep config", "nested too deeply"),
    ("huge latent", "model.latent_dim must be from 1 to 65536"),
    ("huge width", "model.d_width must be from 1 to 65536"),
    ("5000-digit step count", "its stored config is invalid (an integer of more than 4300 digits)"),
    ("EMA but no G", "holds no weights for network 'G', which its dcgan has"),
    ("no D", "holds no weights for network 'D'"),
    ("class names not strings", "aigc.class_names is not a list of distinct class names"),
    ("class names repeated", "aigc.class_names is not a list of distinct class names"),
])
def test_what_the_file_holds_is_checked_on_load(tmp_path, base, case, expect):
    _, loaded = base
    key = g_key(loaded)
    bn_var = next(k for k in loaded.tensors if k.startswith("G.") and k.endswith("running_var"))
    tensors, meta = {}, {}
    if case == "nan weight":
        tensors[key] = torch.full_like(loaded.tensors[key], float("nan"))
    elif case == "inf buffer":
        tensors[bn_var] = torch.full_like(loaded.tensors[bn_var], float("inf"))
    elif case == "negative variance":
        tensors[bn_var] = -loaded.tensors[bn_var]
    elif case == "wrong shape":
        tensors[key] = torch.zeros(1, 1, 3, 3)
    elif case == "missing key":
        tensors[key] = None
    elif case == "extra key":
        tensors["G.extra"] = torch.zeros(2)
    elif case == "int weights":
        tensors[key] = loaded.tensors[key].to(torch.int32)
    elif case == "superscript step":
        meta["aigc.step"] = "\u00b2"
    elif case == "arabic-indic step":
        meta["aigc.step"] = "\u0663"
    elif case == "deep config":
        meta["aigc.config"] = "[" * 100_000 + "]" * 100_000
    elif case == "huge latent":
        meta = config_with(loaded, "model", "latent_dim", 10**400)
    elif case == "5000-digit step count":  # json.loads raises a plain ValueError for it
        meta = {"aigc.config": loaded.meta["aigc.config"].replace('"steps": ', '"steps": ' + "9" * 5000, 1)}
    elif case == "huge width":
        meta = config_with(loaded, "model", "d_width", 3_000_000)
    elif case in ("EMA but no G", "no D"):
        tensors = {k: None for k in loaded.tensors if k.startswith("G." if case == "EMA but no G" else "D.")}
    elif case == "class names not strings":
        meta["aigc.class_names"] = json.dumps([[1], {"a": 2}, None, 4.5])
    elif case == "class names repeated":
        meta["aigc.class_names"] = json.dumps(["cat", "cat"])
    bad = tampered(tmp_path, loaded, tensors, meta)
    with pytest.raises(UsageError) as e:
        ck.load(bad)
    assert expect in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_commands_refuse_a_generator_with_nan_weights(tmp_path, base, monkeypatch, capsys):
    """It used to sample an all-black grid and score a better FID than the real model, with exit 0."""
    _, loaded = base
    key = g_key(loaded).replace("G.", "G_ema.", 1)
    bad = tampered(tmp_path, loaded, {key: torch.full_like(loaded.tensors[key], float("nan"))})
    for args in (["sample", bad, "--n", "4", "--out", tmp_path / "a.png"], ["info", bad],
                 ["export", bad, "--out", tmp_path / "e.safetensors"]):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and f"{key} holds NaN or infinite values" in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "e.safetensors").exists()


def test_an_export_holds_the_generator_and_nothing_else(tmp_path, base, monkeypatch, capsys):
    _, loaded = base
    export = tmp_path / "e.safetensors"
    assert run_cli(monkeypatch, capsys, "export", loaded.path, "--out", export)[0] == 0
    exported = ck.load(export)
    g_only = {k: None for k in exported.tensors}
    for extra, expect in (({"X.a": torch.zeros(2)}, "also holds X.*"), ({"opt.G.0.step": torch.zeros(())}, "also holds opt.*"),
                          (g_only, "holds the generator's G.* tensors only; this one has none")):
        bad = tampered(tmp_path, exported, extra)
        with pytest.raises(UsageError, match=expect.replace("*", r"\*").replace(".", r"\.")):
            ck.load(bad)


def test_fp16_export_of_weights_beyond_its_range_is_refused_not_written(tmp_path, base, monkeypatch, capsys):
    """A finite running_var of 1e6 became inf in fp16: the export was written, then refused by every
    command that loaded it."""
    _, loaded = base
    bn_var = next(k for k in loaded.tensors if k.startswith("G_ema.") and k.endswith("running_var"))
    big = tampered(tmp_path, loaded, {bn_var: torch.full_like(loaded.tensors[bn_var], 1e6)})
    code, _, err = run_cli(monkeypatch, capsys, "export", big, "--out", tmp_path / "h.safetensors", "--dtype", "fp16")
    assert code == 2 and "--dtype fp16: G.net" in err and "beyond fp16's range (largest 65504)" in err, err
    assert not (tmp_path / "h.safetensors").exists()
    code, _, err = run_cli(monkeypatch, capsys, "export", big, "--out", tmp_path / "b.safetensors", "--dtype", "bf16")
    assert code == 0 and ck.load(tmp_path / "b.safetensors").tensors[bn_var.replace("G_ema.", "G.", 1)].max() > 9e5


def test_a_fifo_is_not_read_forever(tmp_path):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):
        ck.load(fifo)


def test_only_the_generator_is_built_to_sample_an_export(tmp_path, base, monkeypatch, capsys):
    """An export holds G alone: a config whose D would need terabytes does not matter to sampling or info
    (both used to build every network of the config)."""
    _, loaded = base
    export = tmp_path / "e.safetensors"
    assert run_cli(monkeypatch, capsys, "export", loaded.path, "--out", export)[0] == 0
    exported = ck.load(export)
    huge = tampered(tmp_path, exported, meta=config_with(exported, "model", "d_width", 65536), name="huge.safetensors")
    code, out, err = run_cli(monkeypatch, capsys, "sample", huge, "--n", "4", "--out", tmp_path / "h.png", "--json")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "info", huge, "--json")
    assert code == 0 and json.loads(out)["parameters"] == {"G": ck.param_counts(exported)["G"]}
    code, out, err = run_cli(monkeypatch, capsys, "sample", export, "--n", "4", "--out", tmp_path / "e.png")
    assert (tmp_path / "e.png").read_bytes() == (tmp_path / "h.png").read_bytes()


def test_class_names_that_do_not_match_the_classes_are_not_shown(tmp_path, base):
    _, loaded = base
    cond = json.loads(loaded.meta["aigc.config"])
    cond["model"]["num_classes"] = 4  # as a conditional model's config would say, for the name check
    meta = {"aigc.config": json.dumps(cond), "aigc.class_names": json.dumps(["a", "b", "c", "d", "e", "f"])}
    assert ck.load(tampered(tmp_path, loaded, meta=meta)).class_names == []
    meta["aigc.class_names"] = json.dumps(["a", "b", "c", "d"])
    assert ck.load(tampered(tmp_path, loaded, meta=meta, name="ok.safetensors")).class_names == ["a", "b", "c", "d"]


def test_markup_and_escape_sequences_in_metadata_are_printed_as_text(tmp_path, base, monkeypatch, capsys):
    _, loaded = base
    bad = tampered(tmp_path, loaded, meta={"aigc.precision": "[/bold]", "aigc.torch": "\x1b[2J"})
    code, out, err = run_cli(monkeypatch, capsys, "info", bad)
    assert code == 0, err  # rich used to raise MarkupError on "[/bold]"
    assert "trained in [/bold]" in out and "\x1b" not in out and "\\x1b[2J" in out


def test_training_from_a_folder_whose_path_looks_like_markup(tmp_path, monkeypatch, capsys):
    from conftest import write_image_folder

    data = write_image_folder(tmp_path / "img[" / "set]", n_per_class=4)  # the path holds "[/set]"
    code, out, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--data", data, "--steps", "1",
                             "--batch-size", "4", "--set", "model.resolution=16", "--out", tmp_path / "r[x]")
    assert code == 0, err
    assert "img[/set]" in out and "r[x]" in out


def resume_error(tmp_path, cfg, bad) -> str:
    with pytest.raises(UsageError) as e:
        train(cfg.with_overrides({"train.steps": "4"}), tmp_path / "fork", Silent(), resume=ck.load(bad))
    assert "\n" not in str(e.value)
    return str(e.value)


def groups_with(loaded, **change):
    groups = json.loads(loaded.meta["aigc.opt.G.param_groups"])
    groups[0].update(change)
    return {"aigc.opt.G.param_groups": json.dumps(groups)}


@pytest.mark.parametrize("case", ["negative lr", "text lr", "one beta", "duplicate params", "no optimizer state",
                                  "negative adam step", "scalar moment", "negative data position",
                                  "short numpy rng", "bad best value", "lr of a million", "text base_lr",
                                  "no first moment", "negative second moment", "integer moment", "true step",
                                  "text scaler scale", "odd parameter index", "huge adam step", "zero scaler scale",
                                  "scaler backoff above one", "negative best step"])
def test_tampered_training_state_is_refused_on_resume(tmp_path, base, case):
    cfg, loaded = base
    moment = next(k for k in loaded.tensors if k.startswith("opt.G.") and k.endswith("exp_avg"))
    tensors, meta = {}, {}
    if case == "negative lr":
        meta = groups_with(loaded, lr=-1.0)  # trained with it, and logged lr_G -1.0
    elif case == "text lr":
        meta = groups_with(loaded, lr="abc")
    elif case == "one beta":
        meta = groups_with(loaded, betas=[0.5])
    elif case == "duplicate params":
        meta = groups_with(loaded, params=[0] * 10)
    elif case == "no optimizer state":  # restarted Adam from scratch without a word
        tensors = {k: None for k in loaded.tensors if k.startswith("opt.G.")}
    elif case == "negative adam step":
        tensors = {moment.replace("exp_avg", "step"): torch.tensor(-5.0)}
    elif case == "scalar moment":
        tensors = {moment: torch.tensor(0.0)}
    elif case == "negative data position":
        meta = {"aigc.data_position": json.dumps({"epoch": 0, "index": -1})}
    elif case == "short numpy rng":
        tensors = {"rng.numpy": loaded.tensors["rng.numpy"][:10]}
    elif case == "bad best value":
        meta = {"aigc.best_value": "not json"}
    elif case == "lr of a million":  # trained on with it
        meta = groups_with(loaded, lr=1e6)
    elif case == "text base_lr":  # a TypeError at the first step of a schedule
        meta = groups_with(loaded, base_lr="x")
    elif case == "no first moment":  # a KeyError at the first step
        tensors = {moment: None}
    elif case == "negative second moment":  # its square root at the first step: NaN
        tensors = {moment + "_sq": -loaded.tensors[moment + "_sq"] - 1}
    elif case == "integer moment":
        tensors = {moment: loaded.tensors[moment].to(torch.int64)}
    elif case == "true step":
        tensors = {moment.replace("exp_avg", "step"): torch.tensor(True)}
    elif case == "text scaler scale":  # a TypeError in the GradScaler
        meta = {"aigc.scaler": json.dumps({"scale": "x", "growth_factor": 2.0, "backoff_factor": 0.5,
                                           "growth_interval": 2000, "_growth_tracker": 2})}
    elif case in ("zero scaler scale", "scaler backoff above one"):
        scale, backoff = (0.0, 0.5) if case == "zero scaler scale" else (1024.0, 1.5)
        meta = {"aigc.scaler": json.dumps({"scale": scale, "growth_factor": 2.0, "backoff_factor": backoff,
                                           "growth_interval": 2000, "_growth_tracker": 2})}
    elif case == "huge adam step":  # Adam's bias correction as if it had run a million times longer
        tensors = {moment.replace("exp_avg", "step"): torch.tensor(float(loaded.step * 1000 + 1))}
    elif case == "negative best step":
        meta = {"aigc.best_step": "-1"}
    elif case == "odd parameter index":  # opt.G.01.* beside opt.G.1.*: one of them won
        tensors = {moment.replace("opt.G.", "opt.G.0", 1): loaded.tensors[moment].clone()}
    message = resume_error(tmp_path, cfg, tampered(tmp_path, loaded, tensors, meta))
    assert "bad.safetensors: cannot resume from it" in message, message
    assert not (tmp_path / "fork" / "checkpoints").exists() or not list((tmp_path / "fork" / "checkpoints").iterdir())


def test_optimizer_settings_aigc_never_uses_are_the_runs_own_whatever_the_file_says(tmp_path, base):
    """amsgrad gave a KeyError at the first step, differentiable an AssertionError, and maximize made G
    climb its loss: none is a setting of aigc's, so a file's are not taken."""
    cfg, loaded = base
    bad = tampered(tmp_path, loaded, meta=groups_with(loaded, amsgrad=True, maximize=True, differentiable=True))
    summary = train(cfg.with_overrides({"train.steps": "4"}), tmp_path / "fork", Silent(), resume=ck.load(bad))
    groups = json.loads(ck.load(tmp_path / "fork").meta["aigc.opt.G.param_groups"])
    assert summary["steps"] == 4 and not any(g[k] for g in groups for k in ("amsgrad", "maximize", "differentiable"))


@pytest.mark.parametrize("case", ["no torch rng", "no param groups", "moment of another shape", "text scaler scale",
                                  "another step in the name"])
def test_resume_auto_passes_over_a_checkpoint_whose_training_state_is_damaged(tmp_path, base, case):
    """It took the newest file that loaded and failed on its training state after the data had loaded,
    where an older checkpoint of the run was whole."""
    cfg, loaded = base
    run = tmp_path / "run"
    train(cfg.with_overrides({"train.steps": "4", "train.ckpt_every": "2", "train.keep_checkpoints": "0"}), run, Silent())
    newest = run / "checkpoints" / "step-0000004.safetensors"
    (run / "checkpoints" / "last.safetensors").unlink()
    four = ck.load(newest)
    moment = next(k for k in four.tensors if k.startswith("opt.D.") and k.endswith("exp_avg"))
    change = {"no torch rng": ({"rng.torch": None}, {}),
              "no param groups": ({}, {"aigc.opt.D.param_groups": "[]"}),
              "moment of another shape": ({moment: torch.zeros(33)}, {}),
              "text scaler scale": ({}, {"aigc.scaler": json.dumps({"scale": "x"})}),
              # resumed at step 1 from step 4's weights, and step 4's file set aside as "after step 1"
              "another step in the name": ({}, {"aigc.step": "1"})}[case]
    tampered(tmp_path, four, *change, name="t.safetensors").replace(newest)
    notes = []
    rng = torch.get_rng_state()
    assert state.find_resume("auto", run, notes.append).step == 2
    assert torch.equal(torch.get_rng_state(), rng)  # a file's RNG states, tried, are put back
    said = "its name says step 4, its metadata step 1" if case == "another step in the name" else "cannot resume from it"
    assert len(notes) == 1 and f"step-0000004.safetensors: {said}" in notes[0], notes


def test_an_untampered_checkpoint_resumes(tmp_path, base):
    cfg, loaded = base
    summary = train(cfg.with_overrides({"train.steps": "4"}), tmp_path / "fork", Silent(),
                    resume=ck.load(tampered(tmp_path, loaded)))
    assert summary["start_step"] == 2 and ck.load(tmp_path / "fork").step == 4


def test_the_divergence_guard_sees_non_finite_buffers():
    from aigc_cli.models import build_nets

    nets = build_nets(tiny("dcgan").model)
    assert state.all_finite(nets, grads=False)
    bn = next(m for m in nets["G"].modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("nan")  # parameters and gradients finite: the old check passed
    assert not state.all_finite(nets, grads=False)


def test_resume_auto_skips_an_export_left_in_the_checkpoints_folder(tmp_path, base, monkeypatch, capsys):
    _, loaded = base
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    assert run_cli(monkeypatch, capsys, "export", loaded.path, "--out", run / "last.safetensors")[0] == 0
    (run / "best.safetensors").write_bytes(loaded.path.read_bytes())
    warnings = []
    found = state.find_resume("auto", tmp_path / "run", warnings.append)
    assert found.kind == "checkpoint" and found.path.name == "best.safetensors"
    assert warnings == [f"skipping {run / 'last.safetensors'}: an exported generator, with no training state to "
                        "resume from"]


@pytest.mark.parametrize("counts, want", [
    ([3, 5], [3, 5]),
    ([3], []),          # not one count per class: eval would draw the wrong class mix
    ([3, 5, 1], []),
    ([-1, 5], []),      # a negative weight for torch.multinomial
    ([0, 0], []),       # no images at all
    ([1.5, 2], []),
    ("x", []),
])
def test_class_counts_are_used_only_when_they_fit_the_models_classes(tmp_path, counts, want):
    cfg = tiny("dcgan", conditional=True, num_classes=2)
    meta = {"aigc.kind": "checkpoint", "aigc.step": "1", "aigc.class_counts": json.dumps(counts)}
    assert ck.Checkpoint(tmp_path / "c.safetensors", {}, meta, cfg).class_counts == want


def test_step_file_names_the_step_file_only_when_it_holds_the_same_checkpoint(tmp_path):
    cfg = tiny("dcgan")
    meta = {"aigc.kind": "checkpoint", "aigc.step": "5", "aigc.created": "2026-01-01T00:00:00+00:00"}
    last, twin = tmp_path / "last.safetensors", tmp_path / "step-0000005.safetensors"
    save_file({"x": torch.zeros(1)}, str(last), metadata=meta)
    save_file({"x": torch.zeros(1)}, str(twin), metadata=meta)
    assert ck.Checkpoint(last, {}, meta, cfg).step_file == twin.resolve()
    save_file({"x": torch.zeros(1)}, str(twin), metadata={**meta, "aigc.created": "2026-01-02T00:00:00+00:00"})
    assert ck.Checkpoint(last, {}, meta, cfg).step_file == last.resolve()  # another save at that step


def test_only_step_numbered_files_are_step_files(tmp_path):
    for name in ("step-0000010.safetensors", "step-backup.safetensors", "step-.safetensors",
                 "step-old-step-0000009.safetensors"):  # the last was step 9 when a search found the number
        save_file({"x": torch.zeros(1)}, str(tmp_path / name), metadata={})
    assert ck.step_of(tmp_path / "step-backup.safetensors") == ck.step_of(tmp_path / "step-old-step-0000009.safetensors") == -1
    assert ck.step_files(tmp_path) == [tmp_path / "step-0000010.safetensors"]


def test_a_file_without_aigc_kind_is_a_usage_error(tmp_path):
    cfg = tiny("dcgan").with_overrides({"train.steps": "1", "train.ckpt_every": "1"})
    train(cfg, tmp_path / "run", Silent())
    good = ck.load(tmp_path / "run")
    bad = tmp_path / "bad.safetensors"
    save_file(dict(good.tensors), str(bad), metadata={k: v for k, v in good.meta.items() if k != "aigc.kind"})
    with pytest.raises(UsageError, match="unknown aigc.kind None"):
        ck.load(bad)


def test_summed_losses_in_a_checkpoint_are_used_only_when_whole():
    sums = {"loss_d": torch.tensor(6.0), "loss_g": torch.tensor(3.0)}
    text = state.log_sums_meta(sums, 3)
    back, n = state.log_sums({"aigc.log_sums": text}, "cpu")
    assert n == 3 and {k: float(v) for k, v in back.items()} == {"loss_d": 6.0, "loss_g": 3.0}
    for bad in (json.dumps({"n": 0, "sums": {"loss_d": [6.0, "float32"]}}), json.dumps({"n": -2, "sums": {"a": [1.0, "float32"]}}),
                json.dumps({"n": 3, "sums": {"a": [1.0, "int64"]}}), json.dumps({"n": 3, "sums": {}}), "not json"):
        assert state.log_sums({"aigc.log_sums": bad}, "cpu") == ({}, 0), bad

