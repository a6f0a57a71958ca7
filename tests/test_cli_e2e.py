"""End to end through the real `aigc` command: train, sample, export, info, eval, on real files."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from conftest import aigc_command, default_sighup
from safetensors import safe_open

from aigc_cli import checkpoint as ckpt_io

QUICK = ["--steps", "20", "--set", "train.log_every=5", "--set", "train.sample_every=10",
         "--set", "train.ckpt_every=10", "--set", "data.limit=512", "--set", "train.n_samples=16"]
META_KEYS = {"aigc.format", "aigc.kind", "aigc.model", "aigc.config", "aigc.step", "aigc.images_seen",
             "aigc.created", "aigc.torch", "aigc.precision"}


def meta_and_keys(path: Path) -> tuple[dict, list[str]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), list(f.keys())


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


@pytest.fixture(scope="module")
def gan_run(aigc, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "gan run"
    r = aigc("train", "--preset", "quickstart", "--out", out, "--json", "--seed", "3", *QUICK)
    assert r.code == 0, r.stderr
    return out, r.json()


@pytest.fixture(scope="module")
def classifier_ckpt(aigc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "clf"
    r = aigc("train", "--preset", "shapes-classifier", "--out", out, "--steps", "30", "--json",
             "--set", "data.limit=512")
    assert r.code == 0, r.stderr
    summary = r.json()
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    return Path(summary["checkpoint"])


def test_train_writes_the_run_folder(gan_run):
    out, summary = gan_run
    assert summary["steps"] == 20 and summary["images_seen"] == 20 * 64
    assert (out / "config.toml").read_text().count("[model]") == 1
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in lines] == [5, 10, 15, 20]
    assert all(rec["img_per_s"] > 0 and "loss_d" in rec and "loss_g" in rec for rec in lines)
    # 16 samples in a 4x4 grid of 32px images with 2px padding
    assert png_size(out / "samples" / "step-0000020.png") == (4 * 34 + 2, 4 * 34 + 2)
    assert (out / "samples" / "step-0000010.png").is_file()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.safetensors"))
    assert ckpts == ["last.safetensors", "step-0000010.safetensors", "step-0000020.safetensors"]
    mask = os.umask(0)
    os.umask(mask)
    for f in ("config.toml", "metrics.jsonl", "samples/step-0000020.png", "checkpoints/last.safetensors"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~mask, f  # as any tool's files: not owner-only
    meta, keys = meta_and_keys(out / "checkpoints" / "last.safetensors")
    assert META_KEYS <= set(meta)
    assert meta["aigc.step"] == "20" and meta["aigc.kind"] == "checkpoint" and meta["aigc.model"] == "dcgan"
    assert json.loads(meta["aigc.config"])["train"]["seed"] == 3
    assert {k.split(".")[0] for k in keys} >= {"G", "D", "opt", "rng"}
    assert summary["samples"].endswith("step-0000020.png")


def test_sample_is_deterministic_per_seed(aigc, cli, gan_run, tmp_path):
    out, _ = gan_run
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    for path, seed, run in ((a, 7, aigc), (b, 7, cli), (c, 8, cli)):  # one process and another
        r = run("sample", out, "--n", "9", "--seed", seed, "--out", path)
        assert r.code == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert png_size(a) == (3 * 34 + 2, 3 * 34 + 2)


def test_sample_individual_and_nrow(aigc, gan_run, tmp_path):
    out, _ = gan_run
    r = aigc("sample", out / "checkpoints" / "step-0000010.safetensors", "--n", "5", "--nrow", "5",
             "--individual", tmp_path / "ind", "--out", tmp_path / "g.png", "--json")
    assert r.code == 0, r.stderr
    files = sorted((tmp_path / "ind").glob("*.png"))
    assert len(files) == 5 and all(png_size(f) == (32, 32) for f in files)
    assert png_size(tmp_path / "g.png") == (5 * 34 + 2, 34 + 2)
    assert r.json()["n"] == 5


def test_same_command_same_seed_gives_identical_training(aigc, gan_run, tmp_path):
    out, _ = gan_run
    r = aigc("train", "--preset", "quickstart", "--out", tmp_path / "again", "--seed", "3", "--quiet", *QUICK)
    assert r.code == 0, r.stderr
    assert r.stdout == ""
    same = (tmp_path / "again" / "samples" / "step-0000020.png").read_bytes()
    assert same == (out / "samples" / "step-0000020.png").read_bytes()


def test_export_sample_and_info(aigc, cli, gan_run, tmp_path):
    out, _ = gan_run
    art = tmp_path / "gen.safetensors"
    r = aigc("export", out, "--out", art, "--dtype", "fp16", "--json")
    assert r.code == 0, r.stderr
    meta, keys = meta_and_keys(art)
    assert meta["aigc.kind"] == "export" and meta["aigc.dtype"] == "fp16"
    assert META_KEYS <= set(meta)
    assert keys and all(k.startswith("G.") for k in keys)
    assert art.stat().st_size < (out / "checkpoints" / "last.safetensors").stat().st_size / 4
    assert {k: r.json()[k] for k in ("format", "dtype", "source", "step", "weights")} == {
        "format": "safetensors", "dtype": "fp16", "source": str((out / "checkpoints" / "step-0000020.safetensors").resolve()),
        "step": 20, "weights": meta["aigc.weights"]}

    r = aigc("sample", art, "--n", "4", "--out", tmp_path / "from-export.png")
    assert r.code == 0, r.stderr
    assert png_size(tmp_path / "from-export.png") == (2 * 34 + 2, 2 * 34 + 2)

    info_art = cli("info", art, "--json").json()
    assert info_art["kind"] == "export" and info_art["step"] == 20 and list(info_art["parameters"]) == ["G"]
    info_run = cli("info", out, "--json").json()
    assert info_run["kind"] == "checkpoint" and info_run["images_seen"] == 20 * 64
    assert info_run["parameters"]["G"] == info_art["parameters"]["G"] > 0
    assert info_run["parameters"]["D"] > 0 and info_run["precision"] == "fp32"
    assert info_run["config"]["model"]["kind"] == "dcgan"
    human = cli("info", out)
    assert human.code == 0 and "dcgan" in human.stdout and "images seen" in human.stdout


def test_eval_with_domain_classifier(aigc, gan_run, classifier_ckpt):
    out, _ = gan_run
    r = aigc("eval", out, "--data", "shapes", "--features", classifier_ckpt, "--n", "200", "--json")
    assert r.code == 0, r.stderr
    res = r.json()
    m, p = res["metrics"], res["protocol"]
    assert m["fid"] > 0 and abs(m["kid"]) < 1e6 and m["kid_std"] >= 0
    assert 1.0 <= m["is"] <= 4.0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1  # 4 shape classes
    assert p["n_fake"] == 200 and p["n_real"] == 200 and p["extractor"].startswith("classifier:")
    # A classifier checkpoint is not a generator: clear error, not a traceback.
    bad = aigc("eval", classifier_ckpt, "--features", classifier_ckpt, "--n", "10")
    assert bad.code == 2 and "does not generate images" in bad.stderr


def test_eval_says_the_classifier_saw_other_data_once_that_data_has_loaded(cli, gan_run, classifier_ckpt,
                                                                          image_folder):
    other = cli("eval", gan_run[0], "--data", image_folder, "--features", classifier_ckpt, "--n", "8", "--metrics", "fid")
    assert other.code == 0 and "the feature classifier was trained on 'shapes'" in other.stderr, other.stderr
    missing = cli("eval", gan_run[0], "--data", "/no/such/folder", "--features", classifier_ckpt, "--n", "8")
    assert "/no/such/folder" in one_line_error(missing)  # the warning came first: two lines


def test_train_on_an_image_folder_with_spaces(aigc, cli, image_folder, tmp_path):
    out = tmp_path / "folder run"
    r = aigc("train", "--preset", "folder-dcgan-64", "--data", image_folder, "--out", out, "--steps", "3",
             "--batch-size", "4", "--set", "model.resolution=16", "--set", "model.g_width=8",
             "--set", "model.d_width=8", "--json")
    assert r.code == 0, r.stderr
    assert png_size(out / "samples" / "step-0000003.png") == (8 * 18 + 2, 8 * 18 + 2)
    r = cli("sample", out, "--n", "1", "--out", tmp_path / "one.png")
    assert r.code == 0 and png_size(tmp_path / "one.png") == (16, 16)  # make_grid leaves a single image unpadded
    # The folder's class subfolders make it a labelled source: a domain classifier for eval.
    clf = tmp_path / "folder clf"
    r = cli("train", "--preset", "shapes-classifier", "--data", image_folder, "--out", clf, "--steps", "5",
             "--batch-size", "4", "--set", "model.resolution=16", "--json")
    assert r.code == 0, r.stderr
    r = cli("eval", out, "--features", clf, "--n", "12", "--json")  # --data defaults to the training folder
    assert r.code == 0, r.stderr
    assert r.json()["protocol"]["n_real"] == 12 and r.json()["metrics"]["fid"] >= 0
    r = cli("export", out, "--out", tmp_path / "folder gen.safetensors", "--json")
    assert r.code == 0 and r.json()["parameters"] == cli("info", out, "--json").json()["parameters"]["G"]


def test_presets_list_and_show(aigc, cli):
    r = aigc("presets", "list")
    assert r.code == 0
    for name in ("quickstart", "mnist-mlp-gan", "fashion-mnist-dcgan", "fashion-mnist-vae", "cifar10-dcgan",
                 "folder-dcgan-64", "fashion-mnist-classifier"):
        assert name in r.stdout
    r = cli("presets", "show", "mnist-mlp-gan")
    assert r.code == 0 and 'kind = "mlp_gan"' in r.stdout
    from aigc_cli.config import load_preset, preset_names

    listed = cli("presets", "list", "--json").json()["presets"]  # for scripts: the table is for people
    assert [p["name"] for p in listed] == preset_names()
    quick, cfg = next(p for p in listed if p["name"] == "quickstart"), load_preset("quickstart")
    assert quick == {"name": "quickstart", "model": cfg.model.kind, "data": cfg.data.source,
                     "resolution": cfg.model.resolution, "description": cfg.description}


def one_line_error(r) -> str:
    assert r.code == 2, (r.code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [s for s in r.stderr.splitlines() if s.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("args, expect", [
    (["train", "--preset", "quickstart", "--data", "/no/such/folder"], "/no/such/folder"),
    (["train", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["train", "--preset", "quickstart", "--set", "train.bogus=1"], "unknown config key 'train.bogus'"),
    (["train", "--preset", "quickstart", "--set", "train.batch_size=many"], "expects int"),
    (["train", "--preset", "quickstart", "--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["train", "--preset", "quickstart", "--precision", "fp8"], "--precision must be one of"),
    (["train", "--preset", "quickstart", "--device", "cuda:x"], "--device must be auto, cpu"),  # named train.device
    (["train", "--preset", "quickstart", "--batch-size", "2000000"], "--batch-size must be at most 1,048,576"),
    (["train", "--preset", "quickstart", "--set", "train.steps=0"], "train.steps must be positive"),  # a --set: its key
    (["train", "--preset", "quickstart", "--data", "mnist"], "--download"),
    (["sample", "/no/such/ckpt.safetensors"], "no such checkpoint"),
    (["train", "--preset", "quickstart", "--out", "-"], "--out -: standard output is not supported"),  # made ./-
    (["sample", "/no/such/run", "--individual=-"], "--individual -: standard output is not supported"),
    (["sample", "/no/such/run", "--nrow", "0"], "--nrow must be positive, got 0"),  # named all three options
    (["train", "--preset", "/dev/null"], "/dev/null: not a regular file"),  # said "no such preset file"
])
def test_bad_input_is_one_line_exit_2(cli, args, expect):
    assert expect in one_line_error(cli(*args))


def test_bad_files_are_one_line_exit_2(aigc, cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(aigc("train", "--preset", "quickstart", "--data", empty))
    text = tmp_path / "notes.safetensors"
    text.write_text("this is not a checkpoint")
    assert "notes.safetensors" in one_line_error(cli("info", text))
    assert "no checkpoint" in one_line_error(cli("sample", empty))


def test_damaged_checkpoints_are_one_line_exit_2(aigc, cli, gan_run, tmp_path):
    data = (gan_run[0] / "checkpoints" / "last.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 3])
    assert "cut.safetensors" in one_line_error(aigc("sample", cut, "--out", tmp_path / "x.png"))
    header_len = int.from_bytes(data[:8], "little")
    tampered = bytearray(data)
    at = data.index(b'"aigc.model":"dcgan"', 0, 8 + header_len)
    tampered[at + 14:at + 19] = b"vae  "[:5]  # same length, so the header still parses
    (tmp_path / "tampered.safetensors").write_bytes(bytes(tampered))
    assert "tampered.safetensors" in one_line_error(cli("info", tmp_path / "tampered.safetensors"))
    assert "tampered.safetensors" in one_line_error(
        cli("train", "--resume", tmp_path / "tampered.safetensors", "--out", tmp_path / "r"))


def test_a_run_folder_whose_last_checkpoint_is_damaged_gives_its_newest_readable_one(cli, gan_run, tmp_path):
    """A disk that filled up or a copy cut short: `info`, `sample`, `export` and `--resume RUN` refused the
    whole folder, though a run folder means its newest checkpoint and an older one was whole."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(gan_run[0], run, symlinks=True)
    last = run / "checkpoints" / "last.safetensors"
    steps = sorted((run / "checkpoints").glob("step-*.safetensors"))
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 3])
    r = cli("info", run, "--json")
    assert r.code == 0 and r.json()["step"] == ckpt_io.load(steps[-1]).step, r.stderr
    assert r.stderr.startswith(f"warning: {last}: not a readable safetensors checkpoint") and \
        f"using {steps[-1]}, the newest checkpoint of the folder that reads" in r.stderr, r.stderr
    assert cli("sample", run, "--n", "4", "--out", tmp_path / "g.png").code == 0
    assert cli("export", run, "--out", tmp_path / "g.safetensors", "-q").code == 0
    quiet = cli("train", "--resume", run, "--steps", str(ckpt_io.load(steps[-1]).step + 1), "-q")
    assert quiet.code == 0 and quiet.stderr == "", quiet.stderr  # --quiet: nothing but errors
    for step in (run / "checkpoints").glob("*.safetensors"):
        step.write_bytes(b"")
    assert "last.safetensors" in one_line_error(cli("info", run))  # nothing reads: the newest file's error


