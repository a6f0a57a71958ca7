"""Images as one .npz (guided-diffusion's and StyleGAN's layout: arr_0 uint8 (N, H, W, C), arr_1 labels):
`aigc sample --npz` writes it as the images are generated, `aigc eval --fake` scores it as it scores a
folder of the same images, and anything else in such a file is a one-line error, never unpickled."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_cli.errors import UsageError
from aigc_cli.image_npz import image_npz_writer, load_images
from aigc_cli.training.loop import train
from conftest import Silent, run_cli, tiny


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    for name, model in (("cond", {"conditional": True}), ("clf", None)):
        cfg = (tiny("dcgan", **model) if model else tiny("classifier", channels=3)).with_overrides(
            {"train.steps": 2, "train.ckpt_every": 2, "train.sample_every": 2})
        train(cfg, root / name, Silent())
    return root


def pngs(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_sample_npz_holds_the_individual_pngs_and_the_class_rows(aigc, runs, tmp_path):
    done = aigc("sample", runs / "cond", "--n", 30, "-b", 7, "--class", "0,2", "--npz", tmp_path / "a.npz",
                "--individual", tmp_path / "ind", "--json")
    assert done.code == 0, done.stderr
    assert done.json()["npz"] == str(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        assert z.files == ["arr_0", "arr_1"]
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (30, 16, 16, 1)
    assert np.array_equal(images[..., 0], pngs(tmp_path / "ind"))  # grey PNGs are (H, W)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 15 + [2] * 15  # one class per row
    alone = aigc("sample", runs / "cond", "--n", 30, "-b", 7, "--class", "0,2", "--npz", tmp_path / "b.npz")
    assert alone.code == 0 and "wrote 30 images:" in alone.stdout, alone.stderr
    assert (tmp_path / "b.npz").read_bytes() == (tmp_path / "a.npz").read_bytes()
    assert not (tmp_path / "samples.png").exists()  # --npz alone writes no default grid


def test_writer_streams_and_leaves_nothing_after_a_stop(tmp_path):
    batches = [torch.randint(0, 256, (k, 3, 5, 4), dtype=torch.uint8) for k in (3, 3, 1)]
    with image_npz_writer(tmp_path / "x.npz", 7, labels=lambda a, b: torch.arange(a, b) % 2) as add:
        for b in batches:
            add(b)
    with np.load(tmp_path / "x.npz") as z:
        assert np.array_equal(z["arr_0"], torch.cat(batches).permute(0, 2, 3, 1).numpy())
        assert z["arr_1"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    with pytest.raises(KeyboardInterrupt), image_npz_writer(tmp_path / "y.npz", 7) as add:
        add(batches[0])
        raise KeyboardInterrupt
    with pytest.raises(RuntimeError, match="never written"), image_npz_writer(tmp_path / "z.npz", 7) as add:
        add(batches[0])  # 3 of 7: the file would claim rows it does not hold
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]  # no partial file, no temporary


def test_load_reads_compressed_grey_files_and_a_seeded_subset(tmp_path):
    from aigc_cli.data.native import seeded_order

    grey = np.random.default_rng(0).integers(0, 256, (9, 6, 5, 1), dtype=np.uint8)
    np.savez_compressed(tmp_path / "g.npz", grey)  # numpy's own writer, deflated
    whole = load_images(str(tmp_path / "g.npz"))
    assert whole.shape == (9, 3, 6, 5) and torch.equal(whole, torch.from_numpy(grey).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))
    some = load_images(str(tmp_path / "g.npz"), n=4, seed=5)
    assert torch.equal(some, whole[sorted(seeded_order(9, 4, 5)[:4])])


def write_raw(path, array, name="arr_0", **kwargs):
    np.savez(path, **{name: array}, **kwargs)
    return str(path)


@pytest.mark.parametrize("make, expect", [
    (lambda p: write_raw(p, np.zeros((4, 8, 8, 3), np.float32)), "holds float32 values; images must be uint8"),
    (lambda p: write_raw(p, np.zeros((4, 3, 8, 8), np.uint8)), "has shape (4, 3, 8, 8); images must be (N, H, W, C)"),
    (lambda p: write_raw(p, np.zeros((0, 8, 8, 3), np.uint8)), "holds no images"),
    (lambda p: write_raw(p, np.zeros((4, 0, 8, 3), np.uint8)), "holds no images"),
    (lambda p: write_raw(p, np.zeros((4, 8, 0, 3), np.uint8)), "holds no images"),
    (lambda p: write_raw(p, np.zeros((4, 8, 8, 4), np.uint8)), "has shape (4, 8, 8, 4); images must be (N, H, W, C) with C 1 or 3"),
    (lambda p: write_raw(p, np.zeros((4, 8, 8, 3), np.uint8), "images"), "holds no 'arr_0' array of images (it holds images)"),
    (lambda p: write_raw(p, np.zeros(3), "mu", sigma=np.eye(3)), "reference statistics: pass it as --ref"),
    (lambda p: p.write_bytes(b"not a zip") and str(p), "not a readable .npz file"),
])
def test_bad_files_are_one_line_errors(tmp_path, make, expect):
    with pytest.raises(UsageError) as e:
        load_images(make(tmp_path / "f.npz"))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exit, (99,))

    np.savez(tmp_path / "evil.npz", arr_0=np.array([Boom()], dtype=object))  # a pickle inside
    with pytest.raises(UsageError, match="holds object values"):
        load_images(str(tmp_path / "evil.npz"))


def test_a_file_cut_short_says_so(tmp_path):
    write_raw(tmp_path / "f.npz", np.zeros((50, 8, 8, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "f.npz") as z:
        data = z.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as z:
        z.writestr("arr_0.npy", data[:-500])
    with pytest.raises(UsageError, match="is cut short"):
        load_images(str(tmp_path / "cut.npz"))


def test_eval_scores_an_npz_as_the_folder_of_its_images(runs, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "fakes.npz", images)
    (tmp_path / "fakes").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "fakes" / f"{i:06d}.png")
    reals = tmp_path / "reals"
    reals.mkdir()
    for i, img in enumerate(rng.integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)):
        Image.fromarray(img).save(reals / f"{i:06d}.png")
    scores = []
    for fake in ("fakes.npz", "fakes"):
        code, out, err = run_cli(monkeypatch, capsys, "eval", "--fake", tmp_path / fake, "--data", reals, "--n", 7,
                                 "--features", runs / "clf", "--stats-dir", tmp_path / "stats", "--json")
        assert code == 0, err
        scores.append(__import__("json").loads(out))
    assert scores[0]["metrics"] == scores[1]["metrics"] and scores[0]["protocol"]["n_fake"] == 7
    assert scores[0]["metrics"]["fid"] > 0


def test_sample_npz_bad_names_fail_before_any_work(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "sample", runs / "cond", "--npz", tmp_path / "x.npy")
    assert code == 2 and "--npz" in err and "ending in .npz" in err and "Traceback" not in err
    (tmp_path / "dir.npz").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "sample", runs / "cond", "--npz", tmp_path / "dir.npz")
    assert code == 2 and "is a folder" in err


def test_a_damaged_member_or_a_header_claiming_too_much_is_one_line(tmp_path):
    import io

    write_raw(tmp_path / "f.npz", np.zeros((50, 8, 8, 3), np.uint8))
    data = bytearray((tmp_path / "f.npz").read_bytes())
    data[2000] ^= 0xFF  # a stored member's pixel byte: the CRC no longer matches
    (tmp_path / "crc.npz").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="'arr_0' is damaged"):
        load_images(str(tmp_path / "crc.npz"))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**11, 8, 8, 3)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("arr_0.npy", header.getvalue() + bytes(192 * 3))
    with pytest.raises(UsageError, match="cut short .3 of the 100,000,000,000 images its header names"):
        load_images(str(tmp_path / "huge.npz"), n=10)  # said before 10^11 indices are shuffled
    header = io.BytesIO()  # sizes whose product wraps to 0 in int64 (3 * 2^80): "array is too big", a traceback
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1, 2**40, 2**40, 3)})
    with zipfile.ZipFile(tmp_path / "wraps.npz", "w") as z:
        z.writestr("arr_0.npy", header.getvalue() + bytes(64))
    with pytest.raises(UsageError, match="cut short"):
        load_images(str(tmp_path / "wraps.npz"))


def _flag_encrypted(path, out):
    """The zip's members marked encrypted (bit 0 of the flags, local and central headers), as zip -e writes them."""
    data = bytearray(path.read_bytes())
    for magic, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(magic)
        while at >= 0:
            data[at + offset] |= 1
            at = data.find(magic, at + 4)
    out.write_bytes(bytes(data))
    return str(out)


