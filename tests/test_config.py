"""Config: presets load and validate, overrides are type-checked, TOML round-trips, no tracebacks."""

from __future__ import annotations

import tomllib

import pytest
from conftest import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc_cli.config import (Config, all_keys, config_from_dict, load_preset, parse_assignments, preset_names,
                             preset_text)
from aigc_cli.errors import UsageError

REQUIRED = {"quickstart", "mnist-mlp-gan", "fashion-mnist-dcgan", "fashion-mnist-vae", "cifar10-dcgan",
            "folder-dcgan-64", "fashion-mnist-classifier"}


def test_required_presets_exist_and_validate():
    assert REQUIRED <= set(preset_names())
    for name in preset_names():
        cfg = load_preset(name)
        assert cfg.name == name and cfg.description


def test_presets_augment_colour_before_the_ops_that_zero_fill():
    """As DiffAugment's own policy, color,translation,cutout: colour after them lit the zeroed holes."""
    augmented = [load_preset(n).train.diffaugment.split(",") for n in preset_names() if load_preset(n).train.diffaugment]
    assert augmented
    for ops in augmented:
        assert ops[0] == "color" and set(ops) == {"color", "translation", "cutout"}, ops


def test_mlp_gan_preset_is_the_classic_one():
    m = load_preset("mnist-mlp-gan")
    assert (m.model.kind, m.model.hidden, m.train.lr_g, m.train.lr_d) == ("mlp_gan", 128, 2e-4, 2e-4)


def test_overrides_convert_types():
    cfg = Config().with_overrides(parse_assignments(["train.lr_g=1e-4", "train.steps=7", "data.download=yes",
                                                     "data.source=/x y", "train.lr_d=0.001"]))
    assert cfg.train.lr_g == 1e-4 and cfg.train.steps == 7 and cfg.data.download is True
    assert cfg.data.source == "/x y" and isinstance(cfg.train.lr_d, float)
    # integers in base 10, as written: a leading zero is no octal, and 0x10 no 16
    assert Config().with_overrides(parse_assignments(["train.steps=010"])).train.steps == 10


@pytest.mark.parametrize("item, message", [
    ("train.nope=1", "unknown config key"), ("nope.steps=1", "unknown config key"), ("train.steps", "key=value"),
    ("train.steps=1.5", "expects int"), ("train.steps=0x10", "expects int"), ("train.lr_g=fast", "expects float"), ("data.download=maybe", "expects bool"),
    ("train.batch_size=-3", "must be positive"), ("model.resolution=48", "power of two"),
    ("model.kind=gpt", "unknown"), ("model.channels=2", "1 or 3"), ("train.device=tpu", "train.device"),
    ("loss.gan=wgan-gp", "d_norm"), ("train.diffaugment=flip", "unknown 'flip'"),
    ("loss.gp_weight=inf", "loss.gp_weight must be a finite number"), ("loss.recon_sigma=nan", "finite"),
    ("loss.vae_beta=1e400", "finite"), ("loss.r1_gamma=inf", "finite"),
    ("train.steps=10000000000000", "at most 1,000,000,000,000"), ("data.limit=" + "9" * 40, "data.limit must be at most"),
])
def test_bad_overrides_fail_cleanly(item, message):
    with pytest.raises(UsageError, match=message):
        Config().with_overrides(parse_assignments([item]))


