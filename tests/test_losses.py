"""losses.py in closed form: the signs of each GAN objective and the VAE's terms. Training tests only check
that losses are finite, so a flipped sign (a discriminator trained to call fakes real) went unnoticed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aigc_cli import losses

REAL, FAKE = torch.tensor([2.0, -0.5]), torch.tensor([-1.5, 0.25])


@pytest.mark.parametrize("kind, d_want, g_want", [
    ("bce", (F.softplus(-REAL).mean() + F.softplus(FAKE).mean()).item(), F.softplus(-FAKE).mean().item()),
    ("hinge", (0 + 1.5) / 2 + (0 + 1.25) / 2, 0.625),  # relu(1 - real) + relu(1 + fake); -mean(fake)
    ("wgan-gp", -0.625 - 0.75, 0.625),  # mean(fake) - mean(real); -mean(fake)
], ids=["bce", "hinge", "wgan-gp"])
def test_gan_losses_have_their_textbook_values(kind, d_want, g_want):
    assert losses.d_loss(kind, REAL, FAKE).item() == pytest.approx(d_want, rel=1e-6)
    assert losses.g_loss(kind, FAKE).item() == pytest.approx(g_want, rel=1e-6)


@pytest.mark.parametrize("kind", ["bce", "hinge", "wgan-gp"])
def test_the_discriminator_loss_falls_as_it_tells_real_from_fake_and_the_generators_as_it_fools_it(kind):
    d = lambda r, f: losses.d_loss(kind, torch.tensor([r]), torch.tensor([f])).item()  # noqa: E731
    assert d(0.5, -0.5) < d(0.0, 0.0) < d(-0.5, 0.5)
    assert losses.g_loss(kind, torch.tensor([0.5])).item() < losses.g_loss(kind, torch.tensor([-0.5])).item()


def test_vae_terms_in_closed_form():
    x = torch.full((1, 1, 2, 2), 0.5)
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    sigma = 0.5
    t = losses.vae_terms(x, torch.zeros(1, 1, 2, 2), mu, logvar, sigma, "gaussian")  # mean image tanh(0) = 0
    nll = 4 * 0.25 / (2 * sigma**2) + 4 * math.log(sigma * math.sqrt(2 * math.pi))
    kl = 0.5 * ((1 + 1 - 1 - 0) + (0 + 2 - 1 - math.log(2.0)))
    assert t["nll"].item() == pytest.approx(nll, rel=1e-6)
    assert t["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert t["neg_elbo"].item() == pytest.approx(nll + kl, rel=1e-6)
    assert t["mse"].item() == pytest.approx(0.25, rel=1e-6)


def test_bernoulli_nll_maps_pixels_from_minus_one_one_to_probabilities():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)  # targets 0, 0.5, 1
    logits = torch.full((1, 1, 1, 3), 2.0)
    soft = math.log1p(math.exp(-2.0))
    want = (2 + soft) + (2 - 1 + soft) + soft  # max(l, 0) - l * t + log(1 + exp(-|l|))
    assert losses.bernoulli_nll(x, logits).item() == pytest.approx(want, rel=1e-6)
    assert losses.vae_terms(x, logits, torch.zeros(1, 2), torch.zeros(1, 2), 1.0, "bernoulli")["nll"].item() == \
        pytest.approx(want, rel=1e-6)
