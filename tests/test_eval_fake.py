"""`aigc eval --fake DIR`: a folder of images from any tool scored against real data, read at the images'
own size; Inception as the default extractor (random weights of the right layout, as the suite cannot
download the real ones); bad input is one `error:` line with exit code 2."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_cli.training.loop import train
from conftest import Silent, run_cli, tiny, write_image_folder


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    out = tmp_path_factory.mktemp("fake-clf") / "clf"
    train(tiny("classifier", channels=3).with_overrides({"train.steps": "5"}), out, Silent())
    return out


def write_pngs(folder, sizes, seed):
    """Real PNG files of random blocks, one per (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(blocks).resize((w, h), Image.Resampling.NEAREST).save(folder / f"{i:03d}.png")
    return folder


def test_fake_folder_against_real_folders_for_real(aigc, clf, tmp_path):
    a = write_image_folder(tmp_path / "set a", n_per_class=6, size=20)
    b = write_pngs(tmp_path / "set b", [(20, 20)] * 12, seed=1)
    common = ["--features", clf, "--n", 100, "--stats-dir", tmp_path / "stats", "--json"]
    same = aigc("eval", "--fake", a, "--data", a, *common)
    assert same.code == 0, same.stderr
    res = same.json()
    assert res["metrics"]["fid"] == pytest.approx(0, abs=1e-6)
    assert res["metrics"]["precision"] == res["metrics"]["recall"] == 1.0
    p = res["protocol"]
    assert p["n_fake"] == p["n_real"] == 12 and p["fake_folder"] == str(a) and p["reference"] == "computed"
    assert (res["checkpoint"], res["model"], res["step"], res["fake_folder"]) == (None, None, None, str(a))
    assert "most common size" in same.stderr  # its images have six widths: conformed, with a warning
    other = aigc("eval", "--fake", b, "--data", a, *common)
    assert other.code == 0, other.stderr
    assert other.json()["metrics"]["fid"] > 1e-3 and other.json()["protocol"]["reference"] == "cache hit"
    assert other.json()["metrics"]["kid"] > 10 * abs(res["metrics"]["kid"])  # unbiased: near 0 for the same set


def test_a_run_folder_given_as_images_is_refused_naming_the_option(clf, tmp_path, monkeypatch, capsys):
    # Its sample grids were scored as the images (with only a size warning), or trained on.
    run = tmp_path / "run"
    train(tiny("dcgan", channels=3).with_overrides({"train.steps": "2"}), run, Silent())
    real = write_pngs(tmp_path / "real", [(16, 16)] * 6, seed=3)
    common = ["--features", clf, "--stats-dir", tmp_path / "stats", "--metrics", "fid"]
    said = "is an aigc run folder, whose images are sample grids, not a data set; to score the run, give the folder"
    for args, what in ((["--fake", run, "--data", real], "--fake folder"), (["--fake", real, "--data", run], "data folder"),
                       ([run, "--data", run], "data folder")):
        code, _, err = run_cli(monkeypatch, capsys, "eval", *args, *common)
        assert code == 2 and err.startswith(f"error: {what} {run}: {said}") and err.count("\n") == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--data", run, "--out", tmp_path / "r2")
    assert code == 2 and f"data folder {run}: {said}" in err, err


def test_inception_is_the_default_extractor_at_the_images_own_size(tmp_path, monkeypatch, capsys):
    from aigc_cli.metrics import weights as W
    from test_inception import random_state_dict  # the layout's random weights, activations kept O(1)

    weights = tmp_path / "random-inception.pth"
    torch.save(random_state_dict(), weights)  # the right layout; not the published hash
    monkeypatch.setenv("AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS", "1")
    monkeypatch.setenv("AIGC_INCEPTION_WEIGHTS", str(weights))
    fetched = []
    monkeypatch.setattr(W, "download_weights", lambda dest=None: fetched.append(dest) or weights)
    fakes = write_pngs(tmp_path / "fakes", [(20, 12)] * 4 + [(30, 30)], seed=2)  # Inception costs ~0.1 s an image
    reals = write_pngs(tmp_path / "reals", [(20, 12)] * 2, seed=3)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--fake", fakes, "--data", reals, "--download-weights",
                             "--metrics", "fid,is", "--n", 5, "--stats-dir", tmp_path / "stats", "--json")
    assert code == 0, err
    assert fetched == [weights]  # --download-weights fetched (pretended) to $AIGC_INCEPTION_WEIGHTS first
    res = json.loads(out)
    assert set(res["metrics"]) == {"fid", "is", "is_std"} and res["metrics"]["fid"] > 0
    assert res["metrics"]["is"] is None  # fewer images than IS's 10 splits: reported as unavailable
    p = res["protocol"]
    assert p["extractor"].startswith("inception-v3-fid") and p["feature_dim"] == 2048 and p["n_real"] == 2
    assert p["weights_verified"] is False and p["generated_shape"] == [3, 12, 20] == p["real_shape"]
    assert "1 of 5 images are not 20x12" in err
    assert "FID from 5 generated and 2 real images, fewer than the 2048 feature dimensions, is biased" in err
    # Missing weights: a one-line error before any work, naming where they were looked for.
    for args, where in ([], "nowhere.pth"), (["--inception-weights", tmp_path / "elsewhere.pth"], "elsewhere.pth"):
        monkeypatch.setenv("AIGC_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
        code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", fakes, "--data", reals, *args)
        assert code == 2 and err.count("error: ") == 1 and where in err, err


@pytest.mark.parametrize("args, expect", [
    (["eval", "--fake", "{missing}", "--data", "{real}"], "does not exist"),
    (["eval", "--fake", "{empty}", "--data", "{real}"], "no images"),
    (["eval", "--fake", "{one}", "--data", "{real}"], "holds 1 usable image; the scores need at least 2"),
    (["eval", "--fake", "{real}", "--data", "{real}", "--no-ema"], "--no-ema applies to a checkpoint"),
    (["eval", "--metrics", "fid", "stats", "--data", "{real}", "--out", "{empty}/r.npz"], "No such option: --metrics"),
    (["eval", "--fake", "{real}", "--data", "{missing}"], "not a built-in source or an existing folder"),
    (["eval", "--fake", "{real}"], "needs --data SOURCE"),
    (["eval", "{real}", "--fake", "{real}", "--data", "{real}"], "not both"),
    (["eval", "--data", "{real}"], "nothing to score"),
    (["eval", "--fake", "{real}", "--data", "{real}", "--metrics", "fid,fdi"], "unknown metric 'fdi'"),
    (["eval", "--fake", "{real}", "--data", "{real}", "--metrics", "bpd"], "needs a VAE checkpoint"),
    (["eval", "--fake", "{real}", "--data", "{real}", "--save-fakes", "{empty}"], "--save-fakes"),
    (["eval", "stats", "--data", "{real}", "--out", "{empty}/ref.txt"], "must end in .npz"),
    (["eval", "stats", "--data", "{missing}", "--out", "{empty}/ref.npz"], "not a built-in source"),
    (["eval", "--fake", "{real}", "--data", "{real}", "-b", str(2**63)], "--batch-size must be at most"),  # was a traceback
    (["eval", "--fake", "{real}", "--data", "{real}", "--n", str(2**63)], "--n must be at most 1,000,000,000, got 9,223,372,036,854,775,808"),
    (["eval", "stats", "--data", "{real}", "--out", "{empty}/r.npz", "-b", str(10**30)], "--batch-size must be at most 1,000,000,000, got "),
])
def test_bad_input_is_one_error_line_with_exit_2(clf, tmp_path, monkeypatch, capsys, args, expect):
    real = write_pngs(tmp_path / "real", [(16, 16)] * 4, seed=3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    one = write_pngs(tmp_path / "one", [(16, 16)], seed=4)
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "real": real, "one": one}
    argv = [a.format(**paths) for a in args] + ["--features", clf]
    if args[1] != "stats":
        argv += ["--stats-dir", tmp_path / "stats"]
    code, out, err = run_cli(monkeypatch, capsys, *argv)
    errors = [s for s in err.splitlines() if s.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err and out == "", (code, err)
    assert expect in errors[0]
    assert not (tmp_path / "stats").exists() or not any((tmp_path / "stats").iterdir())  # no real side computed


def test_fid_from_fewer_images_than_feature_dimensions_is_warned_once_and_only_then():
    from types import SimpleNamespace

    from aigc_cli.metrics.evaluate import _say_if_few_for_fid

    extractor = SimpleNamespace(protocol={"feature_dim": 64})
    cases = [(["fid"], 10, 100, 1), (["fid"], 100, 10, 1), (["fid"], 100, None, 0), (["fid"], 63, None, 1),
             (["fid"], 64, 64, 0), (["kid", "is"], 10, 10, 0), (["fid", "kid"], 10, 10, 1)]
    for chosen, n_fake, n_real, expected in cases:
        said = []
        _say_if_few_for_fid(chosen, n_fake, n_real, extractor, said.append)
        assert len(said) == expected, (chosen, n_fake, n_real, said)
        if said:
            assert f"FID from {n_fake} generated" in said[0] and "64 feature dimensions" in said[0]


def test_scores_too_few_images_allow_are_n_a_with_the_reason(clf, tmp_path, monkeypatch, capsys):
    real = write_pngs(tmp_path / "real", [(16, 16)] * 3, seed=3)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--fake", real, "--data", real, "--features", clf,
                             "--metrics", "is,precision", "--stats-dir", tmp_path / "stats", "--json")
    assert code == 0 and json.loads(out)["metrics"] == {"is": None, "is_std": None, "precision": None}, err
    assert err.splitlines() == [
        "warning: IS needs at least 10 generated images (one per split), got 3: n/a",
        "warning: precision and recall need more than 3 images on each side (k=3 neighbours), got 3 generated and "
        "3 real: n/a"]
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--fake", real, "--data", real, "--features", clf,
                             "--metrics", "is")
    assert code == 0 and f"warning: --data {real} was not used: is needs no real images" in err.splitlines()
    # the extractor named by its step file, absolute: last.safetensors moves on with the classifier's next save
    step_file = (clf / "checkpoints" / "step-0000005.safetensors").resolve()
    assert out.splitlines()[0] == f"{real}: 3 generated, features classifier:{step_file}", out