def test_a_features_run_folder_whose_last_checkpoint_is_damaged_gives_its_newest_readable_one(cli, gan_run,
                                                                                               classifier_ckpt, tmp_path):
    """--features RUN refused the folder over its damaged newest file, as sample and info no longer do."""
    checkpoints = tmp_path / "clf" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / classifier_ckpt.name).write_bytes(classifier_ckpt.read_bytes())
    (checkpoints / "last.safetensors").write_bytes(classifier_ckpt.read_bytes()[:1000])
    r = cli("eval", gan_run[0], "--features", tmp_path / "clf", "--n", "16", "--metrics", "fid", "--json")
    assert r.code == 0 and r.json()["protocol"]["extractor"] == f"classifier:{checkpoints / classifier_ckpt.name}", r.stderr
    assert f"warning: --features {checkpoints / 'last.safetensors'}: not a readable safetensors checkpoint" in r.stderr
    assert f"using {checkpoints / classifier_ckpt.name}, the newest checkpoint of the folder that reads" in r.stderr


def test_bad_image_files_warn_or_fail_with_strict(aigc, cli, image_folder, tmp_path):
    (image_folder / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (image_folder / "cats" / "empty.jpg").write_bytes(b"")
    args = ["train", "--preset", "folder-dcgan-64", "--data", image_folder, "--steps", "1", "--batch-size", "4",
            "--set", "model.resolution=16", "--set", "model.g_width=8", "--set", "model.d_width=8"]
    r = aigc(*args, "--out", tmp_path / "ok")
    assert r.code == 0, r.stderr
    warned = [s for s in r.stderr.splitlines() if "broken.png" in s or "empty.jpg" in s]
    assert len(warned) == 2 and "skipped 2 of 14" in r.stderr
    line = one_line_error(cli(*args, "--out", tmp_path / "strict", "--strict"))
    assert "broken.png" in line or "empty.jpg" in line


@pytest.mark.parametrize("kind", ["vae", "mlp_gan"])
def test_other_families_train_sample_and_eval(aigc, cli, classifier_ckpt, tmp_path, kind):
    out = tmp_path / kind
    r = aigc("train", "--preset", "quickstart", "--out", out, "--steps", "10", "--set", f"model.kind={kind}",
             "--set", "model.g_width=16", "--set", "model.d_width=16", "--set", "data.limit=256",
             "--set", "train.n_samples=16", "--json")
    assert r.code == 0, r.stderr
    assert png_size(out / "samples" / "step-0000010.png") == (4 * 34 + 2, 4 * 34 + 2)
    if kind == "vae":  # inputs above, reconstructions below: 2 rows of 4
        assert png_size(out / "samples" / "recon-step-0000010.png") == (4 * 34 + 2, 4 * 34 + 2)
    r = cli("eval", out, "--features", classifier_ckpt, "--n", "100", "--json")
    assert r.code == 0, r.stderr
    # the step file, not last.safetensors, which the run's next save (or a resume) replaces
    assert r.json()["checkpoint"] == str((out / "checkpoints" / "step-0000010.safetensors").resolve())
    m = r.json()["metrics"]
    assert m["fid"] > 0
    if kind == "vae":
        assert 0 < m["recon_mse"] < 4 and m["neg_elbo"] > 0 and r.json()["protocol"]["n_heldout"] == 100
    else:
        assert "recon_mse" not in m


@pytest.mark.parametrize("args, expect", [
    (["train", "--preset", "quickstart", "--seed", "99999999999999999999"], "'--seed': 99999999999999999999 is not from 0"),
    (["eval", "stats", "--data", "shapes", "--out", "{tmp}/s.npz", "--seed", "4294967296"], "'--seed': 4294967296 is not"),
    (["train", "--preset", "quickstart", "--set", "train.steps=abc", "--steps", "1"], "expects int"),
    (["train", "--preset", "quickstart", "--out", "/proc/no-such/run"], "/proc/no-such"),
    (["sample", "/no/ckpt", "--seed", "-1"], "'--seed': -1 is not from 0 to 4294967295"),
    (["train", "--preset", "quickstart", "--seed", "-1"], "Invalid value for '--seed'"),  # named the option, not train.seed
    (["eval", "stats", "--data", "shapes", "--out", "{tmp}/s.npz", "--channels", "5"], "--channels must be 1 (grey) or 3"),
    (["sample", "/no/ckpt", "--out", "grid.jpg"], ".png"),
    (["train", "--preset", "quickstart", "--steps", "3", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["train", "--preset", "quickstart", "--epochs", "0"], "--epochs must be at least 1, got 0"),  # trained the preset's steps
    (["train", "--preset", "quickstrat"], "unknown preset 'quickstrat'; did you mean 'quickstart'?"),
    (["train", "--preset", "g.png"], "g.png: a preset file's name must end in .toml"),
    (["train", "--preset", "./g.png"], "./g.png: a preset file's name must end in .toml"),  # "no such preset file"
    (["presets", "show", "{tmp}"], "is a folder, not a preset file"),
    (["train", "--preset", "quickstart", "--set", "model.g_widht=8"], "did you mean 'model.g_width'? (model.* keys: kind,"),
    (["train", "--preset", "quickstart", "--set", "model.foo=8"], "'model.foo'; model.* keys: kind, resolution,"),  # no wild guess
    (["train", "--preset", "quickstart", "--out", ""], "an empty value for --out (an unset shell variable?)"),
    (["train", "--preset", "quickstart", "--out="], "an empty value for --out"),
    (["sample", ""], "an empty argument (an unset shell variable?)"),
    (["eval", "--fake", "{tmp}", "--ref", "{tmp}/g.png", "--metrics", "fid"], "not an .npz (zip) file)"),
])
def test_more_bad_input_is_one_line_exit_2(cli, tmp_path, monkeypatch, args, expect):
    monkeypatch.chdir(tmp_path)  # an empty --out meant the current folder: nothing may land here either
    Image.new("RGB", (8, 8)).save(tmp_path / "g.png")
    line = one_line_error(cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]))
    assert expect in line and "pickle" not in line, line
    assert not [p for p in tmp_path.iterdir() if p.name != "g.png"]  # nothing written


