"""Objectives. Discriminators give logits; the losses here are autocast-safe (softplus, not BCE on a
Sigmoid), and the gradient penalties run in fp32 whatever the training precision."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    real, fake = real.float(), fake.float()
    if kind == "bce":  # -log D(x) - log(1 - D(G(z))), on logits
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":  # Lim & Ye 2017; Miyato et al. 2018 (SNGAN)
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":  # the critic's Wasserstein estimate, negated (Gulrajani et al. 2017)
        return fake.mean() - real.mean()
    raise ValueError(f"unknown GAN loss {kind!r}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    fake = fake.float()
    if kind == "bce":  # the non-saturating loss -log D(G(z)) (Goodfellow et al. 2014, section 3)
        return F.softplus(-fake).mean()
    return -fake.mean()  # hinge and Wasserstein generators both maximise the critic's score


def _input_gradients(D, x: torch.Tensor, y) -> torch.Tensor:
    """dD/dx with a graph for the double backward, computed in fp32: the penalty is a small
    difference of norms that bf16/fp16 would swamp, and GradScaler scaling does not apply here."""
    x = x.detach().float().requires_grad_(True)
    with torch.autocast(x.device.type, enabled=False):  # the backward graph too: its products stay fp32
        out = D(x, y)
        (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return grad


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, y=None) -> torch.Tensor:
    """WGAN-GP: E[(||grad_x D(x_hat)||_2 - 1)^2] on random interpolates x_hat of real and fake."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = alpha * real.detach().float() + (1 - alpha) * fake.detach().float()
    grad = _input_gradients(D, x_hat, y)
    return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


def r1_penalty(D, real: torch.Tensor, y=None) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E[||grad_x D(x)||^2] on real images; weight gamma/2 outside."""
    return _input_gradients(D, real, y).flatten(1).pow(2).sum(1).mean()


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-image negative log-likelihood (nats) of x under N(mean, sigma^2) per pixel."""
    d = x[0].numel()
    sq = (x.float() - mean.float()).pow(2).flatten(1).sum(1)
    return sq / (2 * sigma**2) + d * math.log(sigma * math.sqrt(2 * math.pi))


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-image NLL (nats) of pixel intensities in [0, 1] under Bernoulli(sigmoid(logits))."""
    target = (x.float() + 1) / 2
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none").flatten(1).sum(1)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-image KL(N(mu, exp(logvar)) || N(0, I))."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)


def decoded_image(logits: torch.Tensor, likelihood: str) -> torch.Tensor:
    """The decoder's mean image in [-1, 1] from its raw output (as the VAE's G.forward gives it)."""
    return torch.tanh(logits.float()) if likelihood == "gaussian" else torch.sigmoid(logits.float()) * 2 - 1


def vae_terms(x, logits, mu, logvar, sigma: float, likelihood: str = "gaussian") -> dict[str, torch.Tensor]:
    """Batch means of the reconstruction NLL, KL and the negative ELBO (their sum), plus the pixel MSE."""
    recon = decoded_image(logits, likelihood)
    nll = gaussian_nll(x, recon, sigma) if likelihood == "gaussian" else bernoulli_nll(x, logits)
    kl = kl_standard_normal(mu, logvar)
    return {"nll": nll.mean(), "kl": kl.mean(), "neg_elbo": (nll + kl).mean(),
            "mse": (x.float() - recon).pow(2).mean()}
