"""aigc_cli/training/precision.py: device and precision choices, with CUDA's
presence faked where the rule is about a GPU (this runs on a CPU)."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.errors import UsageError
from aigc_cli.training import precision as prec

CPU = torch.device("cpu")


def test_a_cuda_index_at_the_device_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert prec.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(UsageError, match="only 2 CUDA device"):
        prec.resolve_device("cuda:2")


def test_auto_precision_is_bf16_only_on_a_cuda_device_that_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert prec.resolve_precision("auto", CPU) == "fp32"
    assert prec.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert prec.resolve_precision("fp16", torch.device("cuda")) == "fp16"  # explicit: as asked
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert prec.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_the_slow_fp16_note_is_for_the_cpu_only():
    assert "emulated" in prec.slow_precision_note("fp16", CPU)
    assert prec.slow_precision_note("fp16", torch.device("cuda")) is None
    assert prec.slow_precision_note("bf16", CPU) is None


def test_only_fp16_gets_a_grad_scaler():
    assert Precision_scaler("fp16") and not Precision_scaler("bf16") and not Precision_scaler("fp32")


def Precision_scaler(name):
    return prec.Precision(name, CPU).scaler is not None


def test_mps_that_is_not_there_is_refused(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match="MPS is not available"):
        prec.resolve_device("mps")


@pytest.mark.parametrize("name", ["cuda:x", "cuda:", "cuda:1a", "gpu", "CPU"])
def test_malformed_device_names_are_refused_even_where_cuda_is_present(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(UsageError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
        prec.resolve_device(name)


def test_autocast_turns_its_cast_cache_off_while_a_graph_is_captured():
    amp = prec.Precision("bf16", CPU)
    with amp.autocast():
        assert torch.is_autocast_cache_enabled() and torch.get_autocast_dtype("cpu") == torch.bfloat16
    amp.graph_safe = True
    with amp.autocast():
        assert not torch.is_autocast_cache_enabled()
