"""train.fuse_norm_act: BatchNorm + activation pairs compiled together compute what the eager pair
computes (outputs, gradients, running statistics), keep the state_dict, and train the same run.

Most tests use dynamo's "aot_eager" backend, which traces and runs the same captured graph without
generating code (seconds, not minutes, on 2 cores); one test compiles a layer with inductor for real."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aigc_cli.errors import UsageError
from aigc_cli.models import build_nets
from aigc_cli.training import fusion
from aigc_cli.training.fusion import BatchNormAct2d, fuse_norm_act
from aigc_cli.training.loop import train

from conftest import Silent, tiny


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(fusion, "BACKEND", "aot_eager")
    fusion.reset()
    yield
    fusion.reset()


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_fused_dcgan_matches_eager_forward_backward_and_running_stats(aot_eager):
    torch.manual_seed(0)
    nets = build_nets(tiny("dcgan", resolution=32).model)
    for name, net in nets.items():
        plain = net.train()
        fused = copy.deepcopy(plain)
        n = fuse_norm_act(fused)
        assert n == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) > 0
        assert sum(isinstance(m, BatchNormAct2d) for m in fused.modules()) == n
        assert list(fused.state_dict()) == list(plain.state_dict())
        x = torch.randn(6, 8) if name == "G" else torch.randn(6, 1, 32, 32)
        for _ in range(2):  # twice: the running averages move on from updated values
            outs = []
            for net_ in (plain, fused):
                net_.zero_grad(set_to_none=True)
                out = net_(x)
                (out.float() ** 2).mean().backward()
                outs.append(out.detach())
            torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
            g0, g1 = _grads(plain), _grads(fused)
            assert g0.keys() == g1.keys() and g0
            for k in g0:
                torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)
        for k, v in plain.state_dict().items():  # running_mean/var and num_batches_tracked
            torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-5, atol=1e-6)
        plain.eval(), fused.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(x), plain(x))


def test_the_probe_compiles_the_graph_the_real_call_uses(aot_eager):
    """The first call of each kind compiles forward and backward once, on copies of x and the running
    statistics; the real call and every later one reuse that graph."""
    from torch._dynamo.utils import counters

    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    fuse_norm_act(net)
    counters.clear()
    for _ in range(3):
        net(torch.randn(5, 2, 6, 6)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert int(net[1].num_batches_tracked) == 3  # the probe left the statistics alone


def test_a_process_can_compile_more_variants_than_four_batch_sizes_of_the_dcgan_need(aot_eager):
    """About 18 compiled variants per batch size on a GPU: the old limit of 64 ran out at the fourth batch size
    trained in one process, and every pair ran unfused from then on. 66 shapes here, each its own graph."""
    from torch._dynamo.utils import counters

    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
    fuse_norm_act(net)
    counters.clear()
    for n in range(2, 68):
        net(torch.randn(n, 2, 2, 2)).sum().backward()
    assert fusion._failed is None
    assert counters["stats"]["unique_graphs"] == 66


def test_leaves_conditional_bn_and_unpaired_layers_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                        nn.ReLU(), nn.BatchNorm2d(4, momentum=None), nn.ReLU())
    assert fuse_norm_act(net) == 2
    assert type(net[1]) is nn.BatchNorm2d and type(net[2]) is nn.Tanh  # Tanh is not fused
    assert type(net[3]) is BatchNormAct2d and net[3].slope == pytest.approx(0.1) and type(net[4]) is nn.Identity
    assert type(net[5]) is nn.ReLU
    assert type(net[6]) is BatchNormAct2d and net[6].slope == 0.0
    cond = build_nets(tiny("dcgan", conditional=True, num_classes=4).model)["G"]
    assert fuse_norm_act(cond) == 0  # ConditionalBatchNorm2d takes labels: not a plain pair


def test_cumulative_average_bn_runs_eagerly_and_matches(aot_eager):
    plain = nn.Sequential(nn.BatchNorm2d(3, momentum=None), nn.ReLU())
    fused = copy.deepcopy(plain)
    fuse_norm_act(fused)
    x = torch.randn(4, 3, 5, 5)
    for _ in range(3):
        torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused[0].running_var, plain[0].running_var)


def test_inductor_compiles_a_pair_that_matches_eager():
    """The real backend: a generated C++ kernel on the CPU (Triton on CUDA) for one channels-last layer."""
    fmt = torch.channels_last
    fusion.reset()
    try:
        torch.manual_seed(1)
        plain = nn.Sequential(nn.BatchNorm2d(8), nn.LeakyReLU(0.2)).to(memory_format=fmt)
        fused = copy.deepcopy(plain)
        fuse_norm_act(fused)
        x0 = torch.randn(4, 8, 6, 6).contiguous(memory_format=fmt)
        grads, outs = [], []
        for net in (plain, fused):
            x = x0.clone().requires_grad_(True)
            out = net(x)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs.append(out)
            grads.append((x.grad, net[0].weight.grad, net[0].bias.grad))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(grads[0], grads[1]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused[0].running_mean, plain[0].running_mean)
        torch.testing.assert_close(fused[0].running_var, plain[0].running_var)
    finally:
        fusion.reset()


def test_training_with_fusion_matches_and_saves_plain_checkpoints(tmp_path, aot_eager):
    runs = {}
    for setting in ("off", "on"):
        cfg = tiny("dcgan").with_overrides({"train.steps": 6, "train.log_every": 1, "train.fuse_norm_act": setting,
                                            "train.ema_decay": 0.9})
        rep = Silent()
        train(cfg, tmp_path / setting, rep)
        runs[setting] = rep
    assert any(n.startswith("fused ") and "BatchNorm + activation pairs" in n for n in runs["on"].notes)
    for a, b in zip(runs["off"].records, runs["on"].records, strict=True):
        assert b["loss_d"] == pytest.approx(a["loss_d"], rel=1e-3, abs=1e-4)
        assert b["loss_g"] == pytest.approx(a["loss_g"], rel=1e-3, abs=1e-4)
    from aigc_cli import checkpoint as ckpt_io

    off = ckpt_io.load(tmp_path / "off" / "checkpoints" / "last.safetensors").tensors
    on = ckpt_io.load(tmp_path / "on" / "checkpoints" / "last.safetensors").tensors
    assert off.keys() == on.keys()


def test_bad_setting_is_a_usage_error():
    with pytest.raises(UsageError, match="fuse_norm_act must be auto, on or off, got 'yes'"):
        tiny("dcgan").with_overrides({"train.fuse_norm_act": "yes"})


def test_auto_fuses_on_cuda_only(tmp_path, monkeypatch):
    monkeypatch.setattr(fusion, "_triton_usable", lambda: True)
    assert fusion.wanted("auto", torch.device("cuda")) and fusion.wanted("on", torch.device("cpu"))
    assert not fusion.wanted("auto", torch.device("cpu")) and not fusion.wanted("off", torch.device("cuda"))
    monkeypatch.setattr(fusion, "_triton_usable", lambda: False)  # no Triton, or a GPU too old for it
    assert not fusion.wanted("auto", torch.device("cuda")) and fusion.wanted("on", torch.device("cuda"))
    assert tiny("dcgan").train.fuse_norm_act == "auto"
    rep = Silent()  # the default on the CPU: nothing compiled, nothing said
    train(tiny("dcgan").with_overrides({"train.steps": 1}), tmp_path / "run", rep)
    assert not any("fuse" in n for n in rep.notes), rep.notes


def _broken_forward(gm, example_inputs):
    raise RuntimeError("no C++ compiler found\nsecond line")


def _broken_backward():
    """A backend whose forward compiles and whose backward compiler fails: AOTAutograd compiles the
    backward lazily, at the first .backward(), unless the module makes it compile earlier."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    def bad(gm, example_inputs):
        raise RuntimeError("backward compiler broke")

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=bad)