def test_paths_the_shell_left_alone_and_relative_settings_are_made_whole(cli, gan_run, tmp_path, monkeypatch):
    out, _ = gan_run
    monkeypatch.setenv("HOME", str(tmp_path))
    r = cli("sample", str(out), "--n", "2", "--out=~/grid.png", "--json")  # the shell expands no ~ after "="
    assert r.code == 0 and r.json()["grid"] == str(tmp_path / "grid.png") and (tmp_path / "grid.png").is_file()
    assert r.json()["checkpoint"] == str((out / "checkpoints" / "step-0000020.safetensors").resolve())
    (tmp_path / "link").symlink_to(out)
    assert cli("info", "~/link", "--json").json()["step"] == 20  # a quoted "~/..." argument
    # data.root given relative is stored absolute: eval and resume from another folder find the same data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "droot").mkdir()
    r = cli("train", "--preset", "quickstart", "--data-root", "droot", "--out", "rel", "--json", "--steps", "1",
            "--set", "model.g_width=8", "--set", "model.d_width=8", "--set", "data.limit=64")
    assert r.code == 0, r.stderr
    assert f'root = "{tmp_path / "droot"}"' in (tmp_path / "rel" / "config.toml").read_text()
    # train --json gives absolute paths, as sample and eval do: a script may run the next command elsewhere
    assert (r.json()["run_dir"], r.json()["checkpoint"], r.json()["samples"]) == (
        str(tmp_path / "rel"), str(tmp_path / "rel" / "checkpoints" / "step-0000001.safetensors"),
        str(tmp_path / "rel" / "samples" / "step-0000001.png"))