def test_an_encrypted_member_is_one_line_for_fake_and_ref(tmp_path):
    """zipfile raises RuntimeError ("password required") for an encrypted member and NotImplementedError for
    Deflate64: both were tracebacks (exit 1)."""
    from aigc_cli.metrics.reference import load_npz

    images = _flag_encrypted(Path(write_raw(tmp_path / "i.npz", np.zeros((3, 4, 4, 3), np.uint8))), tmp_path / "ie.npz")
    with pytest.raises(UsageError, match="'arr_0' is damaged or unreadable .* encrypted"):
        load_images(images)
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(UsageError, match="not a readable statistics .npz .* encrypted"):
        load_npz(_flag_encrypted(tmp_path / "s.npz", tmp_path / "se.npz"))


def test_fortran_order_reads_as_numpy_reads_it(tmp_path):
    a = np.random.default_rng(2).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "f.npz", np.asfortranarray(a))  # numpy writes it so for any F-contiguous array
    assert torch.equal(load_images(str(tmp_path / "f.npz")), torch.from_numpy(a).permute(0, 3, 1, 2))
    assert torch.equal(load_images(str(tmp_path / "f.npz"), n=3, seed=1),
                       load_images(write_raw(tmp_path / "c.npz", a), n=3, seed=1))


def test_fake_that_is_some_other_file_says_what_fake_takes(runs, tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "plain.npy", np.zeros((4, 8, 8, 3), np.uint8))
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", tmp_path / "plain.npy", "--data", "shapes",
                           "--features", runs / "clf")
    assert code == 2 and "is a file; --fake takes a folder of images or a .npz of them" in err, err


