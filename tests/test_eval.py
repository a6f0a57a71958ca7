"""aigc eval's pipeline: real and generated images reach the feature extractor the same way; only the
requested metrics are computed; VAE bits/dim; the in-process evaluator used during training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.data import load_images
from aigc_cli.errors import UsageError
from aigc_cli.metrics import evaluate as evaluate_mod
from aigc_cli.metrics.fid import fid_from_features
from aigc_cli.models import build_nets
from aigc_cli.training.loop import train
from aigc_cli.training.precision import Precision
from conftest import Counting, Silent, run_cli, tiny
from PIL import Image

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-runs")
    train(tiny("classifier", channels=3, resolution=32).with_overrides({"train.steps": "40"}), root / "clf", Silent())
    train(tiny("dcgan").with_overrides({"train.steps": "1"}), root / "gan", Silent())
    return root


def test_a_perfect_generator_scores_at_the_noise_floor(runs, tmp_path, monkeypatch):
    # An RGB 32px classifier scores a grayscale 16px generator: both sides need converting.
    n = 400
    perfect = load_images("shapes", channels=1, resolution=16, split="test").images[:n]  # what it should draw
    drawn = []

    def fake_generate(G, z, amp, batch_size, labels=None, to_cpu=True):  # called once per batch of the eval loop
        start = sum(drawn)
        drawn.append(len(z))
        return perfect[start:start + len(z)]

    monkeypatch.setattr(evaluate_mod, "generate", fake_generate)
    result = evaluate_mod.evaluate(ckpt_io.load(runs / "gan"), data="shapes", root=None, download=False,
                                   features=str(runs / "clf"), n=n, batch_size=150, seed=0, device="cpu",
                                   precision="fp32", warn=print, stats_dir=tmp_path)
    assert drawn == [150, 150, 100]  # generated batch by batch, never all at once
    fid_perfect = result["metrics"]["fid"]

    # The noise floor: two different real sets, each in the classifier's own input format.
    extract = evaluate_mod.ClassifierFeatures(str(runs / "clf"), CPU, Precision("fp32", CPU))
    a = load_images("shapes", channels=3, resolution=32, split="train").images[:n]
    b = load_images("shapes", channels=3, resolution=32, split="test").images[:n]
    floor = fid_from_features(extract(a, 200).numpy(), extract(b, 200).numpy())
    assert fid_perfect < 2 * floor, (fid_perfect, floor)
    p = result["protocol"]
    assert p["kid_subset_size"] == n // 2 and result["metrics"]["kid_std"] > 0
    assert p["reference"] == "computed" and p["n_real"] == n and p["n_fake"] == n
    assert p["real_shape"] == [1, 16, 16] and p["extractor"].startswith("classifier:")


def test_only_the_requested_metrics_are_computed(runs, tmp_path):
    ck = ckpt_io.load(runs / "gan")
    extractor = Counting(evaluate_mod.ClassifierFeatures(str(runs / "clf"), CPU, "fp32"))
    args = dict(data="shapes", root=None, download=False, features=None, n=30, batch_size=16, seed=0,
                device="cpu", precision="fp32", warn=print, stats_dir=tmp_path)
    only_is = evaluate_mod.evaluate(ck, metrics=["is"], extractor=extractor, **args)
    assert set(only_is["metrics"]) == {"is", "is_std"}
    assert extractor.images == 30  # the generated images only: IS needs no real data
    assert "n_real" not in only_is["protocol"] and not list(tmp_path.iterdir())
    fid = evaluate_mod.evaluate(ck, metrics=["fid"], extractor=extractor, **args)
    assert set(fid["metrics"]) == {"fid"} and fid["protocol"]["n_real"] == 30
    with pytest.raises(UsageError, match="applies to VAEs"):
        evaluate_mod.evaluate(ck, metrics=["bpd"], extractor=extractor, **args)
    with pytest.raises(UsageError, match="unknown metric 'fidd'"):
        evaluate_mod.parse_metrics("fid,fidd")
    assert evaluate_mod.parse_metrics(" FID, kid ,fid") == ["fid", "kid"]
    with pytest.raises(UsageError, match="names no metric"):
        evaluate_mod.parse_metrics(",,,")
    for typo in ("fid,,kid", "fid,", ",fid"):  # a metric left out: said, not passed over
        with pytest.raises(UsageError, match="an empty item in the comma list"):
            evaluate_mod.parse_metrics(typo)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_vae_bits_per_dim_follow_from_the_negative_elbo(tmp_path, likelihood):
    cfg = tiny("vae", likelihood=likelihood).with_overrides({"train.steps": "3"})
    train(cfg, tmp_path / "vae", Silent())
    ck = ckpt_io.load(tmp_path / "vae")
    # No --features and no Inception weights: the VAE scores need no extractor, so none is opened.
    r = evaluate_mod.evaluate(ck, data="shapes", root=None, download=False, features=None, n=40, batch_size=16,
                              seed=0, device="cpu", precision="fp32", warn=print, stats_dir=tmp_path / "stats",
                              metrics=["neg_elbo", "bpd"])
    m = r["metrics"]
    assert set(m) == {"neg_elbo", "bpd"} and m["neg_elbo"] > 0 and r["protocol"]["n_heldout"] == 40
    assert r["protocol"]["n_fake"] == 0  # the VAE scores generate nothing
    assert r["protocol"]["heldout_split"] == "test"
    for batch_size in (1, 7, 40):  # the posterior noise per image does not depend on how they are batched
        again = evaluate_mod.evaluate(ck, data="shapes", root=None, download=False, features=None, n=40,
                                      batch_size=batch_size, seed=0, device="cpu", precision="fp32", warn=print,
                                      stats_dir=tmp_path / "stats", metrics=["neg_elbo"])
        assert again["metrics"]["neg_elbo"] == pytest.approx(m["neg_elbo"], rel=1e-6)
    if likelihood == "gaussian":
        d = 1 * 16 * 16
        # -log p(u) on the 8-bit scale = -log p(x) on [-1, 1] + D ln 127.5, then nats -> bits, per dim
        assert m["bpd"] == pytest.approx((m["neg_elbo"] + d * math.log(127.5)) / (d * math.log(2)), rel=1e-12)
        assert m["bpd"] > 0 and "ln(127.5)" in r["protocol"]["bpd_formula"]
    else:
        assert m["bpd"] is None and "not a density" in r["protocol"]["bpd_formula"]


@pytest.mark.parametrize("sigma, floor", [(1.0, 8.32), (0.1, 5.00)])
def test_a_fixed_sigma_puts_a_floor_under_bpd_as_the_readme_says(sigma, floor):
    """A perfect reconstruction with a posterior equal to the prior: what is left is the density's height."""
    from aigc_cli import losses

    x = torch.rand(3, 1, 16, 16) * 2 - 1
    zero = torch.zeros(3, 4)
    neg_elbo = losses.vae_terms(x, torch.atanh(x), zero, zero, sigma, "gaussian")["neg_elbo"]  # tanh(logits) = x
    assert evaluate_mod.bits_per_dim(float(neg_elbo), 16 * 16) == pytest.approx(floor, abs=0.005)


