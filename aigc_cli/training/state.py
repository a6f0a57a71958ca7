"""Everything needed to continue a run exactly: weights and buffers, optimizer state and learning
rates, the GradScaler, RNG states (Python, NumPy, torch CPU and CUDA), the data order position and
the step / image counters. capture() returns CPU copies, so the same object serves as an in-memory
rollback point (divergence guard) and as the content of a checkpoint file."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from ..checkpoint import Checkpoint, base_meta, load_net
from ..config import Config
from ..errors import UsageError, first_line, one_line
from ..models import FAMILIES, needs_labels


def _optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"opt.{name}.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, json.dumps(sd["param_groups"])


def _rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"aigc.rng.python": json.dumps(random.getstate()),
            "aigc.rng.numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)])}
    return tensors, meta


def capture(cfg, nets: dict, opts: dict, amp, batches, step: int, images_seen: int,
            extra_meta: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    meta = base_meta(cfg, "checkpoint", step, images_seen, amp.name)
    for name, net in nets.items():
        tensors.update({f"{name}.{k}": v for k, v in net.state_dict().items()})
    for name, opt in opts.items():
        t, groups = _optimizer(name, opt)
        tensors.update(t)
        meta[f"aigc.opt.{name}.param_groups"] = groups
    if amp.scaler is not None:
        meta["aigc.scaler"] = json.dumps(amp.scaler.state_dict())
    rng, rng_meta = _rng()
    tensors.update(rng)
    meta.update(rng_meta)
    meta["aigc.data_position"] = json.dumps(batches.position())
    meta.update(extra_meta or {})
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, meta


def restore(tensors: dict[str, torch.Tensor], meta: dict[str, str], nets: dict, opts: dict, amp, batches,
            origin: str) -> tuple[int, int]:
    """Put a captured state back; returns (step, images_seen). Raises UsageError if it does not fit."""
    for name, net in nets.items():
        if name == "G_ema" and not ckpt_io.net_state(tensors, name):
            net.load_state_dict(nets["G"].state_dict())  # EMA switched on at a resume: start from G
            continue
        load_net(tensors, name, net, origin)
    try:
        step = int(meta["aigc.step"])
        for name, opt in opts.items():
            opt.load_state_dict(_optimizer_state(name, tensors, meta, opt, step))
        scaler = _scaler_state(meta)
        if amp.scaler is not None and scaler is not None:
            amp.scaler.load_state_dict(scaler)
        _set_rng(tensors, meta)
        batches.seek(**data_position(meta))
        return step, int(meta["aigc.images_seen"])
    except _INVALID as e:
        raise _invalid_state(origin, e) from None


# What a run may change in its optimizers' param groups (a resume with other rates or betas, a schedule,
# a rollback); every other setting (amsgrad, maximize, fused, ...) is this run's own, whatever a file says.
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "base_lr", "initial_lr")
_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


def _optimizer_state(name: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], opt, step: int,
                     copy: bool = True) -> dict:
    """The state dict to load into `opt` from a captured state, checked: a tampered or damaged file must not
    load mismatched, partial or negative moments, nor settings Adam would fail on or misuse. `copy`: the
    moments are copies (False for a check only)."""
    groups = json.loads(meta[f"aigc.opt.{name}.param_groups"])
    ours = opt.state_dict()["param_groups"]
    _check_groups(name, groups, ours)
    state: dict[int, dict] = {}
    prefix = f"opt.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, sub = key[len(prefix):].split(".", 1)
            if not idx.isdigit() or idx != str(int(idx)):
                raise ValueError(f"optimizer {name} has state for parameter {idx!r}")
            state.setdefault(int(idx), {})[sub] = value
    if step > 0 and not state:  # Adam's moments exist from the first step on: without them no exact resume
        raise ValueError(f"no optimizer state for {name}")
    params = [p for group in opt.param_groups for p in group["params"]]
    for idx, per_param in state.items():
        if not 0 <= idx < len(params):
            raise ValueError(f"optimizer {name} has state for parameter {idx} of {len(params)}")
        if set(per_param) != _ADAM_STATE:
            raise ValueError(f"optimizer {name}: parameter {idx} has state {sorted(per_param)}, "
                             f"Adam's is {sorted(_ADAM_STATE)}")
        for key, value in per_param.items():
            if key == "step":
                if (value.numel() != 1 or not (value.is_floating_point() or value.dtype == torch.int64)
                        or not 0 <= float(value) <= step * 1000):
                    raise ValueError(f"opt.{name}.{idx}.step is {value.tolist()}")
            elif value.shape != params[idx].shape or not value.is_floating_point():
                raise ValueError(f"opt.{name}.{idx}.{key} is {str(value.dtype).removeprefix('torch.')} of shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(params[idx].shape)}")
            elif not bool(torch.isfinite(value).all()):
                raise ValueError(f"opt.{name}.{idx}.{key} holds NaN or infinite values")
            elif key == "exp_avg_sq" and bool((value < 0).any()):
                raise ValueError(f"opt.{name}.{idx}.{key} holds negative values")
    # copies: load_state_dict keeps tensors of the right dtype and device as they are, and Adam then
    # updates them in place, which changed the in-memory rollback point under a second rollback
    # _GROUP_KEYS from the file alone: a snapshot without base_lr (taken before a schedule's first step)
    # must not keep the live one, which a rollback had lowered and the next rollback would lower again
    return {"state": {i: {k: v.clone() if copy else v for k, v in per.items()} for i, per in state.items()},
            "param_groups": [{**{k: v for k, v in o.items() if k not in _GROUP_KEYS},
                              **{k: g[k] for k in _GROUP_KEYS if k in g}} for g, o in zip(groups, ours)]}


def _scaler_state(meta: dict[str, str]) -> dict | None:
    """The fp16 GradScaler's state, checked (None when the run had no scaler)."""
    if "aigc.scaler" not in meta:
        return None
    saved = json.loads(meta["aigc.scaler"])
    if not isinstance(saved, dict):
        raise ValueError(f"GradScaler state {meta['aigc.scaler'][:100]}")
    if not saved:  # a disabled scaler saves nothing
        return saved

    def number(key, lo, hi=float("inf"), kind=(int, float)):
        v = saved.get(key)
        if type(v) not in kind or not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError(f"GradScaler {key} is {v!r}")

    number("scale", 0.0)
    if saved["scale"] == 0:
        raise ValueError("GradScaler scale is 0")
    number("growth_factor", 1.0)
    number("backoff_factor", 0.0, 1.0)
    number("growth_interval", 1, kind=(int,))
    number("_growth_tracker", 0, kind=(int,))
    return saved


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str], cuda_too: bool = True) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda_too and cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    py = json.loads(meta["aigc.rng.python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, pos, has_gauss, gauss = json.loads(meta["aigc.rng.numpy"])
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


_INVALID = (KeyError, ValueError, TypeError, RuntimeError, IndexError, OverflowError, RecursionError)


def _invalid_state(origin, e: Exception) -> UsageError:
    return UsageError(f"{origin}: cannot resume from it, its training state is incomplete or invalid "
                      f"({first_line(e, typed=True)})")


def resume_position(ck: Checkpoint) -> dict[str, int]:
    """data_position of a checkpoint to resume, read before the state is restored (to count the steps
    left): a damaged one is the same one-line error restore gives."""
    try:
        return data_position(ck.meta)
    except _INVALID as e:
        raise _invalid_state(ck.path, e) from None


def data_images_then(ck: Checkpoint) -> int | None:
    """How many training images the run had when the checkpoint was saved (None: not recorded, before
    aigc.data_images existed)."""
    text = ck.meta.get("aigc.data_images", "")
    return int(text) if text.isdigit() and len(text) < 19 else None


def check_resumable(ck: Checkpoint) -> None:
    """Restore's own checks, before the data is loaded (load() has checked the networks): the optimizer
    state against the model's parameters (laid out on the meta device: no memory), the GradScaler, the RNG
    states (each set, then put back) and the data position. `--resume auto` then takes the next checkpoint
    instead of stopping after the data load."""
    from .steps import make_optimizers

    resume_position(ck)
    nets = ckpt_io.shapes_of(ck.config)
    opts = make_optimizers(FAMILIES[ck.config.model.kind].objective, nets, ck.config.train)
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        step = int(ck.meta["aigc.step"])
        for name, opt in opts.items():
            _optimizer_state(name, ck.tensors, ck.meta, opt, step, copy=False)
        _scaler_state(ck.meta)
        _set_rng(ck.tensors, ck.meta, cuda_too=False)  # not put back below; restore sets them (or not) anyway
    except _INVALID as e:
        raise _invalid_state(ck.path, e) from None
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def data_position(meta: dict[str, str]) -> dict[str, int]:
    """(epoch, image) where the data order goes on. Checkpoints before image counts held (epoch, index)
    in batches of their own batch size."""
    position = json.loads(meta["aigc.data_position"])
    if (not isinstance(position, dict) or sorted(position) not in (["epoch", "image"], ["epoch", "index"])
            or not all(type(v) is int and 0 <= v < 2**62 for v in position.values())):
        raise ValueError(f"data position {position!r}")
    if "index" in position:
        batch_size = json.loads(meta["aigc.config"])["train"]["batch_size"]
        position = {"epoch": position["epoch"], "image": position["index"] * int(batch_size)}
    return position


def _check_groups(name: str, groups, ours: list[dict]) -> None:
    """Stored param groups: the same parameters as the model's optimizer, and hyperparameters Adam accepts
    (a negative, non-numeric or huge learning rate would otherwise train, or fail at the first step; the
    config allows rates below 1)."""
    if not isinstance(groups, list) or len(groups) != len(ours):
        raise ValueError(f"optimizer {name}: {len(groups) if isinstance(groups, list) else 'no'} param groups, "
                         f"the model has {len(ours)}")

    def number(v, lo, hi=float("inf")):
        return type(v) in (int, float) and math.isfinite(v) and lo <= v <= hi

    for g, o in zip(groups, ours):
        betas = g.get("betas") if isinstance(g, dict) else None
        if (not isinstance(g, dict) or g.get("params") != o["params"] or not number(g.get("lr"), 0, 1)
                or not all(number(g[k], 0, 1) for k in ("base_lr", "initial_lr") if k in g)
                or not number(g.get("eps"), 1e-30, 1) or not number(g.get("weight_decay", 0), 0)
                or not isinstance(betas, list) or len(betas) != 2 or not all(number(b, 0) and b < 1 for b in betas)):
            shown = {k: v for k, v in g.items() if k != "params"} if isinstance(g, dict) else g
            raise ValueError(f"optimizer {name}: invalid param group {json.dumps(shown)[:200]}")


def best_of(meta: dict[str, str], origin) -> tuple[str | None, float | None, int | None]:
    """The metric that chose best.safetensors, its best value and the step whose checkpoint set it
    (None in checkpoints from before that was recorded), as a checkpoint records them."""
    try:
        metric, value, step = (json.loads(meta.get(f"aigc.best_{k}", "null")) for k in ("metric", "value", "step"))
    except (ValueError, RecursionError):
        metric = value = step = "invalid"
    if not (metric is None or isinstance(metric, str)) or not (
            value is None or (type(value) in (int, float) and math.isfinite(value))) or not (
            step is None or (type(step) is int and step >= 0)):
        raise UsageError(f"{origin}: cannot resume from it, its aigc.best_metric / aigc.best_value / aigc.best_step "
                         "are invalid")
    return metric, value, step


def recorded_best(meta: dict[str, str]) -> tuple[str | None, float | None, int | None]:
    """best_of for a file only shown or reported (`aigc info`, train's summary): invalid records read as none."""
    try:
        return best_of(meta, "")
    except UsageError:
        return None, None, None


def log_sums_meta(sums: dict[str, torch.Tensor], n: int) -> str:
    """The losses summed since the last log line (device tensors: read here, at a save, not per step)."""
    return json.dumps({"n": n, "sums": {k: [float(v), str(v.dtype).removeprefix("torch.")] for k, v in sums.items()}})


def log_sums(meta: dict[str, str], device) -> tuple[dict[str, torch.Tensor], int]:
    """log_sums_meta read back, as the tensors they were (a float32 value survives JSON exactly); none
    from checkpoints before they were saved, or unreadable: the first line then averages fewer steps."""
    try:
        saved = json.loads(meta.get("aigc.log_sums", "null"))
        n, sums = int(saved["n"]), {str(k): torch.tensor(float(v), dtype=getattr(torch, dt), device=device)
                                    for k, (v, dt) in saved["sums"].items()}
        return (sums, n) if n > 0 and sums and all(t.is_floating_point() for t in sums.values()) else ({}, 0)
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError):
        return {}, 0


@torch.no_grad()
def all_finite(nets: dict, grads: bool = True, also=()) -> bool:
    """One device sync: are all weights and buffers, the last step's gradients and the tensors in `also`
    finite? Used at log intervals and before every save (with the losses summed since the last log line, which
    a save between log lines stores and which nothing else has checked yet). Pass grads=False under fp16:
    there inf gradients are routine, the GradScaler skips those steps and lowers its scale."""
    tensors = [t for net in nets.values() for p in net.parameters() for t in (p, p.grad if grads else None)
               if t is not None]
    tensors += [b for net in nets.values() for b in net.buffers() if b.is_floating_point()]  # BN running stats
    tensors += list(also)
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def find_resume(resume: str | None, run_dir: Path, warn) -> Checkpoint | None:
    """`--resume auto`: the newest checkpoint in run_dir that loads (best.safetensors if it is the only
    one left; None when there is none);
    `--resume PATH`: that checkpoint or run folder, which must load."""
    if resume is None:
        return None
    if resume != "auto":
        ck = ckpt_io.load(resume, warn=warn)
        if ck.kind != "checkpoint":
            raise UsageError(f"--resume {resume}: an exported generator has no training state to resume from")
        return ck
    folder = Path(run_dir) / "checkpoints"
    steps = ckpt_io.step_files(folder)
    # last and best take their place by the step they hold: where they are copies rather than links to
    # a step file (`cp -r` or rsync without -H; a file system without hard links), an intact `last` is
    # newer than the step files left when the newest of them is damaged.
    named = [(p, _step_in(p)) for p in (folder / "last.safetensors", folder / "best.safetensors") if p.is_file()]
    order = sorted([(p, ckpt_io.step_of(p), 0) for p in steps] + [(p, k, i + 1) for i, (p, k) in enumerate(named)],
                   key=lambda c: (-c[1], c[2]))
    for path, _, _ in order:
        if not path.is_file():
            continue
        try:
            ck = ckpt_io.load(path)
            if path.name.startswith("step-") and ckpt_io.step_of(path) != ck.step:
                # it would be resumed at its own step, and the files after that (itself among them) set aside
                raise UsageError(f"{path}: its name says step {ckpt_io.step_of(path)}, its metadata step {ck.step}")
            if ck.kind == "checkpoint":
                check_resumable(ck)
        except UsageError as e:
            warn(f"skipping unusable checkpoint: {e}")
            continue
        if ck.kind == "checkpoint":
            return ck
        warn(f"skipping {path}: an exported generator, with no training state to resume from")
    return None


def _step_in(path: Path) -> int:
    """The step a checkpoint's metadata names (-1 when unreadable: tried last)."""
    try:
        return int((ckpt_io.read_meta(path) or {}).get("aigc.step", -1))
    except ValueError:
        return -1


PATH_KEYS = ("data.source", "data.root", "train.eval_features")


def _same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def check_same_classes(ck: Checkpoint, names: tuple[str, ...], num_classes: int) -> None:
    """A labelled model resumed on data whose classes are not the ones it learnt: class folders renamed,
    added or removed renumber the classes (folders are numbered in name order), and a resume would go on
    teaching class k under another meaning, silently."""
    def listed(classes) -> str:
        shown = ", ".join(f"{i} {one_line(c)}" for i, c in enumerate(classes[:8]))
        return shown + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")

    old = ck.class_names
    if old and names and list(names) != list(old):
        raise UsageError(f"cannot resume from {ck.path}: the data's classes are {listed(names)}; the model learnt "
                         f"{listed(old)}, and the class numbers would change meaning; give it the class folders it "
                         "was trained on, or start a new run in another --out")
    if ck.config.model.num_classes != num_classes:
        raise UsageError(f"cannot resume from {ck.path}: the data has {num_classes} classes, the model learnt "
                         f"{ck.config.model.num_classes}; resume on the data it was trained on, or start a new run "
                         "in another --out")


def check_compatible(old: Config, new: Config, origin) -> list[str]:
    """Refuse changes to the architecture; return the other changed keys so the caller can say so."""
    changed, arch = [], []
    old_d, new_d = old.to_dict(), new.to_dict()
    for section, values in new_d.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            before = old_d.get(section, {}).get(key)
            if f"{section}.{key}" in PATH_KEYS and before and value and _same_path(before, value):
                continue  # a run from before paths were stored absolute, resumed from where it started
            if f"{section}.{key}" == "model.num_classes" and not (needs_labels(old.model) or needs_labels(new.model)):
                continue  # a model without labels has no classes: an older run may still carry a stale count
            if before != value:
                (arch if section == "model" else changed).append(f"{section}.{key} {before!r} -> {value!r}")
    if arch:
        raise UsageError(f"cannot resume from {origin}: the config changes the architecture ({', '.join(arch)}); "
                         "drop those overrides or start a new run in another --out")
    return changed
