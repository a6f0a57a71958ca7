"""Device and mixed-precision choices: autocast dtype, and a GradScaler only where fp16 needs it."""

from __future__ import annotations

import contextlib
import re

import torch

from ..errors import UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", name) is None:
        raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device {name}: no CUDA GPU is available here; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError("device mps: MPS is not available here; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on a CUDA GPU that has it (no scaler needed, fp16's NaN risk avoided), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def slow_precision_note(name: str, device: torch.device) -> str | None:
    """fp16 on a CPU works, but PyTorch emulates its convolutions there: a DCGAN step measured 30x slower
    than fp32 on two cores. `auto` never picks it, so only an explicit ask gets here, and gets told."""
    if name == "fp16" and torch.device(device).type == "cpu":
        return ("fp16 on the CPU is emulated and many times slower than fp32 (30x for a DCGAN step); "
                "use --precision fp32 (what auto picks there) or bf16")
    return None


class Precision:
    """Wraps autocast + optional GradScaler so step functions read the same for every precision."""

    def __init__(self, name: str, device: torch.device):
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self.graph_safe = False  # set while a CUDA graph is captured: autocast's cast cache must be off

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=not self.graph_safe)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        self.scaler.step(opt) if self.scaler else opt.step()

    def update(self) -> None:
        if self.scaler:
            self.scaler.update()
