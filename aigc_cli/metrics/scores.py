"""Inception Score and k-NN precision/recall from class probabilities and feature arrays (numpy,
float64; torch tensors accepted by duck typing, like fid.py)."""

from __future__ import annotations

import numpy as np

from .fid import _as_float64, _check_pair


def inception_score(probs, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split, as in Salimans et al. 2016 and torch-fidelity: (mean, std).
    Split after a seeded shuffle, as torch-fidelity does: images in class order (a conditional model's
    `sample --npz`, read back by `eval --fake`) put one class in each split, and the score fell to about 1.
    Split boundaries as theirs and the original code's: i * n // splits."""
    p = _as_float64(probs, "probs")
    if p.ndim != 2 or p.shape[0] < splits or splits < 1:
        raise ValueError(f"probs must be (samples, classes) with at least {splits} samples, got shape {p.shape}")
    if (p < 0).any() or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs rows must be probability distributions")
    p = np.clip(p, 1e-12, 1.0)[np.random.RandomState(seed).permutation(len(p))]
    scores = []
    for part in (p[i * len(p) // splits:(i + 1) * len(p) // splits] for i in range(splits)):
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _distance_blocks(a: np.ndarray, b: np.ndarray, chunk: int = 512):
    """(first row, Euclidean distances of a[rows] to all of b), a block of rows at a time: at 50k x 50k
    the whole matrix would be 20 GB; a block is chunk x len(b)."""
    b2 = (b * b).sum(1)
    for i in range(0, len(a), chunk):
        x = a[i:i + chunk]
        d2 = (x * x).sum(1)[:, None] - 2 * x @ b.T + b2[None, :]
        yield i, np.sqrt(np.maximum(d2, 0.0))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    out = np.empty(len(x))
    for i, d in _distance_blocks(x, x):
        out[i:i + len(d)] = np.partition(d, k, axis=1)[:, k]  # column 0 is the sample itself (distance 0)
    return out


def _share_inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """The share of points inside at least one ball (centre, radius)."""
    inside = sum(int((d <= radii[None, :]).any(1).sum()) for _, d in _distance_blocks(points, centres))
    return inside / len(points)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): the share of fakes inside the real
    k-NN manifold, and of reals inside the fake one."""
    r, f = _check_pair(real, fake)
    if k < 1 or k >= min(len(r), len(f)):
        raise ValueError(f"k must be in [1, {min(len(r), len(f)) - 1}] for these sample counts, got {k}")
    r_rad, f_rad = _radii(r, k), _radii(f, k)
    return _share_inside(f, r, r_rad), _share_inside(r, f, f_rad)


