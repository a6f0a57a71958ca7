"""The models against their published definitions (a mutation review found these unguarded): the DCGAN of
pytorch/examples, SNGAN's ResNet blocks (Miyato et al.) and their init, the conditional projection head, the VAE
encoder's outputs."""

from __future__ import annotations

import math

import pytest
import torch


def test_dcgan_64_is_the_pytorch_examples_dcgan():
    """pytorch/examples dcgan at nz 100, ngf = ndf = 64, nc 3: netG 3,576,704 and netD 2,765,568 parameters;
    widths ngf*8 at 4x4 down to ngf at 32x32."""
    from aigc_cli.config import ModelConfig
    from aigc_cli.models import dcgan

    assert dcgan.widths(64, 64) == [512, 256, 128, 64] and dcgan.widths(32, 64) == [256, 128, 64]
    nets = dcgan.build(ModelConfig(kind="dcgan", resolution=64, channels=3, latent_dim=100, g_width=64, d_width=64))
    count = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    assert count == {"G": 3_576_704, "D": 2_765_568}


def reference_dcgan_discriminator(nc: int, resolution: int, ndf: int) -> torch.nn.Module:
    """pytorch/examples' netD (without its Sigmoid: aigc's D gives logits), at any power-of-two resolution."""
    from torch import nn

    from aigc_cli.models import dcgan

    ws = dcgan.widths(resolution, ndf)[::-1]
    layers = [nn.Conv2d(nc, ws[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
    for w_in, w_out in zip(ws, ws[1:]):
        layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(ws[-1], 1, 4, 1, 0, bias=False)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("train_mode", [False, True])
def test_dcgan_discriminator_computes_the_pytorch_examples_netD(train_mode):
    from aigc_cli.config import ModelConfig
    from aigc_cli.models import dcgan

    torch.manual_seed(0)
    D = dcgan.build(ModelConfig(kind="dcgan", resolution=32, channels=3, d_width=8))["D"]
    ref = reference_dcgan_discriminator(3, 32, 8)
    ref.load_state_dict(D.net.state_dict())  # strict: the same layers, no extra bias
    D.train(train_mode), ref.train(train_mode)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(D(x), ref(x).reshape(-1), atol=1e-6)
    plain = dcgan.build(ModelConfig(kind="dcgan", resolution=32, channels=3, d_width=8, d_norm="none"))["D"]
    hidden = [m for m in plain.net if isinstance(m, torch.nn.Conv2d)][1:-1]
    assert hidden and all(m.bias is not None for m in hidden)  # no normalisation: the hidden convs get a bias


def _up2(x: torch.Tensor) -> torch.Tensor:  # nearest-neighbour 2x upsampling, written out
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _pool2(x: torch.Tensor) -> torch.Tensor:  # 2x2 average pooling, written out
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def test_sngan_resnet_blocks_compute_miyato_et_al_s_definition():
    """SNGAN (Miyato et al. 2018, Chainer code): G block BN-ReLU-up-conv-BN-ReLU-conv + up-conv1x1 shortcut;
    D optimized block conv-ReLU-conv-pool + pool-conv1x1; D block ReLU-conv-ReLU-conv(-pool) + conv1x1(-pool)
    or identity; D head ReLU, global sum pool, linear; G head BN-ReLU-conv-tanh."""
    from torch.nn import functional as F

    from aigc_cli.config import ModelConfig
    from aigc_cli.models import resnet_gan

    torch.manual_seed(0)
    nets = resnet_gan.build(ModelConfig(kind="resnet_gan", resolution=16, channels=3, latent_dim=8, g_width=8, d_width=8))
    G, D = nets["G"].eval(), nets["D"].eval()
    with torch.no_grad():
        for m in G.modules():  # trained-looking statistics, so eval-mode BN is no identity
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2)
        for p in G.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases off zero
        z, x = torch.randn(3, 8), torch.rand(3, 3, 16, 16) * 2 - 1
        # G
        h = G.fc(z).reshape(3, G.w0, 4, 4)
        for b in G.blocks:
            r = b.c1(_up2(F.relu(b.b1(h))))
            r = b.c2(F.relu(b.b2(r)))
            h = r + b.c_sc(_up2(h))
        assert torch.allclose(G(z), torch.tanh(G.out(F.relu(G.bn(h)))), atol=1e-5)
        # D
        b0, *rest = D.blocks
        assert b0.optimized and [b.downsample for b in D.blocks] == [True, True, False, False]
        h = _pool2(b0.c2(F.relu(b0.c1(x)))) + b0.c_sc(_pool2(x))
        for b in rest:
            r = b.c2(F.relu(b.c1(F.relu(h))))
            if b.downsample:
                r = _pool2(r)
            sc = h if b.c_sc is None else (_pool2(b.c_sc(h)) if b.downsample else b.c_sc(h))
            if b.downsample:
                assert b.c_sc is not None
            h = r + sc
        assert torch.allclose(D(x), D.fc(F.relu(h).sum(dim=(2, 3))).reshape(-1), atol=1e-5)
        assert torch.nn.utils.parametrize.is_parametrized(D.fc, "weight")


def test_conditional_dcgan_projection_head_is_dcgan_initialised_and_sized_per_class():
    from aigc_cli.config import ModelConfig
    from aigc_cli.models import dcgan

    torch.manual_seed(0)
    D = dcgan.build(ModelConfig(kind="dcgan", resolution=16, channels=1, d_width=8, conditional=True, num_classes=5))["D"]
    embed = D.head.embed.weight
    assert embed.shape == (5, 16 * 4 * 4)  # one row per class, no more
    assert 0.015 < embed.std().item() < 0.025  # N(0, 0.02) like every DCGAN weight, not xavier's ~0.09


def test_sngan_64_generator_widths_halve_down_to_one():
    from aigc_cli.models import resnet_gan

    assert resnet_gan.g_widths(64, 16) == [16, 8, 4, 2, 1]


def test_sngan_init_is_xavier_with_zero_biases_and_unit_gain_shortcuts():
    from aigc_cli.config import ModelConfig
    from aigc_cli.models import resnet_gan

    torch.manual_seed(0)
    nets = resnet_gan.build(ModelConfig(kind="resnet_gan", resolution=16, channels=3, latent_dim=8, g_width=8, d_width=8))
    for net in nets.values():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias))
    sc = nets["G"].blocks[0].c_sc.weight  # 1x1, 8 -> 8: xavier-uniform bound sqrt(6 / 16) at gain 1
    assert sc.abs().max().item() <= math.sqrt(6 / 16)


def test_vae_encoder_gives_mu_then_a_clamped_logvar():
    from aigc_cli.models import vae

    torch.manual_seed(0)
    E = vae.Encoder(4, 1, 16, 8).eval()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, logvar = E(x)
        raw = E.net(x).float()
        assert torch.equal(mu, raw[:, :4]) and torch.equal(logvar, raw[:, 4:].clamp(-30, 20))
        E.net[-1].bias.fill_(1e3)  # a diverging encoder: exp(logvar) must stay finite
        _, logvar = E(x)
    assert logvar.max().item() == 20.0 and torch.isfinite(logvar.exp()).all()


def test_vae_encoder_is_d_width_wide_with_leaky_relus():
    from aigc_cli.config import ModelConfig
    from aigc_cli.models import vae

    E = vae.build(ModelConfig(kind="vae", resolution=32, channels=1, g_width=8, d_width=16))["E"]
    convs = [m for m in E.net if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]  # d_width at full resolution, doubling (not g_width)
    acts = [m for m in E.net if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
    assert len(acts) == 3 and all(isinstance(a, torch.nn.LeakyReLU) and a.negative_slope == 0.2 for a in acts)
