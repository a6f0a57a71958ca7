"""The networks themselves: shapes, ranges, gradients (also under bf16 autocast), conditioning, spectral norm,
the projection head, and that the unconditional DCGAN/VAE keep today's parameter names and outputs."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from aigc_cli.config import ModelConfig
from aigc_cli.models import FAMILIES, build_nets
from aigc_cli.models.layers import ConditionalBatchNorm2d, ProjectionHead, norm2d
from aigc_cli.models import dcgan, resnet_gan, vae

K = 5  # classes in the conditional configs
N = 4  # batch


def cfg(kind: str, **kw) -> ModelConfig:
    base = dict(kind=kind, resolution=16, channels=1, latent_dim=8, g_width=8, d_width=8, num_classes=K)
    return ModelConfig(**{**base, **kw})


def build(m: ModelConfig) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return FAMILIES[m.kind].build(m)


def labels(n: int = N) -> torch.Tensor:
    return torch.arange(n) % K


GAN_CONFIGS = (
    [cfg("dcgan", resolution=r, channels=c, conditional=cond, d_norm=norm, spectral_norm=s)
     for r, c, cond, norm, s in itertools.product((16, 32), (1, 3), (False, True), ("batch", "layer", "none"),
                                                   (False, True))]
    + [cfg("dcgan", resolution=64, channels=3, conditional=cond, spectral_norm=cond) for cond in (False, True)]
    + [cfg("resnet_gan", resolution=r, channels=c, conditional=cond, g_width=32 if r == 64 else 8,
           d_width=32 if r == 64 else 8)
       for r, c, cond in itertools.product((16, 32, 64), (1, 3), (False, True))]
)
VAE_CONFIGS = [cfg("vae", resolution=r, channels=c, conditional=cond, likelihood=lik)
               for r, c, cond, lik in itertools.product((16, 32, 64), (1, 3), (False, True), ("gaussian", "bernoulli"))]


def cid(m: ModelConfig) -> str:
    return (f"{m.kind}-{m.resolution}px-c{m.channels}-{'cond' if m.conditional else 'uncond'}-{m.d_norm}"
            f"{'-sn' if m.spectral_norm else ''}-{m.likelihood}")


def assert_grads(*nets: nn.Module) -> None:
    for net in nets:
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ---- shapes, ranges, gradients -------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("m", GAN_CONFIGS, ids=cid)
def test_gan_shapes_ranges_and_backward(m, precision):
    nets = build(m)
    G, D = nets["G"].train(), nets["D"].train()
    z, y = torch.randn(N, m.latent_dim), labels()
    with autocast(precision):
        x = G(z, y)
        logits_fake = D(x, y)
        logits_real = D(torch.rand(N, m.channels, m.resolution, m.resolution) * 2 - 1, y)
    assert x.shape == (N, m.channels, m.resolution, m.resolution)
    assert torch.isfinite(x).all() and x.abs().max() <= 1
    assert logits_fake.shape == logits_real.shape == (N,)
    assert torch.isfinite(logits_fake).all() and torch.isfinite(logits_real).all()
    (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()).backward()
    assert_grads(G, D)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("m", VAE_CONFIGS, ids=cid)
def test_vae_shapes_ranges_and_backward(m, precision):
    nets = build(m)
    E, G = nets["E"].train(), nets["G"].train()
    x, y = torch.rand(N, m.channels, m.resolution, m.resolution) * 2 - 1, labels()
    with autocast(precision):
        mu, logvar = E(x, y)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = G.logits(z, y)
        out = G(z, y)
    assert mu.shape == logvar.shape == (N, m.latent_dim)
    assert mu.dtype == logvar.dtype == torch.float32
    assert logits.shape == out.shape == (N, m.channels, m.resolution, m.resolution)
    assert torch.isfinite(out).all() and out.abs().max() <= 1 and torch.isfinite(logits).all()
    if m.likelihood == "gaussian":
        recon = (out.float() - x).pow(2).mean()
    else:
        recon = F.binary_cross_entropy_with_logits(logits.float(), (x + 1) / 2)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1).mean()
    (recon + kl).backward()
    assert_grads(E, G)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("conditional", [False, True])
def test_vae_output_is_the_squashed_logits(likelihood, conditional):
    m = cfg("vae", conditional=conditional, likelihood=likelihood)
    G = build(m)["G"].eval()
    z, y = torch.randn(N, m.latent_dim) * 3, labels()
    with torch.no_grad():
        logits, out = G.logits(z, y), G(z, y)
    want = torch.tanh(logits) if likelihood == "gaussian" else torch.sigmoid(logits) * 2 - 1
    torch.testing.assert_close(out, want)


# ---- spectral normalisation ------------------------------------------------------------------

SN_CONFIGS = [cfg("dcgan", channels=3, spectral_norm=True, conditional=cond, d_norm="none") for cond in (False, True)] \
    + [cfg("resnet_gan", channels=3, conditional=cond) for cond in (False, True)]


@pytest.mark.parametrize("m", SN_CONFIGS, ids=cid)
def test_spectral_norm_bounds_the_largest_singular_value(m):
    D = build(m)["D"]
    layers = [x for x in D.modules() if isinstance(x, (nn.Conv2d, nn.Linear, nn.Embedding))]
    assert layers and all(parametrize.is_parametrized(x, "weight") for x in layers)

    def sigma(w: torch.Tensor) -> float:
        return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).float(), ord=2).item()

    with torch.no_grad():
        for x in layers:
            x.parametrizations.weight.original.mul_(100.0)  # raw weights far above norm 1
        D.train()
        for _ in range(100):  # one power iteration per training-mode forward pass
            D(torch.randn(N, m.channels, m.resolution, m.resolution), labels())
        D.eval()
        for x in layers:
            assert sigma(x.parametrizations.weight.original) > 2.0
            assert 1 - 1e-3 <= sigma(x.weight) <= 1 + 1e-2, x


def test_spectral_norm_only_where_asked():
    for m in (cfg("dcgan", spectral_norm=False, conditional=True), cfg("dcgan", spectral_norm=True)):
        nets = build(m)
        assert not any(parametrize.is_parametrized(x) for x in nets["G"].modules())
        assert any(parametrize.is_parametrized(x) for x in nets["D"].modules()) == m.spectral_norm
    nets = build(cfg("resnet_gan", spectral_norm=False))  # SNGAN's D always has it, its G never
    assert not any(parametrize.is_parametrized(x) for x in nets["G"].modules())
    assert all(parametrize.is_parametrized(x, "weight") for x in nets["D"].modules()
               if isinstance(x, (nn.Conv2d, nn.Linear)))


def test_d_norm_picks_the_discriminator_normalisation():
    kinds = {"batch": nn.BatchNorm2d, "layer": nn.GroupNorm}
    for norm in ("batch", "layer", "none"):
        D = build(cfg("dcgan", resolution=32, d_norm=norm))["D"]
        found = {type(x) for x in D.modules() if isinstance(x, (nn.BatchNorm2d, nn.GroupNorm))}
        assert found == ({kinds[norm]} if norm in kinds else set())
    assert isinstance(norm2d("none", 4), nn.Identity)
    with pytest.raises(ValueError):
        norm2d("instance", 4)


# ---- conditioning ----------------------------------------------------------------------------

def perturb_conditional_bn(net: nn.Module) -> None:
    """Conditional BN starts as plain BN for every class; give each class its own gain and bias, as training would."""
    with torch.no_grad():
        for x in net.modules():
            if isinstance(x, ConditionalBatchNorm2d):
                x.gain.weight.normal_(1.0, 0.3)
                x.bias.weight.normal_(0.0, 0.3)


@pytest.mark.parametrize("kind", ["dcgan", "resnet_gan"])
def test_conditional_gan_depends_on_the_label(kind):
    m = cfg(kind, conditional=True, channels=3)
    nets = build(m)
    G, D = nets["G"].eval(), nets["D"].eval()
    perturb_conditional_bn(G)
    z = torch.randn(1, m.latent_dim).expand(K, -1)  # one z, every class
    x = torch.rand(1, m.channels, m.resolution, m.resolution).expand(K, -1, -1, -1) * 2 - 1
    with torch.no_grad():
        imgs, logits = G(z, torch.arange(K)), D(x, torch.arange(K))
        assert torch.equal(G(z, torch.arange(K)), imgs)
    for a, b in itertools.combinations(range(K), 2):
        assert not torch.allclose(imgs[a], imgs[b]), (a, b)
        assert not torch.isclose(logits[a], logits[b]), (a, b)
    with pytest.raises(ValueError, match="class-conditional"):
        G(z)
    with pytest.raises(ValueError, match="class-conditional"):
        D(x)


def test_conditional_vae_depends_on_the_label():
    m = cfg("vae", conditional=True)
    nets = build(m)
    E, G = nets["E"].eval(), nets["G"].eval()
    z = torch.randn(1, m.latent_dim).expand(K, -1)
    x = torch.rand(1, m.channels, m.resolution, m.resolution).expand(K, -1, -1, -1) * 2 - 1
    with torch.no_grad():
        imgs, (mu, _) = G(z, torch.arange(K)), E(x, torch.arange(K))
    for a, b in itertools.combinations(range(K), 2):
        assert not torch.allclose(imgs[a], imgs[b]) and not torch.allclose(mu[a], mu[b]), (a, b)
    for call in (lambda: G(z), lambda: G.logits(z), lambda: E(x)):
        with pytest.raises(ValueError, match="class-conditional"):
            call()


@pytest.mark.parametrize("kind", ["dcgan", "resnet_gan", "vae"])
def test_unconditional_models_ignore_the_label(kind):
    m = cfg(kind, conditional=False, num_classes=K)
    nets = {k: v.eval() for k, v in build(m).items()}
    z = torch.randn(N, m.latent_dim)
    x = torch.rand(N, m.channels, m.resolution, m.resolution) * 2 - 1
    y1, y2 = labels(), (labels() + 1) % K
    second = "E" if kind == "vae" else "D"
    with torch.no_grad():
        assert torch.equal(nets["G"](z, y1), nets["G"](z)) and torch.equal(nets["G"](z, y2), nets["G"](z))
        a, b, c = nets[second](x), nets[second](x, y1), nets[second](x, y2)
    for u, v in ((a, b), (a, c)):
        for s, t in zip(u if isinstance(u, tuple) else (u,), v if isinstance(v, tuple) else (v,)):
            assert torch.equal(s, t)


# ---- layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spectral_norm", [False, True])
def test_projection_head_is_linear_plus_inner_product(spectral_norm):
    torch.manual_seed(1)
    head = ProjectionHead(6, 3, spectral_norm=spectral_norm).eval()
    h, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 2, 1, 0, 1])
    with torch.no_grad():
        W, b, V = head.linear.weight, head.linear.bias, head.embed.weight  # the normalised weights when SN
        want = torch.stack([W[0] @ h[i] + b[0] + V[y[i]] @ h[i] for i in range(7)])
        got = head(h, y)
    assert got.shape == (7,)
    torch.testing.assert_close(got, want)


def test_conditional_batch_norm():
    cbn = ConditionalBatchNorm2d(3, 4)
    assert torch.equal(cbn.gain.weight, torch.ones(4, 3)) and torch.equal(cbn.bias.weight, torch.zeros(4, 3))
    x, y = torch.randn(6, 3, 5, 5) * 2 + 1, torch.tensor([0, 1, 2, 3, 3, 0])
    plain = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(cbn(x, y), plain)  # at init: plain BN for every class
    perturb_conditional_bn(cbn)
    want = plain * cbn.gain.weight[y][:, :, None, None] + cbn.bias.weight[y][:, :, None, None]
    torch.testing.assert_close(cbn(x, y), want)
    assert cbn.bn.running_mean.abs().sum() > 0  # running statistics are kept for eval mode


def init_dcgan_weights(module: nn.Module) -> None:
    """The reference: the DCGAN paper's initialisation as the first version of aigc wrote it."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def test_dcgan_init():
    """Plain nets: draw for draw what init_dcgan_weights does. Conditional BN: gains 1, biases 0."""
    for m in (cfg("dcgan", resolution=32), cfg("dcgan", resolution=32, d_norm="layer")):
        got = build(m)
        torch.manual_seed(0)
        ref = {"G": dcgan.Generator(m.latent_dim, m.channels, m.resolution, m.g_width),
               "D": dcgan.Discriminator(m.channels, m.resolution, m.d_width, m.d_norm)}
        for net in ref.values():
            init_dcgan_weights(net)
        for k in ref:
            for (n1, a), (n2, b) in zip(got[k].state_dict().items(), ref[k].state_dict().items(), strict=True):
                assert n1 == n2 and torch.equal(a, b), (k, n1)
    nets = build(cfg("dcgan", conditional=True, spectral_norm=True))
    cbns = [x for x in nets["G"].modules() if isinstance(x, ConditionalBatchNorm2d)]
    assert len(cbns) == 2 and all((x.gain.weight == 1).all() and (x.bias.weight == 0).all() for x in cbns)
    conv = nets["D"].net[0]  # spectral norm on top of the DCGAN init of the raw weight
    assert 0.01 < conv.parametrizations.weight.original.std().item() < 0.03