def test_the_training_evaluator_is_deterministic_and_leaves_g_as_it_was(runs, tmp_path, monkeypatch):
    cfg = tiny("dcgan").with_overrides({"train.eval_every": "10", "train.eval_n": "40",
                                        "train.eval_features": str(runs / "clf")})
    amp = Precision("fp32", CPU)
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    ev = evaluate_mod.TrainingEvaluator(cfg, CPU, amp, print)
    assert ev.reference.source == "computed" and len(ev.reference.features) == 40
    G = build_nets(cfg.model)["G"]
    ckpt_io.load(runs / "gan").load_net("G", G)
    G.train()
    first, second = ev(G, 10), ev(G, 20)
    assert set(first) == {"fid"} and first == second and first["fid"] > 0
    assert G.training  # put back in training mode
    again = evaluate_mod.TrainingEvaluator(cfg, CPU, amp, print)
    assert again.reference.source == "cache hit" and again(G, 30) == first
    is_only = evaluate_mod.TrainingEvaluator(cfg.with_overrides({"train.eval_metric": "is"}), CPU, amp, print)
    assert is_only.reference is None and set(is_only(G, 1)) == {"is"}


def test_the_training_evaluator_draws_the_training_data_s_class_mix(runs, tmp_path, monkeypatch):
    cfg = tiny("dcgan", conditional=True, num_classes=4).with_overrides(
        {"train.eval_every": "10", "train.eval_n": "60", "train.eval_metric": "is", "train.eval_features": str(runs / "clf")})
    amp = Precision("fp32", CPU)
    ev = evaluate_mod.TrainingEvaluator(cfg, CPU, amp, print, class_counts=[0, 7, 0, 0])
    assert ev.labels.tolist() == [1] * 60
    assert len(set(evaluate_mod.TrainingEvaluator(cfg, CPU, amp, print).labels.tolist())) == 4  # none given: uniform

    made = []  # what training hands it: the counts of its data's labels
    real_init = evaluate_mod.TrainingEvaluator.__init__
    monkeypatch.setattr(evaluate_mod.TrainingEvaluator, "__init__",
                        lambda self, *a, **k: made.append(k.get("class_counts")) or real_init(self, *a, **k))
    train(cfg.with_overrides({"train.steps": "1", "data.limit": "40"}), tmp_path / "run", Silent())
    labels = load_images("shapes", channels=1, resolution=16, limit=40, seed=0, warn=print).labels
    assert made == [torch.bincount(labels, minlength=4).tolist()] and sum(made[0]) == 40


