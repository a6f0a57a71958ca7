"""Channel and size conversions (aigc_cli/data/transforms.py)."""

from __future__ import annotations

import pytest
import torch

from aigc_cli.data import transforms


def test_unsupported_channel_counts_are_refused_not_passed_through():
    for have, want in ((4, 3), (2, 1), (4, 1), (3, 2)):
        with pytest.raises(ValueError, match=f"cannot convert {have} channels to {want}"):
            transforms.to_channels(torch.zeros((1, have, 2, 2), dtype=torch.uint8), want)


def test_the_longer_side_is_rounded_to_nearest_not_truncated():
    assert transforms.resized_shape(20, 26, 12) == (12, 16)  # 15.6 -> 16
    assert transforms.resized_shape(26, 20, 12) == (16, 12)
    assert transforms.resized_shape(3, 7, 2) == (2, 5)  # 4.67 -> 5


def test_conform_returns_a_contiguous_batch_even_when_nothing_changes():
    """A batch already of the right size came back as given: a transposed view is not contiguous, and
    safetensors (the decoded-image cache) refuses such tensors."""
    view = torch.zeros((2, 8, 8, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
    assert not view.is_contiguous()
    out = transforms.conform(view, 3, 8)
    assert out.shape == (2, 3, 8, 8) and out.is_contiguous()
