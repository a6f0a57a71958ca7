"""Exponential moving average of a model's weights (typically a GAN generator), for sampling and evaluation."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn


# Generated images that settle_norm_stats measures. In the measurement its docstring cites, 512 to 8,192
# gave FIDs from 33.0 to 35.1 in no order (the statistics' own sampling noise); 2,048 costs 3 s on 2 CPU
# cores for the 64x64 DCGAN (20-70 s for the SNGAN presets), at each grid, evaluation and regular save.
NORM_STATS_IMAGES = 2048
# Checkpoint metadata: "settled" when G_ema's batch-norm statistics are its own, "copied" when they are the
# live G's (a save for a signal or by time, which cannot wait); sampling settles those, and older files.
EMA_NORMS_KEY = "aigc.ema_norms"


class EMA:
    """Keeps ``self.model``, a frozen deep copy of ``model`` in eval mode, tracking its weights.

    ``update(model, step)`` copies the weights while ``step < start`` (so the average does not start
    from the random initialisation), afterwards ``ema = d * ema + (1 - d) * w`` with
    ``d = min(decay, (1 + k) / (10 + k))`` at the k-th averaged update when ``warmup`` is on (as
    TensorFlow's ExponentialMovingAverage with num_updates): without it a 0.999 average would still be
    mostly the random initialisation a thousand steps into a run. Buffers
    (BatchNorm running statistics, counters) are copied, never averaged; ``settle_norm_stats`` then
    measures the averaged weights' own statistics before the copy is used. Checkpoints save and load
    ``self.model``'s state dict; ``state_dict``/``load_state_dict`` here are the same.
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
        self.settled = False  # whether the batch-norm statistics are the averaged weights' own

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        self.settled = False
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

    def settle_norm_stats(self, cfg, autocast, should_stop: Callable[[], bool] | None = None) -> None:
        """settle_norm_stats(self.model, ...) for the run's config, once after each update; left unsettled
        (the copied statistics) when should_stop says so before it is done."""
        if not self.settled:
            self.settled = settle_norm_stats(self.model, cfg, autocast, should_stop) is not None

    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.model.load_state_dict(state_dict, strict=strict)


# Mixed into the run's seed: the statistics' latents must not be the grid's or an evaluation's, which
# draw from the seed itself (an FID on the images the statistics were fitted on reads a little better).
SEED_MIX = 0x5E771E


@torch.no_grad()
def settle_norm_stats(model: nn.Module, cfg, autocast, should_stop: Callable[[], bool] | None = None) -> bool | None:
    """Give an averaged generator's batch norms the statistics of its own activations, measured on
    NORM_STATS_IMAGES generated images (whole batches of the run's batch size, as training ran them;
    a conditional model's classes uniform), in place: True; False when it has no batch norm. Its copied ones
    are the live G's, whose weights differ from the average. Measured on Fashion-MNIST (32x32 DCGAN,
    3,000 steps, decay 0.999): FID 37.2 with the copied statistics, 34.3-34.6 with its own, the live G 34.5
    (benchmarks/README.md, "EMA"). BigGAN's "standing statistics". Seeded on its own (the run's seed,
    mixed): no random stream of the run is touched, and the same weights always get the same statistics.

    `should_stop` is asked before each batch: when it says so (a signal whose save must fit in a batch
    system's grace period; this takes a minute for an SNGAN on a CPU), the statistics it found are put back
    and the result is None."""
    layers = norm_layers(model)
    if not layers:
        return False
    m_cfg, batch_size = cfg.model, cfg.train.batch_size
    classes = m_cfg.num_classes if m_cfg.conditional else 0
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.train.seed ^ SEED_MIX)
    was_training, momenta = model.training, [m.momentum for m in layers]
    found = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in layers]
    stopped = True  # also when a batch raises (or a second Ctrl-C): what was found is put back
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches (fused layers run eagerly with it)
        model.train()
        with autocast:
            for _ in range(max(1, round(NORM_STATS_IMAGES / batch_size))):
                if should_stop is not None and should_stop():
                    return None
                z = torch.randn(batch_size, m_cfg.latent_dim, generator=gen).to(device)
                y = torch.randint(classes, (batch_size,), generator=gen).to(device) if classes else None
                model(z, y)
        stopped = False
    finally:
        for m, momentum, kept in zip(layers, momenta, found):
            m.momentum = momentum
            if stopped:
                for b, k in zip((m.running_mean, m.running_var, m.num_batches_tracked), kept):
                    b.copy_(k)
        model.train(was_training)
    return True


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The batch norms whose running statistics the model samples with."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)