def test_a_folder_scored_on_n_images_decodes_only_those(tmp_path, monkeypatch):
    """eval --n 2000 on a folder of large photos held every photo decoded at full size (gigabytes) before
    taking its subset. The subset is picked from the headers; a picked file that fails to decode is
    replaced by the next of the seed's order."""
    import aigc_cli.data.native as native
    from aigc_cli.data.native import real_indices

    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    whole = native.load_folder_native(str(tmp_path), warn=print)
    decoded, real = [], native._decode_native
    monkeypatch.setattr(native, "_decode_native", lambda path, size: decoded.append(path) or real(path, size))
    picked = native.load_folder_native(str(tmp_path), warn=print, n=5, seed=3)
    assert len(decoded) == 5 and torch.equal(picked, whole[real_indices(30, 5, 3)])
    # a picked file whose header reads but whose pixels do not: the next of the order takes its place
    first = int(real_indices(30, 5, 3)[0])
    data = (tmp_path / f"{first:02d}.png").read_bytes()
    (tmp_path / f"{first:02d}.png").write_bytes(data[:60])
    warnings = []
    again = native.load_folder_native(str(tmp_path), warn=warnings.append, n=5, seed=3)
    substitute = native.seeded_order(30, 5, 3)[5]
    expected = sorted([int(i) for i in real_indices(30, 5, 3)[1:]] + [substitute])
    assert len(again) == 5 and torch.equal(again, whole[expected])
    assert any(f"skipping {first:02d}.png" in w for w in warnings), warnings


