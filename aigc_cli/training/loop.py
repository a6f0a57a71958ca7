"""train(cfg, run_dir): the whole training run in one readable function."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..checkpoint import Checkpoint
from ..config import EVAL_METRICS, MAX_WIDTH, Config, unused_settings
from ..data import load_images
from ..data.folder import unlabelled_reason
from ..data.lazy import pick
from ..errors import DivergedError, Interrupted, UsageError, counted
from ..models import FAMILIES, build_nets, needs_labels
from ..sampling import from_uint8, generate, latents, save_grid, to_uint8
from . import fusion, state, subpixel
from .augment import parse_policy
from .batches import make_batches
from .ema import EMA, EMA_NORMS_KEY
from .graph import GraphedStep, use_graph
from .precision import Precision, resolve_device, resolve_precision, slow_precision_note
from .run_folder import RunFolder, run_lock
from .schedule import lr_factor, set_lr
from .signals import USR1_EXIT_CODE, StopFlag, StoppedNow
from .steps import STEPS, Aids, conform_optimizers, make_optimizers, optimizer_flags


class Reporter(Protocol):
    def start(self, total_steps: int, info: dict) -> None: ...
    def log(self, record: dict) -> None: ...
    def advance(self, step: int) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


# train.ckpt_minutes' clock; tests replace it to make minutes pass between steps.
clock = time.monotonic


def save_due(minutes: float) -> float:
    """When the next checkpoint by time is due (train.ckpt_minutes; 0: never)."""
    return clock() + minutes * 60 if minutes else math.inf


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def schedule_jump_note(opts, step: int, steps: int, cfg: Config, note) -> None:
    """A schedule decays over the run's length: resumed with another length (--steps, --epochs), the rate
    moves at once to where the new schedule has it, up or down. That is meant, but it should not surprise."""
    group = next(iter(opts.values())).param_groups[0]
    if not group.get("base_lr"):
        return
    before = group["lr"] / group["base_lr"]  # the factor of the last step taken, by the schedule it followed
    then = lr_factor(step - 1, steps, cfg.train.lr_warmup, cfg.train.lr_decay)  # that step's, by the new one
    after = lr_factor(step, steps, cfg.train.lr_warmup, cfg.train.lr_decay)
    if abs(then - before) > 0.01 * max(before, then):
        note(f"the learning-rate schedule now spans {steps:,} steps: the rates move from {before:.3g} to {after:.3g} "
             f"of their base at step {step + 1:,}")


def total_steps(cfg: Config, n_images: int, step: int = 0, position: dict | None = None) -> int:
    """train.steps, or for train.epochs the steps that show the data that many times: the batches of
    those epochs (each drops its last partial batch), n_critic of them a step for a GAN with critic
    steps. A resumed run (at `step`, its data at `position`, the epoch and the images of it drawn)
    counts the batches left at this batch size, so a batch size changed on resume still makes N passes."""
    if not cfg.train.epochs:
        return cfg.train.steps
    bs, epochs = cfg.train.batch_size, cfg.train.epochs
    epoch, image = (position["epoch"], position["image"]) if position else (0, 0)
    if epoch >= epochs:
        return step
    # a resume on data that has shrunk below the images already drawn: that epoch is over, not negative
    left = max(0, n_images - image) // bs + (epochs - epoch - 1) * (n_images // bs)
    return step + left // cfg.train.n_critic if position else max(1, left // cfg.train.n_critic)


BEST_SETUP_KEY = "aigc.best_setup"  # TrainingEvaluator.setup of the evaluation that measured the best


def best_metric(cfg: Config) -> tuple[str | None, bool]:
    """The logged value that picks best.safetensors, and whether higher is better. With evaluation
    during training, a generative model's best is by its eval metric (DCGAN's FID is known to get
    worse late in training: users need the best weights, not the last)."""
    name = cfg.train.best_metric
    if name == "auto":
        if cfg.train.eval_every and FAMILIES[cfg.model.kind].generative:
            name = cfg.train.eval_metric
        else:
            name = {"vae": "neg_elbo", "classifier": "loss"}.get(FAMILIES[cfg.model.kind].objective, "none")
    higher = "acc" in name or name in ("is", "precision", "recall", "img_per_s")
    return (None, False) if name == "none" else (name, higher)


def eval_setup(cfg: Config) -> tuple:
    """What an evaluation metric's value depends on besides the weights. The classifier as a resolved
    path: `aigc train` stores it absolute, runs from before that hold it relative (to this folder, when
    resumed from where they were started)."""
    features = cfg.train.eval_features
    return (str(Path(features).expanduser().resolve()) if features else ""), cfg.train.eval_n


def grid_labels(cfg: Config) -> tuple[torch.Tensor | None, int]:
    """Labels for the training grids and images per row: a conditional model gets one class per row."""
    if not cfg.model.conditional:
        return None, max(1, int(math.sqrt(cfg.train.n_samples)))
    per_class = max(1, cfg.train.n_samples // cfg.model.num_classes)
    return torch.arange(cfg.model.num_classes).repeat_interleave(per_class), per_class


def apply_changed_optimizer_settings(old: Config, new: Config, opts: dict) -> None:
    """Restoring an optimizer brings back its saved learning rate and betas; a resume that changes
    them in the config means the new values (unchanged ones keep the saved state, so resumes stay exact)."""
    t0, t1 = old.train, new.train
    for name, opt in opts.items():
        lr_key = "lr_d" if name == "D" else "lr_g"
        for group in opt.param_groups:
            if getattr(t0, lr_key) != getattr(t1, lr_key):
                group["lr"] = group["base_lr"] = getattr(t1, lr_key)
            if (t0.beta1, t0.beta2) != (t1.beta1, t1.beta2):
                group["betas"] = (t1.beta1, t1.beta2)


def channels_last(cfg: Config, device: torch.device, nets: dict, note=None) -> bool:
    """channels-last suits cuDNN's tensor-core convolutions and oneDNN's CPU ones alike (measured: the
    fp32 64x64 DCGAN step 1.19x faster on 2 CPU cores); auto turns it on for conv models on both."""
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for net in nets.values() for m in net.modules())
    if cfg.train.channels_last == "on" and not has_conv and note is not None:
        note(f"train.channels_last=on: {cfg.model.kind} has no convolutions, so it changes nothing")
    auto = device.type in ("cuda", "cpu")
    return has_conv and (cfg.train.channels_last == "on" or cfg.train.channels_last == "auto" and auto)


def load_data(cfg: Config, split: str, warn):
    """A training folder larger than data.device_max_mb comes back lazy (decoded on demand, streamed)."""
    return load_images(cfg.data.source, channels=cfg.model.channels, resolution=cfg.model.resolution,
                       root=cfg.data.root or None, download=cfg.data.download and split == "train", split=split,
                       limit=cfg.data.limit, seed=cfg.train.seed, warn=warn, strict=cfg.data.strict,
                       cache=cfg.data.cache, lazy_above_mb=cfg.data.device_max_mb if split == "train" else None)


def train(cfg: Config, run_dir: Path, reporter: Reporter, *, resume: Checkpoint | None = None,
          exit_on_usr1: bool = False, run_locked: bool = False) -> dict:
    """run_locked: the caller holds run_lock(run_dir) already (`aigc train` takes it before choosing what
    to resume); else it is taken here, after the data load."""
    with StopFlag() as stop, contextlib.ExitStack() as cleanup:  # StopFlag first: no signal lost in set-up
        return _train(cfg, Path(run_dir), reporter, resume, exit_on_usr1, stop, cleanup, run_locked)


def _train(cfg, run_dir, reporter, resume, exit_on_usr1, stop, cleanup, run_locked=False) -> dict:
    family = FAMILIES[cfg.model.kind]
    device = resolve_device(cfg.train.device)
    amp = Precision(resolve_precision(cfg.train.precision, device), device)
    if slow := slow_precision_note(amp.name, device):
        reporter.note(slow)
    for line in unused_settings(cfg, resume.config if resume is not None else None):
        reporter.note(line)
    try:  # not around a download: torchvision writes and unpacks it under the final names
        with stop.at_once() if not cfg.data.download else contextlib.nullcontext():
            data = load_data(cfg, "train", reporter.note)
    except StoppedNow:
        raise Interrupted(f"{stop.name} while loading the data, before the first step; nothing to save",
                          stop.exit_code) from None
    if needs_labels(cfg.model):
        check_classes(data, cfg, reporter.note)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=data.num_classes))
    elif cfg.model.num_classes:  # e.g. a conditional run's config.toml with conditional=false: the model has none
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=0))
    bs = cfg.train.batch_size
    if len(data.images) < bs:
        raise UsageError(f"data has {counted(len(data.images), 'image')}, fewer than --batch-size {bs}; pass --batch-size "
                         f"{len(data.images)} or less")
    if resume is not None:
        if needs_labels(cfg.model) and needs_labels(resume.config.model):  # else check_compatible says it
            state.check_same_classes(resume, data.class_names, cfg.model.num_classes)
        for change in state.check_compatible(resume.config, cfg, resume.path):
            reporter.note(f"resuming with a changed setting: {change}")
        if (then := state.data_images_then(resume)) is not None and then != len(data.images):
            reporter.note(f"the data held {then:,} images when {resume.path.name} was saved and holds "
                          f"{len(data.images):,} now (files added or removed?): the order of images from here on "
                          "is not the uninterrupted run's")
    at = (resume.step, state.resume_position(resume)) if resume is not None else ()
    steps = total_steps(cfg, len(data.images), *at)

    seed_everything(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    nets = {k: v.to(device).train() for k, v in build_nets(cfg.model).items()}
    memory_format = torch.channels_last if channels_last(cfg, device, nets, reporter.note) else torch.contiguous_format
    for net in nets.values():
        net.to(memory_format=memory_format)
    scheduled = cfg.train.lr_warmup > 0 or cfg.train.lr_decay != "none"
    graphed = use_graph(cfg, amp, device, scheduled, reporter.note)
    if limit := subpixel.max_channels(cfg.train.subpixel_convs, device, graphed):
        rewrote = sum(subpixel.use_subpixel(net, memory_format, limit) for net in nets.values())
        if not rewrote and cfg.train.subpixel_convs == "on":  # auto says nothing where a model has no such layer
            reporter.note(f"train.subpixel_convs=on: {cfg.model.kind} has no 4x4 stride-2 layer on 1-{subpixel.MAX_CHANNELS} "
                          "image channels to rewrite, so it changes nothing")
    if fusion.wanted(cfg.train.fuse_norm_act, device):
        asked = cfg.train.fuse_norm_act == "on"  # auto fuses where it can and says nothing where it cannot
        fusion.report_to(reporter.note)
        cleanup.callback(fusion.report_to, None)
        # Not D under an R1 penalty: its double backward cannot go through torch.compile'd code. (WGAN-GP's
        # penalty differentiates D twice too; its D has no batch norm, which config refuses, but stay safe.)
        twice = cfg.loss.r1_gamma > 0 or cfg.loss.gan == "wgan-gp"
        skip = {"D"} if twice and family.objective == "gan" else set()
        fused = sum(fusion.fuse_norm_act(net) for name, net in nets.items() if name not in skip)
        unfused_d = bool(skip) and fusion.has_pairs(nets["D"])
        if unfused_d and asked:
            reporter.note("train.fuse_norm_act=on: D's pairs are left unfused, since loss.r1_gamma differentiates "
                          "D twice, which torch.compile'd code cannot")
        if fused or (asked and not unfused_d):
            reporter.note(f"fused {fused} BatchNorm + activation pairs with torch.compile; the first steps compile them"
                          if fused else f"train.fuse_norm_act=on: {cfg.model.kind} has no plain BatchNorm + "
                          "ReLU/LeakyReLU pairs to fuse, so it changes nothing")
    flags = optimizer_flags(device, capturable=graphed)
    opts = make_optimizers(family.objective, nets, cfg.train, flags)
    aids = Aids(augment=parse_policy(cfg.train.diffaugment))
    if family.objective == "gan" and cfg.train.ema_decay > 0:
        aids.ema = EMA(nets["G"], cfg.train.ema_decay, cfg.train.ema_start)
        nets["G_ema"] = aids.ema.model  # saved, restored and checked like the other networks
    step_fn = STEPS[family.objective]
    if graphed:
        step_fn = GraphedStep(step_fn, nets, opts, amp, cfg, aids, note=reporter.note)
    class_counts = (torch.bincount(data.labels.cpu(), minlength=cfg.model.num_classes).tolist()
                    if cfg.model.conditional and data.labels is not None else None)
    evaluator = None
    if cfg.train.eval_every:  # built before the run folder: missing Inception weights fail at once, leaving nothing
        from ..metrics.evaluate import EvaluationStopped, TrainingEvaluator
        try:
            evaluator = TrainingEvaluator(cfg, device, amp, reporter.note, images=data.images, class_counts=class_counts,
                                          should_stop=lambda: stop.signum is not None)
        except EvaluationStopped:
            raise Interrupted(f"{stop.name} while computing the real images' statistics, before the first "
                              "step; nothing to save", stop.exit_code) from None
    if not run_locked:
        cleanup.enter_context(run_lock(run_dir))
    run = RunFolder(run_dir, cfg.train.keep_checkpoints)
    batches = make_batches(data, cfg, device, channels_last=memory_format == torch.channels_last, note=reporter.note)
    cleanup.callback(batches.close)  # stops streaming workers on any exit, errors and signals included
    step, images_seen = 0, 0
    metric, higher_is_better = best_metric(cfg)
    best_value = best_step = None  # best_step: the step whose checkpoint set best_value
    # What best.safetensors is while this run's metric has not replaced it (another metric's, or one measured
    # another way): carried on in each checkpoint, so that a later resume with that metric takes it up again.
    kept: dict | None = None
    metric_from_eval = evaluator is not None and metric in EVAL_METRICS
    if resume is not None:
        step, images_seen = state.restore(resume.tensors, resume.meta, nets, opts, amp, batches, resume.path)
        conform_optimizers(opts, flags)
        apply_changed_optimizer_settings(resume.config, cfg, opts)
        if not scheduled and any("base_lr" in g for opt in opts.values() for g in opt.param_groups):
            set_lr(opts, 1.0)  # the schedule was switched off: back to the full rate, not stuck where it stopped
        elif scheduled and step < steps:
            schedule_jump_note(opts, step, steps, cfg, reporter.note)
        chosen_by, best_value, best_step = state.best_of(resume.meta, resume.path)
        chosen_in = resume.meta.get(BEST_SETUP_KEY)  # the evaluation setup that measured it (None: aigc before 2026-11-30)
        if chosen_by != metric and best_value is not None:
            reporter.note(f"best.safetensors was chosen by {chosen_by}; "
                          + (f"from now on by {metric}, starting afresh" if metric else "no longer updated"))
            kept = {"metric": chosen_by, "value": best_value, "step": best_step, "setup": chosen_in}
            best_value = best_step = None
        elif metric_from_eval and best_value is not None and (
                chosen_in != evaluator.setup if chosen_in is not None else eval_setup(resume.config) != eval_setup(cfg)):
            # an FID in other features (other weights at the same path too), over other real images or another
            # number of them, is not comparable
            reporter.note(f"best.safetensors was chosen by {metric} with other train.eval_features weights, real "
                          "images or train.eval_n; starting afresh")
            kept = {"metric": chosen_by, "value": best_value, "step": best_step, "setup": chosen_in}
            best_value = best_step = None
        reporter.note(f"resumed from {resume.path} at step {step} ({images_seen} images seen)")
    # resumed from this folder's own checkpoints (not a fork from another run's)
    ours = resume is not None and Path(resume.path).resolve().parent == run.checkpoints.resolve()
    if resume is not None and step >= steps:  # leave the run folder as it is
        reporter.note(f"already at step {step} of {steps}: nothing to train (raise --steps or --epochs)")
    else:
        aside = run.set_aside_after(step, resume)
        # A fresh start, or a fork into a folder without checkpoints, drops the lines and grids left by a
        # run killed there before its first checkpoint (a fork's own history is in its parent's folder).
        run.trim_metrics(step if ours else 0)
        if not ours:
            run.remove_grids()
        if aside is not None:
            reporter.note(f"this run had gone on past step {step}: its later checkpoints, metrics lines and grids "
                          f"are kept in {aside}; the run continues from step {step}" if resume is not None else
                          f"starting over: the checkpoints already here (with --resume auto: none could be loaded), "
                          f"with their metrics lines and grids, are kept in {aside}")
        if (best_value is not None and not (run.checkpoints / "best.safetensors").exists()
                and not run.relink_best(best_value, best_step)):
            best_value = best_step = None  # its checkpoint is not in this branch (or this fork): find its own
        if (kept is not None and not (run.checkpoints / "best.safetensors").exists()
                and not run.relink_best(kept["value"], kept["step"])):
            kept = None
        run.write_config(cfg)
        run.adopt_transient()
        run.prune()  # the resumed checkpoint is the newest step file here: it stays
    labels_fixed, nrow = grid_labels(cfg)
    z_fixed = latents(len(labels_fixed) if labels_fixed is not None else cfg.train.n_samples,
                      cfg.model.latent_dim, cfg.train.seed)

    def hurry() -> bool:
        """A save is due that must fit in a batch system's grace period: a stop, or SIGUSR1 with
        --exit-on-usr1 (at the last step there is nothing to come back to: SIGUSR1 lets the work finish)."""
        return stop.signum is not None or (exit_on_usr1 and stop.save_requested and step < steps)

    def generator() -> torch.nn.Module | None:
        """G to sample, evaluate and save: the EMA copy where there is one, its batch norms settled, unless
        hurry() says so before or while they are measured: they then stay the live G's (aids.ema.settled
        says which; the checkpoint too), and the evaluation that hurry() stops as well scores nothing."""
        if aids.ema is None:
            return nets.get("G")  # a classifier has none
        aids.ema.settle_norm_stats(cfg, amp.autocast(), hurry)
        return aids.ema.model

    def write_samples(step: int) -> None:
        if not family.generative:
            return
        G = generator().eval()
        try:
            save_grid(generate(G, z_fixed, amp, labels=labels_fixed), run.samples / f"step-{step:07d}.png", nrow)
            if family.objective == "vae":  # inputs above, their reconstructions below
                k = min(len(data.images), max(nrow, cfg.train.n_samples // 2 // nrow * nrow))
                row = min(nrow, k)  # whole rows of each (fewer images than a row: one row of each)
                k = k // row * row
                real = from_uint8(data.images[:k].to(device))
                y = data.labels[:k].to(device) if cfg.model.conditional else None
                nets["E"].eval()
                with torch.inference_mode(), amp.autocast():
                    mu, _ = nets["E"](real, y)
                    recon = to_uint8(G(mu, y)).cpu()
                save_grid(torch.cat([data.images[:k], recon]), run.samples / f"recon-step-{step:07d}.png", row)
        finally:  # also when a grid cannot be written: training goes on in train mode (the EMA copy stays in eval)
            nets["G"].train()
            if "E" in nets:
                nets["E"].train()

    write_error: tuple[str, str] | None = None  # (what, why) the run could not write: save, then stop

    def log_line(record: dict) -> None:
        nonlocal write_error
        if write_error is not None:  # after a failed write: the run stops at this step's save
            return
        try:
            run.append_metrics(record)
        except OSError as e:  # a full disk, a lost mount: as a grid that cannot be written
            write_error = write_error or (f"to {run.root / 'metrics.jsonl'}", str(e.strerror or e))

    def evaluate_now() -> dict | None:
        """The evaluator's scores (it puts G in eval mode and back), logged; None when a signal that asks
        to stop arrived meanwhile: a long evaluation must not eat the batch system's grace period."""
        from ..metrics.evaluate import EvaluationStopped

        nonlocal evaluated_at, t_log
        t_eval = time.perf_counter()
        try:
            scores = evaluator(generator(), step, amp, should_stop=hurry)
        except EvaluationStopped:
            reporter.note(f"the evaluation at step {step} was stopped by a signal; saving instead")
            return None
        finally:
            t_log += time.perf_counter() - t_eval  # images/s counts training, not evaluation
        scores = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores.items()}
        evaluated_at = step
        log_line({"step": step, "images_seen": images_seen, **scores})
        reporter.log({"step": step, "images_seen": images_seen, **scores, "eval": True})
        return scores

    def save_best(value: float) -> Path:
        path = save(value)
        reporter.note(f"new best {metric} {value:.5g} at step {step}: {path.parent / 'best.safetensors'}")
        return path

    # The rollback point for the divergence guard: the last state known to be finite, in memory.
    good = state.capture(cfg, nets, opts, amp, batches, step, images_seen)
    # resumed and nothing to train: the step file, not the last.safetensors that the next save replaces
    good_path: Path | None = resume.step_file if resume is not None else None
    recoveries = 0
    # Learning rates now, and in `good`, relative to this process's starting rates: a rollback sets
    # them to recover_lr_factor ** recoveries of those, whatever rates the snapshot it restores holds.
    lr_scale = good_scale = 1.0
    evaluated_at = None  # the step of the last evaluation that gave scores
    last_record: dict = {}

    # What `--class K` means to `aigc sample` (folder names, the shapes' kinds), when the model uses labels.
    names = ({"aigc.class_names": json.dumps(list(data.class_names))}
             if cfg.model.num_classes and len(data.class_names) == cfg.model.num_classes else {})
    if class_counts:  # the class mix `aigc eval` draws with, as the evaluation here does
        names["aigc.class_counts"] = json.dumps(class_counts)

    def beats_best(value) -> bool:
        return value is not None and (best_value is None or (value > best_value if higher_is_better else value < best_value))

    def save(eval_value: float | None = None, transient: bool = False) -> Path:
        """A checkpoint; best.safetensors too when it beats the best so far by the metric. An eval
        metric counts only at the evaluation that measured these weights. The losses summed since the
        last log line go with it, so that a resume logs the same averages as an uninterrupted run."""
        nonlocal good, good_path, best_value, best_step, good_scale, due, kept
        # A logged metric is an average over its log interval's steps, never a measure of these exact weights:
        # a save between log lines (a stop, SIGUSR1, train.ckpt_minutes) is judged by the last line, like any.
        value = eval_value if metric_from_eval else last_record.get(metric) if metric else None
        is_best = beats_best(value)
        best_value, best_step = (value, step) if is_best else (best_value, best_step)
        if best_value is not None:
            kept = None  # best.safetensors is this metric's now
        record = kept or {"metric": metric, "value": best_value, "step": best_step,
                          "setup": evaluator.setup if metric_from_eval else None}
        extra = {"aigc.best_metric": json.dumps(record["metric"]), "aigc.best_value": json.dumps(record["value"]),
                 "aigc.best_step": json.dumps(record["step"]), "aigc.log_sums": state.log_sums_meta(sums, n_sum),
                 "aigc.data_images": str(len(data.images)), **names}
        if record["setup"] is not None:
            extra[BEST_SETUP_KEY] = record["setup"]
        if aids.ema is not None:  # "copied": a save in a hurry() or by time skips settling (sampling does it)
            extra[EMA_NORMS_KEY] = "settled" if aids.ema.settled else "copied"
        good = state.capture(cfg, nets, opts, amp, batches, step, images_seen, extra)
        good_scale = lr_scale
        good_path = run.save_checkpoint(step, *good, best=is_best, transient=transient)
        due = save_due(cfg.train.ckpt_minutes)
        return good_path

    def recover(reason: str) -> None:
        """Roll back to the last good state, lower the learning rates (and leave fp16), or give up."""
        nonlocal recoveries, amp, cfg, step, images_seen, sums, n_sum, lr_scale
        recoveries += 1
        where = f"the last good checkpoint is {good_path}" if good_path else "no checkpoint had been saved yet"
        if recoveries > cfg.train.max_recoveries:
            raise DivergedError(f"training diverged at step {step} ({reason}) and {cfg.train.max_recoveries} "
                                f"rollbacks did not help; {where}")
        changes = []
        if amp.name == "fp16" and cfg.train.recover_to_bf16 and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
            amp = Precision("bf16", device)
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))
            changes.append("fp16 -> bf16")
            with contextlib.suppress(OSError):  # config.toml says how the run trains; the checkpoints hold it too
                run.write_config(cfg)
        failed_at = step
        step, images_seen = state.restore(*good, nets, opts, amp, batches, "the in-memory rollback point")
        if aids.ema is not None:
            aids.ema.settled = False  # its batch norms hold what the rollback point held
        conform_optimizers(opts, flags)
        if graphed:
            step_fn.reset()  # new optimizer state tensors and learning rates: capture again
        lr_scale = cfg.train.recover_lr_factor ** recoveries
        adjust = lr_scale / good_scale  # a snapshot saved after an earlier rollback holds lowered rates
        for opt in opts.values():
            for group in opt.param_groups:
                group["lr"] *= adjust
                if "base_lr" in group:  # the schedule scales base_lr: lower that too
                    group["base_lr"] *= adjust
        changes.append(f"learning rates x{lr_scale:g}")
        sums, n_sum = {}, 0
        run.trim_metrics(step)
        reporter.note(f"non-finite values at step {failed_at} ({reason}); rolled back to step {step}, "
                      f"{', '.join(changes)} (rollback {recoveries} of {cfg.train.max_recoveries})")

    def summarize(stopped_by: str | None = None, exit_code: int = 0) -> dict:
        """What `train --json` prints: at the end, or for a stop after its save (with `stopped`). Paths are
        absolute, as `sample` and `eval` give them: a script may run the next command elsewhere."""
        summary = {"run_dir": os.path.abspath(run_dir), "steps": step, "images_seen": images_seen,
                   "checkpoint": os.path.abspath(good_path) if good_path else None, "seconds": round(time.perf_counter() - t_start, 2),
                   "precision": amp.name, "device": str(device), "start_step": start_step, "recoveries": recoveries}
        grid = run.samples / f"step-{step:07d}.png"
        if family.generative and step > start_step and (stopped_by is None or grid.is_file()):
            summary["samples"] = os.path.abspath(grid)
        best_file = run.checkpoints / "best.safetensors"
        if metric and best_file.exists():
            # what the file says of itself: a resume with nothing to train may come from before it
            chosen_by, value, _ = state.recorded_best(ckpt_io.read_meta(best_file) or {})
            if chosen_by == metric and value is not None:
                summary["best"] = {"metric": metric, "value": value, "path": os.path.abspath(best_file)}
        if stopped_by is not None:
            summary.update(stopped=stopped_by, exit_code=exit_code)
        return summary

    info = {"run_dir": str(run_dir), "device": str(device), "precision": amp.name, "data": data.name,
            "model": cfg.model.kind, "steps": steps, "batch_size": bs, "start_step": step}
    reporter.start(steps, info)
    sums, n_sum = state.log_sums(resume.meta, device) if resume is not None else ({}, 0)
    t_log, seen_log, t_start = time.perf_counter(), images_seen, time.perf_counter()
    # A crash or a kill that gives no warning (the OOM killer, a lost node) loses at most this much work.
    due = save_due(cfg.train.ckpt_minutes)
    start_step = step
    if stop.signum is not None:
        raise Interrupted(f"{stop.name} before the first step; nothing to save", stop.exit_code)
    if stop.save_requested:  # as the README says: a checkpoint of what was not trained yet is no use
        stop.save_requested = False
        reporter.note("SIGUSR1 came before the first step: nothing to save, ignored")
    before = resume.config.train if resume is not None else None
    if (evaluator is not None and before is not None and ours and step < steps and before.eval_every
            and step % before.eval_every == 0 and step % cfg.train.eval_every == 0
            and before.eval_metric == cfg.train.eval_metric and eval_setup(resume.config) == eval_setup(cfg)
            and not run.has_record(step, cfg.train.eval_metric)):
        # A stop skips or cuts short the evaluation due at its step (the save must fit in the grace
        # period): do it now, with the same weights, or its record and a best found there were lost.
        reporter.note(f"the evaluation due at step {step} did not run before the stop: evaluating now")
        scores = evaluate_now()
        if scores is None:
            code, name = (stop.exit_code, stop.name) if stop.signum is not None else (USR1_EXIT_CODE, "SIGUSR1")
            raise Interrupted(f"{name} during the evaluation at step {step}; the checkpoint at step {step} stands; "
                              "resume with --resume auto", code, summarize(name, code))
        value = scores.get(metric) if metric_from_eval else None
        if beats_best(value):  # the checkpoint at this step again, now with its best value (as uninterrupted)
            save_best(value)

    def next_batch():
        nonlocal images_seen
        images_seen += bs
        return batches.next()  # in the model's memory format already

    while step < steps:
        step += 1
        if scheduled:
            set_lr(opts, lr_factor(step - 1, steps, cfg.train.lr_warmup, cfg.train.lr_decay))
        out = step_fn(nets, opts, amp, next_batch, cfg, step, aids)
        if sums.keys() != out.keys():  # restored sums of other losses (a resume turned a penalty on or off)
            sums, n_sum = {}, 0  # would mix two objectives, or divide one loss's sum by steps it had none in
        sums = {k: sums.get(k, 0) + v for k, v in out.items()}  # stays on the device: no sync
        n_sum += 1
        reporter.advance(step)

        if step % cfg.train.log_every == 0 or step == steps:
            values = torch.stack([v.float() for v in sums.values()]).div(n_sum).tolist()  # one sync
            now = time.perf_counter()
            record = {"step": step, "images_seen": images_seen,
                      **{k: round(v, 6) for k, v in zip(sums, values)},
                      **{f"lr_{name}": opt.param_groups[0]["lr"] for name, opt in opts.items()},
                      "img_per_s": round((images_seen - seen_log) / max(now - t_log, 1e-9), 1),
                      "elapsed_s": round(now - t_start, 2)}
            if device.type == "cuda":
                record["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            sums, n_sum, t_log, seen_log = {}, 0, now, images_seen
            bad = [f"{k}={v}" for k, v in zip(record, record.values()) if isinstance(v, float) and not math.isfinite(v)]
            if bad or not state.all_finite(nets, grads=amp.scaler is None):
                recover(", ".join(bad) or "non-finite weights")
                t_log, seen_log = time.perf_counter(), images_seen
                continue
            last_record = record
            log_line(record)
            reporter.log(record)
        if step % cfg.train.sample_every == 0 or step == steps:
            try:
                write_samples(step)
            except OSError as e:  # a full disk, a lost mount: save this step's state first, then stop
                write_error = write_error or (f"sample grid {e.filename or run.samples}", str(e.strerror or e))
        path = None  # the checkpoint written at this step, if any
        # A pending stop skips the evaluation: the save it asks for must fit in the job's grace period.
        if evaluator is not None and (step % cfg.train.eval_every == 0 or step == steps) and not hurry():
            scores = evaluate_now()
            value = scores.get(metric) if metric_from_eval and scores is not None else None
            if beats_best(value):
                if not state.all_finite(nets, grads=amp.scaler is None, also=sums.values()):
                    recover("non-finite weights or losses at an evaluation")
                    continue
                path = save_best(value)
        regular = (step % cfg.train.ckpt_every == 0 or step == steps or stop.signum is not None
                   or stop.save_requested or write_error is not None)
        if regular or clock() >= due:
            if path is None:
                if regular:
                    generator()  # the EMA as it samples, checked below (in a hurry(), as it is: see there)
                # Never write a broken state over a good one, nor one whose pending losses are not finite
                # (a save between log lines: SIGUSR1, a stop, train.ckpt_minutes).
                if not state.all_finite(nets, grads=amp.scaler is None, also=sums.values()):
                    recover("non-finite weights or losses at a checkpoint")
                    continue
                path = save(transient=not regular)
            final = step == steps  # the run is complete: nothing to resume, so no stop code either
            if write_error is not None:
                failed = "cannot write {}: {}".format(*write_error)
                if stop.signum is not None and not final:  # the stop's own exit code tells a requeue what to do
                    reporter.note(failed)
                else:
                    reporter.finish()
                    raise UsageError(f"{failed}; saved {path}; " +
                                     ("the run is complete (`aigc sample` draws from it)" if final else
                                      "resume with --resume auto"))
            if stop.save_requested:
                stop.save_requested = False
                if exit_on_usr1 and not final:
                    reporter.finish()
                    raise Interrupted(f"SIGUSR1 at step {step} (--exit-on-usr1); saved {path}; resume with "
                                      "--resume auto", USR1_EXIT_CODE, summarize("SIGUSR1", USR1_EXIT_CODE))
                reporter.note(f"SIGUSR1: saved {path}")
            if stop.signum is not None and not final:
                reporter.finish()
                raise Interrupted(f"{stop.name} at step {step}; saved {path}; resume with --resume auto",
                                  stop.exit_code, summarize(stop.name, stop.exit_code))
    reporter.finish()
    if stop.signum is not None and step > start_step:
        skipped = [what for what, due in (("the final evaluation (`aigc eval` measures it)",
                                           evaluator is not None and evaluated_at != step),
                                          ("the held-out accuracy", family.objective == "classifier")) if due]
        reporter.note(f"{stop.name} came at the last step, {step}: the run is complete"
                      + (f"; skipped {' and '.join(skipped)}" if skipped else ""))
    summary = summarize()
    if family.objective == "classifier" and stop.signum is None:
        try:
            key, value, count = classifier_accuracy(nets["C"], cfg, amp, data, reporter.note,
                                                    getattr(batches, "reported", None))
        except UsageError as e:  # e.g. an IDX folder with no t10k files, or --strict: the trained classifier stands
            reporter.note(f"{'held-out' if data.held_out else 'training'} accuracy not measured: {e}")
        else:
            summary[key], summary["accuracy_images"] = value, count
            if step > start_step:  # a resume that trained nothing leaves the run folder as it was
                log_line({"step": step, key: value})
                if write_error is not None:
                    raise UsageError("cannot write the held-out accuracy {}: {}; the run is complete".format(*write_error))
    return summary


def check_classes(data, cfg: Config, note) -> None:
    """The classes a model that needs labels would get from the data: labels at all, at least two classes, at
    most MAX_WIDTH, and a note where IDX labels skip numbers (labels 0 and 255 make 256 classes, 254 never seen)."""
    what = "a conditional model" if cfg.model.conditional else f"model '{cfg.model.kind}'"
    if data.labels is None:
        raise UsageError(f"data '{cfg.data.source}' has no labels, which {what} needs "
                         "(use a labelled source, or an image folder with one subfolder per class)"
                         + unlabelled_reason(os.path.expanduser(cfg.data.source)))
    if data.num_classes < 2:
        raise UsageError(f"data '{cfg.data.source}' holds {data.num_classes} class{'es' if data.num_classes != 1 else ''}; "
                         f"{what} needs at least 2" + ("" if FAMILIES[cfg.model.kind].needs_labels
                                                       else " (or train it with model.conditional=false)"))
    if data.num_classes > MAX_WIDTH:
        raise UsageError(f"data '{cfg.data.source}' has labels up to {data.num_classes - 1}; {what} can have at most "
                         f"{MAX_WIDTH} classes (labels are class numbers from 0)")
    seen = int(torch.unique(data.labels).numel())
    if seen < data.num_classes:
        note(f"the labels run from 0 to {data.num_classes - 1} but only {seen} of those numbers occur: "
             f"{what} gets {data.num_classes} classes, {data.num_classes - seen} of them never seen in training")


ACCURACY_MAX_TRAINING_IMAGES = 10_000


@torch.inference_mode()
def classifier_accuracy(C, cfg: Config, amp: Precision, data, note, seen: set[str] | None = None) -> tuple[str, float, int]:
    """(key, accuracy, images): "test_accuracy" on the source's held-out split; "train_accuracy" on a
    seeded subset of the training images where there is none (an image folder: its "test" is its
    training images, and one large enough to stream would not fit in memory whole). A streamed file
    that does not decode is said as training says it, unless training has (`seen`); --strict: the UsageError."""
    from ..data.native import real_indices  # noqa: PLC0415

    if data.held_out:
        test = load_data(cfg, "test", lambda s: None)
        if test.labels is None:  # an IDX folder with t10k images but no t10k labels
            raise UsageError(f"the held-out images of {test.name} have no labels")
        key, chunks = "test_accuracy", zip(test.images.split(512), test.labels.split(512))
    else:
        key, picked = "train_accuracy", real_indices(len(data.images), ACCURACY_MAX_TRAINING_IMAGES, cfg.train.seed)
        chunks = (pick(data.images, data.labels, ix, note, cfg.data.strict, seen)  # a bad file's swap takes its label too
                  for ix in picked.split(512))
    C.eval()
    device = next(C.parameters()).device
    correct = count = 0
    for xs, ys in chunks:
        with amp.autocast():
            logits = C(from_uint8(xs.to(device)))
        correct += int((logits.argmax(1).cpu() == ys).sum())
        count += len(ys)
    return key, round(correct / max(1, count), 4), count
