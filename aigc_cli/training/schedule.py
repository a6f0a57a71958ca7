"""Learning-rate schedule: linear warm-up, then no decay, linear or cosine decay to 0 at the last step."""

from __future__ import annotations

import math

import torch

DECAYS = ("none", "linear", "cosine")


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Multiplier in [0, 1] for the base learning rate at 0-based ``step`` of ``total``.

    ``(step + 1) / warmup`` while ``step < warmup``; afterwards 1.0 ("none"), ``1 - progress``
    ("linear") or ``0.5 * (1 + cos(pi * progress))`` ("cosine"), where ``progress`` runs from 0
    at the end of the warm-up to 1 at ``total``.
    """
    if decay not in DECAYS:
        raise ValueError(f"lr decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    if warmup < 0:
        raise ValueError(f"warm-up steps must be >= 0, got {warmup}")
    if warmup > 0 and step < warmup:
        return min(1.0, max(0.0, (step + 1) / warmup))
    if decay == "none":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min(1.0, max(0.0, factor))


def set_lr(optimizers: dict[str, torch.optim.Optimizer], factor: float) -> None:
    """``lr = base_lr * factor`` for every param group; ``base_lr`` is recorded from ``lr`` the first time.

    ``base_lr`` lives in the param group, so it is saved in the optimizer's state dict and a resumed
    run scales the original rate rather than an already-scaled one.
    """
    for opt in optimizers.values():
        for group in opt.param_groups:
            lr = group["lr"]
            if "base_lr" not in group:
                group["base_lr"] = lr.clone() if isinstance(lr, torch.Tensor) else lr
            new = group["base_lr"] * factor
            if isinstance(lr, torch.Tensor):
                lr.copy_(new)  # tensor lr (capturable/fused optimizers): update in place, no host sync
            else:
                group["lr"] = new
