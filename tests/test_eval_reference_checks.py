"""aigc_cli/metrics/reference.py: edges of FeatureStats and of load_npz's
checks on a --ref file, called directly (no CLI run: milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aigc_cli.errors import UsageError
from aigc_cli.metrics.reference import FeatureStats, load_npz


def test_feature_stats_of_one_image_is_a_usage_error_not_a_division_by_zero():
    acc = FeatureStats(keep=False)
    acc.add(torch.randn(1, 4))
    with pytest.raises(UsageError, match="need at least 2 images"):
        acc.mu_sigma()


def test_an_empty_batch_is_ignored_even_when_it_comes_first():
    x = np.random.default_rng(0).normal(5.0, 2.0, (30, 3))
    acc = FeatureStats(keep=True)
    acc.add(torch.empty(0, 3, dtype=torch.float64))
    for chunk in np.array_split(x, 3):
        acc.add(torch.from_numpy(chunk))
    mu, sigma = acc.mu_sigma()
    assert np.allclose(mu, x.mean(0)) and np.allclose(sigma, np.cov(x, rowvar=False))
    assert acc.features().shape == (30, 3)


@pytest.mark.parametrize("arrays, expect", [
    ({"mu": np.zeros(0), "sigma": np.zeros((0, 0))}, "'mu' must be (D,)"),  # else a ValueError from max() of nothing
    ({"mu": np.array([0.0, np.nan, 0.0]), "sigma": np.eye(3)}, "'mu' holds NaN"),  # else FID is NaN, silently
    ({"mu": np.zeros(3), "sigma": np.eye(3), "features": np.array([[np.inf, 0.0, 0.0], [0.0, 0.0, 0.0]])},
     "'features' holds NaN"),
    ({"mu": np.zeros(3), "sigma": np.eye(3), "features": np.zeros((1, 3))}, "'features' must be (N >= 2, 3)"),
    ({"mu": np.zeros(3), "sigma": np.eye(3), "features": np.zeros((4, 2))}, "'features' must be (N >= 2, 3)"),
    # slightly off a covariance, well above rounding: still no covariance
    ({"mu": np.zeros(3), "sigma": np.eye(3) + np.triu(np.full((3, 3), 1e-3), 1)}, "'sigma' is not symmetric"),
    ({"mu": np.zeros(2), "sigma": np.array([[1.0, 0.0], [0.0, -0.01]])}, "'sigma' has negative eigenvalues"),
    ({"mu": np.zeros(2), "sigma": np.eye(2), "protocol": np.array('{"n_real": true}')},
     "protocol field 'n_real' is malformed"),
])
def test_load_npz_refuses_edge_cases_with_one_usage_error(tmp_path, arrays, expect):
    path = tmp_path / "ref.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError) as e:
        load_npz(path)
    assert expect in str(e.value)


def test_load_real_applies_limit_to_an_idx_folder_at_its_own_size(tmp_path):
    """--limit on an IDX folder scored at its own size (no --channels/--resolution): the first `limit`
    images only, as training's data.limit took them."""
    from aigc_cli.metrics.reference import load_real
    from test_data import write_idx

    folder = tmp_path / "idx"
    pixels = np.arange(6 * 28 * 28, dtype=np.int64).reshape(6, 28, 28).astype(np.uint8)
    write_idx(folder, "train", pixels, np.arange(6, dtype=np.uint8))
    images, name = load_real(str(folder), root=None, download=False, split="train", seed=0, warn=print, limit=3)
    assert images.shape == (3, 1, 28, 28) and "3 images" in name
    assert torch.equal(images[:, 0], torch.from_numpy(pixels[:3]))