@pytest.mark.parametrize("line, message", [
    ('batch_size = "64"', "'train.batch_size' expects int, got the string '64' (write numbers without quotes)"),
    ('lr_g = "2e-4"', "'train.lr_g' expects float, got the string '2e-4'"),
    ('gp_weight = 10', None),  # an integer where a float is expected is fine
])
def test_a_preset_file_writes_numbers_as_numbers(line, message, tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text(f"[model]\nkind = \"dcgan\"\n[{'loss' if 'gp_weight' in line else 'train'}]\n{line}\n")
    if message is None:
        assert load_preset(str(p)).loss.gp_weight == 10.0
        return
    with pytest.raises(UsageError) as e:
        load_preset(str(p))
    assert message in str(e.value)
    with pytest.raises(UsageError, match="expects bool, got the string 'yes' .write true or false without quotes"):
        config_from_dict({"data": {"download": "yes"}})


def test_toml_round_trip():
    cfg = load_preset("fashion-mnist-vae").with_overrides({"data.source": 'a "quoted" path\\x'})
    assert config_from_dict(tomllib.loads(cfg.to_toml())) == cfg


def test_a_preset_file_that_is_not_utf8_is_one_line_error(monkeypatch, capsys, tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes('name = "café"\n'.encode("latin-1"))
    for args in (["train", "--preset", p, "--out", tmp_path / "run"], ["presets", "show", p]):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and err.count("\n") == 1 and "not UTF-8" in err and out == "", err
    assert not (tmp_path / "run").exists()


def test_integers_past_pythons_digit_limit_are_one_line_errors(tmp_path):
    p = tmp_path / "big.toml"
    p.write_text("[train]\nsteps = " + "9" * 5000 + "\n")
    with pytest.raises(UsageError, match="invalid TOML: an integer of more than 4300 digits$"):
        load_preset(str(p))
    with pytest.raises(UsageError) as e:
        Config().with_overrides(parse_assignments(["train.steps=" + "9" * 5000]))
    assert len(str(e.value)) < 200


def test_preset_file_path_is_accepted(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('name = "mine"\n[model]\nkind = "mlp_gan"\nresolution = 28\n')
    assert load_preset(str(p)).model.kind == "mlp_gan"
    p.write_text("[model\n")
    with pytest.raises(UsageError, match="invalid TOML"):
        load_preset(str(p))


values = st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans())


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.sampled_from(all_keys()), st.text(max_size=20)), value=values)
def test_fuzzed_overrides_give_a_config_or_a_usage_error(key, value):
    try:
        cfg = Config().with_overrides({key: value})
    except UsageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["model", "train", "data", "loss", "name", "x"]),
                       st.one_of(values, st.dictionaries(st.text(max_size=10), values, max_size=3)), max_size=4))
def test_fuzzed_config_dicts(data):
    try:
        config_from_dict(data)
    except UsageError:
        pass


def test_zoo_presets_are_named_for_what_they_hold():
    names = set(preset_names())
    for data in ("fashion-mnist", "mnist", "cifar10"):
        for model in ("wgan-gp", "sngan", "cond-sngan", "vae", "cond-vae"):
            assert f"{data}-{model}" in names
    for name in names:
        cfg = load_preset(name)
        assert ("cond" in name.split("-")) == cfg.model.conditional, name
        if "wgan-gp" in name:
            assert cfg.loss.gan == "wgan-gp" and cfg.train.n_critic == 5 and cfg.loss.gp_weight == 10
            assert (cfg.train.beta1, cfg.train.beta2) == (0.0, 0.9) and cfg.model.d_norm != "batch"
        if "sngan" in name:
            assert cfg.model.kind == "resnet_gan" and cfg.loss.gan == "hinge"


def test_presets_are_found_from_a_checkout_without_install(monkeypatch):
    """PYTHONPATH=. (no pip install) has no aigc_cli.presets package: the repo's presets/ folder is used."""
    import aigc_cli.config as config_mod

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(config_mod.resources, "files", missing)
    assert "quickstart" in config_mod.preset_names()
    assert config_mod.load_preset("quickstart").name == "quickstart"



def test_presets_show_takes_a_toml_file_as_train_does(monkeypatch, capsys, tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text(preset_text("quickstart"))
    code, out, err = run_cli(monkeypatch, capsys, "presets", "show", good)
    assert code == 0 and out == good.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("[train]", "[train]\nbogus = 1", 1))
    code, out, err = run_cli(monkeypatch, capsys, "presets", "show", bad)
    assert code == 2 and err.count("\n") == 1 and "train.bogus" in err and out == "", err


