"""Inception Score and precision/recall against naive implementations and known cases."""

from __future__ import annotations

import numpy as np
import pytest

from aigc_cli.metrics.scores import inception_score, precision_recall


def naive_is(p, splits):
    out = []
    for part in (p[i * len(p) // splits:(i + 1) * len(p) // splits] for i in range(splits)):
        py = part.mean(0)
        kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, py) if pi > 0) for row in part]
        out.append(np.exp(np.mean(kl)))
    return np.mean(out), np.std(out)


def test_inception_score_matches_a_naive_loop_and_known_values():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 7)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    shuffled = p[np.random.RandomState(0).permutation(len(p))]  # as torch-fidelity shuffles (seed 0 here)
    assert inception_score(p, 10) == pytest.approx(naive_is(shuffled, 10), rel=1e-9)
    confident = np.eye(5)[np.arange(20000) % 5]  # sure of each class, all classes equally often (up to the
    assert inception_score(confident, 10)[0] == pytest.approx(5.0, rel=2e-3)  # shuffle's imbalance per split)
    same = np.full((100, 5), 0.2)  # no information: IS 1
    assert inception_score(same, 10) == pytest.approx((1.0, 0.0), abs=1e-9)
    with pytest.raises(ValueError):
        inception_score(np.full((5, 3), 0.5), 10)


def test_inception_score_does_not_depend_on_the_images_order():
    """A conditional model's `sample --npz` is in class order: each split held one class, and IS fell to ~1."""
    in_order = np.eye(10)[np.repeat(np.arange(10), 300)] * 0.9 + 0.01  # sure of each class, classes in order
    score, std = inception_score(in_order, 10)
    assert score == pytest.approx(inception_score(in_order[::-1], 10, seed=1)[0], rel=0.02)
    assert score > 5 and std < 0.3 * score
    assert inception_score(in_order, 10, seed=0) == inception_score(in_order, 10, seed=0)  # seeded


def test_inception_score_splits_as_the_original_code():
    p = np.eye(7)[np.arange(23) % 7] * 0.93 + 0.01  # 23 images: splits of 2 or 3, at i * 23 // 10
    assert inception_score(p, 10, seed=5) == pytest.approx(naive_is(p[np.random.RandomState(5).permutation(23)], 10),
                                                           rel=1e-12)


def naive_pr(real, fake, k):
    def radius(x, i):
        d = sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        return d[k - 1]
    rr = [radius(real, i) for i in range(len(real))]
    fr = [radius(fake, i) for i in range(len(fake))]
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= fr[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_precision_recall_matches_a_naive_loop():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(50, 4)) * 0.5 + 0.7  # narrower and shifted: precision and recall both partial
    got = precision_recall(real, fake, k=3)
    assert got == pytest.approx(naive_pr(real, fake, 3), abs=1e-12)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_extremes():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(80, 3))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    collapsed = np.repeat(real[:1], 40, axis=0) + 1e-6 * rng.normal(size=(40, 3))  # mode collapse
    precision, recall = precision_recall(real, collapsed, k=3)
    assert precision == 1.0 and recall < 0.2
    with pytest.raises(ValueError):
        precision_recall(real, real, k=80)


def test_precision_recall_of_duplicated_large_features_are_exact():
    """A self-distance that rounds below zero must not become NaN (NaN sorts last: every radius would be
    the next neighbour's, and both scores too high)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 300)) * 0.3 + 1e4  # (a.a - 2a.b + b.b rounds to -7.6e-6 for some a == b)
    real = np.repeat(base, 4, axis=0)  # each point 3 times more: its 3rd neighbour is at distance 0
    fake = base + 0.01  # off every real point: outside radius 0
    assert precision_recall(real, fake, k=3) == pytest.approx(naive_pr(real, fake, 3))
    assert precision_recall(real, fake, k=3)[0] == 0.0
