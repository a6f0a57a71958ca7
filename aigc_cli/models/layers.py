"""Small building blocks shared by the families: class-conditional BN, the projection head, spectral norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize


def sn(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Spectral normalisation (Miyato et al. 2018) of `module.weight` when enabled; the module itself otherwise.

    One power iteration per training-mode forward pass; in eval mode the stored estimate is used.
    """
    if not enabled:
        return module
    if module.weight.is_meta:  # shapes only (models.build_shapes): no power iterations
        parametrize.register_parametrization(module, "weight", _SpectralNormShapes(module))
        return module
    return parametrizations.spectral_norm(module)


def materialize_spectral_norm(net: nn.Module) -> None:
    """After a shapes-only net was given memory (to_empty): torch's spectral norm in place of each stand-in,
    before the weights are loaded. The global RNG is left as it was (a resumed run must draw what it did)."""
    for module in net.modules():
        if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0],
                                                                        _SpectralNormShapes):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            with torch.random.fork_rng(devices=[]):
                parametrizations.spectral_norm(module)


class _SpectralNormShapes(nn.Module):
    """Stands in for torch's spectral norm on the meta device, where only names and shapes matter: the same
    buffers (_u, _v) without the 15 power iterations, which there run through torch's Python reference
    kernels (and import torch._dynamo): seconds on every command that checks a checkpoint."""

    def __init__(self, module: nn.Module):
        super().__init__()
        transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        matrix = module.weight.movedim(1 if transposed else 0, 0).flatten(1)  # as torch's _SpectralNorm
        self.register_buffer("_u", torch.empty(matrix.shape[0], dtype=matrix.dtype, device="meta"))
        self.register_buffer("_v", torch.empty(matrix.shape[1], dtype=matrix.dtype, device="meta"))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The trainable weight tensor: the unnormalised original of a spectral-normalised layer."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def norm2d(kind: str, channels: int) -> nn.Module:
    """The discriminator normalisation named by model.d_norm: batch, layer (GroupNorm with one group) or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalisation {kind!r}; use batch, layer or none")


def need_labels(y: torch.Tensor | None) -> torch.Tensor:
    if y is None:
        raise ValueError("this network is class-conditional: pass the labels y (int64, shape (N,))")
    return y


def one_hot(y: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y.long(), num_classes).to(dtype)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm2d without its own affine parameters, then a gain and a bias looked up per class
    (categorical conditional BN: de Vries et al. 2017; Miyato & Koyama 2018; BigGAN). Gains start at 1, biases at 0."""

    def __init__(self, num_features: int, num_classes: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.gain = nn.Embedding(num_classes, num_features)
        self.bias = nn.Embedding(num_classes, num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.bn(x)
        gain = self.gain(y).to(h.dtype)[:, :, None, None]
        bias = self.bias(y).to(h.dtype)[:, :, None, None]
        return h * gain + bias


class ProjectionHead(nn.Module):
    """The projection discriminator's output (Miyato & Koyama 2018): linear(h) + <embed(y), h>, shape (N,).

    Weights start xavier-uniform (as in the SNGAN code); spectral_norm wraps both the linear and the embedding.
    """

    def __init__(self, features: int, num_classes: int, spectral_norm: bool = False):
        super().__init__()
        linear, embed = nn.Linear(features, 1), nn.Embedding(num_classes, features)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        nn.init.xavier_uniform_(embed.weight)
        self.linear = sn(linear, spectral_norm)
        self.embed = sn(embed, spectral_norm)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.linear(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)