def test_export_names_the_training_checkpoint_it_came_from(cli, gan_run, tmp_path):
    out, _ = gan_run
    assert cli("export", out, "--out", tmp_path / "a.safetensors").code == 0
    source = cli("info", tmp_path / "a.safetensors", "--json").json()["source"]
    assert source == str((out / "checkpoints" / "step-0000020.safetensors").resolve())  # not last.safetensors
    assert cli("info", out, "--json").json()["path"] == source  # info names it as sample and eval do: absolute
    assert cli("export", tmp_path / "a.safetensors", "--out", tmp_path / "b.safetensors", "--dtype", "bf16").code == 0
    assert cli("info", tmp_path / "b.safetensors", "--json").json()["source"] == source  # carried over


def test_outputs_that_cannot_be_written_are_refused_before_the_work(cli, gan_run, tmp_path):
    out, _ = gan_run
    (tmp_path / "d.npz").mkdir()
    assert "--out " in one_line_error(cli("eval", "stats", "--data", "shapes", "--out", tmp_path / "d.npz"))
    (tmp_path / "afile").write_text("x")
    line = one_line_error(cli("eval", out, "--save-fakes", tmp_path / "afile", "--n", "10"))
    assert "--save-fakes" in line and "exists and is not a folder" in line
    line = one_line_error(cli("eval", "stats", "--data", "shapes", "--out", tmp_path / "afile" / "r.npz"))
    assert "afile is a file, not a folder" in line


