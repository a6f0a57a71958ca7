"""aigc_cli/metrics/extractors.py: precision names, the weights' hash that
cache keys go by, and make_extractor's refusals (all before any network is built)."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.errors import UsageError
from aigc_cli.metrics.extractors import extractor_precision, make_extractor, state_sha256
from aigc_cli.training.precision import Precision


def test_extractor_precision_is_fp32_unless_bf16_or_fp16_is_asked_for():
    for unset in ("auto", "", None):
        assert extractor_precision(unset) == "fp32"
    assert extractor_precision("bf16") == "bf16"
    assert extractor_precision(Precision("fp16", torch.device("cpu"))) == "fp16"


def test_state_sha256_sees_names_dtypes_shapes_and_bytes_but_not_order():
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    h = state_sha256(a)
    assert h == state_sha256({"b": torch.zeros(3), "w": a["w"].clone()})  # insertion order: no matter
    assert h != state_sha256({"v": a["w"], "b": a["b"]})  # a renamed tensor
    assert h != state_sha256({"w": a["w"].view(torch.int32), "b": a["b"]})  # same bytes, other dtype
    assert h != state_sha256({"w": a["w"] + 1, "b": a["b"]})


def test_make_extractor_refuses_an_unknown_precision_and_inception_weights_with_a_classifier(tmp_path):
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16, fp16, got 'fp8'"):
        make_extractor(None, None, "cpu", "fp8")
    with pytest.raises(UsageError, match="--inception-weights applies to the Inception extractor"):
        make_extractor(str(tmp_path / "clf"), str(tmp_path / "w.pth"), "cpu")



def test_classifier_features_see_pixels_on_the_models_scale_and_at_its_size(tmp_path):
    """The classifier was trained on [-1, 1] images of its own size: embed must feed it exactly that."""
    from aigc_cli.metrics.extractors import ClassifierFeatures
    from aigc_cli.training.loop import train
    from conftest import Silent, tiny

    cpu = torch.device("cpu")
    train(tiny("classifier", channels=3).with_overrides({"train.steps": "1"}), tmp_path / "clf", Silent())
    ext = ClassifierFeatures(str(tmp_path / "clf"), cpu, "fp32")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    feats, probs = ext.embed(images, batch_size=2)
    with torch.no_grad():
        want = ext.C.features(images.float() / 127.5 - 1.0)
    assert feats.dtype == torch.float64 and feats.shape == (5, ext.protocol["feature_dim"])
    assert torch.allclose(feats, want.double(), atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))