def test_the_training_evaluator_fails_at_construction_without_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    cfg = tiny("dcgan").with_overrides({"train.eval_every": "10", "train.eval_n": "40"})
    with pytest.raises(UsageError, match="missing.pth"):
        evaluate_mod.TrainingEvaluator(cfg, CPU, Precision("fp32", CPU), print)


def test_eval_command_names_what_is_wrong_before_any_work(monkeypatch, capsys, runs, tmp_path):
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    gan, clf = runs / "gan", runs / "clf"
    (tmp_path / "a file").write_text("x")
    one = tmp_path / "one image"
    one.mkdir()
    Image.new("L", (16, 16)).save(one / "0.png")
    for args, expect in [
        (["--save-fakes", tmp_path / "a file" / "sub"], f"{tmp_path / 'a file'}"),  # cannot be made: before any work
        (["--features", tmp_path / "nothing", "--save-fakes", tmp_path / "fk" / "a" / "b"],
         f"--features {tmp_path / 'nothing'}: no such checkpoint"),
        (["--data", one], f"the real data ({one}) has 1 image; feature statistics need at least 2"),
        (["--metrics", ",,"], "names no metric"),
    ]:
        code, out, err = run_cli(monkeypatch, capsys, "eval", gan, *(["--features", clf] if "--features" not in args else []),
                                 "--n", "20", *args)
        errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
        assert code == 2 and len(errors) == 1 and expect in errors[0], (args, err)
        assert "incomplete set" not in err  # nothing was written
    assert not (tmp_path / "cache" / "stats").exists() or not any((tmp_path / "cache" / "stats").iterdir())
    assert not (tmp_path / "fk").exists()  # made for --save-fakes (parents too), left empty by the failure: removed
    code, out, err = run_cli(monkeypatch, capsys, "eval", "stats", "--data", one, "--features", clf, "--split", "test",
                             "--out", tmp_path / "r.npz")
    assert code == 2 and "has no held-out split" in err and not (tmp_path / "r.npz").exists()
    # Flags eval and eval stats share may come before the word `stats`.
    code, out, err = run_cli(monkeypatch, capsys, "eval", "-q", "--json", "stats", "--data", "shapes", "--features", clf,
                             "--n", "20", "--out", tmp_path / "r.npz")
    assert code == 0 and json.loads(out)["protocol"]["n_real"] == 20 and err == ""
    # ... and so may options with a value, in both spellings.
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--features", clf, "--n=20", "-q", "stats", "--data", "shapes",
                             "--out", tmp_path / "r2.npz", "--json")
    assert code == 0 and json.loads(out)["protocol"]["n_real"] == 20 and err == "", err


def test_a_conditional_vae_scored_on_other_classes_warns_and_gives_no_vae_scores(tmp_path):
    """Labels beyond the model's classes raised a traceback from one_hot (exit 1); labels inside its range but
    of another class set gave numbers that mean nothing."""
    from conftest import write_image_folder

    train(tiny("vae", conditional=True, channels=3).with_overrides({"train.steps": "2"}), tmp_path / "vae", Silent())
    ck = ckpt_io.load(tmp_path / "vae")  # shapes: 4 classes, circle, square, triangle, ...
    five = write_image_folder(tmp_path / "five", n_per_class=2, classes=("a", "b", "c", "d", "e"))
    four = write_image_folder(tmp_path / "four", n_per_class=2, classes=("a", "b", "c", "d"))
    for folder, expect in ((five, "labels run to 4, and this conditional VAE has 4 classes (0 to 3)"),
                           (four, "the held-out images' classes (a, b, c, d) are not this conditional VAE's")):
        warnings = []
        r = evaluate_mod.evaluate(ck, data=str(folder), root=None, download=False, features=None, n=8,
                                  batch_size=4, seed=0, device="cpu", precision="fp32", warn=warnings.append,
                                  stats_dir=None, metrics=["neg_elbo"])
        assert r["metrics"] == {"neg_elbo": None} and any(expect in w for w in warnings), warnings


