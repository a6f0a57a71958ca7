"""Exponential moving average of a model's weights (typically a GAN generator), for sampling and evaluation."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``self.model``, a frozen deep copy of ``model`` in eval mode, tracking its weights.

    ``update(model, step)`` copies the weights while ``step < start`` (so the average does not start
    from the random initialisation), afterwards ``ema = d * ema + (1 - d) * w`` with
    ``d = min(decay, (1 + k) / (10 + k))`` at the k-th averaged update when ``warmup`` is on (as
    TensorFlow's ExponentialMovingAverage with num_updates): without it a 0.999 average would still be
    mostly the random initialisation a thousand steps into a run. Buffers
    (BatchNorm running statistics, counters) are always copied, never averaged. Checkpoints save and
    load ``self.model``'s state dict; ``state_dict``/``load_state_dict`` here are the same.
    """

    def __init__(self, model: nn.Module, decay: float, start: int = 0, warmup: bool = True):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.start = int(start)
        self.warmup = warmup
        self.model = copy.deepcopy(model)
        self.model.eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        ema_buffers = list(self.model.buffers())
        buffers = [b.detach() for b in model.buffers()]
        if len(ema_params) != len(params) or len(ema_buffers) != len(buffers):
            raise ValueError("EMA.update: the model does not have the same parameters/buffers as the EMA copy")
        if ema_params:
            if step < self.start:
                _copy(ema_params, params)
            else:
                k = step - self.start  # the step alone decides d, so a resumed run continues exactly
                decay = min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay
                # lerp: ema + (1 - d) * (w - ema) == d * ema + (1 - d) * w
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        if ema_buffers:
            _copy(ema_buffers, buffers)

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.model.load_state_dict(state_dict, strict=strict)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)
