"""The optimised training step (static buffers as captured in a CUDA graph, EMA outside the step,
channels-last) computes what the plain eager step computes. On the CPU the graph itself cannot be
captured; GraphedStep then runs the very same static-buffer path uncaptured, so everything but the
capture is checked here (the capture is checked on a GPU by benchmarks/gpu_check.py)."""

from __future__ import annotations

import json

import pytest
import torch

from aigc_cli.data import load_images
from aigc_cli.models import FAMILIES, build_nets, needs_labels
from aigc_cli.training.augment import parse_policy
from aigc_cli.training.batches import DeviceBatches
from aigc_cli.training.ema import EMA
from aigc_cli.training.graph import WARMUP, GraphedStep, graph_blockers
from aigc_cli.training.loop import seed_everything, train
from aigc_cli.training.precision import Precision
from aigc_cli.training.steps import STEPS, Aids, conform_optimizers, make_optimizers, optimizer_flags

from conftest import Silent, tiny

CPU = torch.device("cpu")


def run_steps(cfg, optimised: bool, n: int, memory_format=torch.contiguous_format):
    family = FAMILIES[cfg.model.kind]
    data = load_images("shapes", channels=cfg.model.channels, resolution=cfg.model.resolution, limit=256,
                       seed=0, warn=lambda s: None)
    if needs_labels(cfg.model):
        cfg = cfg.with_overrides({"model.num_classes": data.num_classes})
    seed_everything(0)
    nets = build_nets(cfg.model)
    fmt = memory_format
    for net in nets.values():
        net.to(memory_format=fmt).train()
    amp = Precision("fp32", CPU)
    opts = make_optimizers(family.objective, nets, cfg.train, optimizer_flags(CPU, capturable=False))
    aids = Aids(augment=parse_policy(cfg.train.diffaugment))
    if cfg.train.ema_decay:
        aids.ema = EMA(nets["G"], cfg.train.ema_decay)
        nets["G_ema"] = aids.ema.model
    step_fn = STEPS[family.objective]
    if optimised:
        step_fn = GraphedStep(step_fn, nets, opts, amp, cfg, aids)
    batches = DeviceBatches(data.images, data.labels, cfg.train.batch_size, CPU, 0)

    def next_batch():
        x, y = batches.next()
        return x.contiguous(memory_format=fmt), y

    losses = []
    for step in range(1, n + 1):
        out = step_fn(nets, opts, amp, next_batch, cfg, step, aids)
        losses.append({k: float(v) for k, v in out.items()})
    return losses, {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in nets.items()}


CASES = {
    "dcgan+ema+diffaugment": (tiny("dcgan"), {"train.ema_decay": 0.9, "train.diffaugment": "translation,color"}),
    "cond-dcgan-hinge": (tiny("dcgan", conditional=True), {"loss.gan": "hinge"}),
    "vae": (tiny("vae"), {}),
    "classifier": (tiny("classifier"), {}),
}


def assert_losses_close(eager, fast, rel):
    assert len(eager) == len(fast)
    for step, (a, b) in enumerate(zip(eager, fast), 1):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=rel / 10), f"step {step} {k}: eager {a[k]} vs optimised {b[k]}"
    assert len({round(l[next(iter(l))], 6) for l in eager}) > 1  # not a comparison of constants


@pytest.mark.parametrize("case", list(CASES))
def test_static_buffer_step_equals_eager_bit_for_bit(case):
    """Same operations in the same order: the graph's path (static input buffers, EMA outside the
    step) must give exactly the eager step's losses and weights."""
    base, overrides = CASES[case]
    cfg = base.with_overrides(overrides)
    n = WARMUP + 5  # past the warm-up, into the static-buffer path
    eager_losses, eager_state = run_steps(cfg, optimised=False, n=n)
    fast_losses, fast_state = run_steps(cfg, optimised=True, n=n)
    assert_losses_close(eager_losses, fast_losses, rel=0)
    for name in eager_state:
        for k, v in eager_state[name].items():
            assert torch.equal(fast_state[name][k], v), f"{name}.{k}"


