"""The model zoo: every objective and family trains on the CPU, the gradient penalty is right, and a
conditional generator really draws the class it is asked for."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from aigc_cli import checkpoint as ckpt_io
from aigc_cli import losses
from aigc_cli.models import build_nets
from aigc_cli.sampling import generate, generator_from, latents
from aigc_cli.training.loop import train
from conftest import Silent, tiny

VARIANTS = {
    "dcgan-hinge-sn": ("dcgan", {"loss.gan": "hinge", "model.spectral_norm": "true"}),
    "dcgan-wgan-gp": ("dcgan", {"loss.gan": "wgan-gp", "model.d_norm": "layer", "train.n_critic": "2",
                                "train.beta1": "0", "train.beta2": "0.9"}),
    "dcgan-r1": ("dcgan", {"loss.r1_gamma": "1.0", "model.d_norm": "none"}),
    "dcgan-r1-diffaugment": ("dcgan", {"loss.r1_gamma": "1.0", "train.diffaugment": "translation,color"}),
    "dcgan-cond": ("dcgan", {"model.conditional": "true"}),
    "resnet-hinge": ("resnet_gan", {"loss.gan": "hinge", "train.n_critic": "2"}),
    "resnet-cond-aids": ("resnet_gan", {"loss.gan": "hinge", "model.conditional": "true", "train.ema_decay": "0.9",
                                        "train.diffaugment": "translation,cutout,color", "train.lr_warmup": "5",
                                        "train.lr_decay": "cosine"}),
    "vae-bernoulli-beta": ("vae", {"model.likelihood": "bernoulli", "loss.vae_beta": "4", "loss.kl_warmup": "10"}),
    "vae-cond": ("vae", {"model.conditional": "true"}),
    "wgan-gp-bf16": ("dcgan", {"loss.gan": "wgan-gp", "model.d_norm": "layer", "train.precision": "bf16"}),
    "sngan-fp16-ncritic": ("resnet_gan", {"loss.gan": "hinge", "train.n_critic": "3", "train.precision": "fp16"}),
    "wgan-gp-fp16": ("dcgan", {"loss.gan": "wgan-gp", "model.d_norm": "none", "train.n_critic": "2",
                               "train.precision": "fp16"}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_with_finite_losses(name, tmp_path):
    kind, extra = VARIANTS[name]
    cfg = tiny(kind).with_overrides({"train.steps": "10", "train.log_every": "5", "train.ckpt_every": "10",
                                     "train.sample_every": "10", **extra})
    rep = Silent()
    summary = train(cfg, tmp_path / name, rep)
    assert summary["steps"] == 10 and len(rep.records) == 2
    for record in rep.records:
        for key, value in record.items():
            assert math.isfinite(value), (key, value)
    if cfg.loss.gan == "wgan-gp" and kind != "vae":
        assert "gp" in rep.records[-1] and rep.records[-1]["gp"] >= 0
    if cfg.train.n_critic > 1:  # D sees n_critic real batches per step
        assert summary["images_seen"] == 10 * cfg.train.n_critic * cfg.train.batch_size
    ck = ckpt_io.load(tmp_path / name)
    assert bool(ck.net_state("G_ema")) == (cfg.train.ema_decay > 0)
    stats = [k for k in ck.net_state("G") if k.endswith("running_var")]
    if ck.net_state("G_ema") and stats:  # its own batch-norm statistics, not the live G's copied
        assert all(not torch.equal(ck.net_state("G_ema")[k], ck.net_state("G")[k]) for k in stats)


def test_gradient_penalty_matches_a_direct_computation():
    torch.manual_seed(0)
    real, fake = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    w = torch.randn(16)

    def linear_critic(x, y=None):  # grad_x = w everywhere: GP = (|w| - 1)^2
        return x.flatten(1) @ w

    assert losses.gradient_penalty(linear_critic, real, fake).item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a matmul would run in bf16 here, but not in the penalty
        assert losses.gradient_penalty(linear_critic, real, fake).item() == pytest.approx((w.norm().item() - 1) ** 2, rel=1e-5)

    def square_critic(x, y=None):  # grad_x = 2 x: GP = mean((2|x_hat| - 1)^2) on the same interpolates
        return x.flatten(1).pow(2).sum(1)

    torch.manual_seed(1)
    alpha = torch.rand(6, 1, 1, 1)
    x_hat = alpha * real + (1 - alpha) * fake
    want = (2 * x_hat.flatten(1).norm(dim=1) - 1).pow(2).mean().item()
    torch.manual_seed(1)
    assert losses.gradient_penalty(square_critic, real, fake).item() == pytest.approx(want, rel=1e-5)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in fp32 whatever the autocast
        assert losses.gradient_penalty(square_critic, real, fake).item() == pytest.approx(want, rel=1e-5)
    # R1 on the square critic: E|2x|^2
    assert losses.r1_penalty(square_critic, real).item() == pytest.approx((2 * real).flatten(1).pow(2).sum(1).mean().item(), rel=1e-5)


def test_penalties_stay_fp32_under_autocast_through_the_double_backward():
    """D's forward ran without autocast but the input gradient, taken under the caller's bf16 autocast,
    ran its matrix products in bf16 (0.3% off): a caller inside autocast got a bf16 penalty."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 48, requires_grad=True), torch.randn(48, requires_grad=True)
    real, fake = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)

    def critic(x, y=None):
        return torch.tanh(x.flatten(1) @ w1) @ w2

    for penalty in (lambda: losses.gradient_penalty(critic, real, fake), lambda: losses.r1_penalty(critic, real)):
        torch.manual_seed(1)
        want = penalty()
        want_grad = torch.autograd.grad(want, w1)[0]
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = penalty()
        got_grad = torch.autograd.grad(got, w1)[0]  # the step's backward, outside autocast as torch advises
        assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
        assert torch.allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def test_gradient_penalty_reaches_the_critic_weights():
    cfg = tiny("dcgan").with_overrides({"model.d_norm": "layer"})
    D = build_nets(cfg.model)["D"]
    gp = losses.gradient_penalty(D, torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 16))
    gp.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())
    assert any(p.grad.abs().sum() > 0 for p in D.parameters())


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def colour_folder(root, per_class=48, size=16):
    """An easy labelled set: class k is noisy colour k with a darker square at a random place."""
    g = torch.Generator().manual_seed(0)
    for k, colour in enumerate(COLOURS):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            img = torch.tensor(colour, dtype=torch.float32).expand(size, size, 3).clone()
            x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
            img[y0:y0 + size // 2, x0:x0 + size // 2] *= 0.5
            img = (img + 20 * torch.randn(img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
            Image.fromarray(img.numpy()).save(root / f"class{k}" / f"{i}.png")
    return root


def test_conditional_generator_draws_the_requested_class(tmp_path):
    folder = colour_folder(tmp_path / "colours")
    base = {"data.source": str(folder), "data.limit": "0", "model.channels": "3", "train.batch_size": "32",
            "train.log_every": "50", "train.sample_every": "1000", "train.ckpt_every": "1000"}
    gan = tiny("dcgan").with_overrides({**base, "model.conditional": "true", "model.g_width": "16",
                                         "model.d_width": "16", "train.steps": "300", "train.lr_g": "1e-3",
                                         "train.lr_d": "1e-3"})
    train(gan, tmp_path / "gan", Silent())
    clf = tiny("classifier").with_overrides({**base, "train.steps": "60"})
    summary = train(clf, tmp_path / "clf", Silent())
    assert summary["train_accuracy"] > 0.9  # easy classes: the judge itself must be reliable (on its training images)

    ck = ckpt_io.load(tmp_path / "gan")
    G, amp = generator_from(ck, "cpu", "fp32")
    labels = torch.arange(4).repeat_interleave(25)
    images = generate(G, latents(100, ck.config.model.latent_dim, seed=5), amp, labels=labels)
    C = build_nets(ckpt_io.load(tmp_path / "clf").config.model)["C"]
    ckpt_io.load(tmp_path / "clf").load_net("C", C)
    with torch.no_grad():
        predicted = C.eval()(images.float() / 127.5 - 1).argmax(1)
    accuracy = (predicted == labels).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.25 (0.88 when written)
