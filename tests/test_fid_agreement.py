"""Our FID against pytorch-fid's on the same two image folders and the same weights: the real `aigc
eval --fake A --data B` command and pytorch-fid's own `calculate_fid_given_paths`. The weights are random
in the real file's layout (the real file is not available offline); benchmarks/fid_agreement.py runs the
same comparison on any folders and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from test_inception import random_state_dict


def write_folder(path, seed: int, n: int = 6, size: int = 24):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.linspace(0, 255, size)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 40 + 10 * seed, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / f"{i}.png")
    return path


def test_aigc_and_pytorch_fid_agree_on_the_same_folders(aigc, aigc_env, tmp_path):
    from pytorch_fid import fid_score  # in the test extra: `make test` installs it
    from pytorch_fid import inception as pfi

    weights = tmp_path / "random-inception.pth"
    torch.save(random_state_dict(seed=3), weights)
    a, b = write_folder(tmp_path / "a", 1), write_folder(tmp_path / "b", 2)

    env_flag = {**aigc_env, "AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS": "1"}
    aigc_env_backup = dict(aigc_env)
    aigc_env.update(env_flag)
    try:
        r = aigc("eval", "--fake", a, "--data", b, "--metrics", "fid", "--inception-weights", weights,
                 "--device", "cpu", "--json", "--stats-dir", tmp_path / "stats")
    finally:
        aigc_env.clear()
        aigc_env.update(aigc_env_backup)
    assert r.code == 0, r.stderr
    ours = r.json()["metrics"]["fid"]

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: torch.load(weights, map_location="cpu", weights_only=True)
    try:
        theirs = float(fid_score.calculate_fid_given_paths([str(a), str(b)], 6, "cpu", 2048, num_workers=0))
    finally:
        pfi.load_state_dict_from_url = original
    assert theirs > 1.0  # different folders: a comparison of two zeros would prove nothing
    assert ours == pytest.approx(theirs, rel=0.005), (ours, theirs)
