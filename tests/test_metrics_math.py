"""FID/KID math checked against independent reference implementations."""

import numpy as np
import pytest
import scipy.linalg

from aigc_cli.metrics.fid import feature_stats, fid_from_features, frechet_distance, kid
from aigc_cli.metrics.scores import inception_score, precision_recall


def _correlated(rng, n, d, shift=0.0):
    # Random mixing matrix -> strongly correlated, anisotropic features (non-diagonal covariance).
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(x, y):
    """pytorch-fid formula with scipy.linalg.sqrtm."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1.dot(s2)).real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def _reference_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit loops."""
    m, d = x.shape
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (m * m)


@pytest.mark.parametrize("n1,n2,d", [(500, 500, 64), (300, 700, 16), (200, 150, 8)])
def test_fid_matches_sqrtm_reference(n1, n2, d):
    rng = np.random.default_rng(d)
    x = _correlated(rng, n1, d)
    y = _correlated(rng, n2, d, shift=0.3)
    ours, ref = fid_from_features(x, y), _reference_fid(x, y)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert isinstance(ours, float)


def test_feature_stats_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(50, 5))
    mu, sigma = feature_stats(x)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=1))
    assert mu.dtype == sigma.dtype == np.float64


def test_fid_identity_symmetry_and_monotone_in_noise():
    rng = np.random.default_rng(1)
    x = _correlated(rng, 500, 32)
    assert abs(fid_from_features(x, x)) < 1e-6

    noise = rng.normal(size=x.shape)
    fids = [fid_from_features(x, x + s * noise) for s in (0.05, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids

    y = x + 0.5 * noise
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)


def test_frechet_distance_closed_form():
    # Diagonal covariances: tr((S1 S2)^{1/2}) = sum sqrt(a_i b_i).
    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_fid_singular_covariance_is_finite():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 64)), rng.normal(size=(12, 64)) + 0.1  # n < d: rank-deficient
    val = fid_from_features(x, y)
    assert np.isfinite(val) and val >= 0.0
    assert fid_from_features(x, x) < 1e-6
    # Fully degenerate: constant features have a zero covariance.
    const = np.ones((5, 8))
    assert fid_from_features(const, const) == 0.0


def test_kid_single_subset_matches_loop_reference():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) + 0.5
    # subset_size >= n: every subset is a permutation of all rows, and MMD^2 is permutation-invariant.
    mean, std = kid(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_reference_mmd2(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_kid_subsets_match_loop_reference_with_same_sampling():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(60, 5)), rng.normal(size=(45, 5)) * 1.5
    m, seed, subsets = 20, 7, 4
    # Reproduce the documented sampling scheme of kid().
    idx_rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        i1 = idx_rng.choice(len(x), m, replace=False)
        i2 = idx_rng.choice(len(y), m, replace=False)
        vals.append(_reference_mmd2(x[i1], y[i2]))
    mean, std = kid(x, y, subsets=subsets, subset_size=m, seed=seed)
    assert mean == pytest.approx(np.mean(vals), rel=1e-9)
    assert std == pytest.approx(np.std(vals), rel=1e-9)
    assert kid(x, y, subsets=subsets, subset_size=m, seed=seed) == (mean, std)  # deterministic


def test_kid_near_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(5)
    x, x2 = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kid(x, x2, subsets=20, subset_size=200)
    shifted, _ = kid(x, x2 + 1.0, subsets=20, subset_size=200)
    assert shifted > 0.1
    assert abs(same) < 0.05 * shifted


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(100, 8)), rng.normal(size=(100, 8)) + 0.2
    tx, ty = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    assert fid_from_features(tx, ty) == pytest.approx(fid_from_features(x, y))
    assert kid(tx, ty, subsets=2, subset_size=50) == kid(x, y, subsets=2, subset_size=50)
    assert np.isfinite(fid_from_features(tx.to(torch.bfloat16), ty.requires_grad_()))


