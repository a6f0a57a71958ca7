"""Sampling edges a mutation review of aigc_cli/sampling.py and aigc_cli/cli/sample.py found unguarded: truncation
and walks at their limits, the grid size limit, option refusals, output names and suffixes, conditional rows, the
seed in --json. Each test fails on the change that left every other test passing."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.errors import UsageError
from aigc_cli.sampling import (check_generates, check_grid_size, class_labels, filling, latents, png_name,
                               sample_latents, slerp, truncate)

CELL = 16 + 2  # tiny()'s resolution and make_grid's padding


# ---- sampling.py: pure functions -------------------------------------------------------------

def test_truncation_with_a_threshold_past_the_normals_float_range_stays_finite():
    """ndtr(40) is 1.0 and ndtr(-40) 0.0 in float64, whose quantiles are +-inf: the clamp keeps them in range."""
    t = truncate(torch.tensor([40.0, -40.0, 1.5]), 40.0)
    assert torch.isfinite(t).all(), t
    assert t[:2].tolist() == [40.0, -40.0] and abs(t[2].item() - 1.5) < 1e-4


def test_slerp_of_nearly_parallel_ends_stays_on_the_arc():
    """Only (anti)parallel ends fall back to the straight line; ends 0.05 rad apart still walk the arc."""
    angle = 0.05
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[math.cos(angle), math.sin(angle)]], dtype=torch.float64)
    w = slerp(a, b, 3)
    assert torch.allclose(w.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-9, rtol=0)
    mid = torch.tensor([math.cos(angle / 2), math.sin(angle / 2)], dtype=torch.float64)
    assert torch.allclose(w[1], mid, atol=1e-9, rtol=0)


def test_walks_take_n_rounded_down_to_whole_walks():
    """sample_latents(walk=K): n // K walks; an n that is no multiple of K draws no spare end."""
    got = torch.cat(list(sample_latents(5, 4, 0, 64, walk=2)))
    ends = latents(4, 4, 0)
    assert torch.equal(got, slerp(ends[0::2], ends[1::2], 2))


def test_a_walk_longer_than_the_batch_ends_at_its_last_step():
    """A walk of 3 at --batch-size 2: pieces of 2 and 1, not 2 and 2 (past the walk's end)."""
    pieces = list(sample_latents(3, 4, 5, 2, None, 3))
    assert [len(p) for p in pieces] == [2, 1]
    ends = latents(2, 4, 5)
    assert torch.equal(torch.cat(pieces), slerp(ends[0:1], ends[1:2], 3))


def test_grid_size_limit_counts_the_padding_and_only_the_columns_used():
    check_grid_size(1024 * 1023, 1024, 14)  # 16386 x 16370 pixels: just under 2**28
    with pytest.raises(UsageError, match=r"a grid of 1048576 images would be 16386x16386 pixels"):
        check_grid_size(1024 * 1024, 1024, 14)  # 14x14 images: under the limit only without the padding
    check_grid_size(4, 10**6, 32)  # a --nrow wider than --n: 4 columns, a small grid


def test_a_classifier_checkpoint_does_not_generate():
    ck = SimpleNamespace(path="c.safetensors", config=SimpleNamespace(model=SimpleNamespace(kind="classifier")))
    with pytest.raises(UsageError, match="holds a classifier, which does not generate images"):
        check_generates(ck)


def test_class_labels_of_an_unconditional_model():
    model = SimpleNamespace(kind="dcgan", conditional=False, num_classes=0)
    ck = SimpleNamespace(path="g.safetensors", config=SimpleNamespace(model=model), class_names=[])
    assert class_labels(ck, None, 8) == (None, None)
    with pytest.raises(UsageError, match="--class needs a class-conditional model; this dcgan is unconditional"):
        class_labels(ck, [0], 8)


def test_filling_warns_of_an_incomplete_set_only_when_some_were_written(tmp_path):
    said = []
    folder = tmp_path / "new" / "each"
    with pytest.raises(RuntimeError):
        with filling(folder, 5, "--individual x", said.append):
            raise RuntimeError  # nothing written: no warning, and the folders made for it are gone
    assert said == [] and not (tmp_path / "new").exists()
    folder.mkdir(parents=True)
    old = folder / "000009.png"  # an earlier run's: not counted
    old.write_bytes(b"")
    os.utime(old, ns=(0, 0))
    with pytest.raises(RuntimeError):
        with filling(folder, 5, "--individual x", said.append):
            for k in range(2):
                (folder / png_name(k, 5)).write_bytes(b"")
            raise RuntimeError
    assert said == ["--individual x: stopped after 2 of the 5 images were written; the folder holds an incomplete set"]


