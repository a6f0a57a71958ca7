"""Evaluation during training: train.eval_every scores the (EMA) generator, logs the metric to
metrics.jsonl and keeps best.safetensors at the evaluation that measured the best value."""

from __future__ import annotations

import contextlib
import json

import pytest

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.training.loop import train
from conftest import Silent, tiny


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("clf")
    train(tiny("classifier").with_overrides({"train.steps": "30"}), root / "clf", Silent())
    return root / "clf"


def run_with_eval(tmp_path, classifier, metric: str, **extra):
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "20", "train.eval_every": "5", "train.eval_n": "48", "train.eval_metric": metric,
        "train.eval_features": str(classifier), "train.ckpt_every": "20", "train.keep_checkpoints": "1",
        "train.ema_decay": "0.9", **extra})
    rep = Silent()
    summary = train(cfg, tmp_path / "run", rep)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r[metric] for r in lines if metric in r}
    return summary, rep, evals


def test_best_checkpoint_is_the_best_real_fid(tmp_path, classifier):
    summary, rep, evals = run_with_eval(tmp_path, classifier, "fid")
    assert sorted(evals) == [5, 10, 15, 20]
    assert len(set(evals.values())) > 1  # the generator changed between evaluations
    best_step = min(evals, key=evals.get)
    best = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert best.step == best_step and summary["best"]["value"] == pytest.approx(evals[best_step])


# Scripted values, so the best is neither the first nor the last evaluation, in both directions.
SCRIPTED = {"fid": ({5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0}, 10), "is": ({5: 1.5, 10: 2.0, 15: 3.5, 20: 2.5}, 15)}


@pytest.mark.parametrize("metric", list(SCRIPTED))
def test_best_checkpoint_is_the_best_evaluation(tmp_path, classifier, metric, monkeypatch):
    values, best_step = SCRIPTED[metric]
    from aigc_cli.metrics.evaluate import TrainingEvaluator
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {metric: values[step]})
    summary, rep, evals = run_with_eval(tmp_path, classifier, metric)
    assert evals == values
    best = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert best.step == best_step
    assert json.loads(best.meta["aigc.best_value"]) == pytest.approx(evals[best_step])
    assert summary["best"]["metric"] == metric and summary["best"]["value"] == pytest.approx(evals[best_step])
    # Every new best was announced, and the console saw each evaluation.
    assert any(f"new best {metric}" in n for n in rep.notes)
    assert [r["step"] for r in rep.records if r.get("eval")] == [5, 10, 15, 20]
    # keep_checkpoints=1 prunes old step files, but best.safetensors stays a loadable file.
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()


def test_resume_keeps_the_best_value(tmp_path, classifier):
    run_with_eval(tmp_path, classifier, "fid")
    best_before = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors")
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "25", "train.eval_every": "5", "train.eval_n": "48", "train.eval_features": str(classifier),
        "train.ckpt_every": "20", "train.keep_checkpoints": "1", "train.ema_decay": "0.9"})
    last = ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.safetensors")
    summary = train(cfg, tmp_path / "run", Silent(), resume=last)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = {r["step"]: r["fid"] for r in lines if "fid" in r}
    assert sorted(fids) == [5, 10, 15, 20, 25]
    best = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors")
    expected = min(fids, key=fids.get)
    assert best.step == expected and summary["best"]["value"] == pytest.approx(fids[expected])
    if expected != 25:  # the resumed run compared against the restored best, not against nothing
        assert best.step == best_before.step


def test_cli_prints_evaluations(aigc, tmp_path, classifier):
    r = aigc("train", "--preset", "quickstart", "--out", tmp_path / "run", "--steps", "6",
             "--set", "train.eval_every=3", "--set", "train.eval_n=32", "--set", f"train.eval_features={classifier}",
             "--set", "model.channels=1", "--set", "model.resolution=16", "--set", "data.limit=256",
             "--set", "model.g_width=8", "--set", "model.d_width=8", "--batch-size", "16")
    assert r.code == 0, r.stderr
    assert "eval at step 3/6" in r.stdout and "eval at step 6/6" in r.stdout and "fid" in r.stdout
    assert "new best fid" in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file()