@pytest.mark.parametrize(
    "f1,f2,match",
    [
        (np.zeros(10), np.zeros((10, 3)), "2-D"),
        (np.zeros((10, 3, 1)), np.zeros((10, 3)), "2-D"),
        (np.zeros((1, 3)), np.zeros((10, 3)), "at least 2 samples"),
        (np.zeros((10, 3)), np.zeros((10, 4)), "feature dims differ"),
        (np.full((10, 3), np.nan), np.zeros((10, 3)), "NaN"),
        ([["a", "b"], ["c", "d"]], np.zeros((10, 2)), "numeric"),
    ],
)
def test_bad_inputs_raise(f1, f2, match):
    with pytest.raises(ValueError, match=match):
        fid_from_features(f1, f2)
    with pytest.raises(ValueError, match=match):
        kid(f1, f2)


def test_bad_stats_and_kid_args_raise():
    with pytest.raises(ValueError, match="at least 2 samples"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))
    x = np.zeros((10, 3))
    with pytest.raises(ValueError, match="subsets"):
        kid(x, x, subsets=0)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, x, subset_size=1)


def test_kid_draws_subsets_no_larger_than_the_smaller_side():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(12, 4))
    for x, y in ((a, b), (b, a)):
        mean, std = kid(x, y, subsets=5, subset_size=30, seed=0)
        assert np.isfinite(mean) and np.isfinite(std)


def test_inception_score_refuses_no_splits_negative_and_unnormalised_probabilities():
    p = np.full((20, 4), 0.25)
    for splits in (0, -1):  # range(0): no split, and a mean of nothing (NaN)
        with pytest.raises(ValueError):
            inception_score(p, splits)
    negative = p.copy()
    negative[0] = [1.5, -0.5, 0.0, 0.0]  # sums to 1
    with pytest.raises(ValueError, match="probability distributions"):
        inception_score(negative, 2)
    with pytest.raises(ValueError, match="probability distributions"):
        inception_score(p * 1.01, 2)


def test_precision_recall_counts_a_point_on_the_ball_boundary_as_inside():
    """Kynkäänniemi et al.: inside means distance <= the k-NN radius. Exact small integers, so no rounding."""
    base = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
    real = np.repeat(base, 4, axis=0)  # each point 4 times: its 3rd neighbour is at distance 0
    assert precision_recall(real, base.repeat(4, axis=0), k=3) == (1.0, 1.0)


def test_precision_recall_every_row_of_a_set_with_one_row_past_a_block():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(513, 2))  # 512 rows a block: the 513th is a block of its own
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)


def test_precision_recall_refuses_k_zero():
    x = np.random.default_rng(1).normal(size=(10, 3))
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(x, x, k=0)


def test_fid_refuses_features_with_no_dimension_or_any_infinite_value():
    with pytest.raises(ValueError, match="at least 1 feature"):
        fid_from_features(np.zeros((10, 0)), np.zeros((10, 0)))
    x = np.random.default_rng(2).normal(size=(10, 3))
    bad = x.copy()
    bad[4, 1] = np.inf
    for f1, f2 in ((bad, x), (x, bad)):
        with pytest.raises(ValueError, match="NaN or infinite"):
            fid_from_features(f1, f2)
        with pytest.raises(ValueError, match="NaN or infinite"):
            kid(f1, f2, subsets=1, subset_size=5)


def test_frechet_distance_refuses_bad_covariances():
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    s = np.eye(3)
    s[0, 1] = np.nan
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), s)  # else a NaN FID (max(nan, 0.0) is nan)


def test_fid_of_one_feature_is_the_closed_form():
    """np.cov of one feature is 0-d: the reshape makes it (1, 1)."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 1)), rng.normal(size=(40, 1)) * 2 + 1
    va, vb = a.var(ddof=1), b.var(ddof=1)
    expected = (a.mean() - b.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)


def test_fid_of_a_set_with_itself_is_never_negative():
    """Cancellation leaves about -3e-14 for some sets: printed as a negative FID without the clamp."""
    for seed in range(20):
        x = np.random.default_rng(seed).normal(size=(50, 8)) * 3 + 5
        assert fid_from_features(x, x) >= 0.0
