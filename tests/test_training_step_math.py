"""Training-step arithmetic (aigc_cli/training/steps.py): which parameters each optimizer holds at which
rate, the penalty and KL weights in the loss that is backpropagated, the latent prior and WGAN's fresh
sample for G."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.models import build_nets
from aigc_cli.training.precision import Precision
from aigc_cli.training.steps import Aids, gan_step, kl_weight, make_optimizers, vae_step

from conftest import tiny

CPU = torch.device("cpu")


class Recording(Precision):
    """fp32 on the CPU, remembering each loss it is asked to backpropagate and each update()."""

    def __init__(self):
        super().__init__("fp32", CPU)
        self.losses, self.updates = [], 0

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        super().backward(loss)

    def update(self):
        self.updates += 1
        super().update()


def batch():
    torch.manual_seed(1)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    return lambda: (x, torch.zeros(4, dtype=torch.long))


def test_each_optimizer_holds_its_networks_at_its_learning_rate():
    cfg = tiny("dcgan").with_overrides({"train.lr_g": "3e-4", "train.lr_d": "7e-4"})
    nets = build_nets(cfg.model)
    opts = make_optimizers("gan", nets, cfg.train)
    assert [g["lr"] for g in opts["G"].param_groups] == [3e-4] and [g["lr"] for g in opts["D"].param_groups] == [7e-4]
    vae = tiny("vae")
    nets = build_nets(vae.model)
    held = {id(p) for g in make_optimizers("vae", nets, vae.train)["G"].param_groups for p in g["params"]}
    assert all(id(p) in held for name in ("E", "G") for p in nets[name].parameters())  # the encoder learns too


@pytest.mark.parametrize("overrides, penalty", [({"loss.gan": "wgan-gp", "loss.gp_weight": "7"}, ("gp", 7.0)),
                                                ({"loss.r1_gamma": "1e4"}, ("r1", 0.5 * 1e4))])  # a new D's R1 is ~1e-5
def test_d_backpropagates_its_loss_plus_the_weighted_penalty(overrides, penalty):
    cfg = tiny("dcgan", d_norm="none").with_overrides(overrides)
    nets = build_nets(cfg.model)
    amp = Recording()
    out = gan_step(nets, make_optimizers("gan", nets, cfg.train), amp, batch(), cfg, 1, Aids())
    key, weight = penalty
    assert float(out[key]) > 0
    assert amp.losses[0] - float(out["loss_d"]) == pytest.approx(weight * float(out[key]), rel=1e-3)


def test_kl_weight_warms_up_linearly_then_stays_at_beta():
    cfg = tiny("vae").with_overrides({"loss.vae_beta": "2", "loss.kl_warmup": "10"})
    assert [kl_weight(cfg, s) for s in (0, 5, 10, 20, 1000)] == pytest.approx([0.0, 1.0, 2.0, 2.0, 2.0])
    assert kl_weight(cfg.with_overrides({"loss.kl_warmup": "0"}), 3) == 2.0


def test_the_vae_loss_weights_its_kl_term_by_the_warm_up():
    cfg = tiny("vae").with_overrides({"loss.kl_warmup": "4", "loss.vae_beta": "1"})
    nets = build_nets(cfg.model)
    amp = Recording()
    out = vae_step(nets, make_optimizers("vae", nets, cfg.train), amp, batch(), cfg, 1, Aids())
    nll = float(out["neg_elbo"]) - float(out["kl"])
    assert float(out["kl"]) > 0
    assert amp.losses[0] == pytest.approx(nll + 0.25 * float(out["kl"]), rel=1e-5)


def test_the_vae_samples_z_with_the_encoders_standard_deviation():
    cfg = tiny("vae")
    nets = build_nets(cfg.model)
    mu, logvar = torch.zeros(4, cfg.model.latent_dim), torch.full((4, cfg.model.latent_dim), 2 * torch.log(torch.tensor(3.0)))
    nets["E"].forward = lambda x, y=None: (mu.requires_grad_(), logvar.requires_grad_())  # std 3
    seen = []
    real_logits = nets["G"].logits
    nets["G"].logits = lambda z, y=None: seen.append(z.detach()) or real_logits(z, y)
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(5)
    eps = torch.randn(4, cfg.model.latent_dim)
    torch.manual_seed(5)
    vae_step(nets, {"G": torch.optim.SGD(nets["G"].parameters(), lr=0.0)}, Recording(), lambda: (x, None), cfg, 1, Aids())
    assert torch.allclose(seen[0], 3 * eps)


def test_g_sees_standard_normal_latents_and_a_fresh_sample_after_the_critic_steps():
    """Sampling draws z ~ N(0, I): training on any other prior makes samples off-distribution. With
    n_critic > 1, G gets a fresh z (WGAN-GP's algorithm), and each D step is followed by an update()
    (fp16's GradScaler allows one step per optimizer between updates)."""
    cfg = tiny("dcgan", d_norm="none").with_overrides({"loss.gan": "wgan-gp", "train.n_critic": "3"})
    nets = build_nets(cfg.model)
    zs = []
    nets["G"].register_forward_pre_hook(lambda module, args: zs.append(args[0].detach().clone()))
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.manual_seed(9)
    expected = torch.randn(4, cfg.model.latent_dim)
    torch.manual_seed(9)
    amp = Recording()
    gan_step(nets, make_optimizers("gan", nets, cfg.train), amp, lambda: (x, None), cfg, 1, Aids())
    assert torch.equal(zs[0], expected)
    assert len(zs) == 4 and not any(torch.equal(zs[3], z) for z in zs[:3])
    assert amp.updates == 4


def test_a_conditional_vae_step_hands_the_labels_to_encoder_and_decoder():
    """`model.conditional` passes the batch's labels on; dropping them would train an unconditional VAE
    under a conditional model's name (its `--class` then meaning nothing)."""
    cfg = tiny("vae", conditional=True, num_classes=3)
    nets = build_nets(cfg.model)
    seen = {}

    def watching(name, real):
        def call(inputs, y=None):
            seen[name] = y
            return real(inputs, y)
        return call

    nets["E"].forward = watching("E", nets["E"].forward)
    nets["G"].logits = watching("G", nets["G"].logits)
    labels = torch.tensor([0, 2, 1, 2])
    vae_step(nets, make_optimizers("vae", nets, cfg.train), Recording(), lambda: (torch.rand(4, 1, 16, 16), labels),
             cfg, 1, Aids())
    assert torch.equal(seen["E"], labels) and torch.equal(seen["G"], labels)
