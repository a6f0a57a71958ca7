"""`aigc sample` at any size: latents drawn in pieces equal one draw, streamed --individual output,
grid limits, notices; `aigc export` refusals. In-process CLI runs (run_cli) for speed."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import Silent, run_cli, tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.data.shapes import CLASSES as SHAPE_CLASSES
from aigc_cli.sampling import latent_batches, latents, sample_latents, save_individual, slerp, truncate
from aigc_cli.training.loop import train


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), dim=st.integers(1, 40), batch=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
def test_latents_drawn_in_pieces_equal_one_draw(n, dim, batch, seed):
    pieces = list(latent_batches(n, dim, seed, batch))
    assert torch.equal(torch.cat(pieces), latents(n, dim, seed))
    assert all(len(p) <= max(batch, 16) for p in pieces[:-1]) and len(pieces[-1]) < max(batch, 16) + 16



@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 80), k=st.integers(1, 80), dim=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_image_k_is_the_same_for_any_n(n, k, dim, seed):
    """`--n 1` and `--n 40` begin with the same image: torch draws a count that is no multiple of 16
    another way at its end, so latents(1, 100) used to differ from latents(40, 100)[0] in 16 values."""
    k = min(k, n)
    assert torch.equal(latents(n, dim, seed)[:k], latents(k, dim, seed))


def test_truncation_maps_each_value_into_the_range_keeping_its_order():
    z = latents(20000, 4, 7)
    for threshold in (0.3, 1.0, 2.5):
        t = truncate(z, threshold)
        assert t.dtype == z.dtype and t.abs().max() <= threshold
        inside = z.abs() < threshold * 0.9
        assert not torch.equal(t[inside], z[inside])  # every value moves, not just the outliers
        order = z.flatten().argsort()
        assert (t.flatten()[order].diff() >= 0).all()  # a larger draw stays larger
        # the standard deviation of a normal truncated to [-a, a]: 1 - 2a phi(a) / (2 Phi(a) - 1)
        a = torch.tensor(threshold, dtype=torch.float64)
        phi, Phi = torch.exp(-a * a / 2) / (2 * torch.pi) ** 0.5, torch.special.ndtr(a)
        expected = (1 - 2 * a * phi / (2 * Phi - 1)) ** 0.5
        assert abs(t.double().std() - expected) < 0.01, (threshold, t.std(), expected)
    assert torch.equal(truncate(torch.tensor([40.0, -40.0]), 0.5), torch.tensor([0.5, -0.5]))  # no inf or nan


def test_slerp_walks_from_each_start_to_its_end():
    a, b = latents(3, 16, 1), latents(3, 16, 2)
    w = slerp(a, b, 7).view(3, 7, 16)
    assert torch.allclose(w[:, 0], a, atol=1e-6) and torch.allclose(w[:, -1], b, atol=1e-6)
    # ends of one length: even steps along the arc, every point of that length (a line would cut inside)
    b = b / b.norm(dim=1, keepdim=True) * a.norm(dim=1, keepdim=True)
    w = slerp(a, b, 7).view(3, 7, 16)
    steps = torch.stack([torch.nn.functional.cosine_similarity(w[:, i], w[:, i + 1], dim=-1) for i in range(6)])
    assert torch.allclose(steps, steps[0].expand(6, 3), atol=1e-5)
    assert torch.allclose(w.norm(dim=-1), a.norm(dim=1, keepdim=True).expand(3, 7), rtol=1e-5)
    same = slerp(a, a, 4)  # parallel ends: no division by zero
    assert torch.isfinite(same).all() and torch.allclose(same.view(3, 4, 16), a.unsqueeze(1).expand(3, 4, 16))


@settings(max_examples=40, deadline=None)
@given(walks=st.integers(1, 30), steps=st.integers(2, 9), dim=st.integers(1, 20), batch=st.integers(1, 40),
       truncation=st.sampled_from([None, 0.7]))
def test_walks_drawn_in_pieces_equal_one_draw(walks, steps, dim, batch, truncation):
    n = walks * steps
    pieces = list(sample_latents(n, dim, 5, batch, truncation, steps))
    assert all(len(p) <= batch for p in pieces)  # --batch-size holds, even for a walk longer than a batch
    got = torch.cat(pieces)
    ends = latents(2 * walks, dim, 5)
    ends = truncate(ends, truncation) if truncation else ends
    assert torch.equal(got, slerp(ends[0::2], ends[1::2], steps))
    plain = torch.cat(list(sample_latents(n, dim, 5, batch, truncation)))
    if walks == 1:  # the longest walk --interpolate allows starts at once, a batch at a time (not 8 GB of fractions)
        first = next(iter(sample_latents(10**9, dim, 5, batch, truncation, 10**9)))
        assert first.shape == (batch, dim)
    assert torch.equal(plain, truncate(latents(n, dim, 5), truncation) if truncation else latents(n, dim, 5))

def test_individual_files_streamed_from_batches_equal_one_batch(tmp_path):
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    assert save_individual(images.split(3), tmp_path / "a", 10, workers=2) == 10
    assert save_individual([images], tmp_path / "b", 10) == 10
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]
    assert all((tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes() for s in names)


def test_past_a_million_images_the_png_names_sort_in_order():
    """000000.png ... 999999.png, then 1000000.png sorted before 999999.png: eval --fake and --data read a folder
    in name order, so a --n subset of such a folder was not the file's."""
    from aigc_cli.sampling import png_name

    assert [png_name(k, 10) for k in (0, 9)] == ["000000.png", "000009.png"]
    assert png_name(999_999, 1_000_000) == "999999.png"
    names = [png_name(k, 1_000_001) for k in (0, 999_999, 1_000_000)]
    assert names == ["0000000.png", "0999999.png", "1000000.png"] == sorted(names)