# ---- `aigc sample` in-process ---------------------------------------------------------------

def grid_cells(path: Path) -> tuple[int, int]:
    w, h = Image.open(path).size
    return (w - 2) // CELL, (h - 2) // CELL


@pytest.mark.parametrize("args, expect", [
    (["--n", "0"], "--n must be positive, got 0"),
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--nrow", "0"], "--nrow must be positive, got 0"),
    (["--precision", "fp64"], "--precision must be"),
    (["--out", "{tmp}"], "is a folder; give a file name ending in .png"),
    (["--individual", "{tmp}/file"], "exists and is not a folder"),
])
def test_sample_option_refusals(monkeypatch, capsys, sample_runs, tmp_path, args, expect):
    (tmp_path / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], *args)
    assert code == 2 and expect in err and err.count("\n") == 1, err


def test_output_suffixes_are_matched_whatever_their_case(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--out", tmp_path / "G.PNG",
                           "--npz", tmp_path / "A.NPZ")
    assert code == 0, err
    assert (tmp_path / "G.PNG").exists() and (tmp_path / "A.NPZ").exists()


def test_npz_alone_writes_no_grid(monkeypatch, capsys, sample_runs, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "3", "--npz", tmp_path / "a.npz")
    assert code == 0, err
    assert not (tmp_path / "samples.png").exists()
    assert np.load(tmp_path / "a.npz")["arr_0"].shape == (3, 16, 16, 1)


def test_default_grid_is_sqrt_n_rounded_up_wide(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "5", "--out", tmp_path / "g.png")
    assert code == 0, err
    assert grid_cells(tmp_path / "g.png") == (3, 2)


def test_a_walk_longer_than_n_is_one_walk(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "3", "--interpolate", "5",
                           "--individual", tmp_path / "each")
    assert code == 0, err
    assert "--n 3 with --interpolate 5: 1 walk of 5 images, 5 in all" in err
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [png_name(k, 5) for k in range(5)]


def test_conditional_n_is_rounded_to_whole_rows_in_the_files_too(monkeypatch, capsys, sample_runs, tmp_path):
    k = ckpt_io.load(sample_runs["cond"]).config.model.num_classes
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--n", str(2 * k + 1),
                           "--individual", tmp_path / "each", "--npz", tmp_path / "a.npz")
    assert code == 0, err
    assert len(list((tmp_path / "each").iterdir())) == 2 * k
    assert np.load(tmp_path / "a.npz")["arr_1"].tolist() == [c for c in range(k) for _ in range(2)]


def test_one_walk_per_class_says_nothing_of_classes_left_out(monkeypatch, capsys, sample_runs, tmp_path):
    k = ckpt_io.load(sample_runs["cond"]).config.model.num_classes
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--n", str(2 * k), "--interpolate", "2",
                           "--out", tmp_path / "g.png")
    assert code == 0, err
    assert "classes only" not in err, err
    assert grid_cells(tmp_path / "g.png") == (2, k)


def test_two_classes_take_a_row_each_and_one_class_walks_a_row_each(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "1,2", "--n", "8",
                           "--out", tmp_path / "two.png")
    assert code == 0, err
    assert grid_cells(tmp_path / "two.png") == (4, 2)  # not a square 3x3
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "1", "--n", "8",
                           "--interpolate", "4", "--out", tmp_path / "walks.png")
    assert code == 0, err
    assert grid_cells(tmp_path / "walks.png") == (4, 2)  # a walk a row, as without --class


def test_json_names_the_seed_it_drew_from(monkeypatch, capsys, sample_runs, tmp_path):
    import json

    code, out, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--seed", "7", "--json",
                             "--out", tmp_path / "g.png")
    assert code == 0, err
    assert json.loads(out)["seed"] == 7


def test_a_class_name_with_edge_spaces_beats_its_stripped_namesake():
    from aigc_cli.cli.sample import parse_classes

    assert parse_classes(" sp,sp", ["sp", " sp"]) == [1, 0]