@pytest.mark.parametrize("conditional", [False, True])
def test_vae_scores_on_a_folder_too_large_to_hold_decode_only_the_n_picked(tmp_path, monkeypatch, conditional):
    """As training streams such a folder (data.device_max_mb), so do the VAE scores: the whole folder was
    decoded into memory to score --n of its images. The labels are those of the images picked."""
    from conftest import write_image_folder
    from aigc_cli.data import folder as folder_mod, lazy as lazy_mod

    folder = write_image_folder(tmp_path / "folder", n_per_class=10, classes=("a", "b", "c", "d"), size=16)
    cfg = tiny("vae", conditional=conditional, channels=3).with_overrides({
        "data.source": str(folder), "data.device_max_mb": "0", "train.steps": "2", "train.batch_size": "4"})
    train(cfg, tmp_path / "vae", Silent())
    ck = ckpt_io.load(tmp_path / "vae")
    run = lambda: evaluate_mod.evaluate(ck, data=str(folder), root=None, download=False, features=None, n=6,
                                        batch_size=4, seed=0, device="cpu", precision="fp32", warn=print,
                                        stats_dir=None, metrics=["recon_mse", "neg_elbo"])
    decoded = []
    original = folder_mod.decode
    for module in (folder_mod, lazy_mod):
        monkeypatch.setattr(module, "decode", lambda path, *a, **k: decoded.append(path) or original(path, *a, **k))
    streamed = run()
    assert len(decoded) == 6 and streamed["protocol"]["n_heldout"] == 6
    held = ck.config.with_overrides({"data.device_max_mb": "1024"})
    monkeypatch.setattr(ck, "config", held)
    in_memory = run()  # the same images, decoded whole: the same scores
    assert streamed["metrics"] == pytest.approx(in_memory["metrics"], rel=1e-5)
    assert all(v is not None for v in streamed["metrics"].values())


def test_one_data_set_named_two_ways_is_one_for_the_classifier_warning(tmp_path):
    """A classifier trained on `fashion-mnist` (found in a folder) scoring a run trained on that folder by its
    path was warned about as other data ("distances may mean little")."""
    import numpy as np

    from aigc_cli.metrics.evaluate import _data_folder
    from test_data import write_idx

    folder = tmp_path / "root" / "fashion-mnist"  # the Debian package's layout under a data root
    write_idx(folder, "train", np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8))
    assert _data_folder("fashion-mnist", str(tmp_path / "root")) == _data_folder(str(folder), None)
    assert _data_folder(str(folder) + "/", None) == _data_folder(str(folder), None)
    assert _data_folder("shapes", None) != _data_folder(str(folder), None)
    assert _data_folder("mnist", str(tmp_path / "root")) == "mnist"  # not found: by its name


def test_eval_of_a_run_that_streamed_its_folder_decodes_only_the_images_it_scores(runs, tmp_path, monkeypatch):
    """aigc eval decoded the whole training folder (and cached it) although the run had streamed it for not
    fitting in memory: the real side now takes training's choice, data.device_max_mb."""
    from aigc_cli.data import lazy
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", n_per_class=20, size=16)
    cfg = tiny("dcgan").with_overrides({"data.source": str(folder), "data.device_max_mb": "0", "data.limit": "0",
                                        "train.steps": "1"})
    train(cfg, tmp_path / "run", Silent())
    decoded = []
    real = lazy.LazyFolder._decode
    monkeypatch.setattr(lazy.LazyFolder, "_decode", lambda self, i: decoded.append(i) or real(self, i))
    result = evaluate_mod.evaluate(ckpt_io.load(tmp_path / "run"), data=str(folder), root=None, download=False,
                                   features=str(runs / "clf"), n=10, batch_size=8, seed=0, device="cpu",
                                   precision="fp32", warn=print, stats_dir=tmp_path / "stats", metrics=["fid"])
    assert len(decoded) == 10 and result["protocol"]["n_real"] == 10


def test_a_streamed_real_side_says_which_file_it_replaced_and_strict_refuses(tmp_path):
    from aigc_cli.data.lazy import pick
    from aigc_cli.metrics.reference import load_real
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "imgs", n_per_class=6, size=16)
    bad = sorted(folder.rglob("*.png"))[3]
    bad.write_bytes(b"junk, not a png")
    said = []
    args = dict(n=100, seed=0, channels=1, resolution=16, root=None, download=False, lazy_above_mb=0)
    real, _ = load_real(str(folder), split="train", warn=said.append, **args)
    assert len(real) == 12  # streamed: the bad file is still listed, found only when decoded
    picked = pick(real, None, torch.arange(12), said.append, strict=False)[0]
    assert len(picked) == 12 and any(f"skipping {bad.parent.name}/{bad.name}" in w for w in said), said
    with pytest.raises(UsageError, match="stopped by --strict"):
        pick(real, None, torch.arange(12), said.append, strict=True)