def test_individual_only_streams_the_same_files_as_with_a_grid(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "37", "--batch-size", "5",
                           "--individual", tmp_path / "each")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "37", "--out", tmp_path / "g.png",
                           "--individual", tmp_path / "both")
    assert code == 0, err
    assert not (tmp_path / "samples.png").exists()  # --individual alone writes no grid
    names = sorted(p.name for p in (tmp_path / "each").iterdir())
    assert len(names) == 37
    assert all((tmp_path / "each" / s).read_bytes() == (tmp_path / "both" / s).read_bytes() for s in names)

    # Fewer images into the same folder: the files left from before are pointed out, not scored silently.
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "30", "--individual", tmp_path / "each")
    assert code == 0 and "also holds 7 PNG files this command did not write" in err, err
    code, out, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "30", "--individual", tmp_path / "each",
                             "--quiet")
    assert (code, out, err) == (0, "", "")


def test_individual_sweeps_what_killed_writers_left(monkeypatch, capsys, sample_runs, tmp_path):
    """kill -9 mid-write leaves a hidden .NNNNNN.png.XXXXXXXX.png, which a glob of *.png takes for an image;
    the next run into the folder removes it (once, before writing: not per PNG)."""
    each = tmp_path / "each"
    each.mkdir()
    dead, live, other = each / ".000001.png.89abcdef.png", each / ".000002.png.01234567.png", each / ".notes.png"
    for f in (dead, live, other):
        f.write_bytes(b"x")
    os.utime(dead, (time.time() - 3600,) * 2)
    os.utime(other, (time.time() - 3600,) * 2)
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "3", "--individual", each)
    assert code == 0, err
    assert not dead.exists() and live.exists() and other.exists()
    assert "did not write" not in err, err  # hidden files are no images: none of them is "from an earlier run"