def test_a_run_folder_named_stats_is_pointed_to_as_dot_slash_stats(cli, gan_run, tmp_path, monkeypatch):
    """`aigc eval "$RUN"` with RUN=stats runs `eval stats`, which refused eval's options with no word why."""
    import shutil

    shutil.copytree(gan_run[0], tmp_path / "stats", symlinks=True)
    monkeypatch.chdir(tmp_path)
    line = one_line_error(cli("eval", "stats", "--n", "8", "--metrics", "fid"))
    assert "No such option: --metrics" in line and line.endswith("write ./stats"), line
    monkeypatch.chdir(gan_run[0])  # no folder named stats here: no such hint
    assert "./stats" not in one_line_error(cli("eval", "stats", "--metrics", "fid"))


def test_bad_output_paths_and_devices_are_one_line_exit_2(cli, gan_run, tmp_path):
    out, _ = gan_run
    assert "is a folder" in one_line_error(cli("sample", out, "--n", "1", "--out", tmp_path))
    assert "is a folder" in one_line_error(cli("export", out, "--out", tmp_path))
    (tmp_path / "file.txt").write_text("x")
    assert "not a folder" in one_line_error(cli("sample", out, "--n", "1", "--individual", tmp_path / "file.txt"))
    assert "--device" in one_line_error(cli("sample", out, "--n", "1", "--device", "tpu", "--out", tmp_path / "a.png"))


