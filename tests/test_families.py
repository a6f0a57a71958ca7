"""Each model family trains for real on the CPU: finite losses, and a VAE whose loss goes down."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from aigc_cli.training.loop import train
from conftest import Silent, tiny


@pytest.mark.parametrize("kind", ["mlp_gan", "dcgan", "vae", "classifier"])
def test_family_trains_with_finite_losses(kind, tmp_path):
    rep = Silent()
    summary = train(tiny(kind), tmp_path / kind, rep)
    assert summary["steps"] == 20 and len(rep.records) == 4
    losses = [v for r in rep.records for k, v in r.items() if k.startswith("loss") or k in ("kl", "neg_elbo")]
    assert losses and all(math.isfinite(v) for v in losses)
    lines = (tmp_path / kind / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 5


@pytest.mark.parametrize("kind, overrides", [("mlp_gan", {}), ("dcgan", {"loss.gan": "wgan-gp", "train.n_critic": "2", "model.d_norm": "layer"}),
                                             ("dcgan", {"loss.r1_gamma": "1.0"}), ("vae", {}), ("classifier", {})])
def test_best_metric_names_what_training_logs_and_a_typo_is_refused(kind, overrides, tmp_path):
    # train.best_metric is checked against logged_values() before the data loads; that list must be what
    # metrics.jsonl holds, or a valid name would be refused (and a wrong one let through to a run without
    # best.safetensors, as a typo was before).
    from aigc_cli.config import check_for_training
    from aigc_cli.errors import UsageError
    from aigc_cli.models import FAMILIES
    from aigc_cli.training.steps import logged_values

    cfg = tiny(kind).with_overrides({"train.steps": "5", **overrides})
    train(cfg, tmp_path / "run", Silent())
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    logged = logged_values(cfg, FAMILIES[kind].objective)
    assert sorted(logged) == sorted(k for k in record if k not in ("step", "images_seen", "elapsed_s"))
    for name in logged:
        check_for_training(cfg.with_overrides({"train.best_metric": name}))
    with pytest.raises(UsageError, match=r"^train.best_metric='los' is not a value this run logs \("):
        check_for_training(cfg.with_overrides({"train.best_metric": "los"}))



def test_a_resume_that_stops_logging_its_best_metric_is_refused():
    from aigc_cli.config import check_for_training
    from aigc_cli.errors import UsageError

    r1 = tiny("dcgan").with_overrides({"loss.r1_gamma": "1.0", "train.best_metric": "r1"})
    check_for_training(r1)
    with pytest.raises(UsageError, match=r"^train.best_metric='r1' is not a value this run logs \(loss_d, loss_g, lr_G"):
        check_for_training(r1.with_overrides({"loss.r1_gamma": "0"}), base=r1)  # best.safetensors would stay stuck
    older = tiny("dcgan").with_overrides({"train.best_metric": "loss_dd"})  # a run older aigc let through, with a note
    check_for_training(older.with_overrides({"train.steps": "40"}), base=older)
    from aigc_cli.training.loop import best_metric

    assert best_metric(tiny("dcgan").with_overrides({"train.best_metric": "img_per_s"})) == ("img_per_s", True)
    assert best_metric(tiny("dcgan").with_overrides({"train.best_metric": "loss_g"})) == ("loss_g", False)


def test_vae_loss_goes_down(tmp_path):
    rep = Silent()
    summary = train(tiny("vae").with_overrides({"train.ckpt_every": "10"}), tmp_path / "vae", rep)
    assert summary["best"]["metric"] == "neg_elbo"
    best = tmp_path / "vae" / "checkpoints" / "best.safetensors"
    assert best.read_bytes() == (tmp_path / "vae" / "checkpoints" / "step-0000020.safetensors").read_bytes()
    first, last = rep.records[0]["neg_elbo"], rep.records[-1]["neg_elbo"]
    assert last < first * 0.9, (first, last)
    assert (tmp_path / "vae" / "samples" / "recon-step-0000020.png").is_file()


def test_a_vae_on_fewer_images_than_a_grid_row_shows_inputs_above_reconstructions(tmp_path):
    """6 images and rows of 8 (64 samples) put inputs and reconstructions side by side in one row."""
    from PIL import Image
    from conftest import write_image_folder

    folder = write_image_folder(tmp_path / "few", n_per_class=3, classes=("a", "b"), size=16)
    cfg = tiny("vae").with_overrides({"data.source": str(folder), "train.steps": "1", "train.batch_size": "2",
                                      "train.n_samples": "64"})
    train(cfg, tmp_path / "vae", Silent())
    assert Image.open(tmp_path / "vae" / "samples" / "recon-step-0000001.png").size == (6 * 18 + 2, 2 * 18 + 2)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_on_cpu(precision, tmp_path):
    cfg = tiny("dcgan").with_overrides({"train.precision": precision, "train.steps": "5", "train.log_every": "5"})
    rep = Silent()
    summary = train(cfg, tmp_path / precision, rep)
    assert summary["precision"] == precision
    assert all(math.isfinite(rep.records[-1][k]) for k in ("loss_d", "loss_g"))


def test_classifier_learns_above_chance(tmp_path):
    cfg = tiny("classifier").with_overrides({"train.steps": "60", "model.channels": "3"})
    summary = train(cfg, tmp_path / "clf", Silent())
    assert summary["test_accuracy"] > 0.4  # 4 balanced classes: chance is 0.25


def test_nonfinite_loss_stops_with_exit_code_3(tmp_path, monkeypatch):
    from aigc_cli.errors import DivergedError
    from aigc_cli.training import steps

    real = steps.STEPS["gan"]

    def poisoned(*args):
        out = real(*args)
        return {**out, "loss_d": out["loss_d"] * float("nan")}

    monkeypatch.setitem(steps.STEPS, "gan", poisoned)
    with pytest.raises(DivergedError) as e:
        train(tiny("dcgan"), tmp_path / "nan", Silent())
    assert e.value.exit_code == 3 and "step 5" in str(e.value)


def test_labels_required_for_classifier(tmp_path, image_folder):
    from aigc_cli.errors import UsageError

    flat = tmp_path / "flat"
    flat.mkdir()
    for p in image_folder.rglob("*.png"):
        (flat / p.name).write_bytes(p.read_bytes())
    cfg = tiny("classifier").with_overrides({"data.source": str(flat), "train.batch_size": "2", "data.limit": "0"})
    with pytest.raises(UsageError, match="no labels") as e:
        train(cfg, tmp_path / "x", Silent())
    assert "directly in" not in str(e.value)  # a flat folder: nothing more to say

    # Class subfolders plus one loose image: unlabelled, and the error says which file is the cause.
    mixed = tmp_path / "mixed"
    shutil.copytree(image_folder, mixed)
    shutil.copy(next(image_folder.rglob("*.png")), mixed / "stray.png")
    cfg = cfg.with_overrides({"data.source": str(mixed)})
    with pytest.raises(UsageError, match="no labels") as e:
        train(cfg, tmp_path / "y", Silent())
    n = len(list(mixed.rglob("*.*")))
    assert f"1 of its {n} image files sits directly in {mixed} (e.g. stray.png) next to its class subfolders" in str(e.value)
