"""train.subpixel_convs: D's first convolution as space-to-depth + a 2x2 convolution and G's last transposed
convolution as a 3x3 convolution + pixel_shuffle compute the same outputs and gradients from the same
parameters, keep the state_dict, and train the same run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.errors import UsageError
from aigc_cli.models import build_nets
from aigc_cli.models.layers import sn
from aigc_cli.training import subpixel
from aigc_cli.training.loop import train
from aigc_cli.training.subpixel import candidates, space_to_depth_weight, sub_pixel_weight, use_subpixel

from conftest import Silent, tiny

CL = torch.channels_last


def _out_and_grads(layer, x):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)  # not uniform: every output position weighs differently
    return y, torch.autograd.grad(y, [x, *layer.parameters()], g)


def _layer(transposed: bool, channels: int, bias: bool, spectral: bool) -> nn.Module:
    layer = nn.ConvTranspose2d(8, channels, 4, 2, 1, bias=bias) if transposed else nn.Conv2d(channels, 8, 4, 2, 1, bias=bias)
    return sn(layer) if spectral else layer


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, CL])
@pytest.mark.parametrize("spectral", [False, True])
@pytest.mark.parametrize("pad", [0, 8, 16])
def test_rewritten_layer_computes_the_same_outputs_and_gradients(transposed, channels, bias, fmt, spectral, pad, monkeypatch):
    monkeypatch.setattr(subpixel, "PAD_CHANNELS", pad)  # 8 pads 1 channel's 4 to 8 (3 channels' 12 stay); 16 pads both
    torch.manual_seed(0)
    plain = _layer(transposed, channels, bias, spectral).to(memory_format=fmt)
    fast = copy.deepcopy(plain)
    assert use_subpixel(fast, fmt) == 1
    assert type(fast) is type(plain) and subpixel.rewritten(fast)
    assert list(fast.state_dict()) == list(plain.state_dict())
    shape = (3, 8, 6, 7) if transposed else (3, channels, 12, 14)  # not square: rows and columns kept apart
    x = torch.randn(shape).to(memory_format=fmt)
    y0, g0 = _out_and_grads(plain, x)
    y1, g1 = _out_and_grads(fast, x)
    assert y1.shape == y0.shape == ((3, channels, 12, 14) if transposed else (3, 8, 6, 7))
    assert y1.is_contiguous(memory_format=fmt)  # the layers after it (D after G) get the network's format
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    if spectral:  # one power iteration ran in each, from the same start
        torch.testing.assert_close(fast.parametrizations.weight[0]._u, plain.parametrizations.weight[0]._u)


def test_space_to_depth_weight_puts_each_tap_where_the_formula_says():
    w = torch.arange(2 * 3 * 16, dtype=torch.float32).reshape(2, 3, 4, 4)
    w2 = space_to_depth_weight(w)
    assert w2.shape == (2, 12, 2, 2)
    for o, c, dy, dx, a, b in torch.cartesian_prod(*[torch.arange(n) for n in (2, 3, 2, 2, 2, 2)]).tolist():
        assert w2[o, 4 * c + 2 * dy + dx, a, b] == w[o, c, 2 * a + dy, 2 * b + dx]


def test_sub_pixel_weight_matches_the_transposed_layer_tap_by_tap():
    """Each single tap of the kernel alone, through both forms: one-hot kernels find a misplaced tap that a
    random kernel's sum could hide."""
    h = torch.randn(1, 2, 5, 5)
    for tap in range(2 * 1 * 16):
        w = torch.zeros(2 * 1 * 16)
        w[tap] = 1.0
        w = w.reshape(2, 1, 4, 4)
        torch.testing.assert_close(F.pixel_shuffle(F.conv2d(h, sub_pixel_weight(w), padding=1), 2),
                                   F.conv_transpose2d(h, w, None, 2, 1))


def _picked(net):
    return [list(net).index(m) for m, _ in candidates(net)]