def test_eval_metric_must_match_best_metric():
    from aigc_cli.errors import UsageError
    with pytest.raises(UsageError, match="eval_every"):
        tiny("dcgan").with_overrides({"train.best_metric": "fid"})
    with pytest.raises(UsageError, match="generative"):
        tiny("classifier").with_overrides({"train.eval_every": "5"})


def test_missing_inception_weights_fail_before_anything_is_written(tmp_path, monkeypatch):
    from aigc_cli.errors import UsageError
    monkeypatch.setenv("AIGC_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    cfg = tiny("dcgan").with_overrides({"train.eval_every": "5", "train.eval_n": "16"})
    with pytest.raises(UsageError, match="missing.pth") as e:
        train(cfg, tmp_path / "run", Silent())
    assert str(e.value).startswith("evaluation during training (train.eval_every=5): ")
    assert not (tmp_path / "run").exists()
    # a checkpoint that is not a classifier is named by the setting that gave it
    gan = tmp_path / "gan"
    train(tiny("dcgan").with_overrides({"train.steps": 2}), gan, Silent())
    with pytest.raises(UsageError, match=f"train.eval_features {gan}: expected a classifier checkpoint"):
        train(cfg.with_overrides({"train.eval_features": str(gan)}), tmp_path / "run", Silent())


def test_a_classifier_run_folder_whose_last_checkpoint_is_damaged_gives_its_newest_readable_one(tmp_path, classifier):
    import shutil

    clf = tmp_path / "clf"
    shutil.copytree(classifier, clf)  # last.safetensors becomes a file of its own, not a link
    last = clf / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])
    cfg = tiny("dcgan").with_overrides({"train.steps": "5", "train.eval_every": "5", "train.eval_n": "16",
                                        "train.eval_features": str(clf)})
    rep = Silent()
    train(cfg, tmp_path / "run", rep)
    [said] = [n for n in rep.notes if "not a readable safetensors checkpoint" in n]
    assert said.startswith(f"train.eval_features {last}: ") and "using " in said and "step-0000030" in said, said
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("fid" in r for r in evals)


def test_images_per_second_leave_evaluation_time_out(tmp_path, classifier, monkeypatch):
    import time
    from aigc_cli.metrics.evaluate import TrainingEvaluator

    # The evaluation "takes" 1000 s on a clock that only it advances: counted, a 5-step interval of 16-image
    # batches would show under 0.08 img/s; not counted, it shows the training rate, whatever the load.
    offset = [0.0]
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: real() + offset[0])

    def slow(self, G, step, amp=None, **kw):
        offset[0] += 1000.0
        return {"fid": 1.0}

    monkeypatch.setattr(TrainingEvaluator, "__call__", slow)
    _, rep, _ = run_with_eval(tmp_path, classifier, "fid", **{"train.log_every": "5"})
    rates = [r["img_per_s"] for r in rep.records if not r.get("eval")]
    assert len(rates) == 4 and min(rates[1:]) > 1, rates


def resume_to_30(tmp_path, classifier, **changed):
    """The run of run_with_eval("fid"), resumed to step 30 with `changed` evaluation settings."""
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "30", "train.eval_every": "5", "train.eval_n": "48", "train.eval_metric": "fid",
        "train.eval_features": str(classifier), "train.ckpt_every": "20", "train.ema_decay": "0.9", **changed})
    rep = Silent()
    summary = train(cfg, tmp_path / "run", rep, resume=ckpt_io.load(tmp_path / "run" / "checkpoints" / "last.safetensors"))
    return summary, rep


def test_resume_with_another_eval_metric_starts_the_best_afresh(tmp_path, classifier, monkeypatch):
    from aigc_cli.metrics.evaluate import TrainingEvaluator
    values = {"fid": {5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0}, "is": {25: 1.5, 30: 2.0}}
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {self.metric: values[self.metric][step]})
    run_with_eval(tmp_path, classifier, "fid")
    summary, rep = resume_to_30(tmp_path, classifier, **{"train.eval_metric": "is"})
    assert any("chosen by fid" in n and "from now on by is" in n for n in rep.notes), rep.notes
    best = ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert summary["best"] == {"metric": "is", "value": 2.0, "path": str(tmp_path / "run" / "checkpoints" / "best.safetensors")}
    assert best.step == 30  # IS 2.0 beat IS 1.5; FID 4.0 from before was not compared with them