@pytest.mark.parametrize("case", ["dcgan+ema+diffaugment", "vae"])
def test_channels_last_step_matches_eager(case):
    """channels-last convolutions sum in another order: losses agree to rounding. (Weights are not
    compared: a conv bias before batch norm has a zero true gradient, and Adam turns the rounding
    noise there into full-size steps of either sign.)"""
    base, overrides = CASES[case]
    cfg = base.with_overrides(overrides)
    n = WARMUP + 4
    eager_losses, _ = run_steps(cfg, optimised=False, n=n)
    fast_losses, _ = run_steps(cfg, optimised=True, n=n, memory_format=torch.channels_last)
    assert_losses_close(eager_losses, fast_losses, rel=1e-3)


def test_a_stale_batch_would_be_caught():
    """The comparison above can fail: replaying the first static batch forever changes the result."""
    cfg = CASES["vae"][0]
    eager_losses, _ = run_steps(cfg, optimised=False, n=WARMUP + 3)

    class Stale(GraphedStep):
        def __call__(self, nets, opts, amp, next_batch, cfg, step, aids):
            if self.static_in is not None:
                return self._run(*self.static_in, step)
            return super().__call__(nets, opts, amp, next_batch, cfg, step, aids)

    import aigc_cli.training.graph as graph_mod
    original = graph_mod.GraphedStep
    try:
        globals()["GraphedStep"] = Stale
        stale_losses, _ = run_steps(cfg, optimised=True, n=WARMUP + 3)
    finally:
        globals()["GraphedStep"] = original
    assert stale_losses[-1]["loss"] != pytest.approx(eager_losses[-1]["loss"], rel=1e-4)


def test_graph_blockers_name_each_reason():
    amp = Precision("fp32", CPU)
    cfg = tiny("dcgan")
    assert graph_blockers(cfg, amp, torch.device("cuda"), scheduled=False) == []
    assert "no CUDA device" in graph_blockers(cfg, amp, CPU, scheduled=False)
    wgan = tiny("dcgan", d_norm="layer").with_overrides({"loss.gan": "wgan-gp", "train.n_critic": 5})
    why = graph_blockers(wgan, amp, torch.device("cuda"), scheduled=True)
    assert any("double backward" in w for w in why) and any("n_critic" in w for w in why)
    assert any("schedule" in w for w in why)
    assert any("GradScaler" in w for w in graph_blockers(cfg, Precision("fp16", CPU), torch.device("cuda"), False))
    # a loss setting the family does not read (a note says so) must not cost it the graph either
    assert graph_blockers(tiny("vae").with_overrides({"loss.r1_gamma": "5"}), amp, torch.device("cuda"), False) == []
    assert graph_blockers(cfg.with_overrides({"loss.kl_warmup": "100"}), amp, torch.device("cuda"), False) == []
    assert any("KL warm-up" in w for w in graph_blockers(tiny("vae").with_overrides({"loss.kl_warmup": "100"}), amp,
                                                         torch.device("cuda"), False))


def test_cuda_graph_on_without_cuda_says_why_and_trains(tmp_path):
    cfg = tiny("dcgan").with_overrides({"train.cuda_graph": "on", "train.steps": 5, "train.channels_last": "on"})
    rep = Silent()
    summary = train(cfg, tmp_path / "run", rep)
    assert summary["steps"] == 5
    assert any("CUDA graph off" in n and "no CUDA device" in n for n in rep.notes), rep.notes
    assert not any("channels_last" in n for n in rep.notes)  # a conv model: it applies


def test_channels_last_on_for_a_model_without_convolutions_says_it_changes_nothing(tmp_path):
    rep = Silent()
    train(tiny("mlp_gan").with_overrides({"train.steps": 1, "train.channels_last": "on"}), tmp_path / "run", rep)
    assert "train.channels_last=on: mlp_gan has no convolutions, so it changes nothing" in rep.notes, rep.notes