# ---- the SNGAN ResNet --------------------------------------------------------------------------

def test_resnet_gan_matches_sngan_cifar_and_64_sizes():
    def count(net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    nets = build(ModelConfig(kind="resnet_gan", resolution=32, channels=3, latent_dim=128, g_width=256, d_width=128))
    assert (count(nets["G"]), count(nets["D"])) == (4_276_739, 1_053_825)  # SNGAN CIFAR-10: 4.3M, 1.1M
    assert len(nets["G"].blocks) == 3 and len(nets["D"].blocks) == 4
    assert resnet_gan.g_widths(64, 1024) == [1024, 512, 256, 128, 64]  # SNGAN STL/64x64 G
    assert resnet_gan.d_blocks(64, 1024) == [(64, True), (128, True), (256, True), (512, True), (1024, True)]
    assert len(resnet_gan.g_widths(128, 1024)) == 6 and len(resnet_gan.d_blocks(16, 128)) == 4


# ---- checkpoint compatibility: today's names and outputs ---------------------------------------

KEYS = {
    16: {
        "dcgan.G": ["net.0.weight", "net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var",
                    "net.1.num_batches_tracked", "net.3.weight", "net.4.weight", "net.4.bias", "net.4.running_mean",
                    "net.4.running_var", "net.4.num_batches_tracked", "net.6.weight"],
        "dcgan.D": ["net.0.weight", "net.2.weight", "net.3.weight", "net.3.bias", "net.3.running_mean",
                    "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight"],
        "vae.G": ["fc.weight", "fc.bias", "net.0.weight", "net.0.bias", "net.0.running_mean", "net.0.running_var",
                  "net.0.num_batches_tracked", "net.2.weight", "net.2.bias", "net.3.weight", "net.3.bias",
                  "net.3.running_mean", "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight", "net.5.bias"],
        "vae.E": ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.3.weight", "net.3.bias",
                  "net.3.running_mean", "net.3.running_var", "net.3.num_batches_tracked", "net.6.weight", "net.6.bias"],
    },
    32: {
        "dcgan.G": ["net.0.weight", "net.1.weight", "net.1.bias", "net.1.running_mean", "net.1.running_var",
                    "net.1.num_batches_tracked", "net.3.weight", "net.4.weight", "net.4.bias", "net.4.running_mean",
                    "net.4.running_var", "net.4.num_batches_tracked", "net.6.weight", "net.7.weight", "net.7.bias",
                    "net.7.running_mean", "net.7.running_var", "net.7.num_batches_tracked", "net.9.weight"],
        "dcgan.D": ["net.0.weight", "net.2.weight", "net.3.weight", "net.3.bias", "net.3.running_mean",
                    "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight", "net.6.weight", "net.6.bias",
                    "net.6.running_mean", "net.6.running_var", "net.6.num_batches_tracked", "net.8.weight"],
        "vae.G": ["fc.weight", "fc.bias", "net.0.weight", "net.0.bias", "net.0.running_mean", "net.0.running_var",
                  "net.0.num_batches_tracked", "net.2.weight", "net.2.bias", "net.3.weight", "net.3.bias",
                  "net.3.running_mean", "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight",
                  "net.5.bias", "net.6.weight", "net.6.bias", "net.6.running_mean", "net.6.running_var",
                  "net.6.num_batches_tracked", "net.8.weight", "net.8.bias"],
        "vae.E": ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.3.weight", "net.3.bias",
                  "net.3.running_mean", "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight",
                  "net.5.bias", "net.6.weight", "net.6.bias", "net.6.running_mean", "net.6.running_var",
                  "net.6.num_batches_tracked", "net.9.weight", "net.9.bias"],
    },
}