@pytest.mark.parametrize("args, expect", [
    (["--set", "name=/tmp/x"], "cannot name a folder under runs/"),
    (["--set", "name=../escaped"], "cannot name a folder under runs/"),
    (["--set", "name=exp[1]"], "cannot name a folder under runs/"),
    (["--preset", "no/such.toml"], "no/such.toml: no such preset file"),
])
def test_run_names_and_preset_files_that_cannot_work_are_one_line_errors(monkeypatch, capsys, tmp_path, args, expect):
    monkeypatch.chdir(tmp_path)
    preset = [] if "--preset" in args else ["--preset", "quickstart"]
    code, out, err = run_cli(monkeypatch, capsys, "train", *preset, *args)
    assert code == 2 and err.count("\n") == 1 and expect in err, err
    assert not any(tmp_path.iterdir())  # nothing written anywhere


@pytest.mark.parametrize("preset, item, expect", [
    ("mnist-mlp-gan", "model.spectral_norm=true", "model.spectral_norm=true applies to dcgan (resnet_gan always has it), not to a mlp_gan"),
    ("cifar10-sngan", "model.d_norm=layer", "model.d_norm=layer applies to dcgan, not to a resnet_gan"),
    ("quickstart", "model.likelihood=bernoulli", "model.likelihood=bernoulli applies to vae, not to a dcgan"),
    ("fashion-mnist-cond-sngan", "model.num_classes=5", "model.num_classes is set from the data"),
])
def test_model_options_the_family_ignores_are_refused_at_train_time(monkeypatch, capsys, tmp_path, preset, item, expect):
    code, out, err = run_cli(monkeypatch, capsys, "train", "--preset", preset, "--set", item, "--out", tmp_path / "r")
    assert code == 2 and err.count("\n") == 1 and expect in err, err
    assert not (tmp_path / "r").exists()


def test_options_a_family_reads_pass_and_a_stored_config_is_let_be():
    from aigc_cli.config import check_for_training

    check_for_training(load_preset("quickstart").with_overrides({"model.spectral_norm": "true", "model.d_norm": "none"}))
    stored = load_preset("mnist-mlp-gan").with_overrides({"model.spectral_norm": "true"})  # loads: not in validate()
    check_for_training(stored, base=stored)  # resuming a run saved before the check
    with pytest.raises(UsageError, match="spectral_norm"):
        check_for_training(stored)


@pytest.mark.parametrize("item, expect", [
    ("train.n_samples=5000", "train.n_samples must be at most 4,096, got 5,000"),
    ("train.batch_size=2000000", "at most 1,048,576"), ("train.n_critic=101", "at most 100"),
    ("train.eval_n=100000000", "at most 10,000,000"), ("data.workers=1025", "data.workers must be at most 1,024"),
])
def test_tighter_caps_hold_when_training_starts_but_stored_configs_still_load(item, expect):
    from aigc_cli.config import check_for_training

    cfg = Config().with_overrides(parse_assignments([item]))  # validate(): a stored config like this loads
    with pytest.raises(UsageError, match=expect):
        check_for_training(cfg)
    check_for_training(cfg, base=cfg)  # resuming a run saved before the caps


@pytest.mark.parametrize("policy, expect", [
    ("translation,translation", "translation given twice"), ("translation,,cutout", "an empty item"),
    (", ", "an empty item"), ("color,", "an empty item"),
])
def test_a_diffaugment_policy_with_an_op_twice_or_an_empty_item_is_refused_when_training_starts(policy, expect):
    """An op given twice was applied twice; empty items were dropped without a word."""
    from aigc_cli.config import check_for_training

    cfg = Config().with_overrides({"train.diffaugment": policy})
    with pytest.raises(UsageError, match=expect):
        check_for_training(cfg)
    check_for_training(cfg, base=cfg)  # a run that already has it resumes as it was
    check_for_training(Config().with_overrides({"train.diffaugment": " translation, cutout,color"}))