def test_conditional_sampling_by_class_and_ema(aigc, cli, image_folder, gan_run, tmp_path):
    out = tmp_path / "cond"
    r = aigc("train", "--preset", "folder-cond-sngan-64", "--data", image_folder, "--out", out, "--steps", "2",
             "--batch-size", "4", "--set", "model.resolution=16", "--set", "model.g_width=16",
             "--set", "model.d_width=16", "--set", "train.ema_decay=0.5", "--set", "train.n_critic=1", "--json")
    assert r.code == 0, r.stderr
    r = aigc("sample", out, "--class", "1", "--n", "3", "--out", tmp_path / "one-class.png")
    assert r.code == 0 and png_size(tmp_path / "one-class.png") == (2 * 18 + 2, 2 * 18 + 2)  # one class: square
    r = cli("sample", out, "--class", "Dogs", "--n", "3", "--out", tmp_path / "by-name.png")  # its folder's name
    assert r.code == 0 and (tmp_path / "by-name.png").read_bytes() == (tmp_path / "one-class.png").read_bytes()
    r = cli("sample", out, "--class", "dogs,0", "--n", "2", "--out", tmp_path / "mixed.png")
    assert r.code == 0 and png_size(tmp_path / "mixed.png") == (18 + 2, 2 * 18 + 2)
    assert "not a class number or name (this model's classes are cats, dogs)" in one_line_error(
        cli("sample", out, "--class", "birds"))
    r = cli("sample", out, "--n", "6", "--out", tmp_path / "all.png")
    assert r.code == 0 and png_size(tmp_path / "all.png") == (3 * 18 + 2, 2 * 18 + 2)  # a row per class
    r = cli("sample", out, "--n", "6", "--out", tmp_path / "raw.png", "--no-ema")
    assert r.code == 0 and (tmp_path / "raw.png").read_bytes() != (tmp_path / "all.png").read_bytes()
    assert "classes 0..1 (0 cats, 1 dogs)" in one_line_error(cli("sample", out, "--class", "5"))
    assert "unconditional" in one_line_error(cli("sample", gan_run[0], "--class", "0"))
    r = aigc("export", out, "--out", tmp_path / "g.safetensors", "--json")
    assert r.code == 0
    again = aigc("sample", tmp_path / "g.safetensors", "--n", "6", "--out", tmp_path / "exported.png")
    assert again.code == 0 and (tmp_path / "exported.png").read_bytes() == (tmp_path / "all.png").read_bytes()
    # An export holds the EMA weights only: --no-ema cannot be honoured, so it is refused, not ignored.
    assert "is an export of the EMA weights only" in one_line_error(
        cli("sample", tmp_path / "g.safetensors", "--no-ema", "--out", tmp_path / "x.png"))
    assert cli("export", tmp_path / "g.safetensors", "--out", tmp_path / "g2.safetensors").code == 0
    for export in ("g.safetensors", "g2.safetensors"):  # eval's protocol reads this too
        assert ckpt_io.load(tmp_path / export).generator_weights() == ("G", "G_ema")
        assert json.loads(cli("info", tmp_path / export, "--json").stdout)["weights"] == "G_ema"


