"""`aigc export` (aigc_cli/export.py): --no-ema, integer buffers, the dtype and name checks, what may be exported."""

from __future__ import annotations

import pytest
import torch

from aigc_cli import checkpoint as ck
from aigc_cli.training.loop import train
from conftest import Silent, run_cli, tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step DCGAN with an EMA (BN buffers included) and a 2-step classifier."""
    root = tmp_path_factory.mktemp("export_mutants")
    over = {"train.steps": "2", "train.ckpt_every": "2", "train.sample_every": "2"}
    train(tiny("dcgan").with_overrides({**over, "train.ema_decay": "0.9"}), root / "gan", Silent())
    train(tiny("classifier").with_overrides(over), root / "clf", Silent())
    return {name: root / name / "checkpoints" / "last.safetensors" for name in ("gan", "clf")}


def test_no_ema_exports_the_raw_generator_weights(runs, tmp_path, monkeypatch, capsys):
    """--no-ema wrote the EMA weights labelled as the raw ones when ema=True reached generator_from."""
    loaded = ck.load(runs["gan"])
    assert loaded.net_state("G_ema")
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["gan"], "--out", tmp_path / "raw.safetensors", "--no-ema")
    assert code == 0, err
    raw = ck.load(tmp_path / "raw.safetensors")
    assert raw.meta["aigc.weights"] == "G"
    params = [k for k, v in loaded.tensors.items() if k.startswith("G.") and v.is_floating_point() and v.dim() > 1]
    assert params and all(torch.equal(raw.tensors[k], loaded.tensors[k]) for k in params)
    assert any(not torch.equal(loaded.tensors[k], loaded.tensors["G_ema." + k[2:]]) for k in params)  # not a no-op


def test_a_half_precision_export_keeps_integer_buffers_integers(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["gan"], "--out", tmp_path / "h.safetensors", "--dtype", "fp16")
    assert code == 0, err
    tensors = ck.load(tmp_path / "h.safetensors").tensors
    counters = [k for k in tensors if k.endswith("num_batches_tracked")]
    assert counters and all(tensors[k].dtype == torch.int64 for k in counters)
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k not in counters)


def test_an_unknown_dtype_and_a_classifier_are_one_line_errors(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["gan"], "--out", tmp_path / "x.safetensors", "--dtype", "float16")
    assert code == 2 and "--dtype must be one of" in err and "Traceback" not in err, err
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["clf"], "--out", tmp_path / "c.safetensors")
    assert code == 2 and "has no generator to export" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_an_upper_case_suffix_is_a_safetensors_export(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", runs["gan"], "--out", tmp_path / "G.SAFETENSORS")
    assert code == 0, err
    assert ck.load(tmp_path / "G.SAFETENSORS").kind == "export"
