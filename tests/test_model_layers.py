"""aigc_cli/models/layers.py: the shared blocks checked against their
definitions, on tiny tensors."""

from __future__ import annotations

import torch
from torch import nn

from aigc_cli.models.layers import (ConditionalBatchNorm2d, ProjectionHead, materialize_spectral_norm, norm2d,
                                    raw_weight, sn)


def test_projection_head_is_linear_plus_the_inner_product_and_keeps_a_batch_of_one():
    torch.manual_seed(0)
    head = ProjectionHead(5, 3)
    h, y = torch.randn(4, 5), torch.tensor([0, 2, 1, 2])
    want = h @ head.linear.weight[0] + head.linear.bias + (head.embed.weight[y] * h).sum(1)
    assert torch.allclose(head(h, y), want, atol=1e-6)
    assert head(h[:1], y[:1]).shape == (1,)
    assert torch.all(head.linear.bias == 0)


def test_conditional_batch_norm_applies_each_class_gain_and_bias():
    cbn = ConditionalBatchNorm2d(2, num_classes=3)
    assert not any(k.startswith("bn.weight") or k.startswith("bn.bias") for k in cbn.state_dict())
    x, y = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.allclose(cbn(x, y), cbn.bn(x))  # gains 1, biases 0 at the start
    with torch.no_grad():
        cbn.gain.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
        cbn.bias.weight.copy_(torch.tensor([[0.5, -0.5], [1.0, -1.0], [2.0, -2.0]]))
    cbn.eval()
    want = cbn.bn(x) * cbn.gain.weight[y][:, :, None, None] + cbn.bias.weight[y][:, :, None, None]
    assert torch.allclose(cbn(x, y), want)


def test_layer_norm_is_one_group_over_all_channels():
    norm = norm2d("layer", 4)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
    assert isinstance(norm2d("batch", 4), nn.BatchNorm2d) and norm2d("batch", 4).affine


def test_raw_weight_of_a_spectral_normalised_layer_is_its_unnormalised_original():
    layer = sn(nn.Linear(3, 3))
    assert raw_weight(layer) is layer.parametrizations.weight.original
    assert raw_weight(nn.Linear(3, 3)).requires_grad and sn(nn.Linear(2, 2), enabled=False).weight is not None


def test_shapes_only_spectral_norm_of_a_transposed_conv_has_torch_s_buffers_and_keeps_the_rng():
    for make in (lambda: nn.ConvTranspose2d(4, 6, 3), lambda: nn.Conv2d(4, 6, 3)):
        real = sn(make())
        with torch.device("meta"):
            meta = sn(make())
        shapes = {k: v.shape for k, v in real.state_dict().items()}
        assert {k: v.shape for k, v in meta.state_dict().items()} == shapes  # the stand-in's, before any memory
        meta.to_empty(device="cpu")
        before = torch.get_rng_state()
        materialize_spectral_norm(meta)
        assert torch.equal(torch.get_rng_state(), before)
        assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
