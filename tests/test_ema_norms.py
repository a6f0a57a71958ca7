"""The EMA generator's own batch-norm statistics in checkpoints: measured at regular saves, not at saves a
signal asks for (the grace period), and then by whatever samples from such a file."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest
import torch

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.errors import DivergedError, Interrupted
from aigc_cli.export import export_generator
from aigc_cli.sampling import generator_from
from aigc_cli.training import ema as ema_mod
from aigc_cli.training.loop import train
from conftest import Silent, StopsAt, tiny

CFG = tiny("dcgan").with_overrides({"train.ema_decay": "0.9", "train.steps": "8", "train.log_every": "4",
                                    "train.ckpt_every": "4", "train.sample_every": "100"})


def norms(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ckpt_io.load(path).net_state("G_ema").items() if "running" in k}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Saved at step 4 (regular), then stopped by SIGTERM at step 5."""
    root = tmp_path_factory.mktemp("ema-norms")
    with pytest.raises(Interrupted):
        train(CFG, root, StopsAt(5))
    return root / "checkpoints"


def test_regular_saves_settle_and_a_signal_s_save_does_not(run):
    regular, stopped = (ckpt_io.load(run / f"step-000000{k}.safetensors") for k in (4, 5))
    assert regular.meta[ema_mod.EMA_NORMS_KEY] == "settled" and stopped.meta[ema_mod.EMA_NORMS_KEY] == "copied"
    for ck in (regular, stopped):
        own, live = ck.net_state("G_ema"), ck.net_state("G")
        stats = [k for k in own if k.endswith("running_var")]
        assert stats and all(torch.equal(own[k], live[k]) == (ck is stopped) for k in stats)


def test_sampling_from_a_file_with_copied_statistics_measures_them(run, tmp_path):
    said = []
    G, _ = generator_from(ckpt_io.load(run / "step-0000005.safetensors"), "cpu", "fp32", warn=said.append)
    assert len(said) == 1 and "step-0000005.safetensors holds the live G's" in said[0]
    copied = norms(run / "step-0000005.safetensors")
    mine = {k: v for k, v in G.state_dict().items() if "running" in k}
    assert mine.keys() == copied.keys() and all(not torch.equal(mine[k], copied[k]) for k in mine if "var" in k)

    said.clear()
    export_generator(ckpt_io.load(run / "step-0000005.safetensors"), tmp_path / "g.safetensors", "fp32", warn=said.append)
    assert len(said) == 1 and "holds the live G's" in said[0]
    exported = ckpt_io.load(tmp_path / "g.safetensors")
    assert exported.meta[ema_mod.EMA_NORMS_KEY] == "settled"
    assert all(torch.equal(v, mine[k]) for k, v in norms(tmp_path / "g.safetensors").items())
    for settled in (run / "step-0000004.safetensors", tmp_path / "g.safetensors"):  # measured once is enough
        said.clear()
        G, _ = generator_from(ckpt_io.load(settled), "cpu", "fp32", warn=said.append)
        assert said == [] and all(torch.equal(G.state_dict()[k], v) for k, v in norms(settled).items())


def test_statistics_that_are_not_finite_are_never_saved(tmp_path, monkeypatch):
    """The settle ran inside save(), after the finite check: a NaN it produced was written and became the
    rollback point."""
    real = ema_mod.settle_norm_stats

    def poisoned(model, cfg, autocast, should_stop=None):
        real(model, cfg, autocast, should_stop)
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(float("nan"))
        return True

    monkeypatch.setattr(ema_mod, "settle_norm_stats", poisoned)
    with pytest.raises(DivergedError):
        train(CFG, tmp_path / "run", Silent())
    assert not list((tmp_path / "run" / "checkpoints").glob("*.safetensors"))


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_signal_at_a_grid_step_does_not_wait_for_the_statistics(tmp_path, monkeypatch, when):
    """The grid at step 4 measured them first, although its checkpoint is for the signal: 20-70 s of the
    grace period for an SNGAN on a CPU. Whether the signal came before the grid or while it measured."""
    real, asked = ema_mod.settle_norm_stats, []

    def signalled(model, cfg, autocast, should_stop=None):
        def ask():
            asked.append(1)
            if len(asked) == 2 and when == "during":
                os.kill(os.getpid(), signal.SIGTERM)
            return should_stop is not None and should_stop()
        return real(model, cfg, autocast, ask)

    monkeypatch.setattr(ema_mod, "settle_norm_stats", signalled)
    cfg = CFG.with_overrides({"train.sample_every": "4", "train.ckpt_every": "100"})
    with pytest.raises(Interrupted) as e:
        train(cfg, tmp_path, StopsAt(4 if when == "before" else 100))
    assert e.value.exit_code == 143
    ck = ckpt_io.load(tmp_path / "checkpoints" / "step-0000004.safetensors")
    assert ck.meta[ema_mod.EMA_NORMS_KEY] == "copied"
    own, live = ck.net_state("G_ema"), ck.net_state("G")
    assert all(torch.equal(own[k], live[k]) for k in own if "running" in k)
    assert (tmp_path / "samples" / "step-0000004.png").is_file()  # drawn all the same
    assert len(asked) <= 4  # not 2048 / 16 batches


def test_eval_s_protocol_says_whether_it_measured_the_statistics(run, tmp_path):
    from aigc_cli.metrics import evaluate as evaluate_mod

    train(tiny("classifier").with_overrides({"train.steps": "5"}), tmp_path / "clf", Silent())
    extractor = evaluate_mod.ClassifierFeatures(str(tmp_path / "clf"), torch.device("cpu"), "fp32")
    said = {}
    for step, ema in ((4, True), (5, True), (5, False)):
        r = evaluate_mod.evaluate(ckpt_io.load(run / f"step-000000{step}.safetensors"), metrics=["is"],
                                  extractor=extractor, data="shapes", root=None, download=False, features=None,
                                  n=16, batch_size=16, seed=0, device="cpu", precision="fp32", warn=print,
                                  stats_dir=None, ema=ema)
        said[step, ema] = r["protocol"].get("ema_norms")
    assert said == {(4, True): "as saved", (5, True): "measured on loading", (5, False): None}


@pytest.mark.parametrize("at, exit_on_usr1, measured, saved", [
    (4, False, [True, True], "settled"),  # the run goes on: no grace period to fit in
    (4, True, [None, None], "copied"),    # it exits after its save: as SIGTERM (the grid, the save)
    (8, True, [True, True], "settled"),   # at the last step: the run ends complete, its checkpoint measured
])
def test_sigusr1_hurries_the_statistics_only_when_the_run_exits_after_its_save(tmp_path, monkeypatch, at,
                                                                              exit_on_usr1, measured, saved):
    real, results = ema_mod.settle_norm_stats, []
    monkeypatch.setattr(ema_mod, "settle_norm_stats",
                        lambda *a, **k: results.append(real(*a, **k)) or results[-1])

    class UsrAt(Silent):
        def advance(self, step):
            if step == at:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg = CFG.with_overrides({"train.sample_every": "4", "train.ckpt_every": "100"})
    with pytest.raises(Interrupted) if (at, exit_on_usr1) == (4, True) else contextlib.nullcontext():
        train(cfg, tmp_path, UsrAt(), exit_on_usr1=exit_on_usr1)
    assert results == measured  # a None: cut short (the grid drawn with the live G's statistics)
    assert ckpt_io.load(tmp_path / "checkpoints" / f"step-000000{at}.safetensors").meta[ema_mod.EMA_NORMS_KEY] == saved