def test_a_grid_too_large_to_hold_is_one_line_exit_2_before_generating(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "1000000000", "--out", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and "--individual" in err and "pixels" in err, err
    assert not (tmp_path / "x.png").exists()


def test_conditional_n_rounded_to_whole_rows_says_so(monkeypatch, capsys, sample_runs, tmp_path):
    k = ckpt_io.load(sample_runs["cond"]).config.model.num_classes
    assert k >= 2
    code, out, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--n", str(k + 1), "--json",
                             "--out", tmp_path / "c.png")
    assert code == 0, err
    assert f"--n {k + 1} with {k} classes: 1 image per class, {k} in all" in err
    # What --class K means travels with the checkpoint and its export.
    code, out, err = run_cli(monkeypatch, capsys, "export", sample_runs["cond"], "--out", tmp_path / "c.safetensors")
    assert code == 0, err
    for path in (sample_runs["cond"], tmp_path / "c.safetensors"):
        code, out, err = run_cli(monkeypatch, capsys, "info", path, "--json")
        assert json.loads(out)["class_names"] == list(SHAPE_CLASSES)
    code, out, err = run_cli(monkeypatch, capsys, "sample", tmp_path / "c.safetensors", "--class", str(k))
    assert code == 2 and f"(0 {SHAPE_CLASSES[0]}, 1 {SHAPE_CLASSES[1]}" in err, err


def test_a_stored_conditional_config_without_classes_is_refused(sample_runs, tmp_path):
    ck = ckpt_io.load(sample_runs["cond"])
    cfg = ck.config.with_overrides({"model.num_classes": 0})
    meta = {**ck.meta, "aigc.config": cfg.to_json()}
    ckpt_io.write_atomic(tmp_path / "bad.safetensors", ck.tensors, meta)
    with pytest.raises(Exception, match="conditional model with model.num_classes 0"):
        ckpt_io.load(tmp_path / "bad.safetensors")


def test_export_refuses_other_formats_and_training_checkpoints(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "export", sample_runs["gan"], "--out", tmp_path / "g.pt")
    assert code == 2 and ".safetensors" in err and not (tmp_path / "g.pt").exists()
    last = sample_runs["gan"] / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "export", sample_runs["gan"], "--out", last)
    assert code == 2 and "holds a training checkpoint" in err and last.read_bytes() == before
    foreign = tmp_path / "hub.safetensors"  # another program's weights
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "pt"})
    before = foreign.read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "export", sample_runs["gan"], "--out", foreign)
    assert code == 2 and "holds tensors that aigc did not write" in err and foreign.read_bytes() == before, err
    (tmp_path / "g.safetensors").write_bytes(b"cut sh")  # a write cut short: no safetensors file, replaced
    for quiet in ([], ["-q"]):  # an earlier export is replaced, as asked
        code, out, err = run_cli(monkeypatch, capsys, "export", sample_runs["gan"], "--out", tmp_path / "g.safetensors", *quiet)
        assert code == 0 and ("wrote" in out) != bool(quiet) and not err, err
    step_file = (sample_runs["gan"] / "checkpoints" / "step-0000002.safetensors").resolve()  # what last links to now
    assert ckpt_io.load(tmp_path / "g.safetensors").meta["aigc.source"] == str(step_file)
    code, out, err = run_cli(monkeypatch, capsys, "info", tmp_path / "g.safetensors", "--json")
    info = json.loads(out)
    assert code == 0 and info["source"] == str(step_file)
    assert info["weights"] == ("G_ema" if ckpt_io.load(last).net_state("G_ema") else "G")
    code, out, err = run_cli(monkeypatch, capsys, "info", last, "--json")
    assert code == 0 and "weights" not in json.loads(out)  # a training checkpoint holds them all