def test_sigterm_stops_even_inside_library_code_that_catches_exceptions(cli, gan_run, tmp_path, monkeypatch):
    """torch's import and error-collecting loaders wrap their work in `except Exception`: a SIGTERM that
    lands there must still stop the command (143), not be swallowed (exit 0 after all the work)."""
    import aigc_cli.export

    def library_code(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the batch system's kill, while a library works
            time.sleep(5)
        except Exception:
            pass  # what such a library does with its own failures
        raise AssertionError("the SIGTERM was swallowed")

    monkeypatch.setattr(aigc_cli.export, "export_generator", library_code)
    r = cli("export", gan_run[0], "--out", tmp_path / "g.safetensors")
    assert (r.code, r.stderr) == (143, "stopped: SIGTERM\n")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the command's handler is gone again


def test_sigterm_inside_an_import_waits_for_it_and_then_stops(cli, gan_run, tmp_path, monkeypatch):
    """A SIGTERM while torch imports numpy was raised inside that import, where torch's C code swallowed it
    (`sample` then exited 0 after all its work) or importlib's locks stayed held (a hang). It now waits for
    the import to end, then stops."""
    import aigc_cli.export
    from conftest import module_that_stops_its_import

    module_that_stops_its_import(tmp_path, monkeypatch, "slow_import_mod", "DONE = True\n")
    imported = []

    def library_code(*args, **kwargs):
        import slow_import_mod

        imported.append(slow_import_mod.DONE)
        time.sleep(5)  # the stop lands here, once the import is done
        raise AssertionError("the SIGTERM was lost")

    monkeypatch.setattr(aigc_cli.export, "export_generator", library_code)
    r = cli("export", gan_run[0], "--out", tmp_path / "g.safetensors")
    assert (r.code, r.stderr, imported) == (143, "stopped: SIGTERM\n", [True])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


@pytest.mark.parametrize("sig, code, said", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP"),
                                             (signal.SIGINT, 130, "SIGINT (Ctrl-C)")])
def test_sigterm_during_sample_leaves_no_temporary_files(aigc_env, gan_run, tmp_path, sig, code, said):
    """Also SIGHUP, a terminal closed under the command: it was killed on the spot; and Ctrl-C."""
    each = tmp_path / "each"
    proc = subprocess.Popen([*aigc_command(), "sample", gan_run[0], "--n", "500000", "--individual", each],
                            env=aigc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sighup)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (each.is_dir() and len(os.listdir(each)) >= 50):
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    names = os.listdir(each)
    assert proc.returncode == code and err == (f"warning: --individual {each}: stopped after {len(names)} of the "
                                               "500000 images were written; the folder holds an incomplete set\n"
                                               f"stopped: {said}\n"), err
    assert len(names) >= 50 and not [s for s in names if s.startswith(".")]  # whole PNGs only


def test_ctrl_c_during_eval_save_fakes_exits_130_and_says_the_set_is_incomplete(aigc_env, gan_run, classifier_ckpt,
                                                                                tmp_path):
    """Also: no hidden temporary PNG is left. A stop raised as atomic_write's os.open returned (most runs here:
    the main thread writes each PNG, and opening a file is slow on this file system) left it behind."""
    fakes = tmp_path / "fakes"
    proc = subprocess.Popen([*aigc_command(), "eval", gan_run[0], "--features", classifier_ckpt, "--metrics", "is",
                             "--n", "400000", "--save-fakes", fakes], env=aigc_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sighup)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (fakes.is_dir() and len(os.listdir(fakes)) >= 50):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    names = os.listdir(fakes)
    assert proc.returncode == 130 and out == "", (proc.returncode, err)
    assert err.endswith(f"warning: --save-fakes {fakes}: stopped after {len(names)} of the 400000 images were written; "
                        "the folder holds an incomplete set\nstopped: SIGINT (Ctrl-C)\n"), err
    assert "Traceback" not in err and len(names) >= 50 and not [s for s in names if s.startswith(".")]