def test_eval_save_fakes_to_an_npz_holds_what_it_scored(runs, tmp_path, monkeypatch, capsys):
    args = ["eval", runs / "cond", "--n", 20, "-b", 8, "--metrics", "fid", "--features", runs / "clf",
            "--data", "shapes", "--stats-dir", tmp_path / "stats", "--json"]
    code, out, err = run_cli(monkeypatch, capsys, *args, "--save-fakes", tmp_path / "f.npz")
    assert code == 0, err
    with np.load(tmp_path / "f.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (20, 16, 16, 1) and labels.shape == (20,) and set(labels.tolist()) <= set(range(4))
    code, pngs_out, err = run_cli(monkeypatch, capsys, *args, "--save-fakes", tmp_path / "pngs")
    assert code == 0, err
    assert np.array_equal(images[..., 0], pngs(tmp_path / "pngs"))  # the same images as the PNG folder
    scored = __import__("json").loads(out)
    again = run_cli(monkeypatch, capsys, "eval", "--fake", tmp_path / "f.npz", "--data", "shapes", "--n", 20,
                    "--metrics", "fid", "--features", runs / "clf", "--stats-dir", tmp_path / "stats2", "--json")
    assert again[0] == 0 and scored["protocol"]["saved_fakes"] == str(tmp_path / "f.npz")


def test_an_npz_given_as_a_checkpoint_says_what_it_is(tmp_path, monkeypatch, capsys):
    write_raw(tmp_path / "a.npz", np.zeros((2, 4, 4, 3), np.uint8))
    for command in ("sample", "info"):
        code, _, err = run_cli(monkeypatch, capsys, command, tmp_path / "a.npz")
        assert code == 2 and "not a checkpoint: score images with `aigc eval --fake`" in err, err


def test_save_fakes_onto_the_ref_file_is_refused(runs, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "cond", "--ref", tmp_path / "ref.npz",
                           "--save-fakes", tmp_path / "ref.npz")
    assert code == 2 and "is the --ref file, which it would overwrite" in err, err


def test_an_npz_of_another_kind_is_not_overwritten(runs, tmp_path, monkeypatch, capsys):
    """`sample --npz` onto reference statistics, `eval stats --out` onto a file of images: each replaced
    the other's file without a word."""
    stats, images, other = tmp_path / "ref.npz", tmp_path / "images.npz", tmp_path / "other.npz"
    np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
    np.savez(images, np.zeros((2, 4, 4, 3), np.uint8))
    np.savez(other, weights=np.ones(2))
    batch = tmp_path / "batch.npz"  # guided-diffusion's reference batch: images and their statistics
    np.savez(batch, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3))
    before = {p: p.read_bytes() for p in (stats, images, other, batch)}
    for argv, expect in [
        (["sample", runs / "cond", "--n", "2", "--npz", stats], "--npz {}: holds reference statistics"),
        (["sample", runs / "cond", "--n", "2", "--npz", other], "--npz {}: holds other arrays (weights)"),
        (["eval", runs / "cond", "--features", runs / "clf", "--n", "4", "--data", "shapes", "--save-fakes", stats],
         "--save-fakes {}: holds reference statistics"),
        (["eval", "stats", "--data", "shapes", "--features", runs / "clf", "--n", "4", "--out", images],
         "--out {}: holds images (from `aigc sample --npz`)"),
        (["eval", "stats", "--data", "shapes", "--features", runs / "clf", "--n", "4", "--out", batch],
         "--out {}: holds images and their statistics"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, *argv)
        target = argv[-1]
        assert code == 2 and expect.format(target) in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in before} == before
    code, _, err = run_cli(monkeypatch, capsys, "sample", runs / "cond", "--n", "2", "--npz", images)
    assert code == 0, err  # images by images: as any output file is replaced
    with np.load(images) as z:
        assert z["arr_0"].shape[1:] != (4, 4, 3)  # the model's images now


def test_an_npz_of_images_and_labels_is_replaceable_by_images(tmp_path):
    from aigc_cli.image_npz import check_replaceable, is_npz

    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8), arr_1=np.array([0, 1]))  # a conditional `sample --npz`
    check_replaceable(path, "--npz", images=True)
    with pytest.raises(UsageError, match="holds images"):
        check_replaceable(path, "--out", images=False)
    assert is_npz("X.NPZ")
