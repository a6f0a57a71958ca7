"""Inception Score and k-NN precision/recall from class probabilities and feature arrays (numpy,
float64; torch tensors accepted by duck typing, like fid.py)."""

from __future__ import annotations

import numpy as np

from .fid import _as_float64, _check_pair


def inception_score(probs, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, as in Salimans et al. 2016 and torch-fidelity: (mean, std)."""
    p = _as_float64(probs, "probs")
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"probs must be (samples, classes) with at least {splits} samples, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs rows must be probability distributions")
    p = np.clip(p, 1e-12, 1.0)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distances, chunked so 10k x 10k stays within memory."""
    b2 = (b * b).sum(1)
    rows = []
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        d2 = (x * x).sum(1)[:, None] - 2 * x @ b.T + b2[None, :]
        rows.append(np.sqrt(np.maximum(d2, 0.0)))
    return np.concatenate(rows)


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    d = _pairwise(x, x)
    return np.partition(d, k, axis=1)[:, k]  # column 0 is the sample itself (distance 0)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of fakes inside the real
    k-NN manifold, and of reals inside the fake one."""
    r, f = _check_pair(real, fake)
    if k < 1 or k >= min(len(r), len(f)):
        raise ValueError(f"k must be in [1, {min(len(r), len(f)) - 1}] for these sample counts, got {k}")
    r_rad, f_rad = _radii(r, k), _radii(f, k)
    d = _pairwise(f, r)  # (fake, real)
    precision = (d <= r_rad[None, :]).any(1).mean()
    recall = (d.T <= f_rad[None, :]).any(1).mean()
    return float(precision), float(recall)


