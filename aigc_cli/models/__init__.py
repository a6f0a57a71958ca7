"""Model families: name -> builder. Networks only; objectives live in losses.py and training/steps.py.

Every family returns a dict of named networks. "G" is always the image generator (a VAE's decoder):
`G(z)` maps latents (N, latent_dim) to images (N, C, H, W) in [-1, 1]. That one convention lets
sampling, export and eval treat GANs and VAEs alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import classifier, dcgan, mlp_gan, resnet_gan, vae


@dataclass(frozen=True)
class Family:
    name: str
    objective: str  # "gan" | "vae" | "classifier": picks the training step and optimizers
    build: Callable[..., dict[str, nn.Module]]
    needs_labels: bool = False
    needs_power_of_two: bool = False
    generative: bool = True
    supports_conditional: bool = False
    uses: tuple[str, ...] = ()  # model options only this family reads (others refuse non-default values)


FAMILIES: dict[str, Family] = {
    "mlp_gan": Family("mlp_gan", "gan", mlp_gan.build),
    "dcgan": Family("dcgan", "gan", dcgan.build, needs_power_of_two=True, supports_conditional=True,
                    uses=("spectral_norm", "d_norm")),
    "resnet_gan": Family("resnet_gan", "gan", resnet_gan.build, needs_power_of_two=True, supports_conditional=True),
    "vae": Family("vae", "vae", vae.build, needs_power_of_two=True, supports_conditional=True, uses=("likelihood",)),
    "classifier": Family("classifier", "classifier", classifier.build, needs_labels=True, generative=False),
}


def build_nets(model_cfg) -> dict[str, nn.Module]:
    return FAMILIES[model_cfg.kind].build(model_cfg)


class _NoRandomInit(TorchFunctionMode):
    """Random initialisations of meta tensors draw nothing: on the meta device torch runs them through
    Python reference kernels whose first use imports torch._dynamo (2 s on every command)."""

    INITS = {nn.init.normal_, nn.init.uniform_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
             nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.trunc_normal_, nn.init.orthogonal_,
             torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.INITS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def build_shapes(model_cfg) -> dict[str, nn.Module]:
    """build_nets on the meta device: every parameter's and buffer's name, shape and dtype, with no memory
    and no initialisation, whatever sizes a (possibly hostile) config asks for; in milliseconds."""
    with torch.device("meta"), _NoRandomInit():
        return build_nets(model_cfg)


def needs_labels(model_cfg) -> bool:
    return FAMILIES[model_cfg.kind].needs_labels or model_cfg.conditional
