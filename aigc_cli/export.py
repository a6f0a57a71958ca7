"""Generator-only artifacts: the G weights (a VAE's decoder) and the config, nothing needed for training;
as safetensors here, as an ONNX model in export_onnx.py."""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .errors import UsageError
from .files import check_name_lengths, check_writable
from .models import FAMILIES
from .sampling import generator_from
from .training.ema import EMA_NORMS_KEY
from .training.precision import DTYPES


def export_generator(ckpt: ckpt_io.Checkpoint, out: Path, dtype: str, ema: bool = True, warn=None) -> dict:
    if not FAMILIES[ckpt.config.model.kind].generative:
        raise UsageError(f"{ckpt.path}: a {ckpt.config.model.kind} has no generator to export")
    out = Path(out)
    check_name_lengths(out, "--out")  # before the checks below stat it
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name such as model.safetensors")
    if out.suffix.lower() not in (".safetensors", ".onnx"):
        raise UsageError(f"--out {out}: exports are safetensors files (`aigc sample` and `aigc info` read "
                         "them) or ONNX models; use a name ending in .safetensors or .onnx")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    check_writable(out, "--out")
    label = ckpt.generator_weights(ema)[1]  # the EMA weights are the better generator
    meta = _meta(ckpt, dtype, label)
    # what the file says it came from, for --json too
    origin = {"source": meta["aigc.source"], "step": ckpt.step, "weights": label}
    if out.suffix.lower() == ".onnx":
        from .export_onnx import export_onnx  # noqa: PLC0415 (onnx is an optional extra)

        return {**export_onnx(ckpt, out, dtype, ema, meta, warn), **origin}
    _refuse_replacing(out)
    target = DTYPES[dtype]
    # The generator as sampling loads it (an EMA's batch-norm statistics measured where the file holds the
    # live G's). Floating weights take the requested dtype; integer buffers (num_batches_tracked) stay.
    G, _ = generator_from(ckpt, "cpu", "fp32", ema=ema, warn=warn)
    tensors = {f"G.{k}": (v.to(target) if v.is_floating_point() else v) for k, v in G.state_dict().items()}
    for key, v in tensors.items():  # load() refused non-finite sources: an inf here is fp16's range (65504)
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UsageError(f"--dtype {dtype}: {key} has values beyond {dtype}'s range "
                             f"(largest {torch.finfo(target).max:g}); export as bf16 or fp32")
    ckpt_io.write_atomic(out, tensors, meta)
    return {"out": str(out), "format": "safetensors", "dtype": dtype, "tensors": len(tensors),
            "parameters": ckpt_io.param_counts(ckpt)["G"],  # as `aigc info` counts them: no BN buffers
            "bytes": out.stat().st_size, **origin}


def _meta(ckpt: ckpt_io.Checkpoint, dtype: str, label: str) -> dict[str, str]:
    """What an export says of itself: the config it rebuilds from, where it was trained, which weights."""
    meta = ckpt_io.base_meta(ckpt.config, "export", ckpt.step, ckpt.images_seen, ckpt.meta.get("aigc.precision", ""))
    meta["aigc.dtype"] = dtype
    meta["aigc.source"] = _source_of(ckpt)
    meta["aigc.weights"] = label
    if label == "G_ema":  # settled by the training run or by this export (ONNX too, through generator_from)
        meta[EMA_NORMS_KEY] = "settled"
    for key in ("aigc.class_names", "aigc.class_counts"):
        if key in ckpt.meta:
            meta[key] = ckpt.meta[key]
    return meta


def _source_of(ckpt: ckpt_io.Checkpoint) -> str:
    """Where the weights were trained: an export's own source carries over (re-exported at another
    dtype, say), and last.safetensors or best.safetensors by their step file."""
    if ckpt.kind == "export" and ckpt.meta.get("aigc.source"):
        return ckpt.meta["aigc.source"]
    return str(ckpt.step_file)


def _refuse_replacing(out: Path) -> None:
    """An export replaces an earlier export (or a file that is no safetensors file: a write cut short),
    nothing else. Written over a training checkpoint (the source itself, say) it would silently take the
    discriminator, optimizers and resume state with it; over another program's weights, those. As
    `sample --npz` treats an .npz of other arrays."""
    meta = ckpt_io.read_meta(out) if out.is_file() else None
    if meta is None or meta.get("aigc.kind") == "export" and meta.get("aigc.format"):
        return
    if meta.get("aigc.format"):
        raise UsageError(f"--out {out}: holds a training checkpoint, which an export would replace "
                         "(losing what resuming needs); choose another file name")
    raise UsageError(f"--out {out}: holds tensors that aigc did not write, which an export would replace; "
                     "name another file or remove it first")