def test_resume_with_other_eval_features_or_n_starts_the_best_afresh(tmp_path, classifier, monkeypatch):
    from aigc_cli.metrics.evaluate import TrainingEvaluator
    values = {5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0, 25: 30.0, 30: 20.0}  # the new setup's FIDs are larger
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {"fid": values[step]})
    run_with_eval(tmp_path, classifier, "fid")
    summary, rep = resume_to_30(tmp_path, classifier, **{"train.eval_n": "40"})
    assert any("other train.eval_features weights, real images or train.eval_n" in n for n in rep.notes), rep.notes
    assert summary["best"]["value"] == 20.0 and ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors").step == 30


def test_new_weights_at_the_same_eval_features_path_start_the_best_afresh(tmp_path, classifier, monkeypatch):
    # A classifier run folder trained on: the same path, other features. FIDs in them were compared with the old.
    import shutil

    from aigc_cli.metrics.evaluate import TrainingEvaluator

    clf = tmp_path / "clf"
    shutil.copytree(classifier, clf)
    values = {5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0, 25: 30.0, 30: 20.0}
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {"fid": values[step]})
    run_with_eval(tmp_path, clf, "fid")
    train(tiny("classifier").with_overrides({"train.steps": "32"}), clf, Silent(), resume=ckpt_io.load(clf))
    summary, rep = resume_to_30(tmp_path, clf)
    assert any("other train.eval_features weights" in n for n in rep.notes), rep.notes
    assert summary["best"]["value"] == 20.0 and ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors").step == 30


def test_a_resume_with_nothing_to_train_reports_the_best_file_there(tmp_path, classifier, monkeypatch):
    # It reported the best recorded in the checkpoint resumed from, which came before best.safetensors.
    from aigc_cli.metrics.evaluate import TrainingEvaluator

    values = {5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0}
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {"fid": values[step]})
    run_with_eval(tmp_path, classifier, "fid", **{"train.ckpt_every": "5", "train.keep_checkpoints": "0"})
    early = ckpt_io.load(tmp_path / "run" / "checkpoints" / "step-0000005.safetensors")
    cfg = early.config.with_overrides({"train.steps": "5"})
    summary = train(cfg, tmp_path / "run", Silent(), resume=early)
    assert summary["best"]["value"] == 4.0 and ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors").step == 10


def test_a_resume_without_evaluation_keeps_the_best_for_a_later_one_with_it(tmp_path, classifier, monkeypatch):
    # Each checkpoint of the run without evaluation recorded no best, so the next resume with evaluation
    # started afresh and its first FID, worse than the best's, replaced best.safetensors as "new best".
    from aigc_cli.metrics.evaluate import TrainingEvaluator

    values = {5: 9.0, 10: 4.0, 15: 6.0, 20: 5.0, 30: 7.0}
    monkeypatch.setattr(TrainingEvaluator, "__call__", lambda self, G, step, amp=None, **kw: {"fid": values[step]})
    run_with_eval(tmp_path, classifier, "fid")
    off = tiny("dcgan").with_overrides({"train.steps": "25", "train.ckpt_every": "20", "train.ema_decay": "0.9"})
    rep = Silent()
    train(off, tmp_path / "run", rep, resume=ckpt_io.load(tmp_path / "run"))
    assert any("chosen by fid; no longer updated" in n for n in rep.notes), rep.notes
    summary, rep = resume_to_30(tmp_path, classifier)
    assert not any("best.safetensors was chosen" in n for n in rep.notes), rep.notes
    assert summary["best"]["value"] == 4.0 and ckpt_io.load(tmp_path / "run" / "checkpoints" / "best.safetensors").step == 10


def test_evaluation_on_a_streamed_folder_with_no_readable_image_is_one_usage_error(tmp_path, classifier):
    from aigc_cli.errors import UsageError

    src = tmp_path / "garbage"
    src.mkdir()
    for i in range(20):
        (src / f"{i}.png").write_text(f"not an image {i}")
    cfg = tiny("dcgan").with_overrides({"data.source": str(src), "data.device_max_mb": "0", "train.batch_size": "4",
                                        "train.eval_every": "2", "train.eval_n": "10",
                                        "train.eval_features": str(classifier)})
    with pytest.raises(UsageError, match="could be decoded"):
        train(cfg, tmp_path / "run", Silent())