def test_settings_a_family_does_not_read_are_noted_not_ignored_in_silence(tmp_path):
    from aigc_cli.config import load_preset, unused_settings, preset_names
    from aigc_cli.training.loop import train
    from conftest import Silent, tiny

    assert all(unused_settings(load_preset(name)) == [] for name in preset_names())  # presets are clean
    cfg = tiny("vae").with_overrides({"loss.r1_gamma": "5", "train.lr_d": "1e-3", "model.hidden": "64",
                                      "model.likelihood": "bernoulli", "loss.recon_sigma": "0.5", "train.steps": "2"})
    rep = Silent()
    train(cfg, tmp_path / "vae", rep)
    assert [n for n in rep.notes if "changes nothing" in n] == [
        "loss.r1_gamma=5.0 is not read by a vae; it changes nothing",
        "loss.recon_sigma=0.5 is not read by a vae with model.likelihood=bernoulli; it changes nothing",
        "model.hidden=64 is not read by a vae; it changes nothing",
        "train.lr_d=0.001 is not read by a vae; it changes nothing"]
    gan = tiny("mlp_gan", g_width=64, d_width=16).with_overrides({"loss.gp_weight": "3", "loss.kl_warmup": "5"})
    assert unused_settings(gan) == ["loss.gp_weight=3.0 is not read by an mlp_gan with loss.gan=bce; it changes nothing",
                                    "loss.kl_warmup=5 is not read by an mlp_gan; it changes nothing",
                                    "model.d_width=16 is not read by an mlp_gan; it changes nothing"]
    assert unused_settings(gan.with_overrides({"loss.gan": "wgan-gp"}), base=gan) == []  # the resumed run had them


def test_a_preset_file_without_a_name_names_runs_after_the_file(tmp_path):
    from aigc_cli.config import load_preset

    (tmp_path / "my-gan.toml").write_text('[model]\nkind = "dcgan"\n')
    (tmp_path / "two words.toml").write_text('[model]\nkind = "dcgan"\n')
    (tmp_path / "named.toml").write_text('name = "chosen"\n')
    assert load_preset(str(tmp_path / "my-gan.toml")).name == "my-gan"
    assert load_preset(str(tmp_path / "two words.toml")).name == "custom"  # not a folder name runs/ takes
    assert load_preset(str(tmp_path / "named.toml")).name == "chosen"


def test_strings_beyond_the_basic_plane_round_trip_through_config_toml():
    """json.dumps wrote an emoji as a surrogate pair of \\u escapes, which TOML refuses: a run whose data
    folder or description held one could not read its own config.toml back."""
    cfg = Config().with_overrides({"description": 'café 🙂 "q" \\ tab\there', "data.source": "/data/imgs 📷"})
    text = cfg.to_toml()
    assert text.isascii() and "\\U0001f642" in text
    assert config_from_dict(tomllib.loads(text)) == cfg


def test_more_settings_that_change_nothing_are_noted():
    from aigc_cli.config import unused_settings
    from conftest import tiny

    def unused(cfg):  # tiny() sets model.hidden for every family
        return [n for n in unused_settings(cfg) if not n.startswith("model.hidden")]

    vae = tiny("vae").with_overrides({"train.ema_start": "100", "loss.vae_beta": "0", "loss.kl_warmup": "50"})
    assert unused(vae) == [
        "loss.kl_warmup=50 is not read by a vae with loss.vae_beta=0 (no KL term); it changes nothing",
        "train.ema_start=100 is not read by a vae; it changes nothing"]
    gan = tiny("dcgan").with_overrides({"train.ema_start": "100", "train.eval_n": "50", "train.eval_metric": "kid"})
    assert unused(gan) == [
        "train.ema_start=100 is not read by a dcgan with train.ema_decay=0 (no EMA); it changes nothing",
        "train.eval_metric=kid is not read by a dcgan without train.eval_every (no evaluation during training); it changes nothing",
        "train.eval_n=50 is not read by a dcgan without train.eval_every (no evaluation during training); it changes nothing"]
    assert unused(gan.with_overrides({"train.ema_decay": "0.999", "train.eval_every": "10"})) == []
    clf = tiny("classifier").with_overrides({"train.n_samples": "16"})
    assert [n for n in unused(clf) if n.startswith("train.")] == [  # tiny() sets sample_every too
        "train.n_samples=16 is not read by a classifier; it changes nothing",
        "train.sample_every=20 is not read by a classifier; it changes nothing"]


