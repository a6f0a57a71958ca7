"""train(cfg, run_dir): the whole training run in one readable function."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..config import Config
from ..data import load_images
from ..errors import DivergedError, Interrupted, UsageError
from ..models import FAMILIES, build_nets
from ..sampling import generate, latents, save_grid, to_uint8
from .batches import DeviceBatches
from .precision import Precision, resolve_device, resolve_precision
from .signals import StopFlag
from .steps import STEPS, make_optimizers


class Reporter(Protocol):
    def start(self, total_steps: int, info: dict) -> None: ...
    def log(self, record: dict) -> None: ...
    def advance(self, step: int) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(cfg: Config, n_images: int) -> int:
    return cfg.train.epochs * (n_images // cfg.train.batch_size) if cfg.train.epochs else cfg.train.steps


class RunFolder:
    """The run folder layout of DESIGN.md: config.toml, metrics.jsonl, samples/, checkpoints/."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep
        self.samples = self.root / "samples"
        self.checkpoints = self.root / "checkpoints"
        for d in (self.samples, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

    def write_config(self, cfg: Config) -> None:
        tmp = self.root / ".config.toml.tmp"
        tmp.write_text(cfg.to_toml(), encoding="utf-8")
        tmp.replace(self.root / "config.toml")

    def append_metrics(self, record: dict) -> None:
        with open(self.root / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, step: int, tensors: dict, meta: dict) -> Path:
        path = self.checkpoints / f"step-{step:07d}.safetensors"
        ckpt_io.write_atomic(path, tensors, meta)
        last = self.checkpoints / "last.safetensors"
        tmp = self.checkpoints / ".last.link.tmp"
        tmp.unlink(missing_ok=True)
        try:  # a hard link costs no second write; the rename keeps `last` valid at every instant
            tmp.hardlink_to(path)
            tmp.replace(last)
        except OSError:
            ckpt_io.write_atomic(last, tensors, meta)
        self._prune()
        return path

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        steps = sorted(self.checkpoints.glob("step-*.safetensors"))
        for old in steps[:-self.keep]:
            old.unlink(missing_ok=True)


def train(cfg: Config, run_dir: Path, reporter: Reporter) -> dict:
    family = FAMILIES[cfg.model.kind]
    device = resolve_device(cfg.train.device)
    amp = Precision(resolve_precision(cfg.train.precision, device), device)
    data = load_images(cfg.data.source, channels=cfg.model.channels, resolution=cfg.model.resolution,
                       root=cfg.data.root or None, download=cfg.data.download, split="train",
                       limit=cfg.data.limit, seed=cfg.train.seed, warn=reporter.note)
    if family.needs_labels:
        if data.labels is None:
            raise UsageError(f"data '{cfg.data.source}' has no labels, which model '{family.name}' needs "
                             "(use a labelled source, or an image folder with one subfolder per class)")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=data.num_classes))
    bs = cfg.train.batch_size
    if len(data.images) < bs:
        raise UsageError(f"data has {len(data.images)} images, fewer than --batch-size {bs}")
    steps = total_steps(cfg, len(data.images))

    seed_everything(cfg.train.seed)
    nets = {k: v.to(device).train() for k, v in build_nets(cfg.model).items()}
    opts = make_optimizers(family.objective, nets, cfg.train)
    step_fn = STEPS[family.objective]
    run = RunFolder(run_dir, cfg.train.keep_checkpoints)
    run.write_config(cfg)
    batches = DeviceBatches(data.images, data.labels, bs, device, cfg.train.seed)
    z_fixed = latents(cfg.train.n_samples, cfg.model.latent_dim, cfg.train.seed)
    nrow = max(1, int(math.sqrt(cfg.train.n_samples)))

    def write_samples(step: int) -> None:
        if not family.generative:
            return
        G = nets["G"].eval()
        save_grid(generate(G, z_fixed, amp), run.samples / f"step-{step:07d}.png", nrow)
        if family.objective == "vae":  # inputs above, their reconstructions below
            k = min(len(data.images), max(nrow, cfg.train.n_samples // 2 // nrow * nrow))
            real = data.images[:k].to(device).float().div(127.5).sub(1)
            nets["E"].eval()
            with torch.inference_mode(), amp.autocast():
                mu, _ = nets["E"](real)
                recon = to_uint8(G(mu)).cpu()
            nets["E"].train()
            save_grid(torch.cat([data.images[:k], recon]), run.samples / f"recon-step-{step:07d}.png", nrow)
        G.train()

    def save(step: int, images_seen: int) -> Path:
        extra = {"aigc.data_position": json.dumps(batches.position())}
        tensors, meta = ckpt_io.training_checkpoint(cfg, nets, opts, amp, step, images_seen, extra)
        return run.save_checkpoint(step, tensors, meta)

    info = {"run_dir": str(run_dir), "device": str(device), "precision": amp.name, "data": data.name,
            "model": cfg.model.kind, "steps": steps, "batch_size": bs}
    reporter.start(steps, info)
    images_seen, sums, n_sum = 0, {}, 0
    t_log, seen_log, t_start = time.perf_counter(), 0, time.perf_counter()
    last_ckpt: Path | None = None
    step = 0
    with StopFlag() as stop:
        for step in range(1, steps + 1):
            x, y = batches.next()
            if family.objective == "gan":
                out = step_fn(nets, opts, amp, x, torch.randn(bs, cfg.model.latent_dim, device=device), cfg)
            else:
                out = step_fn(nets, opts, amp, x, y, cfg)
            images_seen += bs
            sums = {k: sums.get(k, 0) + v for k, v in out.items()}  # stays on the device: no sync
            n_sum += 1
            reporter.advance(step)

            if step % cfg.train.log_every == 0 or step == steps:
                values = torch.stack([v.float() for v in sums.values()]).div(n_sum).tolist()  # one sync
                now = time.perf_counter()
                record = {"step": step, "images_seen": images_seen,
                          **{k: round(v, 6) for k, v in zip(sums, values)},
                          "img_per_s": round((images_seen - seen_log) / max(now - t_log, 1e-9), 1),
                          "elapsed_s": round(now - t_start, 2)}
                run.append_metrics(record)
                reporter.log(record)
                if not all(math.isfinite(v) for v in values):
                    good = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                    raise DivergedError(f"training diverged at step {step}: non-finite loss "
                                        f"({', '.join(f'{k}={v}' for k, v in zip(sums, values))}){good}")
                sums, n_sum, t_log, seen_log = {}, 0, now, images_seen
            if step % cfg.train.sample_every == 0 or step == steps:
                write_samples(step)
            if step % cfg.train.ckpt_every == 0 or step == steps:
                last_ckpt = save(step, images_seen)
            if stop.signum is not None:
                if last_ckpt is None or not last_ckpt.name.endswith(f"{step:07d}.safetensors"):
                    last_ckpt = save(step, images_seen)
                reporter.finish()
                raise Interrupted(f"stopped by signal at step {step}; saved {last_ckpt}", stop.exit_code)
    reporter.finish()

    summary = {"run_dir": str(run_dir), "steps": step, "images_seen": images_seen,
               "checkpoint": str(last_ckpt), "seconds": round(time.perf_counter() - t_start, 2),
               "precision": amp.name, "device": str(device)}
    if family.generative:
        summary["samples"] = str(run.samples / f"step-{step:07d}.png")
    if family.objective == "classifier":
        summary["test_accuracy"] = classifier_accuracy(nets["C"], cfg, amp)
        run.append_metrics({"step": step, "test_accuracy": summary["test_accuracy"]})
    return summary


@torch.inference_mode()
def classifier_accuracy(C, cfg: Config, amp: Precision) -> float:
    test = load_images(cfg.data.source, channels=cfg.model.channels, resolution=cfg.model.resolution,
                       root=cfg.data.root or None, download=False, split="test", limit=cfg.data.limit,
                       seed=cfg.train.seed, warn=lambda s: None)
    C.eval()
    device = next(C.parameters()).device
    correct = 0
    for xs, ys in zip(test.images.split(512), test.labels.split(512)):
        with amp.autocast():
            logits = C(xs.to(device).float().div(127.5).sub(1))
        correct += int((logits.argmax(1).cpu() == ys).sum())
    return round(correct / max(1, len(test.images)), 4)
