"""One training step per objective. Each returns detached loss tensors and never syncs with the
device (no .item()): the loop reads values back only at log intervals."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import losses


def make_optimizers(objective: str, nets: dict, train_cfg) -> dict[str, torch.optim.Optimizer]:
    betas = (train_cfg.beta1, train_cfg.beta2)
    fused = {"foreach": True}

    def adam(params, lr):
        return torch.optim.Adam(params, lr=lr, betas=betas, **fused)

    if objective == "gan":
        return {"G": adam(nets["G"].parameters(), train_cfg.lr_g), "D": adam(nets["D"].parameters(), train_cfg.lr_d)}
    if objective == "vae":
        return {"G": adam([*nets["E"].parameters(), *nets["G"].parameters()], train_cfg.lr_g)}
    return {"C": adam(nets["C"].parameters(), train_cfg.lr_g)}


def gan_step(nets, opts, amp, x, z, cfg) -> dict[str, torch.Tensor]:
    G, D = nets["G"], nets["D"]
    with amp.autocast():
        fake = G(z)
        loss_d = losses.bce_d(D(x), D(fake.detach()))
    opts["D"].zero_grad(set_to_none=True)
    amp.backward(loss_d)
    amp.step(opts["D"])

    D.requires_grad_(False)  # the G step needs gradients through D, not for D's weights
    with amp.autocast():
        loss_g = losses.bce_g(D(fake))
    opts["G"].zero_grad(set_to_none=True)
    amp.backward(loss_g)
    amp.step(opts["G"])
    D.requires_grad_(True)
    amp.update()
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}


def vae_forward(nets, x):
    mu, logvar = nets["E"](x)
    z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
    return nets["G"](z), mu, logvar


def vae_step(nets, opts, amp, x, z, cfg) -> dict[str, torch.Tensor]:
    with amp.autocast():
        recon, mu, logvar = vae_forward(nets, x)
        t = losses.vae_terms(x, recon, mu, logvar, cfg.loss.recon_sigma)
        loss = t["nll"] + cfg.loss.vae_beta * t["kl"]
    opts["G"].zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(opts["G"])
    amp.update()
    return {"loss": loss.detach(), "neg_elbo": t["neg_elbo"].detach(), "kl": t["kl"].detach(),
            "mse": t["mse"].detach()}


def classifier_step(nets, opts, amp, x, y, cfg) -> dict[str, torch.Tensor]:
    with amp.autocast():
        logits = nets["C"](x)
        loss = F.cross_entropy(logits.float(), y)
    opts["C"].zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(opts["C"])
    amp.update()
    return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


STEPS = {"gan": gan_step, "vae": vae_step, "classifier": classifier_step}
