"""One training step per objective, shared by `aigc train` and the benchmarks. Each returns detached
loss tensors and never syncs with the device (no .item()): the loop reads values back at log intervals.

A step draws its real batches through `next_batch()`, so a WGAN critic can take n_critic fresh
batches per generator step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import losses
from .augment import diff_augment
from .ema import EMA


@dataclass
class Aids:
    """Per-run helpers a step uses: the DiffAugment policy and the generator's EMA."""

    augment: tuple[str, ...] = ()
    ema: EMA | None = None


def optimizer_flags(device: torch.device, capturable: bool) -> dict[str, bool]:
    """Fused Adam on CUDA (one kernel for all parameters), foreach elsewhere; capturable when the
    step is captured in a CUDA graph (the step counter then lives on the device)."""
    if device.type == "cuda":
        return {"fused": True, "foreach": False, "capturable": capturable}
    return {"fused": False, "foreach": True, "capturable": False}


def conform_optimizers(opts: dict, flags: dict[str, bool]) -> None:
    """This run's group settings (fused, foreach, capturable) on its optimizers, their step counters
    where those settings need them (on the device for fused or capturable Adam), and their moments in
    their parameters' memory layout: after a restore, the counters are where the run that saved them
    kept them, and the moments are contiguous (as safetensors stores them) where a parameter is
    channels-last. Fused Adam on CUDA refuses moments whose strides differ from the parameter's."""
    for opt in opts.values():
        for group in opt.param_groups:
            group.update(flags)
            for p in group["params"]:
                st = opt.state.get(p, {})
                if "step" in st and torch.is_tensor(st["step"]):
                    on_device = flags["fused"] or flags["capturable"]
                    st["step"] = st["step"].to(p.device if on_device else "cpu", torch.float32)
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in st and st[key].stride() != p.stride():
                        st[key] = torch.empty_like(p, dtype=st[key].dtype).copy_(st[key])


def make_optimizers(objective: str, nets: dict, train_cfg, flags: dict[str, bool] | None = None
                    ) -> dict[str, torch.optim.Optimizer]:
    betas = (train_cfg.beta1, train_cfg.beta2)
    flags = flags or {"foreach": True}

    def adam(params, lr):
        return torch.optim.Adam(params, lr=lr, betas=betas, **flags)

    if objective == "gan":
        return {"G": adam(nets["G"].parameters(), train_cfg.lr_g), "D": adam(nets["D"].parameters(), train_cfg.lr_d)}
    if objective == "vae":
        return {"G": adam([*nets["E"].parameters(), *nets["G"].parameters()], train_cfg.lr_g)}
    return {"C": adam(nets["C"].parameters(), train_cfg.lr_g)}


def gan_step(nets, opts, amp, next_batch, cfg, step: int, aids: Aids) -> dict[str, torch.Tensor]:
    G, D = nets["G"], nets["D"]
    kind, latent, cond = cfg.loss.gan, cfg.model.latent_dim, cfg.model.conditional

    def aug(t):
        return diff_augment(t, aids.augment) if aids.augment else t

    sums: dict[str, torch.Tensor] = {}  # D's losses summed over its n_critic steps: logged as their mean
    for _ in range(cfg.train.n_critic):
        out: dict[str, torch.Tensor] = {}
        x, y = next_batch()
        y = y if cond else None  # conditional: fakes get the real batch's labels (its class balance)
        z = torch.randn(x.shape[0], latent, device=x.device)
        with amp.autocast():
            fake = G(z, y)
            out["loss_d"] = losses.d_loss(kind, D(aug(x), y), D(aug(fake.detach()), y))
        total = out["loss_d"]
        seen = (lambda t, labels: D(aug(t), labels)) if aids.augment else D  # D as its loss sees its input
        if kind == "wgan-gp":  # the Lipschitz bound on the function the critic loss scores: through DiffAugment too
            out["gp"] = losses.gradient_penalty(seen, x, fake, y)
            total = total + cfg.loss.gp_weight * out["gp"]
        elif cfg.loss.r1_gamma > 0:  # through the augmentation, as StyleGAN2-ADA does: D's view of x
            out["r1"] = losses.r1_penalty(seen, x, y)
            total = total + 0.5 * cfg.loss.r1_gamma * out["r1"]
        opts["D"].zero_grad(set_to_none=True)
        amp.backward(total)
        amp.step(opts["D"])
        amp.update()  # fp16: GradScaler allows one step per optimizer between updates
        for k, v in out.items():
            sums[k] = sums[k] + v.detach() if k in sums else v.detach()

    D.requires_grad_(False)  # the G step needs gradients through D, not for D's weights
    try:  # and back on whatever happens (a CUDA-graph capture that fails here reruns the step eagerly)
        with amp.autocast():
            if cfg.train.n_critic > 1:  # a fresh sample for G, as in WGAN-GP's algorithm
                fake = G(torch.randn(x.shape[0], latent, device=x.device), y)
            loss_g = losses.g_loss(kind, D(aug(fake), y))
        opts["G"].zero_grad(set_to_none=True)
        amp.backward(loss_g)
        amp.step(opts["G"])
    finally:
        D.requires_grad_(True)
    amp.update()
    if aids.ema is not None:
        aids.ema.update(G, step)
    means = {k: v / cfg.train.n_critic if cfg.train.n_critic > 1 else v for k, v in sums.items()}
    return {"loss_d": means.pop("loss_d"), "loss_g": loss_g.detach(), **means}


def kl_weight(cfg, step: int) -> float:
    warm = cfg.loss.kl_warmup
    return cfg.loss.vae_beta * (min(1.0, step / warm) if warm else 1.0)


def vae_step(nets, opts, amp, next_batch, cfg, step: int, aids: Aids) -> dict[str, torch.Tensor]:
    x, y = next_batch()
    y = y if cfg.model.conditional else None
    with amp.autocast():
        mu, logvar = nets["E"](x, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        t = losses.vae_terms(x, nets["G"].logits(z, y), mu, logvar, cfg.loss.recon_sigma, cfg.model.likelihood)
        loss = t["nll"] + kl_weight(cfg, step) * t["kl"]
    opts["G"].zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(opts["G"])
    amp.update()
    return {"loss": loss.detach(), "neg_elbo": t["neg_elbo"].detach(), "kl": t["kl"].detach(),
            "mse": t["mse"].detach()}


def classifier_step(nets, opts, amp, next_batch, cfg, step: int, aids: Aids) -> dict[str, torch.Tensor]:
    x, y = next_batch()
    with amp.autocast():
        logits = nets["C"](x)
        loss = F.cross_entropy(logits.float(), y)
    opts["C"].zero_grad(set_to_none=True)
    amp.backward(loss)
    amp.step(opts["C"])
    amp.update()
    return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


STEPS = {"gan": gan_step, "vae": vae_step, "classifier": classifier_step}


def logged_values(cfg, objective: str) -> list[str]:
    """The values metrics.jsonl holds at every log interval for this config (what train.best_metric can
    name besides an eval metric): the step's, each optimizer's learning rate, and the speed."""
    if objective == "gan":
        penalty = ["gp"] if cfg.loss.gan == "wgan-gp" else ["r1"] if cfg.loss.r1_gamma > 0 else []
        return ["loss_d", "loss_g", *penalty, "lr_G", "lr_D", "img_per_s"]
    if objective == "vae":
        return ["loss", "neg_elbo", "kl", "mse", "lr_G", "img_per_s"]
    return ["loss", "acc", "lr_C", "img_per_s"]