def test_only_the_image_side_ends_are_candidates(monkeypatch):
    net = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.Conv2d(8, 16, 4, 2, 1), nn.Conv2d(4, 8, 4, 2, 1),
                        nn.ConvTranspose2d(16, 4, 4, 2, 1), nn.ConvTranspose2d(4, 1, 4, 2, 1))
    assert _picked(net) == [0, 4]  # the first conv and the last transposed one; not the narrow ones between
    for not_fitting in (nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(3, 8, 4, 1, 0), nn.Conv2d(3, 8, 4, 2, 1, dilation=2),
                        nn.Conv2d(3, 8, 4, 2, 1, padding_mode="reflect"), nn.Conv2d(8, 8, 4, 2, 1)):
        assert _picked(nn.Sequential(not_fitting, nn.Conv2d(3, 8, 4, 2, 1))) == []  # only the first is image-side
    assert _picked(nn.Sequential(nn.ConvTranspose2d(8, 1, 4, 2, 1, 1))) == []  # output_padding
    assert _picked(nn.Sequential(nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.ConvTranspose2d(1, 8, 4, 2, 1))) == []
    monkeypatch.setattr(subpixel, "KINDS", ("transposed",))
    assert _picked(net) == [4]
    monkeypatch.setattr(subpixel, "KINDS", ("conv", "transposed"))
    assert use_subpixel(net, torch.contiguous_format) == 2
    assert use_subpixel(net, torch.contiguous_format) == 0  # already rewritten


def test_dcgan_and_vae_have_one_each_side_and_deep_copies_keep_them():
    for kind, extra, sides in (("dcgan", {}, {"G": 1, "D": 1}), ("vae", {}, {"E": 1, "G": 1}),
                               ("dcgan", {"g_width": 2, "d_width": 2}, {"G": 1, "D": 1}),  # hidden layers narrow too
                               ("vae", {"conditional": True, "num_classes": 4}, {"E": 0, "G": 1})):
        nets = build_nets(tiny(kind, resolution=32, **extra).model)
        assert {name: len(candidates(net)) for name, net in nets.items()} == sides, (kind, extra)
        for net in nets.values():
            use_subpixel(net, CL)
            copied = copy.deepcopy(net)  # as the EMA copies G: the rewrite goes along, bound to the copy
            layers = [m for m in copied.modules() if subpixel.rewritten(m)]
            assert len(layers) == sum(subpixel.rewritten(m) for m in net.modules())
            for m in layers:
                bound = m.__dict__.get("forward") or m.__dict__["_conv_forward"]
                assert bound.__self__ is m
    assert not any(candidates(net) for net in build_nets(tiny("resnet_gan").model).values())


