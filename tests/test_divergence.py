"""The divergence guard: injected NaNs roll back to the last good state, lower the learning rate or
leave fp16, and after a bounded number of tries stop with exit code 3 naming the good checkpoint."""

from __future__ import annotations

import json
import math

import pytest
import torch

from aigc_cli.errors import DivergedError
from aigc_cli.training import steps
from conftest import Silent, tiny


def inject(monkeypatch, at_call: int | tuple[int, ...], *, forever: bool = False, into: str = "loss"):
    """Poison the GAN step's output (or G's weights) at call `at_call` (or each of several), or from
    there on (forever)."""
    real = steps.STEPS["gan"]
    calls = {"n": 0}
    at = (at_call,) if isinstance(at_call, int) else at_call

    def poisoned(nets, *args):
        calls["n"] += 1
        out = real(nets, *args)
        if calls["n"] in at or (forever and calls["n"] >= at[0]):
            if into == "loss":
                out = {**out, "loss_d": out["loss_d"] * float("nan")}
            else:
                with torch.no_grad():
                    next(nets["G"].parameters()).fill_(float("inf"))
        return out

    monkeypatch.setitem(steps.STEPS, "gan", poisoned)
    return calls


def cfg(**extra):
    base = {"train.steps": "15", "train.log_every": "5", "train.ckpt_every": "5", "train.sample_every": "100"}
    return tiny("dcgan").with_overrides({**base, **extra})


def read_lr(run):
    from aigc_cli import checkpoint as ckpt_io

    ck = ckpt_io.load(run / "checkpoints" / "last.safetensors")
    return json.loads(ck.meta["aigc.opt.G.param_groups"])[0]["lr"]


@pytest.mark.parametrize("into", ["loss", "weights"])
def test_one_nan_rolls_back_and_training_finishes(monkeypatch, tmp_path, into):
    inject(monkeypatch, 8, into=into)
    rep = Silent()
    from aigc_cli.training.loop import train

    summary = train(cfg(), tmp_path / "r", rep)
    assert summary["steps"] == 15 and summary["recoveries"] == 1
    assert any("rolled back to step 5" in n and "x0.5" in n for n in rep.notes), rep.notes
    assert read_lr(tmp_path / "r") == pytest.approx(2e-4 * 0.5)
    logged = [json.loads(s)["step"] for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [5, 10, 15]
    assert all(math.isfinite(r["loss_d"]) for r in rep.records if r["step"] in (10, 15))


def test_each_rollback_halves_the_starting_rates_once_even_from_a_checkpoint_saved_after_one(monkeypatch, tmp_path):
    # Call 8 (step 8) fails: back to step 5, rates x0.5; steps 6-15 again (checkpoints 10 and 15 hold the
    # halved rates). Call 23 (step 18) fails: back to step 15, rates x0.25 of the start, not x0.5 of x0.5 of x0.5.
    inject(monkeypatch, (8, 23))
    rep = Silent()
    from aigc_cli.training.loop import train

    summary = train(cfg(**{"train.steps": "25"}), tmp_path / "r", rep)
    rollbacks = [n for n in rep.notes if "rolled back" in n]
    assert summary["recoveries"] == 2 and "to step 15" in rollbacks[1] and "x0.25" in rollbacks[1], rollbacks
    assert read_lr(tmp_path / "r") == pytest.approx(2e-4 * 0.25)


def test_two_rollbacks_to_a_snapshot_from_before_the_schedule_lower_its_rates_once_each(monkeypatch, tmp_path):
    """The start's snapshot has no base_lr (the schedule records it at its first step): restoring it kept the
    live base_lr, which the first rollback had halved, and the second halved it twice (x0.125, not x0.25)."""
    inject(monkeypatch, (2, 4))
    rep = Silent()
    from aigc_cli.training.loop import train

    summary = train(cfg(**{"train.lr_decay": "linear", "train.log_every": "1", "train.ckpt_every": "100",
                           "train.steps": "6"}), tmp_path / "r", rep)
    rollbacks = [n for n in rep.notes if "rolled back" in n]
    assert summary["recoveries"] == 2 and all("to step 0" in n for n in rollbacks), rollbacks
    from aigc_cli import checkpoint as ckpt_io

    [group] = json.loads(ckpt_io.load(tmp_path / "r").meta["aigc.opt.G.param_groups"])
    assert group["base_lr"] == pytest.approx(2e-4 * 0.25)


def test_fp16_switches_to_bf16_on_divergence(monkeypatch, tmp_path):
    inject(monkeypatch, 8)
    from aigc_cli.training.loop import train

    from aigc_cli.metrics.evaluate import TrainingEvaluator

    seen = []  # the precision each evaluation during training generated with
    monkeypatch.setattr(TrainingEvaluator, "__init__", lambda self, *a, **k: self.__dict__.update(metric="fid", setup="s"))
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: seen.append((step, amp.name))
                        or {"fid": 1.0 / step})
    rep = Silent()
    summary = train(cfg(**{"train.precision": "fp16", "train.eval_every": "5"}), tmp_path / "r", rep)
    assert summary["precision"] == "bf16"
    assert any("fp16 -> bf16" in n for n in rep.notes)
    assert seen[0] == (5, "fp16") and seen[-1] == (15, "bf16")  # not the fp16 it was built with
    assert 'precision = "bf16"' in (tmp_path / "r" / "config.toml").read_text()  # it said fp16 still