def test_unwritable_outputs_are_named_as_the_user_typed_them(monkeypatch, capsys, sample_runs, tmp_path):
    (tmp_path / "a.png").write_text("a file")
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--out", tmp_path / "a.png" / "x.png")
    assert code == 2 and err == f"error: --out {tmp_path / 'a.png' / 'x.png'}: {tmp_path / 'a.png'} is a file, not a folder\n"
    # Where only a real write shows the folder is closed to us (root passes every permission check):
    # said before generating, naming the option.
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--out", "/proc/x.png")
    assert code == 2 and err.startswith("error: --out /proc/x.png: cannot create files in /proc (") and err.count("\n") == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--individual", "/proc/imgs")
    assert code == 2 and err.startswith("error: --individual /proc/imgs: cannot create files there (") and err.count("\n") == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--individual", tmp_path / "a.png" / "d")
    assert (code, err) == (2, f"error: --individual {tmp_path / 'a.png' / 'd'}: {tmp_path / 'a.png'} is a file, not a folder\n")
    long = "x" * 252 + ".png"  # 256 bytes: one past what file systems allow in a name
    for option in ("--out", "--npz", "--individual"):
        name = long[:-4] + ".npz" if option == "--npz" else long
        code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", option, tmp_path / name)
        assert code == 2 and err == f"error: {option}: the name {name[:30]}... is 256 bytes long; file systems allow 255\n", err
    for args in (["export", sample_runs["gan"], "--out", tmp_path / (long[:-4] + ".onnx")],
                 ["eval", sample_runs["gan"], "--save-fakes", tmp_path / long]):
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith(f"error: {args[2]}: the name xxxxx") and err.count("\n") == 1, err
    assert not list(tmp_path.glob(".aigc-*"))  # the probe leaves nothing


def test_class_numbers_win_over_class_folders_named_with_digits_and_say_so():
    from aigc_cli.cli.sample import parse_classes

    names = [str(i) for i in range(1, 11)]  # folders 1..10 are classes 0..9
    said = []
    assert parse_classes("2", names, said.append) == [2]
    assert said == ["--class 2 is class number 2 ('3'); the class named '2' is number 1"]
    said.clear()
    assert parse_classes("10", names, said.append) == [10] and "the class named '10' is number 9" in said[0]
    said.clear()
    assert parse_classes("0,cats", ["0", "cats"], said.append) == [0, 1] and said == []  # no ambiguity


@pytest.mark.parametrize("text, expect", [
    ("\u00b2", "not a class number or name"), ("--1", "not a class number or name"), ("1\u00b2", "not a class"),
    ("\u0663", "not a class number or name"),  # an Arabic-Indic 3 is not ASCII: checkpoints count in ASCII
    ("9" * 5000, "not a class number or name"), ("CAT", "matches the classes Cat and cat but for case"),
])
def test_class_text_that_is_no_number_or_name_is_one_line(text, expect):
    from aigc_cli.cli.sample import parse_classes
    from aigc_cli.errors import UsageError

    with pytest.raises(UsageError) as e:
        parse_classes(text, ["1", "0", "a,b", "Cat", "cat", " sp"])
    assert expect in str(e.value) and len(str(e.value)) < 300, str(e.value)
    assert "'a,b'" in str(e.value) or "matches" in str(e.value)  # odd names are quoted in the listing


def test_an_empty_item_in_a_class_list_is_an_error_but_a_name_with_a_comma_is_matched():
    from aigc_cli.cli.sample import parse_classes
    from aigc_cli.errors import UsageError

    for typo in ("0,,1", "0,1,", ",0", "0, ,1"):
        with pytest.raises(UsageError, match="an empty item in the comma list"):
            parse_classes(typo, ["a", "b"])
    assert parse_classes("a,b", ["a,b", "c"]) == [0]


def test_class_names_with_commas_or_edge_spaces_are_matched_exactly():
    from aigc_cli.cli.sample import parse_classes

    names = ["1", "0", "a,b", "Cat", "cat", " sp"]
    assert parse_classes("a,b", names) == [2] and parse_classes(" sp", names) == [5]
    assert parse_classes(" sp,cat", names) == [5, 4] and parse_classes("0, 1", names) == [0, 1]
    assert parse_classes("sp", names) == [5]  # as typed without its space, it is still the one match


def test_conditional_labels_are_made_batch_by_batch_one_class_per_row(monkeypatch, capsys, sample_runs, tmp_path):
    import aigc_cli.sampling as S

    seen, real = [], S.generate
    monkeypatch.setattr(S, "generate", lambda G, z, amp, bs, labels=None: seen.append(labels) or real(G, z, amp, bs, labels=labels))
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "3,0,2", "--n", "6", "-b", "4",
                           "--individual", tmp_path / "each")
    assert code == 0, err
    assert [t.tolist() for t in seen] == [[3, 3, 0, 0], [2, 2]]