@pytest.mark.parametrize("strict", [False, True])
def test_an_evaluation_image_of_a_streamed_folder_that_does_not_decode_is_said(tmp_path, classifier, monkeypatch, strict):
    """The evaluator's real images from a streamed folder: a bad file is replaced by the next one with a
    warning, or stops the run under data.strict, as `aigc eval` and streamed training treat it (it was
    replaced silently, --strict or not)."""
    import numpy as np
    from PIL import Image
    from aigc_cli.data import load_images
    from aigc_cli.errors import UsageError
    from aigc_cli.metrics.evaluate import TrainingEvaluator
    import torch
    from aigc_cli.training.precision import Precision

    src = tmp_path / "pngs"
    src.mkdir()
    for i in range(12):
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(src / f"{i:02d}.png")
    (src / "05.png").write_bytes(b"not a png")
    monkeypatch.setenv("AIGC_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tiny("dcgan").with_overrides({"data.source": str(src), "data.strict": str(strict).lower(),
                                        "train.eval_every": "2", "train.eval_n": "12",
                                        "train.eval_features": str(classifier)})
    images = load_images(str(src), channels=1, resolution=16, cache=False, lazy_above_mb=0).images
    said = []
    make = lambda: TrainingEvaluator(cfg, torch.device("cpu"), Precision("fp32", torch.device("cpu")), said.append,
                                     images=images, stats_dir=None)
    if strict:
        with pytest.raises(UsageError, match="cannot use image file 05.png"):
            make()
    else:
        make()
        assert any("skipping 05.png" in s and "06.png is used in its place" in s for s in said), said


def test_lazy_training_data_decodes_only_the_evaluation_images(tmp_path, classifier, monkeypatch):
    """A folder streamed because it is large: the evaluator picks eval_n of its images, it does not
    decode (and cache) the whole folder."""
    import numpy as np
    from PIL import Image
    from aigc_cli.data import folder as folder_mod

    src = tmp_path / "pngs"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(src / f"{i:03d}.png")
    decoded = []
    original = folder_mod.decode
    monkeypatch.setattr(folder_mod, "decode", lambda path, *a, **k: decoded.append(path) or original(path, *a, **k))
    cfg = tiny("dcgan").with_overrides({
        "data.source": str(src), "data.limit": "0", "data.device_max_mb": "0", "data.workers": "0",
        "train.steps": "2", "train.eval_every": "2", "train.eval_n": "12", "train.eval_features": str(classifier)})
    summary = train(cfg, tmp_path / "run", Silent())
    assert summary["steps"] == 2
    # The lazy folder decodes through its own reference to decode(); this patched one counts only the
    # eager whole-folder load that must not happen.
    assert decoded == []