@pytest.mark.parametrize("resolution", [16, 32])
def test_unconditional_dcgan_and_vae_keep_their_state_dict_keys(resolution):
    for likelihood in ("gaussian", "bernoulli"):
        m = ModelConfig(resolution=resolution, channels=1, likelihood=likelihood)  # default d_norm batch, no SN
        got = {f"dcgan.{k}": list(v.state_dict()) for k, v in dcgan.build(m).items()}
        got |= {f"vae.{k}": list(v.state_dict()) for k, v in vae.build(m).items()}
        assert got == KEYS[resolution]


class OldDecoder(nn.Module):
    """vae.Decoder as it was before conditioning and likelihoods, for the outputs-unchanged check."""

    def __init__(self, latent_dim, channels, resolution, width):
        super().__init__()
        ws = dcgan.widths(resolution, width)
        self.fc = nn.Linear(latent_dim, ws[0] * 4 * 4)
        self.w0 = ws[0]
        layers = [nn.BatchNorm2d(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.fc(z).reshape(z.shape[0], self.w0, 4, 4))


class OldGenerator(nn.Module):
    """dcgan.Generator as it was."""

    def __init__(self, latent_dim, channels, resolution, width):
        super().__init__()
        ws = dcgan.widths(resolution, width)
        layers = [nn.ConvTranspose2d(latent_dim, ws[0], 4, 1, 0, bias=False), nn.BatchNorm2d(ws[0]), nn.ReLU(True)]
        for w_in, w_out in zip(ws, ws[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(ws[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


@pytest.mark.parametrize("train_mode", [False, True])
def test_unconditional_generators_give_todays_outputs(train_mode):
    m = cfg("vae", resolution=32, channels=3)
    new = {"vae": vae.build(m)["G"], "dcgan": dcgan.build(dataclasses.replace(m, kind="dcgan"))["G"]}
    old = {"vae": OldDecoder(m.latent_dim, m.channels, m.resolution, m.g_width),
           "dcgan": OldGenerator(m.latent_dim, m.channels, m.resolution, m.g_width)}
    z = torch.randn(N, m.latent_dim)
    for k in new:
        with torch.no_grad():  # trained-looking BN statistics, so eval mode is not trivially the identity
            for x in new[k].modules():
                if isinstance(x, nn.BatchNorm2d):
                    x.running_mean.normal_(0, 0.1)
                    x.running_var.uniform_(0.5, 2)
        old[k].load_state_dict(new[k].state_dict())
        new[k].train(train_mode), old[k].train(train_mode)
        with torch.no_grad():
            assert torch.equal(new[k](z), old[k](z)), k


def test_every_family_config_is_valid_for_the_config_checks():
    """The configs exercised here are accepted by config validation (power-of-two sizes, conditional support)."""
    from aigc_cli.config import Config, validate

    for m in GAN_CONFIGS + VAE_CONFIGS:
        validate(Config(model=m))
    assert all(FAMILIES[k].supports_conditional for k in ("dcgan", "resnet_gan", "vae"))


@pytest.mark.parametrize("preset", ["quickstart", "cifar10-sngan", "cifar10-cond-sngan", "fashion-mnist-vae",
                                    "mnist-mlp-gan", "fashion-mnist-classifier", "fashion-mnist-wgan-gp"])
def test_shapes_built_on_meta_equal_a_real_build(preset):
    from aigc_cli.config import load_preset
    from aigc_cli.models import build_nets, build_shapes

    cfg = load_preset(preset).with_overrides({"model.num_classes": "3", "model.resolution": "32"})
    for model in (cfg.model, dataclasses.replace(cfg.model, spectral_norm=cfg.model.kind == "dcgan")):
        def layout(nets):
            return {f"{n}.{k}": (tuple(v.shape), v.dtype) for n, net in nets.items() for k, v in net.state_dict().items()}

        shapes = build_shapes(model)
        assert all(t.is_meta for net in shapes.values() for t in net.state_dict().values())
        assert layout(shapes) == layout(build_nets(model))


def test_building_shapes_stays_fast_and_never_imports_dynamo():
    import subprocess
    import sys

    # torch runs random inits and spectral norm's power iterations on the meta device through Python
    # reference kernels that import torch._dynamo: 2-3 s on every command that loads a checkpoint.
    code = ("import sys; from aigc_cli.config import load_preset; from aigc_cli.models import build_shapes; "
            "[build_shapes(load_preset(p).with_overrides({'model.num_classes': '3'}).model) "
            "for p in ('quickstart', 'cifar10-cond-sngan', 'fashion-mnist-vae')]; print('torch._dynamo' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "False\n", r.stderr


def test_a_net_built_from_a_checkpoint_computes_what_the_trained_one_did(tmp_path):
    """build_net lays a net out on the meta device and fills it from the file; spectral norm (in D here)
    becomes torch's own again, and the global RNG is not touched."""
    from conftest import Silent, tiny

    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.training.loop import train

    train(tiny("dcgan", spectral_norm=True, conditional=True).with_overrides(
        {"train.steps": "2", "model.num_classes": "4"}), tmp_path / "r", Silent())
    ck = ckpt_io.load(tmp_path / "r")
    trained = build_nets(ck.config.model)
    for name, net in trained.items():
        net.load_state_dict(ck.net_state(name))
        net.eval()
    x, y = torch.rand(3, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 3])
    rng = torch.get_rng_state()
    D, G = ckpt_io.build_net(ck, "D").eval(), ckpt_io.build_net(ck, "G").eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert parametrize.is_parametrized(D.head.linear, "weight") and type(D.head.linear.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    with torch.no_grad():
        assert torch.allclose(D(x, y), trained["D"](x, y))
        z = torch.randn(3, 8)
        assert torch.equal(G(z, y), trained["G"](z, y))
