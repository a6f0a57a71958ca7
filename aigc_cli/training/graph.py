"""The whole training step (forwards, backwards and optimizer steps) captured once in a CUDA graph and
replayed: below batch ~256 an eager GAN step on a fast GPU is bound by kernel launches, not arithmetic,
and one graph replay replaces a few hundred launches.

A captured step reads its batch from static buffers, so each call copies the next real batch into
them and replays. The first WARMUP calls run eagerly on a side stream (CUDA graphs need the lazy
allocations of cuDNN/cuBLAS handles and optimizer state done before capture); they are real steps.
The generator EMA stays outside the graph: its decay changes every step and would be frozen in.

Anything that changes Python-side values the graph has baked in (learning rates, a rollback that
replaces optimizer state) must call `reset()`: the next call warms up and captures again.

Without CUDA (the CPU tests) the same object runs the same static-buffer path without capture, so the
plumbing (buffers, outputs, EMA outside the step) is exercised everywhere.
"""

from __future__ import annotations

import torch

from ..errors import first_line
from .steps import Aids

WARMUP = 3


def graph_blockers(cfg, amp, device: torch.device, scheduled: bool) -> list[str]:
    """Why this run's step cannot be captured (empty: it can)."""
    from ..models import FAMILIES

    objective, why = FAMILIES[cfg.model.kind].objective, []
    if device.type != "cuda":
        why.append("no CUDA device")
    if amp.scaler is not None:
        why.append("fp16's GradScaler syncs with the host")
    if objective == "gan" and (cfg.loss.gan == "wgan-gp" or cfg.loss.r1_gamma > 0):  # other families read neither
        why.append("the gradient penalty needs a double backward")
    if cfg.train.n_critic > 1:
        why.append("n_critic > 1")
    if scheduled:
        why.append("a learning-rate schedule changes the rates every step")
    if objective == "vae" and cfg.loss.kl_warmup > 0:
        why.append("the KL warm-up changes its weight every step")
    return why


def use_graph(cfg, amp, device: torch.device, scheduled: bool, note) -> bool:
    """train.cuda_graph: off, on (warn and fall back when impossible), auto (on where possible)."""
    setting = cfg.train.cuda_graph
    if setting == "off":
        return False
    why = graph_blockers(cfg, amp, device, scheduled)
    if why and (setting == "on" or device.type == "cuda"):
        note(f"CUDA graph off, training step runs eagerly: {'; '.join(why)}")
    return not why


class GraphedStep:
    def __init__(self, step_fn, nets: dict, opts: dict, amp, cfg, aids: Aids, capture: bool = True, note=None):
        self.step_fn, self.nets, self.opts, self.amp, self.cfg = step_fn, nets, opts, amp, cfg
        self.note = note or (lambda text: None)
        self.failed = False  # a capture failed once: eager from then on
        self.ema = aids.ema
        self.aids = Aids(augment=aids.augment, ema=None)  # EMA runs outside the graph
        self.capture = capture and torch.cuda.is_available()
        self.reset()

    def reset(self) -> None:
        """Forget the captured graph (after a rollback or a change of learning rates)."""
        self.graph = None
        self.static_in: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.static_out: dict[str, torch.Tensor] | None = None
        self.calls = 0

    def __call__(self, nets, opts, amp, next_batch, cfg, step: int, aids) -> dict[str, torch.Tensor]:
        self.amp, self.cfg = amp, cfg  # a rollback may have replaced them (then reset() was called too)
        x, y = next_batch()
        self.calls += 1
        if self.calls <= WARMUP or self.failed:
            out = self._eager(x, y, step)
        elif self.static_in is None:
            out = self._capture(x, y, step)
        else:
            self.static_in[0].copy_(x)
            if y is not None:
                self.static_in[1].copy_(y)
            if self.graph is not None:
                self.graph.replay()
                out = self.static_out
            else:  # no CUDA: the same static-buffer step, uncaptured
                out = self._run(*self.static_in, step)
        if self.ema is not None:
            self.ema.update(self.nets["G"], step)
        return out

    def _run(self, x, y, step):
        return self.step_fn(self.nets, self.opts, self.amp, lambda: (x, y), self.cfg, step, self.aids)

    def _eager(self, x, y, step):
        if not self.capture:
            return self._run(x, y, step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm up as the capture will run: with autocast's cast cache off. Compiled regions
        # (train.fuse_norm_act) are guarded on that setting; a different one would recompile them
        # inside the capture, where compiling cannot work.
        self.amp.graph_safe = not self.failed
        try:
            with torch.cuda.stream(side):
                out = self._run(x, y, step)
        finally:
            self.amp.graph_safe = False
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self, x, y, step):
        self.static_in = (x.clone(memory_format=torch.preserve_format), None if y is None else y.clone())
        if not self.capture:
            return self._run(*self.static_in, step)
        for opt in self.opts.values():  # gradients are allocated inside the graph's memory pool
            opt.zero_grad(set_to_none=True)
        self.amp.graph_safe = True  # autocast's weight-cast cache must be off under capture
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_out = self._run(*self.static_in, step)
        except Exception as e:  # an op that cannot be captured (a host sync, say): carry on eagerly
            # Capture records without running, so nothing of this step happened yet: run it eagerly.
            self.failed, self.graph, self.static_in, self.static_out = True, None, None, None
            torch.cuda.synchronize()
            self.note(f"CUDA graph capture failed ({first_line(e, typed=True)}); "
                      "the training step runs eagerly from here on")
            return self._eager(x, y, step)
        finally:
            self.amp.graph_safe = False
        self.graph.replay()  # capture records without running: this is the step itself
        return self.static_out