def test_persistent_nan_gives_up_with_exit_code_3(monkeypatch, tmp_path):
    calls = inject(monkeypatch, 8, forever=True)
    from aigc_cli.training.loop import train

    rep = Silent()
    with pytest.raises(DivergedError) as e:
        train(cfg(**{"train.max_recoveries": "2"}), tmp_path / "r", rep)
    rollbacks = [n for n in rep.notes if "rolled back" in n]
    assert "x0.5" in rollbacks[0] and "x0.25" in rollbacks[1]  # each retry lower than the last
    assert e.value.exit_code == 3
    message = str(e.value)
    assert "2 rollbacks did not help" in message and "step-0000005.safetensors" in message
    assert calls["n"] == 10 + 5 + 5  # the failing interval, then two retried ones: bounded work
    # The good checkpoint on disk is untouched and loads.
    from aigc_cli import checkpoint as ckpt_io

    assert ckpt_io.load(tmp_path / "r").step == 5


def test_nan_before_any_checkpoint_rolls_back_to_the_start(monkeypatch, tmp_path):
    inject(monkeypatch, 2)
    from aigc_cli.training.loop import train

    rep = Silent()
    train(cfg(), tmp_path / "r", rep)
    assert any("rolled back to step 0" in n for n in rep.notes)


def test_a_rollback_point_is_not_changed_by_the_training_after_it():
    """A second rollback before the next save restored moments that the steps after the first had updated
    in place: load_state_dict kept the rollback point's own tensors as the optimizer's state."""
    from aigc_cli.training import state

    class Batches:
        def position(self): return {"epoch": 0, "image": 0}
        def seek(self, epoch, image): pass

    class Amp:
        name, scaler = "fp32", None

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def train_step():
        opt.zero_grad()
        net(torch.randn(4, 3)).square().sum().backward()
        opt.step()

    train_step()
    good = state.capture(tiny("dcgan"), {"G": net}, {"G": opt}, Amp(), Batches(), 1, 4)
    before = {k: v.clone() for k, v in good[0].items()}
    for _ in range(2):  # two rollbacks to the same point, with training between
        state.restore(*good, {"G": net}, {"G": opt}, Amp(), Batches(), "the in-memory rollback point")
        train_step()
    for key, value in before.items():
        assert torch.equal(good[0][key], value), key


def test_moments_after_a_rollback_and_a_resume_are_in_their_parameters_layout(monkeypatch, tmp_path):
    """Snapshots and checkpoints hold contiguous moments; the parameters here are channels-last (the CPU's
    default too). Fused Adam on CUDA refuses mismatched strides, so every restore must conform them."""
    import aigc_cli.training.loop as loop_mod
    from aigc_cli import checkpoint as ckpt_io

    real, restores = loop_mod.conform_optimizers, []

    def checked(opts, flags):
        real(opts, flags)
        pairs = [(p, st[k]) for opt in opts.values() for p, st in opt.state.items() for k in ("exp_avg", "exp_avg_sq")]
        assert any(not p.is_contiguous() for p, _ in pairs)  # channels-last parameters: the case at hand
        assert all(m.stride() == p.stride() for p, m in pairs)
        restores.append(len(pairs))

    monkeypatch.setattr(loop_mod, "conform_optimizers", checked)
    inject(monkeypatch, 8)
    run = tmp_path / "r"
    assert loop_mod.train(cfg(), run, Silent())["recoveries"] == 1
    loop_mod.train(cfg(**{"train.steps": "20"}), run, Silent(), resume=ckpt_io.load(run / "checkpoints" / "last.safetensors"))
    assert len(restores) == 2  # the rollback and the resume


def test_a_save_between_log_lines_rolls_back_from_losses_that_are_not_finite(monkeypatch, tmp_path):
    """Step 8's loss is NaN; the next log line would be at 10, but train.ckpt_minutes saves at 9 first: that
    save must not store the NaN sums (a resume would read them back) nor become the rollback point."""
    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.training.loop import train
    from conftest import Timed

    inject(monkeypatch, 8)
    rep = Timed(7).on(monkeypatch)  # saves by time at steps 3, 6 and 9 (20 minutes, 7 a step)
    summary = train(cfg(**{"train.ckpt_every": "100", "train.ckpt_minutes": "20", "train.keep_checkpoints": "0"}),
                    tmp_path / "r", rep)
    assert summary["recoveries"] == 1
    assert any("(non-finite weights or losses at a checkpoint); rolled back to step 6" in n for n in rep.notes), rep.notes
    for path in (tmp_path / "r" / "checkpoints").glob("step-*.safetensors"):
        sums = json.loads(ckpt_io.load(path).meta["aigc.log_sums"])["sums"]
        assert all(math.isfinite(v) for v, _ in sums.values()), (path.name, sums)


def test_a_non_finite_gradient_is_caught_before_it_reaches_the_weights():
    from aigc_cli.training.state import all_finite

    net = torch.nn.Linear(2, 2)
    nets = {"G": net}
    net.weight.grad = torch.zeros(2, 2)
    assert all_finite(nets)
    net.weight.grad[0, 1] = float("nan")
    assert not all_finite(nets) and all_finite(nets, grads=False)  # fp16: the GradScaler's business