def test_a_signal_during_an_evaluation_stops_it_and_saves(tmp_path, classifier, monkeypatch):
    import os
    import signal

    from aigc_cli.errors import Interrupted
    from aigc_cli.metrics.evaluate import FakeEmbedder

    batches = []
    real_add = FakeEmbedder.add

    def add(self, images, batch_size):
        batches.append(len(images))
        if len(batches) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the batch system's notice, mid-evaluation
        return real_add(self, images, batch_size)

    monkeypatch.setattr(FakeEmbedder, "add", add)
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "20", "train.eval_every": "5", "train.eval_n": "200", "train.eval_metric": "fid",
        "train.eval_features": str(classifier), "train.ckpt_every": "20", "train.batch_size": "16"})
    rep = Silent()
    with pytest.raises(Interrupted) as e:
        train(cfg, tmp_path / "run", rep)
    assert e.value.exit_code == 143 and len(batches) == 1  # not the other 200/16 - 1 batches
    assert any("evaluation at step 5 was stopped by a signal" in n for n in rep.notes), rep.notes
    assert ckpt_io.load(tmp_path / "run").step == 5
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in lines if "fid" in r]
    # The resume does that evaluation first (with the same weights), or its record, and a best found
    # there, were lost for good: the same FIDs and best as a run that was never stopped.
    from aigc_cli.training.state import find_resume

    monkeypatch.setattr(FakeEmbedder, "add", real_add)
    fork = Silent()  # a fork of that checkpoint has nothing skipped to redo: its first evaluation is its own
    train(cfg.with_overrides({"train.steps": "6"}), tmp_path / "fork", fork,
          resume=find_resume(str(tmp_path / "run" / "checkpoints" / "step-0000005.safetensors"), tmp_path / "fork", print))
    assert not any("did not run before the stop" in n for n in fork.notes), fork.notes
    rep = Silent()
    train(cfg, tmp_path / "run", rep, resume=find_resume("auto", tmp_path / "run", print))
    assert any("the evaluation due at step 5 did not run before the stop" in n for n in rep.notes), rep.notes
    train(cfg, tmp_path / "whole", Silent())

    def fids(run):
        return {r["step"]: r["fid"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "fid" in r}

    assert fids(tmp_path / "run") == fids(tmp_path / "whole") and sorted(fids(tmp_path / "whole")) == [5, 10, 15, 20]
    best = {name: ckpt_io.read_meta(tmp_path / name / "checkpoints" / "best.safetensors") for name in ("run", "whole")}
    assert best["run"]["aigc.step"] == best["whole"]["aigc.step"]
    assert best["run"]["aigc.best_value"] == best["whole"]["aigc.best_value"]


def test_a_signal_while_the_reference_is_computed_stops_before_the_first_step(tmp_path, classifier, monkeypatch):
    """The real images' statistics come before step 1 (minutes on a CPU with Inception): a SIGTERM then
    stops them at their next batch, not after all of them, and nothing is written."""
    import os
    import signal

    from aigc_cli.errors import Interrupted
    from aigc_cli.metrics.reference import FeatureStats

    batches = []
    real_add = FeatureStats.add

    def add(self, features):
        batches.append(len(features))
        if len(batches) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_add(self, features)

    monkeypatch.setattr(FeatureStats, "add", add)
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "20", "train.eval_every": "5", "train.eval_n": "200", "train.eval_features": str(classifier),
        "train.batch_size": "16"})
    with pytest.raises(Interrupted) as e:
        train(cfg, tmp_path / "run", Silent())
    assert e.value.exit_code == 143 and len(batches) == 1, batches  # not the other 200/16 - 1 batches
    assert str(e.value) == "SIGTERM while computing the real images' statistics, before the first step; nothing to save"
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_signal_at_the_last_step_skips_the_final_evaluation_and_says_so(tmp_path, classifier):
    """The run is complete (exit 0), but the final FID it would have logged was not measured."""
    import os
    import signal

    class TermAtLast(Silent):
        def advance(self, step):
            if step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny("dcgan").with_overrides({
        "train.steps": "6", "train.eval_every": "5", "train.eval_n": "32", "train.eval_features": str(classifier),
        "train.batch_size": "16"})
    rep = TermAtLast()
    summary = train(cfg, tmp_path / "run", rep)
    assert summary["steps"] == 6 and rep.notes[-1] == ("SIGTERM came at the last step, 6: the run is complete; "
                                                       "skipped the final evaluation (`aigc eval` measures it)")
    evaluated = [json.loads(s)["step"] for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if "fid" in s]
    assert evaluated == [5]

    class TermAfterTheLastEvaluation(Silent):
        def log(self, record):
            super().log(record)
            if record.get("eval") and record["step"] == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    rep = TermAfterTheLastEvaluation()
    train(cfg, tmp_path / "run2", rep)  # the final evaluation was made: nothing skipped to speak of
    assert rep.notes[-1] == "SIGTERM came at the last step, 6: the run is complete"


def test_sigusr1_with_exit_on_usr1_lets_the_final_evaluation_finish(tmp_path, classifier, monkeypatch):
    """At the last step there is nothing to requeue: SIGUSR1 (--exit-on-usr1) used to stop the final
    evaluation and the run ended complete, exit 0, without its FID and without a word."""
    import os
    import signal

    from aigc_cli.metrics.evaluate import FakeEmbedder

    sent, real_add = [], FakeEmbedder.add

    def add(self, images, batch_size):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_add(self, images, batch_size)

    monkeypatch.setattr(FakeEmbedder, "add", add)
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "4", "train.eval_every": "4", "train.eval_n": "48", "train.eval_metric": "fid",
        "train.eval_features": str(classifier), "train.ckpt_every": "4"})
    summary = train(cfg, tmp_path / "run", Silent(), exit_on_usr1=True)
    assert sent and summary["steps"] == 4
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "fid" in r] == [4]


