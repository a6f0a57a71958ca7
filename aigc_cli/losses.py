"""Objectives. Discriminators give logits; the losses here are autocast-safe (softplus, not BCE on a Sigmoid)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def bce_d(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))), written with softplus on logits."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def bce_g(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log D(G(z)) (Goodfellow et al. 2014, section 3)."""
    return F.softplus(-fake_logits.float()).mean()


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-image negative log-likelihood (nats) of x under N(mean, sigma^2) per pixel."""
    d = x[0].numel()
    sq = (x.float() - mean.float()).pow(2).flatten(1).sum(1)
    return sq / (2 * sigma**2) + d * math.log(sigma * math.sqrt(2 * math.pi))


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image KL(N(mu, exp(logvar)) || N(0, I))."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def vae_terms(x, recon, mu, logvar, sigma: float) -> dict[str, torch.Tensor]:
    """Batch means of the reconstruction NLL, KL and the negative ELBO (their sum), plus the pixel MSE."""
    nll = gaussian_nll(x, recon, sigma)
    kl = kl_standard_normal(mu, logvar)
    return {"nll": nll.mean(), "kl": kl.mean(), "neg_elbo": (nll + kl).mean(),
            "mse": (x.float() - recon.float()).pow(2).mean()}