@pytest.mark.parametrize("backend, message", [(_broken_forward, "no C++ compiler found"),
                                              (_broken_backward(), "backward compiler broke")])
def test_a_compile_failure_trains_on_unfused_with_one_note(tmp_path, monkeypatch, backend, message):
    monkeypatch.setattr(fusion, "BACKEND", backend)
    fusion.reset()
    try:
        cfg = tiny("dcgan").with_overrides({"train.steps": 4, "train.log_every": 1, "train.fuse_norm_act": "on"})
        rep = Silent()
        train(cfg, tmp_path / "fused", rep)
        failed = [n for n in rep.notes if n.startswith("fusing BatchNorm + activation failed")]
        assert len(failed) == 1 and message in failed[0] and "second line" not in failed[0]
        off = Silent()
        train(cfg.with_overrides({"train.fuse_norm_act": "off"}), tmp_path / "plain", off)
        assert [r["loss_d"] for r in rep.records] == pytest.approx([r["loss_d"] for r in off.records], rel=1e-5)
    finally:
        fusion.reset()


def test_fused_generator_with_ema_and_a_reporter_that_cannot_be_copied(tmp_path, aot_eager):
    """The EMA deep-copies G; the fused modules must not drag the run's reporter (consoles, locks) along."""
    import threading

    class Locked(Silent):
        def __init__(self):
            super().__init__()
            self.lock = threading.RLock()  # as rich's Console holds: deepcopy fails on it

    cfg = tiny("dcgan").with_overrides({"train.steps": 3, "train.fuse_norm_act": "on", "train.ema_decay": 0.99})
    summary = train(cfg, tmp_path / "ema", Locked())
    assert summary["steps"] == 3


