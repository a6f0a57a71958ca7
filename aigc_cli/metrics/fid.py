"""Frechet Inception Distance and Kernel Inception Distance from feature arrays.

Pure numpy, all math in float64. Torch tensors are accepted by duck typing so this module
never imports torch (it stays cheap to import and usable without a model).
"""

from __future__ import annotations

import numpy as np


def _as_float64(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        # .double() before numpy: bfloat16/half tensors have no numpy dtype of their own.
        x = x.detach().cpu().double()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array: {exc}") from None


def _check_features(x, name: str) -> np.ndarray:
    a = _as_float64(x, name)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {a.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {a.shape[0]}")
    if a.shape[1] < 1:
        raise ValueError(f"{name} needs at least 1 feature, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_pair(f1, f2) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_features(f1, "f1"), _check_features(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: f1 has {a.shape[1]}, f2 has {b.shape[1]}")
    return a, b


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) (ddof=1, as pytorch-fid) of (N, D) features."""
    f = _check_features(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False, ddof=1).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    # Round-off makes the smallest eigenvalues of a PSD (possibly singular) matrix slightly negative.
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    |mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}), where tr((S1 S2)^{1/2}) is computed as
    tr((S1^{1/2} S2 S1^{1/2})^{1/2}): that matrix is symmetric PSD, so eigh/eigvalsh apply and
    the result stays real and finite even for singular covariances (unlike scipy's sqrtm).
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be ({d}, {d}), got {s1.shape} and {s2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")

    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    m = (m + m.T) / 2.0  # eigvalsh reads one triangle only; make both agree
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum()

    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # The true value is >= 0; a tiny negative is cancellation error when the Gaussians coincide.
    return max(fid, 0.0)


def fid_from_features(f1, f2) -> float:
    """FID between two (N, D) feature sets (N may differ, D must match)."""
    a, b = _check_pair(f1, f2)
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Unbiased estimator: the within-set sums exclude the diagonal (i == j) terms.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid(f1, f2, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

    Kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018; torch-fidelity). Each subset draws
    m = min(subset_size, len(f1), len(f2)) rows without replacement from each set, using
    rng = np.random.default_rng(seed): idx1 = rng.choice(len(f1), m, replace=False), then
    idx2 = rng.choice(len(f2), m, replace=False), per subset in turn. std uses ddof=0.
    """
    a, b = _check_pair(f1, f2)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        idx1 = rng.choice(a.shape[0], m, replace=False)
        idx2 = rng.choice(b.shape[0], m, replace=False)
        mmds[i] = _mmd2_unbiased(a[idx1], b[idx2])
    return float(mmds.mean()), float(mmds.std())