def test_spectral_norm_can_still_be_removed_from_a_rewritten_layer():
    from torch.nn.utils import parametrize

    layer = sn(nn.Conv2d(1, 8, 4, 2, 1))
    x = torch.randn(2, 1, 8, 8)
    use_subpixel(layer, torch.contiguous_format)
    layer.eval()
    before = layer(x)
    parametrize.remove_parametrizations(layer, "weight")  # keeps the normalised weight as a plain one
    assert type(layer) is nn.Conv2d
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("kind", ["dcgan", "vae"])
def test_training_with_and_without_it_matches_and_saves_the_same_checkpoint(tmp_path, monkeypatch, kind):
    rewritten = []
    real = subpixel.use_subpixel

    def counting(net, fmt, most):
        rewritten.append(real(net, fmt, most))
        return rewritten[-1]

    monkeypatch.setattr(subpixel, "use_subpixel", counting)
    runs = {}
    for setting in ("off", "on"):
        cfg = tiny(kind).with_overrides({"train.steps": 5, "train.log_every": 1, "train.subpixel_convs": setting})
        runs[setting] = Silent()
        train(cfg, tmp_path / setting, runs[setting])
    assert sum(rewritten) == 2  # only under "on"
    for a, b in zip(runs["off"].records, runs["on"].records, strict=True):
        for key in ("loss_d", "loss_g") if kind == "dcgan" else ("loss", "mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key
    off = ckpt_io.load(tmp_path / "off" / "checkpoints" / "last.safetensors").tensors
    on = ckpt_io.load(tmp_path / "on" / "checkpoints" / "last.safetensors").tensors
    assert off.keys() == on.keys()
    # Same shapes; values are not compared: Adam turns the rounding noise of gradients that are zero in exact
    # arithmetic (the VAE's conv biases before BatchNorm) into full-size steps of either sign.
    assert all(on[k].shape == off[k].shape for k in off)


def test_auto_rewrites_one_channel_layers_of_graphed_cuda_steps_only(tmp_path):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert subpixel.max_channels("auto", cuda, True) == 1 and subpixel.max_channels("auto", cuda, False) == 0
    assert subpixel.max_channels("auto", cpu, True) == 0 and subpixel.max_channels("auto", cpu, False) == 0
    assert subpixel.max_channels("on", cpu, False) == subpixel.MAX_CHANNELS == 4
    assert subpixel.max_channels("off", cuda, True) == 0
    assert tiny("dcgan").train.subpixel_convs == "auto"
    with pytest.raises(UsageError, match="subpixel_convs must be auto, on or off, got 'yes'"):
        tiny("dcgan").with_overrides({"train.subpixel_convs": "yes"})


def _counting(monkeypatch, limit):
    """Fake the device and graph decision (auto's answer `limit`), and count what use_subpixel rewrites."""
    counts, real = [], subpixel.use_subpixel
    monkeypatch.setattr(subpixel, "max_channels", lambda setting, device, graphed: 0 if setting == "off" else limit)
    monkeypatch.setattr(subpixel, "use_subpixel", lambda net, fmt, most: counts.append(real(net, fmt, most)) or counts[-1])
    return counts


@pytest.mark.parametrize("channels,limit,expected", [(1, 1, 2), (3, 1, 0), (3, 4, 2)])
def test_the_loop_rewrites_what_the_channel_limit_allows_and_auto_says_nothing(tmp_path, monkeypatch, channels,
                                                                                   limit, expected):
    counts = _counting(monkeypatch, limit)
    rep = Silent()
    train(tiny("dcgan").with_overrides({"train.steps": 1, "model.channels": channels}), tmp_path / "run", rep)
    assert sum(counts) == expected
    assert not any("subpixel" in n for n in rep.notes), rep.notes


def test_on_says_so_where_a_model_has_nothing_to_rewrite_and_auto_does_not(tmp_path, monkeypatch):
    rep = Silent()
    train(tiny("mlp_gan").with_overrides({"train.steps": 1, "train.subpixel_convs": "on"}), tmp_path / "on", rep)
    assert any("train.subpixel_convs=on: mlp_gan has no 4x4 stride-2 layer" in n for n in rep.notes), rep.notes
    counts = _counting(monkeypatch, 1)
    rep = Silent()
    train(tiny("mlp_gan").with_overrides({"train.steps": 1}), tmp_path / "auto", rep)
    assert counts == [0, 0] and not any("subpixel" in n for n in rep.notes), rep.notes


def test_the_loop_asks_with_whether_the_step_is_captured(tmp_path, monkeypatch):
    """auto's choice hangs on the graph decision: the loop must make that first and pass it on."""
    import aigc_cli.training.loop as loop_mod

    asked = []
    monkeypatch.setattr(subpixel, "max_channels", lambda setting, device, graphed: asked.append(graphed) or 0)
    train(tiny("dcgan").with_overrides({"train.steps": 1}), tmp_path / "cpu", Silent())
    monkeypatch.setattr(loop_mod, "use_graph", lambda *a: True)  # as on CUDA: the static-buffer step, uncaptured here
    train(tiny("dcgan").with_overrides({"train.steps": 1}), tmp_path / "graphed", Silent())
    assert asked == [False, True]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("channels,pad,width", [(1, 8, 8), (1, 0, 4), (3, 8, 12), (3, 16, 16)])
def test_the_rewritten_convolution_runs_on_the_padded_width(transposed, channels, pad, width, monkeypatch):
    """The default pads a one-channel layer's 4 sub-pixel channels to 8 (measured at least as fast on an H200,
    1.04x at batch 64); wider ones are padded only up to PAD_CHANNELS."""
    assert subpixel.PAD_CHANNELS == 8
    monkeypatch.setattr(subpixel, "PAD_CHANNELS", pad)
    layer = _layer(transposed, channels, True, False)
    use_subpixel(layer, torch.contiguous_format)
    seen, real = [], F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a, **k: seen.append((x.shape[1], tuple(w.shape[:2]))) or real(x, w, *a, **k))
    layer(torch.randn((2, 8, 5, 5) if transposed else (2, channels, 10, 10)))
    assert seen == ([(8, (width, 8))] if transposed else [(width, (8, width))])