def test_nothing_is_compiled_again_when_the_graph_is_captured(simulated_capture, aot_eager):
    """The capture must replay what warm-up compiled: a recompile there (a guard that differs, such as
    autocast's cast cache) cannot work inside a CUDA graph. Simulated on the CPU under bf16 autocast,
    counting the graphs dynamo compiles."""
    from torch._dynamo.utils import counters

    from aigc_cli.training.graph import WARMUP, GraphedStep
    from aigc_cli.training.precision import Precision
    from aigc_cli.training.steps import STEPS, Aids, make_optimizers

    cfg = tiny("dcgan")
    torch.manual_seed(0)
    nets = {k: v.train().to(memory_format=torch.channels_last) for k, v in build_nets(cfg.model).items()}
    assert sum(fuse_norm_act(net) for net in nets.values()) > 0
    amp = Precision("bf16", torch.device("cpu"))
    opts = make_optimizers("gan", nets, cfg.train)
    graphed = GraphedStep(STEPS["gan"], nets, opts, amp, cfg, Aids())
    graphed.capture = True  # pretend CUDA is here
    batch = (torch.rand(16, 1, 16, 16).mul(2).sub(1).contiguous(memory_format=torch.channels_last), None)
    counters.clear()
    for step in range(1, WARMUP + 1):
        graphed(nets, opts, amp, lambda: batch, cfg, step, Aids())
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0
    graphed(nets, opts, amp, lambda: batch, cfg, WARMUP + 1, Aids())  # the capture
    assert graphed.static_in is not None and not graphed.failed
    assert counters["stats"]["unique_graphs"] == compiled


def test_auto_fuses_quietly_where_it_can(tmp_path, aot_eager, monkeypatch):
    """auto (as on CUDA) under R1: G's pairs fused with the one note saying so, D left unfused without one."""
    monkeypatch.setattr(fusion, "wanted", lambda setting, device: setting in ("auto", "on"))
    rep = Silent()
    train(tiny("dcgan").with_overrides({"train.steps": 2, "loss.r1_gamma": 1.0}), tmp_path / "auto", rep)
    assert [n for n in rep.notes if "fuse" in n] == [
        "fused 2 BatchNorm + activation pairs with torch.compile; the first steps compile them"], rep.notes  # G's two


def test_r1_trains_with_fusion_on_leaving_d_unfused(tmp_path, aot_eager):
    """R1 differentiates D twice, which compiled code cannot: the first step crashed."""
    cfg = tiny("dcgan").with_overrides({"train.steps": 2, "train.fuse_norm_act": "on", "loss.r1_gamma": 1.0})
    rep = Silent()
    train(cfg, tmp_path / "r1", rep)
    assert any("D's pairs are left unfused" in n for n in rep.notes), rep.notes
    assert any(n.startswith("fused ") for n in rep.notes)  # G's still are


def test_a_batch_norm_without_running_statistics_runs_eagerly_and_costs_no_one_fusion(aot_eager):
    """track_running_stats=False has no buffers to pass the compiled pair: that layer runs its eager
    BatchNorm; it must not count as a compile failure that turns fusion off for every layer of the process."""
    import copy

    from torch import nn

    from aigc_cli.training import fusion

    plain = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.LeakyReLU(0.2))
    fused = copy.deepcopy(plain)
    assert fusion.fuse_norm_act(fused) == 1
    notes = []
    fusion.report_to(notes.append)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(fused(x), plain(x))
    assert fusion._failed is None and notes == []


def test_the_probe_runs_once_per_kind_of_input(aot_eager, monkeypatch):
    """The first call of each kind compiles forward and backward on copies; later calls of that kind run
    the compiled pair once, not the probe again (a second forward and backward every step)."""
    from torch import nn

    from aigc_cli.training import fusion

    calls = []
    real = fusion._kernel

    def counting():
        kernel = real()
        return lambda *a: calls.append(1) or kernel(*a)

    monkeypatch.setattr(fusion, "_kernel", counting)
    net = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    fusion.fuse_norm_act(net)
    for _ in range(3):
        net(torch.randn(5, 4, 3, 3)).sum().backward()
    assert len(calls) == 1 + 3  # one probe, three real calls


def test_a_fused_run_after_a_failure_earlier_in_the_process_says_so(aot_eager):
    from aigc_cli.training import fusion

    fusion._failed = "RuntimeError: no C++ compiler found"
    notes = []
    fusion.report_to(notes.append)
    assert len(notes) == 1 and "failed earlier in this process" in notes[0] and "no C++ compiler" in notes[0]


def test_a_training_mode_forward_without_gradients_stays_fused(aot_eager):
    """Batch statistics gathered under no_grad (a BatchNorm re-estimate, say): nothing to differentiate, so
    the probe has no backward to compile; that is not a compile failure."""
    import copy

    from torch import nn

    from aigc_cli.training import fusion

    plain = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    fused = copy.deepcopy(plain)
    fusion.fuse_norm_act(fused)
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x))
    torch.testing.assert_close(fused[0].running_mean, plain[0].running_mean)
    assert fusion._failed is None


def test_a_subclass_of_batch_norm_is_not_fused():
    """Only plain BatchNorm2d: a subclass's own forward (what it is for) would be replaced by the fused pair."""
    from torch import nn

    from aigc_cli.training import fusion

    class Custom(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(Custom(3), nn.ReLU())
    assert fusion.fuse_norm_act(net) == 0 and type(net[0]) is Custom and type(net[1]) is nn.ReLU