def test_the_size_remedy_carries_the_inception_weights_and_data_root_given():
    """Made without them, the reference would be computed with other weights (refused by --ref, which checks
    their hash) or would not find a built-in data set kept under --data-root."""
    import numpy as np

    from aigc_cli.metrics.evaluate import _say_if_sides_differ
    from aigc_cli.metrics.reference import Reference

    ref = Reference(np.zeros(2), np.eye(2), None, {"real_shape": [1, 28, 28], "extractor": "inception-v3-fid"})
    said = []
    _say_if_sides_differ(ref, [1, 32, 32], "the generator draws", "fashion-mnist", said.append, "/data sets",
                         "/w/pt_inception.pth")
    command = said[0].split("`aigc ")[2].split("`")[0]
    assert shlex.split(command) == ["eval", "stats", "--data", "fashion-mnist", "--resolution", "32", "--channels", "1",
                                    "--inception-weights", "/w/pt_inception.pth", "--data-root", "/data sets",
                                    "--out", "ref-1x32.npz"], command
    # A --ref made from other data than the model's (its protocol says which, and which split): the remedy
    # makes that reference again at the new size, not one of the model's data (a CLI review found `--data
    # shapes` offered for a Fashion-MNIST reference); --fake images, read as RGB, are compared by size only.
    ref = Reference(np.zeros(2), np.eye(2), None, {"real_shape": [1, 28, 28], "extractor": "inception-v3-fid",
                                                   "real_source": "fashion-mnist", "real_split": "test"})
    said.clear()
    _say_if_sides_differ(ref, [3, 32, 32], "the generator draws", "shapes", said.append)
    assert said[0].startswith("the real images are 1x28x28, the generator draws 3x32x32: ")
    assert shlex.split(said[0].split("`aigc ")[2].split("`")[0]) == [
        "eval", "stats", "--data", "fashion-mnist", "--resolution", "32", "--channels", "3", "--split", "test",
        "--out", "ref-3x32.npz"], said[0]
    said.clear()
    _say_if_sides_differ(ref, [32, 32], "the --fake images are", None, said.append)
    assert said[0].startswith("the real images are 1x28x28, the --fake images are 32x32: ") and "--channels 1 " in said[0]
    said.clear()
    _say_if_sides_differ(ref, [28, 28], "the --fake images are", None, said.append)
    assert said == []  # grey real images against the same size read as RGB: nothing to say