def test_set_train_steps_counts_in_steps_over_a_presets_epochs(cli, tmp_path):
    """`--set train.steps=N` on a preset that counts epochs was ignored (its epochs won), and the run's
    config.toml then said steps = N."""
    r = cli("train", "--preset", "mnist-mlp-gan", "--data", "shapes", "--out", tmp_path / "r", "--json",
            "--set", "train.steps=2", "--set", "data.limit=128", "--set", "model.hidden=16", "--batch-size", "16")
    assert r.code == 0 and r.json()["steps"] == 2, r.stderr
    assert "epochs = 0" in (tmp_path / "r" / "config.toml").read_text()
    r = cli("train", "--preset", "quickstart", "--out", tmp_path / "f", "--json", "--steps", "2", "--set",
            "train.epochs=1", "--set", "data.limit=128", "--set", "model.g_width=8", "--set", "model.d_width=8")
    assert r.code == 0 and r.json()["steps"] == 2, r.stderr  # the flag wins over --set, as flags do


def test_an_option_over_a_set_of_the_same_key_and_a_key_set_twice_are_said(cli):
    """`--steps 1 --set train.steps=2` trained 1 step without a word; a repeated --set took the last."""
    r = cli("train", "--preset", "quickstart", "--steps", "1", "--set", "train.steps=2", "--set", "train.steps=3",
            "--set", "train.epochs=1", "--seed", "4", "--set", "train.seed=4", "--data", "/no/such/folder")
    assert r.code == 2 and r.stderr.splitlines()[:3] == [
        "warning: --set train.steps is given twice ('2', then '3'); the last is used",
        "warning: --steps 1 is used over --set train.steps=3",
        "warning: --steps 1 is used over --set train.epochs=1"], r.stderr  # the same seed twice: nothing to say
    assert r.stderr.count("warning") == 3 and "/no/such/folder" in r.stderr.splitlines()[3]
    same = cli("train", "--preset", "quickstart", "--steps", "2", "--set", "train.steps=02", "--set", "train.epochs=0",
               "--strict", "--set", "data.strict=True", "--data", "/no/such/folder")
    assert same.code == 2 and "warning" not in same.stderr, same.stderr  # the same values, parsed
    both = cli("train", "--preset", "quickstart", "--set", "train.steps=3", "--set", "train.epochs=1",
               "--data", "/no/such/folder")  # epochs win: said, where the steps were dropped without a word
    assert both.stderr.startswith("warning: --set train.epochs=1 is used over --set train.steps=3"), both.stderr


def test_a_run_folder_name_that_is_not_utf8_is_refused_before_training(cli, tmp_path):
    """Its checkpoints were written, but safetensors opens only UTF-8 paths: `info` and `sample` failed on
    them, and `--resume auto` skipped each as unusable and began again at step 0, in every requeue."""
    out = Path(os.fsdecode(bytes(tmp_path) + b"/r\xff"))
    line = one_line_error(cli("train", "--preset", "quickstart", "--steps", "1", "--out", out))
    assert "r\\xff: its path is not valid UTF-8" in line and not out.exists(), line


def test_a_data_path_or_setting_that_is_not_utf8_is_refused_before_training(cli, image_folder, tmp_path):
    """config.toml held it as an escaped lone surrogate, which is not TOML: the run's config could not be
    read back (`--preset RUN/config.toml` failed), though the run trained."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/d\xffata"))
    image_folder.rename(data)
    args = ["train", "--preset", "folder-dcgan-64", "--steps", "1", "--out", tmp_path / "run"]
    line = one_line_error(cli(*args, "--data", data))
    assert line.endswith("d\\xffata: not valid UTF-8, which the run's config.toml cannot hold; rename it"), line
    line = one_line_error(cli(*args, "--data", tmp_path, "--set", "name=" + os.fsdecode(b"x\xff")))
    assert "name 'x\\xff': not valid UTF-8" in line, line
    assert not (tmp_path / "run").exists()


def test_a_resume_into_another_architecture_is_refused_before_the_data_is_looked_for(cli, gan_run, tmp_path):
    """mnist is not on disk here: the refusal asked for --download first, so a user could download a data
    set only to be refused."""
    line = one_line_error(cli("train", "--preset", "mnist-dcgan", "--resume", gan_run[0], "--out", tmp_path / "new"))
    assert "the config changes the architecture" in line and "--download" not in line, line
    assert not (tmp_path / "new").exists()


def test_an_export_removes_a_killed_exports_leftover(cli, gan_run, tmp_path):
    out, _ = gan_run
    leftover = tmp_path / ".gen.safetensors.deadbeef.tmp"
    leftover.write_bytes(b"\0" * 4096)
    t = leftover.stat().st_mtime - 3600
    os.utime(leftover, (t, t))  # an hour old and unlocked: a killed writer's
    assert cli("export", out, "--out", tmp_path / "gen.safetensors").code == 0
    assert not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.safetensors"]