def test_restored_optimizer_takes_this_runs_flags():
    nets = build_nets(tiny("dcgan").model)
    saved = make_optimizers("gan", nets, tiny("dcgan").train, {"foreach": True})
    nets["G"](torch.randn(2, 8)).sum().backward()
    saved["G"].step()
    sd = json.loads(json.dumps(saved["G"].state_dict()["param_groups"]))
    sd[0]["foreach"], sd[0]["fused"] = False, True  # as if saved by a fused (CUDA) run
    fresh = make_optimizers("gan", nets, tiny("dcgan").train, optimizer_flags(CPU, False))
    fresh["G"].load_state_dict({"state": saved["G"].state_dict()["state"], "param_groups": sd})
    assert fresh["G"].param_groups[0]["fused"] is True
    conform_optimizers(fresh, optimizer_flags(CPU, False))
    group = fresh["G"].param_groups[0]
    assert group["fused"] is False and group["foreach"] is True and group["capturable"] is False
    step = fresh["G"].state[group["params"][0]]["step"]
    assert step.device.type == "cpu" and step.dtype == torch.float32
    fresh["G"].step()  # and it still steps


def test_restored_moments_take_their_parameters_memory_layout():
    """Checkpoints hold contiguous moments (safetensors); channels-last parameters need channels-last
    moments, or fused Adam on CUDA refuses to step after every resume and rollback."""
    nets = build_nets(tiny("dcgan").model)
    for net in nets.values():
        net.to(memory_format=torch.channels_last)
    saved = make_optimizers("gan", nets, tiny("dcgan").train, {"foreach": True})
    nets["G"](torch.randn(2, 8)).sum().backward()
    saved["G"].step()
    sd = saved["G"].state_dict()
    stored = {i: {k: v.contiguous() for k, v in per.items()} for i, per in sd["state"].items()}  # as capture() does
    fresh = make_optimizers("gan", nets, tiny("dcgan").train, optimizer_flags(CPU, False))
    fresh["G"].load_state_dict({"state": stored, "param_groups": sd["param_groups"]})
    params = fresh["G"].param_groups[0]["params"]
    assert any(fresh["G"].state[p]["exp_avg"].stride() != p.stride() for p in params)  # the case at hand
    conform_optimizers(fresh, optimizer_flags(CPU, False))
    for i, p in enumerate(params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert fresh["G"].state[p][key].stride() == p.stride(), (i, key)
            assert torch.equal(fresh["G"].state[p][key], sd["state"][i][key])


def test_a_failed_capture_falls_back_to_eager_with_a_note(monkeypatch):
    """Simulated on the CPU: capture raises (as for an op that syncs with the host); the step that was
    being captured runs eagerly, one note says why, and every later step stays eager and exact."""
    import aigc_cli.training.graph as graph_mod

    cfg = CASES["vae"][0]
    n = WARMUP + 4
    eager_losses, eager_state = run_steps(cfg, optimised=False, n=n)

    notes = []

    class FailingCapture(GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, note=notes.append)
            self.capture = True  # pretend CUDA is here

        def _eager(self, x, y, step):
            return self._run(x, y, step)

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graph_mod.torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(graph_mod.torch.cuda, "graph", refuse)
    monkeypatch.setattr(graph_mod.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setitem(globals(), "GraphedStep", FailingCapture)
    losses, state = run_steps(cfg, optimised=True, n=n)
    assert len(notes) == 1 and "capture failed" in notes[0] and "eagerly" in notes[0]
    assert losses == eager_losses
    for name in eager_state:
        for k, v in eager_state[name].items():
            assert torch.equal(state[name][k], v), f"{name}.{k}"


def test_warm_up_runs_with_the_capture_s_autocast_cache_setting(simulated_capture):
    """Simulated on the CPU: compiled regions (train.fuse_norm_act) are guarded on autocast's cache
    setting, so the eager warm-up steps must run with the cache off, as the capture does, or they
    would be compiled again inside the capture."""
    seen = []

    def step_fn(nets, opts, amp, next_batch, cfg, step, aids):
        seen.append(amp.graph_safe)
        return {}

    amp = Precision("bf16", CPU)
    graphed = GraphedStep(step_fn, {}, {}, amp, tiny("dcgan"), Aids())
    graphed.capture = True  # pretend CUDA is here
    batch = (torch.zeros(2, 1, 4, 4), None)
    for step in range(1, WARMUP + 3):
        graphed({}, {}, amp, lambda: batch, tiny("dcgan"), step, Aids())
    assert seen == [True] * (WARMUP + 1)  # warm-up steps and the capture; replays run no Python
    assert amp.graph_safe is False  # and the run's own setting is back afterwards


def test_a_failure_in_gs_update_leaves_d_trainable(monkeypatch):
    """A CUDA-graph capture failing in G's update reran the step eagerly with D still frozen."""
    from aigc_cli import losses
    from aigc_cli.models import build_nets
    from aigc_cli.training.precision import Precision
    from aigc_cli.training.steps import Aids, gan_step, make_optimizers

    cfg = tiny("dcgan")
    nets = build_nets(cfg.model)
    opts = make_optimizers("gan", nets, cfg.train)
    cpu = torch.device("cpu")
    batch = lambda: (torch.rand(4, 1, 16, 16) * 2 - 1, None)  # noqa: E731
    monkeypatch.setattr(losses, "g_loss", lambda kind, fake: (_ for _ in ()).throw(RuntimeError("capture failed")))
    with pytest.raises(RuntimeError, match="capture failed"):
        gan_step(nets, opts, Precision("fp32", cpu), batch, cfg, 1, Aids())
    assert all(p.requires_grad for p in nets["D"].parameters())


def test_the_gradient_penalty_sees_d_through_diffaugment_as_its_loss_does(monkeypatch):
    from aigc_cli import losses
    from aigc_cli.models import build_nets
    from aigc_cli.training.augment import parse_policy
    from aigc_cli.training.precision import Precision
    from aigc_cli.training.steps import Aids, gan_step, make_optimizers

    cfg = tiny("dcgan", d_norm="none").with_overrides({"loss.gan": "wgan-gp", "train.diffaugment": "translation"})
    nets = build_nets(cfg.model)
    seen = []
    real = losses.gradient_penalty
    monkeypatch.setattr(losses, "gradient_penalty", lambda D, *a: seen.append(D) or real(D, *a))
    gan_step(nets, make_optimizers("gan", nets, cfg.train), Precision("fp32", torch.device("cpu")),
             lambda: (torch.rand(4, 1, 16, 16) * 2 - 1, None), cfg, 1, Aids(augment=parse_policy("translation")))
    assert len(seen) == 1 and seen[0] is not nets["D"]  # D composed with the augmentation


def test_d_losses_logged_are_the_mean_over_the_critic_steps(monkeypatch):
    """With n_critic 3 the step returned the last critic step's loss_d and gp: two thirds unseen."""
    from aigc_cli import losses
    from aigc_cli.models import build_nets
    from aigc_cli.training.precision import Precision
    from aigc_cli.training.steps import Aids, gan_step, make_optimizers

    cfg = tiny("dcgan", d_norm="none").with_overrides({"loss.gan": "wgan-gp", "train.n_critic": 3})
    nets = build_nets(cfg.model)
    seen = {"loss_d": [], "gp": []}
    real_d, real_gp = losses.d_loss, losses.gradient_penalty
    monkeypatch.setattr(losses, "d_loss", lambda *a: seen["loss_d"].append(v := real_d(*a)) or v)
    monkeypatch.setattr(losses, "gradient_penalty", lambda *a: seen["gp"].append(v := real_gp(*a)) or v)
    out = gan_step(nets, make_optimizers("gan", nets, cfg.train), Precision("fp32", torch.device("cpu")),
                   lambda: (torch.rand(4, 1, 16, 16) * 2 - 1, None), cfg, 1, Aids())
    assert list(out) == ["loss_d", "loss_g", "gp"]
    for key, values in seen.items():
        values = [float(v.detach()) for v in values]
        assert len(values) == 3 and len(set(values)) == 3
        assert float(out[key]) == pytest.approx(sum(values) / 3, rel=1e-6)