def test_a_grid_of_one_class_is_square_not_one_long_row(monkeypatch, capsys, sample_runs, tmp_path):
    from PIL import Image

    res = 16 + 2  # tiny()'s resolution and make_grid's padding
    for classes, n, cells in (("1", 16, (4, 4)), ("1,2", 6, (3, 2))):  # two classes: one a row
        code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", classes, "--n", str(n),
                               "--out", tmp_path / "g.png")
        assert code == 0, err
        assert Image.open(tmp_path / "g.png").size == (cells[0] * res + 2, cells[1] * res + 2)


@pytest.mark.parametrize("args, expect", [
    (["--n", str(10**9 + 1)], "--n must be at most 1,000,000,000"),
    (["--n", "99999999999999999999", "--individual", "{tmp}/i"], "--n must be at most"),
    (["--n", "4", "--batch-size", str(2**63), "--individual", "{tmp}/i"], "--batch-size must be at most"),  # a traceback
    (["--n", str(10**8), "--out", "{tmp}/g.png"], "a grid of 100000000 images would be"),  # not an out of memory
    (["--individual", "{tmp}/i", "--out", "{tmp}/i/grid.png"], "is inside the --individual folder"),
    (["--individual", "{tmp}/i", "--out", "{tmp}/i/sub/grid.png"], "is inside the --individual folder"),
])
def test_sample_refuses_before_any_work(monkeypatch, capsys, sample_runs, tmp_path, args, expect):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], *args)
    assert code == 2 and expect in err and err.count("\n") == 1, err
    assert not (tmp_path / "i").exists()


def test_class_for_a_model_that_cannot_take_one_says_why(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--class", "dog", "--out", tmp_path / "g.png")
    assert code == 2 and "--class needs a class-conditional model; this dcgan is unconditional" in err, err


@pytest.mark.parametrize("n, nrow, channels", [(1, 8, 3), (2, 8, 1), (7, 3, 3), (9, 3, 1), (5, 1, 3)])
def test_the_grid_is_laid_out_as_torchvisions_make_grid(n, nrow, channels):
    from torchvision.utils import make_grid as torchvision_grid

    from aigc_cli.sampling import make_grid

    images = torch.randint(0, 256, (n, channels, 5, 4), dtype=torch.uint8)
    ours = make_grid(images, nrow)
    theirs = torchvision_grid(images, nrow=nrow, padding=2, pad_value=0)
    assert torch.equal(ours, theirs[:channels])


def test_fp16_on_the_cpu_is_warned_as_slow_in_sample_and_train(monkeypatch, capsys, sample_runs, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--precision", "fp16",
                           "--out", tmp_path / "g.png")
    assert code == 0 and err.count("fp16 on the CPU is emulated and many times slower than fp32") == 1, err
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--n", "2", "--out", tmp_path / "h.png")
    assert code == 0 and "emulated" not in err, err  # auto is fp32 on a CPU
    reporter = Silent()
    train(tiny("dcgan").with_overrides({"train.steps": 1, "train.precision": "fp16"}), tmp_path / "run", reporter)
    assert sum("fp16 on the CPU is emulated" in n for n in reporter.notes) == 1, reporter.notes


def test_walks_fill_grid_rows_and_take_the_classes_in_turn(monkeypatch, capsys, sample_runs, tmp_path):
    import aigc_cli.sampling as S
    from PIL import Image

    seen, real = [], S.generate
    monkeypatch.setattr(S, "generate", lambda G, z, amp, bs, labels=None: seen.append(labels) or real(G, z, amp, bs, labels=labels))
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "3,1", "--n", "14",
                           "--interpolate", "4", "--out", tmp_path / "w.png")
    assert code == 0 and "--n 14 with --interpolate 4: 3 walks of 4 images, 12 in all" in err, err
    assert torch.cat(seen).tolist() == [3] * 4 + [1] * 4 + [3] * 4
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "3,1,0", "--n", "8",
                           "--interpolate", "4", "--out", tmp_path / "w2.png")
    assert code == 0 and "2 walks, so the first 2 of the 3 classes only; --n 12 gives one walk per class" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["cond"], "--class", "3,1,0", "--n", "5",
                           "--interpolate", "4", "--out", tmp_path / "w3.png")
    # the --n asked for, not the 4 it was rounded to (said in the line before)
    assert code == 0 and "--interpolate 4 with --n 5: 1 walk, so the first 1 of the 3 classes" in err, err
    res = tiny("dcgan").model.resolution
    assert Image.open(tmp_path / "w.png").size == (4 * (res + 2) + 2, 3 * (res + 2) + 2)  # a walk a row


