"""aigc eval's pipeline: real and generated images must reach the feature extractor the same way."""

from __future__ import annotations

import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.data import load_images
from aigc_cli.metrics import evaluate as evaluate_mod
from aigc_cli.metrics.fid import fid_from_features
from aigc_cli.training.loop import train
from aigc_cli.training.precision import Precision
from conftest import Silent, tiny


def test_a_perfect_generator_scores_at_the_noise_floor(tmp_path, monkeypatch):
    # An RGB 32px classifier scores a grayscale 16px generator: both sides need converting.
    train(tiny("classifier", channels=3, resolution=32).with_overrides({"train.steps": "40"}), tmp_path / "clf", Silent())
    train(tiny("dcgan").with_overrides({"train.steps": "1"}), tmp_path / "gan", Silent())
    n = 400
    perfect = load_images("shapes", channels=1, resolution=16, split="test").images[:n]  # what it should draw
    monkeypatch.setattr(evaluate_mod, "generate", lambda G, z, amp, batch_size, labels=None: perfect[: len(z)])
    result = evaluate_mod.evaluate(ckpt_io.load(tmp_path / "gan"), data="shapes", root=None, download=False,
                                   features=str(tmp_path / "clf"), n=n, batch_size=200, seed=0, device="cpu",
                                   precision="fp32", warn=print)
    fid_perfect = result["metrics"]["fid"]

    # The noise floor: two different real sets, each in the classifier's own input format.
    extract = evaluate_mod.ClassifierFeatures(str(tmp_path / "clf"), torch.device("cpu"),
                                              Precision("fp32", torch.device("cpu")))
    a = load_images("shapes", channels=3, resolution=32, split="train").images[:n]
    b = load_images("shapes", channels=3, resolution=32, split="test").images[:n]
    floor = fid_from_features(extract(a, 200).numpy(), extract(b, 200).numpy())
    assert fid_perfect < 2 * floor, (fid_perfect, floor)
    assert result["protocol"]["kid_subset_size"] == n // 2 and result["metrics"]["kid_std"] > 0