def test_a_skipped_file_of_a_folder_eval_reads_twice_is_said_once(runs, tmp_path, monkeypatch, capsys):
    """A VAE's scores read --data for the real statistics and again for its held-out images."""
    from conftest import write_image_folder

    train(tiny("vae", channels=3).with_overrides({"train.steps": "2"}), tmp_path / "vae", Silent())
    folder = write_image_folder(tmp_path / "folder", n_per_class=4, size=16)
    (folder / "cats" / "zz-broken.png").write_bytes(b"not a png")
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "vae", "--data", folder, "--features",
                             runs / "clf", "--n", 8, "--stats-dir", tmp_path / "stats", "--metrics", "fid,recon_mse")
    assert code == 0, err
    assert err.count("skipping cats/zz-broken.png") == 1, err


def test_vae_scores_say_when_they_cannot_be_or_are_not_on_held_out_images(runs, tmp_path, monkeypatch, capsys):
    from aigc_cli.export import export_generator
    from conftest import write_image_folder

    train(tiny("vae", channels=3).with_overrides({"train.steps": "2"}), tmp_path / "vae", Silent())
    folder = write_image_folder(tmp_path / "folder", n_per_class=4, size=16)
    common = ["--features", runs / "clf", "--n", 8, "--stats-dir", tmp_path / "stats"]
    # an image folder has no held-out split: its own images are used, and the output says so
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "vae", "--data", folder, *common,
                             "--metrics", "recon_mse", "--json")
    assert code == 0, err
    assert json.loads(out)["protocol"]["heldout_split"] == "train"
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "vae", "--data", folder, *common,
                             "--metrics", "recon_mse")
    assert code == 0 and "8 of its training images for the VAE scores" in out and "held-out" not in out, out
    # an exported decoder has no encoder: the default metrics leave the VAE scores out, and say why
    export_generator(ckpt_io.load(tmp_path / "vae"), tmp_path / "dec.safetensors", "fp32")
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "dec.safetensors", "--data", "shapes", *common,
                             "--json")
    assert code == 0, err
    assert set(json.loads(out)["metrics"]).isdisjoint({"recon_mse", "neg_elbo", "bpd"})
    assert "warning: no recon_mse, neg_elbo, bpd: an exported VAE decoder has no encoder" in err, err
    code, out, err = run_cli(monkeypatch, capsys, "info", tmp_path / "dec.safetensors")
    assert code == 0 and "exported the decoder from" in out and "generator" not in out, out
    code, out, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "vae", "--data", "shapes", "--n", 8, "-b", 0)
    assert code == 2 and err == "error: --batch-size must be positive, got 0\n", err


def test_a_conditional_model_is_scored_with_the_training_data_s_class_mix(runs, tmp_path):
    """Classes were drawn uniformly, while the real subset has the data's mix: on data with 3 images of one
    class to 1 of the other, a perfect generator was scored as far from it."""
    import numpy as np

    from aigc_cli.export import export_generator

    rng = np.random.default_rng(0)
    for name, count in (("many", 24), ("few", 8)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    cfg = tiny("dcgan", conditional=True, channels=3).with_overrides(
        {"data.source": str(tmp_path / "data"), "train.steps": "1", "train.batch_size": "8"})
    train(cfg, tmp_path / "run", Silent())
    ck = ckpt_io.load(tmp_path / "run")
    assert ck.class_names == ["few", "many"] and ck.class_counts == [8, 24]
    export_generator(ck, tmp_path / "g.safetensors", "fp32")
    assert ckpt_io.load(tmp_path / "g.safetensors").class_counts == [8, 24]

    def drawn(ckpt):
        r = evaluate_mod.evaluate(ckpt, data=str(tmp_path / "data"), root=None, download=False,
                                  features=str(runs / "clf"), n=400, batch_size=200, seed=0, device="cpu",
                                  precision="fp32", warn=lambda s: None, stats_dir=None, metrics=["fid"],
                                  save_fakes=str(tmp_path / "fakes.npz"))
        with np.load(tmp_path / "fakes.npz") as f:
            return r["protocol"]["fake_classes"], float((f["arr_1"] == 1).mean())

    kind, many = drawn(ck)
    assert kind == "as in the training data" and 0.68 < many < 0.82  # 3/4
    older = ckpt_io.Checkpoint(ck.path, ck.tensors, {k: v for k, v in ck.meta.items() if k != "aigc.class_counts"},
                               ck.config)
    kind, many = drawn(older)
    assert kind == "uniform" and 0.43 < many < 0.57
