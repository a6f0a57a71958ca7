"""Model families: name -> builder. Networks only; objectives live in losses.py and training/steps.py.

Every family returns a dict of named networks. "G" is always the image generator (a VAE's decoder):
`G(z)` maps latents (N, latent_dim) to images (N, C, H, W) in [-1, 1]. That one convention lets
sampling, export and eval treat GANs and VAEs alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

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


def needs_labels(model_cfg) -> bool:
    return FAMILIES[model_cfg.kind].needs_labels or model_cfg.conditional