def test_walk_ends_are_the_seeds_images_and_truncation_changes_them(monkeypatch, capsys, sample_runs, tmp_path):
    def pngs(*args):
        folder = tmp_path / "-".join(args)
        code, out, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--seed", "3", "--json",
                                 "--individual", folder, *args)
        assert code == 0, err
        return json.loads(out), [p.read_bytes() for p in sorted(folder.iterdir())]

    _, plain = pngs("--n", "3", "--batch-size", "1")  # 3 x 8 latent values: no multiple of 16
    info, walk = pngs("--n", "10", "--interpolate", "5", "--batch-size", "1")
    assert (info["n"], info["interpolate"], info["truncation"]) == (10, 5, None)
    assert [walk[0], walk[4], walk[5]] == plain  # walk w goes from image 2w to image 2w + 1
    assert len(set(walk)) == 10
    info, cut = pngs("--n", "4", "--truncation", "0.5", "--batch-size", "1")
    assert info["truncation"] == 0.5 and all(a != b for a, b in zip(cut, plain))


@pytest.mark.parametrize("args, expect", [
    (["--truncation", "0"], "--truncation must be a positive number"),
    (["--truncation", "-1"], "--truncation must be a positive number"),
    (["--truncation", "inf"], "--truncation must be a positive number"),
    (["--interpolate", "1"], "--interpolate must be at least 2"),
    (["--interpolate", str(10**9 + 1), "--individual", "{tmp}/i"], "and at most 1,000,000,000"),
])
def test_bad_truncation_or_walks_are_refused(monkeypatch, capsys, sample_runs, tmp_path, args, expect):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], *args, "--out", tmp_path / "g.png")
    assert code == 2 and expect in err and err.count("\n") == 1, err
    assert not (tmp_path / "g.png").exists()


def test_a_grid_out_that_cannot_be_written_is_refused_before_generating(monkeypatch, capsys, sample_runs, tmp_path):
    import aigc_cli.sampling as S

    (tmp_path / "one.png").write_bytes(b"x")
    monkeypatch.setattr(S, "generate", lambda *a, **k: pytest.fail("generated before the --out check"))
    code, _, err = run_cli(monkeypatch, capsys, "sample", sample_runs["gan"], "--out", tmp_path / "one.png" / "x.png")
    assert code == 2 and "--out " in err and "one.png is a file, not a folder" in err, err


def test_generate_gives_each_batch_its_own_labels():
    from aigc_cli.sampling import generate
    from aigc_cli.training.precision import Precision

    class Echo(torch.nn.Module):  # images whose pixels are the label: which label each image got
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, z, y):
            return (y.float() / 10 - 0.5).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) + self.w

    labels = torch.arange(10)
    out = generate(Echo(), torch.zeros(10, 3), Precision("fp32", torch.device("cpu")), batch_size=3, labels=labels)
    expected = ((labels.float() / 10 - 0.5 + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(out[:, 0, 0, 0], expected)


def test_pixel_scale_round_trips_and_clamps():
    from aigc_cli.sampling import from_uint8, to_uint8

    every = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(every)), every)
    assert from_uint8(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