def test_real_and_fake_images_of_different_sizes_are_pointed_out_with_the_remedy(clf, tmp_path, monkeypatch, capsys):
    # 28x28 Fashion-MNIST against the same images at 32x32 scored FID 53 instead of 9 with no word said;
    # `aigc eval CHECKPOINT` conforms the real side to the generator's size, --fake reads each at its own.
    real = write_pngs(tmp_path / "real", [(16, 16)] * 6, seed=3)
    small, big = write_pngs(tmp_path / "small", [(16, 16)] * 6, seed=5), write_pngs(tmp_path / "big", [(24, 24)] * 6, seed=5)
    common = ["--features", clf, "--stats-dir", tmp_path / "stats", "--metrics", "fid"]
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", small, "--data", real, *common)
    assert code == 0 and "different" not in err, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", big, "--data", real, *common)
    assert code == 0, err
    said = err.replace("\n", " ")
    assert "the real images are 3x16x16, the --fake images are 24x24: the two sides reach the extractor from " \
           f"different sizes; to score as `aigc eval CHECKPOINT` does, make the reference at their size with " \
           f"`aigc eval stats --data {real} --resolution 24 --channels 3 --features " in said, err
    # The remedy as said, word for word: it used to leave out --features (and --channels), so the file it
    # made was an Inception reference, which --features CLF then refused; and it wrote over ref.npz.
    command, ref = said.split("`aigc ")[2].split("`")[0], "ref-3x24.npz"
    assert f"`aigc {command}` and pass --ref {ref}" in said and command.endswith(f"--out {ref}"), said
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, *shlex.split(command))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", big, "--ref", ref, *common)
    assert code == 0 and "different" not in err, err  # the remedy: the same sizes on both sides
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", small, "--ref", ref, *common)
    assert code == 0 and "the two sides reach the extractor from different sizes" in err, err