def test_a_pending_sigusr1_with_exit_on_usr1_skips_the_evaluation_as_a_pending_sigterm_does(tmp_path, classifier):
    """The evaluation started, built the fake side and stopped at its first batch; the README says a pending
    stop skips it. The resume evaluates that step first, so nothing is lost."""
    import os
    import signal

    from aigc_cli.errors import Interrupted

    class Usr1At(Silent):
        def advance(self, step):
            if step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)

    cfg = tiny("dcgan").with_overrides({
        "train.steps": "8", "train.eval_every": "5", "train.eval_n": "32", "train.eval_metric": "fid",
        "train.eval_features": str(classifier), "train.ckpt_every": "100", "train.sample_every": "100"})
    rep = Usr1At()
    with pytest.raises(Interrupted) as stopped:
        train(cfg, tmp_path / "run", rep, exit_on_usr1=True)
    assert stopped.value.exit_code == 75
    assert not [n for n in rep.notes if "evaluation" in n], rep.notes
    assert not [r for r in (json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    resumed = Silent()
    train(cfg, tmp_path / "run", resumed, resume=ckpt_io.load(tmp_path / "run"))
    fids = [r["step"] for r in (json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "fid" in r]
    assert fids == [5, 8], fids


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_signal_while_the_ema_statistics_are_measured_for_an_evaluation(tmp_path, classifier, monkeypatch, sig):
    """SIGTERM (or SIGUSR1 with --exit-on-usr1) stops the measuring, and the evaluation, which never scores
    the EMA with the live G's statistics; a SIGUSR1 that lets the run go on lets both finish, as before."""
    import os
    import signal

    from aigc_cli.errors import Interrupted
    from aigc_cli.training import ema as ema_mod

    real, asked = ema_mod.settle_norm_stats, []

    def signalled(model, cfg, autocast, should_stop=None):
        def ask():
            asked.append(1)
            if len(asked) == 2:
                os.kill(os.getpid(), getattr(signal, sig))
            return should_stop is not None and should_stop()
        return real(model, cfg, autocast, ask)

    monkeypatch.setattr(ema_mod, "settle_norm_stats", signalled)
    cfg = tiny("dcgan").with_overrides({
        "train.steps": "6", "train.eval_every": "5", "train.eval_n": "48", "train.eval_metric": "fid",
        "train.eval_features": str(classifier), "train.ckpt_every": "100", "train.sample_every": "100",
        "train.ema_decay": "0.9"})
    for exit_on_usr1 in ((False, True) if sig == "SIGUSR1" else (False,)):
        asked.clear()
        run, rep = tmp_path / f"run-{exit_on_usr1}", Silent()
        stops = sig == "SIGTERM" or exit_on_usr1
        with pytest.raises(Interrupted) if stops else contextlib.nullcontext():
            train(cfg, run, rep, exit_on_usr1=exit_on_usr1)
        lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        ck = ckpt_io.load(run / "checkpoints" / "step-0000005.safetensors")
        if stops:
            assert len(asked) <= 3 and not [r for r in lines if "fid" in r]
            assert any("evaluation at step 5 was stopped by a signal" in n for n in rep.notes), rep.notes
            assert ck.meta[ema_mod.EMA_NORMS_KEY] == "copied"
        else:  # the run's end measures again at step 6 (a new EMA): two whole measurements
            assert len(asked) == 2 * round(ema_mod.NORM_STATS_IMAGES / 16)
            assert [r["step"] for r in lines if "fid" in r] == [5, 6]
            assert ck.meta[ema_mod.EMA_NORMS_KEY] == "settled"


def test_best_by_one_eval_metric_while_evaluating_another_is_refused():
    from aigc_cli.errors import UsageError

    with pytest.raises(UsageError, match="train.best_metric=kid needs train.eval_every > 0 and train.eval_metric=kid"):
        tiny("dcgan").with_overrides({"train.eval_every": "5", "train.eval_metric": "fid", "train.best_metric": "kid"})
    tiny("dcgan").with_overrides({"train.eval_every": "5", "train.eval_metric": "kid", "train.best_metric": "kid"})