@pytest.mark.parametrize("key, guess", [("batch_size", "train.batch_size"), ("train.LR_G", "train.lr_g"),
                                        ("Train.LR_G", "train.lr_g"), ("model.res", "model.resolution"),
                                        ("train.hflip", "data.hflip"), ("loss.lr_d", "train.lr_d"),
                                        ("model.n_critic", "train.n_critic"), ("train.GAN", "loss.gan")])
def test_unknown_keys_get_the_likely_one(key, guess):
    with pytest.raises(UsageError, match=f"did you mean '{guess}'"):
        parse_assignments([f"{key}=1"])


def test_presets_show_full_prints_every_key_training_would_use(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, "presets", "show", "quickstart", "--full")
    assert code == 0, err
    assert config_from_dict(tomllib.loads(out)) == load_preset("quickstart")
    assert "keep_checkpoints = 3" in out and "keep_checkpoints" not in load_preset_text("quickstart")
    p = tmp_path / "bom.toml"
    p.write_bytes("\ufeffname = \"bom\"\n".encode("utf-8"))  # Notepad's byte-order mark
    assert load_preset(str(p)).name == "bom"


def load_preset_text(name):
    from aigc_cli.config import preset_text

    return preset_text(name)


def test_a_preset_file_name_that_cannot_name_a_folder_is_said(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two words.toml").write_text('[model]\nkind = "dcgan"\nresolution = 16\nchannels = 1\ng_width = 8\n'
                                             'd_width = 8\nlatent_dim = 8\n[data]\nsource = "shapes"\nlimit = 64\n'
                                             '[train]\nsteps = 1\nbatch_size = 16\n')
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", tmp_path / "two words.toml")
    assert code == 0, err
    assert "the preset file's name 'two words' cannot name a run folder" in err and (tmp_path / "runs" / "custom-001").is_dir()
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--set", "name=custom", "--steps", 1)
    assert code == 0 and "cannot name a run folder" not in err, err  # a name chosen, not a file name refused


def test_out_of_memory_advice_fits_the_command(capsys):
    import typer

    from aigc_cli.cli.output import handles_errors

    def train():
        raise MemoryError

    def sample():
        raise MemoryError

    for fn, advice in ((train, "data.device_max_mb"), (sample, "fewer images (--n)")):
        with pytest.raises(typer.Exit):
            handles_errors(fn)()
        assert advice in capsys.readouterr().err


@pytest.mark.parametrize("key, accepted, refused", [
    # Each range's edges, as the message states it (a mutation review found every one of these unguarded).
    ("train.recover_lr_factor", "1", "1.01"), ("model.resolution", "4096", "8192"), ("train.n_critic", "1", "0"),
    ("train.lr_g", "0.5", "1"), ("train.seed", str(2**32 - 1), str(2**32)), ("train.eval_n", "10", "9"),
    ("data.translate", "15", "16"),  # resolution 32: [0, 16)
])
def test_range_edges_are_as_the_messages_say(key, accepted, refused):
    from conftest import tiny

    from aigc_cli.errors import UsageError

    cfg = tiny("mlp_gan").with_overrides({"model.resolution": "32"})
    cfg.with_overrides({key: accepted})
    with pytest.raises(UsageError, match=key.split(".")[1]):
        cfg.with_overrides({key: refused})


@pytest.mark.parametrize("key, value", [("steps", True), ("lr_g", True), ("steps", 3.0)])
def test_a_toml_boolean_or_float_for_a_count_is_refused(key, value):
    # TOML's `steps = true` is a bool, which Python counts as the int 1.
    with pytest.raises(UsageError, match=f"config key 'train.{key}' expects (int|float), got (bool|float)"):
        config_from_dict({"model": {"kind": "dcgan"}, "train": {key: value}})
