"""The image-side 4x4 stride-2 layers run as sub-pixel convolutions (train.subpixel_convs).

D's first convolution (1-4 input channels) and G's last transposed convolution (1-4 output channels) are
where cuDNN runs its slowest kernels: in a profile of the 64x64 DCGAN step at batch 1024 on an H200 they
and the layout copies beside them took 5-6 ms of 12-13 (benchmarks/README.md). Both have an exact rewrite
with more channels and stride 1 (Shi et al. 2016), which the libraries run with their common kernels:

- Conv2d(C, O, 4, stride 2, padding 1)(x) == conv2d(pixel_unshuffle(pad(x, 1), 2), w2): space-to-depth and a
  2x2 convolution over 4C channels, w2[o, 4c + 2dy + dx, a, b] = w[o, c, 2a + dy, 2b + dx].
- ConvTranspose2d(C, O, 4, stride 2, padding 1)(h) == pixel_shuffle(conv2d(h, w3, padding=1), 2): a 3x3
  convolution to the 4 sub-pixel phases of each output channel, then depth-to-space. Output pixel
  (2i + dy, 2j + dx) sums input pixels i-1..i+1 with the kernel taps that reach it: the kernel flipped,
  every other tap, offset by the phase. 9/4 of the transposed layer's multiply-adds.

`use_subpixel(net, memory_format)` changes a network in place without changing its state_dict: the
parameters stay the 4x4 kernels (checkpoints, EMA copies and sampling see the usual layers), and each
forward pass derives the rewritten kernel from them, so gradients reach the same parameters. Spectral
normalisation, a parametrization of `weight`, applies before the rewrite as before.

On an H200 (torch 2.11, bf16, the whole step in a CUDA graph, fused BN + activation) the one-channel DCGAN
step ran 1.32x faster at batch 1024 (85.6k -> 113k images/s), 1.19x at 256 and 1.07x at 64, so `auto` turns
it on for CUDA where the step is to be captured in a graph, for one-channel images: what was measured. An eager
step pays the rewrites' extra launches on the host (302 -> 366 aten calls per DCGAN step), which a graph
hides; at small batch, where launches are the bottleneck, that is not measured yet, so `auto` leaves eager
steps alone (eager at batch 1024 gained 1.31x: `on` for such runs). Nor were 3-channel images measured:
`on` rewrites them too. On 2 CPU cores the step gained nothing measurable (1.00-1.04x, benchmarks/README.md),
so `auto` leaves it off there.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

# Image-side layers only (the image's 1 or 3 channels): between wide layers the library's own kernels are
# fast. A conditional VAE's encoder takes its label maps as channels too, which leaves it out.
MAX_CHANNELS = 4
AUTO_MAX_CHANNELS = 1  # what `auto` rewrites: the one-channel layers measured on a GPU
# Which rewrites use_subpixel applies; benchmarks/gpu_check.py narrows it to time each one alone.
KINDS = ("conv", "transposed")
# The rewritten convolution's narrow side (D's 4C input channels, G's 4O output channels) is zero-padded up to
# this many channels (0: not padded): cuDNN's 16-bit tensor-core kernels want channel counts that are multiples
# of 8. Same function either way. On the H200, 8 against 0: 1.04x at batch 64, 1.00-1.01x at 256 and 1024.
PAD_CHANNELS = 8


def space_to_depth_weight(w: torch.Tensor) -> torch.Tensor:
    """(O, C, 4, 4) -> (O, 4C, 2, 2): the kernel over pixel_unshuffle(2) of the padded input."""
    o, c = w.shape[:2]
    return w.reshape(o, c, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, 2, 2)


def sub_pixel_weight(w: torch.Tensor) -> torch.Tensor:
    """(C, O, 4, 4) transposed kernel -> (4O, C, 3, 3) convolution to the 4 phases of each output channel.

    Flipped and padded with one zero each side, a dimension's 6 taps reshape to (3 input offsets, 2);
    phase d takes column 1 - d, hence the second flip."""
    c, o = w.shape[:2]
    wp = F.pad(w.flip(2, 3), (1, 1, 1, 1)).reshape(c, o, 3, 2, 3, 2).flip(3, 5)
    return wp.permute(1, 3, 5, 0, 2, 4).reshape(4 * o, c, 3, 3)


def _space_to_depth_conv(self, x, weight, bias):
    """Bound to a Conv2d as its _conv_forward, which its forward calls with `weight` after any
    parametrization (spectral norm) has been applied."""
    fmt = self.subpixel_format  # the network's: the layers after this one expect it
    u = F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2)
    w2 = space_to_depth_weight(weight)
    extra = PAD_CHANNELS - u.shape[1]
    if extra > 0:  # zero channels in both: they add nothing
        u, w2 = F.pad(u, (0, 0, 0, 0, 0, extra)), F.pad(w2, (0, 0, 0, 0, 0, extra))
    return F.conv2d(u.contiguous(memory_format=fmt), w2.contiguous(memory_format=fmt), bias)


def _depth_to_space_forward(self, x, output_size=None):
    """Bound to a ConvTranspose2d as its forward."""
    if output_size is not None:  # another output size needs output_padding, which the rewrite lacks
        return type(self).forward(self, x, output_size)
    fmt = self.subpixel_format
    w3 = sub_pixel_weight(self.weight)
    # Each output channel's bias on its 4 phases (expand, not repeat_interleave: nothing a CUDA graph could trip on)
    bias = self.bias.reshape(-1, 1).expand(-1, 4).reshape(-1) if self.bias is not None else None
    phases = w3.shape[0]
    extra = PAD_CHANNELS - phases
    if extra > 0:  # zero kernels (and biases) for the padding channels, sliced off below
        w3 = F.pad(w3, (0, 0, 0, 0, 0, 0, 0, extra))
        bias = F.pad(bias, (0, extra)) if bias is not None else None
    y = F.conv2d(x, w3.contiguous(memory_format=fmt), bias, padding=1)
    # pixel_shuffle keeps channels-last on the CPU only (torch's own meta function says so): back to the
    # network's format, free for one channel, where both formats are the same bytes.
    return F.pixel_shuffle(y[:, :phases] if extra > 0 else y, 2).contiguous(memory_format=fmt)


# Which method each kind replaces, by an attribute of the instance: the class stays what it was, so that
# torch's parametrize (which takes a parametrized class's first base for the original), deep copies (the
# EMA's, which rebind the method to the copy) and type checks see the usual layer.
_METHODS = {"conv": ("_conv_forward", _space_to_depth_conv), "transposed": ("forward", _depth_to_space_forward)}


def _fits(m: nn.Module) -> bool:
    """A 4x4, stride-2, padding-1, ungrouped, undilated, zero-padded layer with no output_padding."""
    return (m.kernel_size == (4, 4) and m.stride == (2, 2) and m.padding == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and tuple(m.output_padding) == (0, 0))


def rewritten(m: nn.Module) -> bool:
    return "subpixel_format" in m.__dict__


def candidates(net: nn.Module, limit: int = MAX_CHANNELS) -> list[tuple[nn.Module, str]]:
    """(layer, kind) for what use_subpixel rewrites in `net`: its first Conv2d (D's, an encoder's) when that
    takes at most `limit` channels, and its last ConvTranspose2d (G's, a decoder's) when that gives at most
    `limit`, either only when 4x4 stride-2 and of the KINDS asked for, and not rewritten yet."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    found = []
    if "conv" in KINDS and convs and convs[0].in_channels <= limit:
        found.append((convs[0], "conv"))
    if "transposed" in KINDS and ups and ups[-1].out_channels <= limit:
        found.append((ups[-1], "transposed"))
    return [(m, kind) for m, kind in found if _fits(m) and not rewritten(m)]


def use_subpixel(net: nn.Module, memory_format: torch.memory_format, limit: int = MAX_CHANNELS) -> int:
    """Rewrite the candidate layers of `net` in place; returns how many. The state_dict is unchanged."""
    found = candidates(net, limit)
    for m, kind in found:
        name, fn = _METHODS[kind]
        m.subpixel_format = memory_format
        setattr(m, name, types.MethodType(fn, m))
    return len(found)


def max_channels(setting: str, device: torch.device, graphed: bool) -> int:
    """How many image channels a layer may have for this run to rewrite it (0: none). `on`: MAX_CHANNELS.
    `auto`: one-channel layers where the step is to be captured in a CUDA graph (1.07-1.32x on an H200);
    none in an eager step (not measured at small batch) or on the CPU (no gain on 2 cores)."""
    if setting == "on":
        return MAX_CHANNELS
    return AUTO_MAX_CHANNELS if setting == "auto" and device.type == "cuda" and graphed else 0
