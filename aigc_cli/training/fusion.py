"""BatchNorm + activation pairs run as compiled, fused kernels (train.fuse_norm_act).

At large batch the DCGAN step on a fast GPU is bound by arithmetic and memory traffic, not launches:
a CUDA graph no longer helps there. Between the convolutions (cuDNN's, left alone) every BatchNorm in
training mode reads its input twice (statistics, then normalisation) and writes it once, and the
activation after it reads and writes it again, forwards and backwards. `torch.compile` on just the
BatchNorm + ReLU/LeakyReLU pair fuses the normalisation, the affine and the activation into one pass
each way. The convolutions stay outside the compiled region: inductor's own convolution path failed
in backward with channels-last on torch 2.11.

`fuse_norm_act(net)` changes the networks in place without changing their state_dict: each fused
BatchNorm2d becomes a `BatchNormAct2d` (a subclass, same parameters and buffers) and the activation
after it an `nn.Identity`. In eval mode, or with a cumulative (momentum=None) average, the module
runs the eager BatchNorm and activation, so EMA copies, sampling and checkpoints see the same model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import first_line

# Recompiles: one per layer shape and per requires_grad pattern (the generator step freezes D): ten
# for the 64x64 DCGAN's two networks on the CPU in fp32, about 18 on a GPU in bf16, for each batch size.
# Dynamo's default limit of 8 per function would silently send the rest back to eager; 64 ran out in a
# process that trained four batch sizes after another (benchmarks/gpu_check.py, or a sweep from Python).
RECOMPILE_LIMIT = 256
BACKEND = "inductor"  # tests swap in "aot_eager" to check the wiring without a C++/Triton compile

_compiled = None
_failed: str | None = None  # why compiling failed once: every fused module runs eagerly from then on
# Where that failure is reported (the run's notes). Module-level, not on the modules: an EMA deep copy
# of the generator would otherwise try to copy the reporter (consoles, locks) with it.
_note = None


def _norm_act(x, weight, bias, running_mean, running_var, momentum: float, eps: float, slope: float):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    return F.leaky_relu(y, slope) if slope else F.relu(y)


def _kernel():
    global _compiled
    if _compiled is None:
        import logging

        import torch._dynamo

        if not torch.cuda.is_available():  # a CUDA build of torch on a CPU-only machine: an irrelevant warning
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), RECOMPILE_LIMIT))
        _compiled = torch.compile(_norm_act, backend=BACKEND, dynamic=False, fullgraph=True)
    return _compiled


def reset() -> None:
    """Forget the compiled function and any failure (tests that change BACKEND)."""
    global _compiled, _failed, _note
    _compiled = _failed = _note = None


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by ReLU (slope 0) or LeakyReLU(slope), fused when training."""

    slope: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        global _failed
        if self.training and self.track_running_stats and self.momentum is not None and _failed is None:
            args = (self.weight, self.bias, self.running_mean, self.running_var,
                    float(self.momentum), float(self.eps), float(self.slope))
            try:
                self._compile_backward_now(x, args)
                y = _kernel()(x, *args)
            except Exception as e:  # noqa: BLE001 - no compiler, a backend bug ...: train on, unfused
                # Nothing was updated yet (a failed compile never ran); a genuine runtime error
                # (out of memory, say) comes back from the eager path below.
                _failed = _describe(e)
                if _note is not None:
                    _note(f"fusing BatchNorm + activation failed ({_failed}); they run unfused from here on")
            else:
                self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d does; outside the compiled region
                return y
        y = super().forward(x)
        return F.leaky_relu(y, self.slope) if self.slope else F.relu(y)

    def _compile_backward_now(self, x: torch.Tensor, args: tuple) -> None:
        """AOTAutograd compiles a graph's backward lazily, at its first .backward(), where a failure
        could no longer fall back. So the first call with each kind of input runs once on copies
        (running statistics untouched) with a backward, inside forward's try; the real call then
        reuses both compiled halves."""
        w = self.weight
        kind = (tuple(x.shape), x.stride(), x.dtype, x.requires_grad, w is not None and w.requires_grad,
                torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type),
                torch.get_autocast_dtype(x.device.type), torch.is_autocast_cache_enabled())
        seen = self.__dict__.setdefault("_compiled_kinds", set())
        if kind in seen:
            return
        # The parameters themselves (guards check their type, so copies would compile another graph;
        # autograd.grad leaves their .grad alone); a copy of x and of the running statistics.
        xs = x.detach().clone().requires_grad_(x.requires_grad)
        y = _kernel()(xs, *args[:2], args[2].clone(), args[3].clone(), *args[4:])
        needs = [t for t in (xs, *args[:2]) if t is not None and t.requires_grad]
        if needs and y.requires_grad:
            torch.autograd.grad(y.float().sum(), needs)
        seen.add(kind)


def wanted(setting: str, device: torch.device) -> bool:
    """auto fuses on CUDA only, where Triton can compile for the GPU. Measured on an H200 (64x64 DCGAN,
    bf16, whole step in a CUDA graph): 1.06-1.13x images/s at batch 64-1024, for 10-35 s of compiling at
    the start. On 2 CPU cores the compiled pair was slower than oneDNN's kernels. Without Triton (or on a
    GPU too old for it) auto stays off quietly rather than fail a compile and say so in every run."""
    return setting == "on" or (setting == "auto" and device.type == "cuda" and _triton_usable())


def _triton_usable() -> bool:
    try:
        from torch.utils._triton import has_triton  # private, but what inductor itself asks
    except ImportError:
        return True  # let the compile try; a failure falls back with a note
    return has_triton()


def _describe(e: BaseException) -> str:
    """One line for a compile failure: dynamo wraps the backend's own error, which says more."""
    return first_line(getattr(e, "inner_exception", None) or e.__cause__ or e, typed=True)


def _slope(act: nn.Module) -> float | None:
    if type(act) is nn.ReLU:
        return 0.0
    if type(act) is nn.LeakyReLU:
        return float(act.negative_slope)
    return None


def report_to(note) -> None:
    """Where a compile failure is reported (a run's notes; None: nowhere, so a finished run's reporter
    is not kept alive). A failure from earlier in this process is reported at once."""
    global _note
    _note = note
    if note is not None and _failed is not None:
        note(f"fusing BatchNorm + activation failed earlier in this process ({_failed}); they run unfused")


def _pairs(net: nn.Module):
    """(container, index, slope) of each plain BatchNorm2d directly followed by a ReLU or LeakyReLU inside
    a Sequential or ModuleList of `net`."""
    for container in list(net.modules()):
        if not isinstance(container, (nn.Sequential, nn.ModuleList)):
            continue
        mods = list(container)
        for i in range(len(mods) - 1):
            slope = _slope(mods[i + 1])
            if type(mods[i]) is nn.BatchNorm2d and slope is not None:
                yield container, i, slope


def has_pairs(net: nn.Module) -> bool:
    return any(True for _ in _pairs(net))


def fuse_norm_act(net: nn.Module) -> int:
    """Fuse every pair _pairs finds; returns how many were fused. Conditional BatchNorm, spectral norm and
    other layers are left as they are."""
    count = 0
    for container, i, slope in list(_pairs(net)):
        bn = container[i]
        bn.__class__ = BatchNormAct2d  # same parameters and buffers: state_dict unchanged
        bn.slope = slope
        container[i + 1] = nn.Identity()
        count += 1
    return count
