"""Reference statistics: the numbers of a whole eval run against independent computations on the same
features, the cache (reused, invalidated), `aigc eval stats` files and pytorch-fid-style files for --ref."""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.data import load_images
from aigc_cli.errors import UsageError
from aigc_cli.metrics import evaluate as evaluate_mod
from aigc_cli.metrics.fid import kid
from aigc_cli.data.native import real_indices
from aigc_cli.metrics.reference import FeatureStats, load_npz
from aigc_cli.training.loop import train
from conftest import Counting, Silent, run_cli, tiny, write_image_folder
from test_metrics_scores import naive_is

CPU = torch.device("cpu")
OLD = time.time() - 3600


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref-runs")
    train(tiny("classifier", channels=3).with_overrides({"train.steps": "5"}), root / "clf", Silent())
    train(tiny("dcgan").with_overrides({"train.steps": "2"}), root / "gan", Silent())
    return root


def one_error_line(code: int, err: str) -> str:
    lines = [s for s in err.splitlines() if s.strip()]
    errors = [s for s in lines if s.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    return errors[0]


def sqrtm_fid(x, y):
    """pytorch-fid's formula with scipy.linalg.sqrtm, on float64 features."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def naive_pr(real, fake, k):
    def kth(x, i):
        return sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1]
    rr, fr = [kth(real, i) for i in range(len(real))], [kth(fake, i) for i in range(len(fake))]
    precision = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - f) <= fr[j] for j, f in enumerate(fake)) for r in real])
    return float(precision), float(recall)


def test_feature_stats_in_batches_equal_numpy_on_all_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 1000.0  # a large mean next to the spread
    acc = FeatureStats(keep=True)
    for part in np.array_split(x, 7):
        acc.add(part)
    mu, sigma = acc.mu_sigma()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)
    assert acc.features().dtype == np.float32 and acc.features().shape == x.shape
    # float32 tensors, as extractors hand them over on their device, are summed in float64 too
    acc32 = FeatureStats(keep=False)
    for part in torch.from_numpy(x.astype(np.float32)).split(40):
        acc32.add(part)
    np.testing.assert_allclose(acc32.mu_sigma()[1], np.cov(x.astype(np.float32).astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-9)
    assert acc32.features() is None


def test_non_finite_features_are_a_usage_error_when_read():
    acc = FeatureStats(keep=True)
    acc.add(torch.ones(3, 4))
    acc.add(torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))  # no sync per batch: noticed at the end
    acc.add(torch.zeros(2, 4))
    for read in (acc.mu_sigma, acc.features):
        with pytest.raises(UsageError, match="NaN or infinite"):
            read()


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 60 samples of 128 features: a singular covariance
def test_every_metric_of_a_run_equals_an_independent_computation(runs, tmp_path):
    n, seed = 60, 3
    r = evaluate_mod.evaluate(ckpt_io.load(runs / "gan"), data="shapes", root=None, download=False,
                              features=str(runs / "clf"), n=n, batch_size=25, seed=seed, device="cpu",
                              precision="fp32", warn=print, stats_dir=tmp_path / "stats",
                              save_fakes=str(tmp_path / "fakes"))
    m, p = r["metrics"], r["protocol"]
    assert set(m) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall"}
    # The same images, embedded again from scratch: the saved PNGs and the seeded real subset.
    files = sorted((tmp_path / "fakes").glob("*.png"))
    assert len(files) == n
    fakes = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in files]))[:, None]  # grey (N, 1, H, W)
    reals = load_images("shapes", channels=1, resolution=16, split="train", seed=seed).images
    reals = reals[real_indices(len(reals), n, seed)]
    clf = evaluate_mod.ClassifierFeatures(str(runs / "clf"), CPU, "fp32")
    f_fake, p_fake = (t.numpy() for t in clf.embed(fakes, 7))
    f_real = clf(reals, 7).numpy()
    assert m["fid"] == pytest.approx(sqrtm_fid(f_fake, f_real), rel=1e-5)
    # KID and precision/recall run on the float32 features kept for them (as cached).
    f32, r32 = f_fake.astype(np.float32), f_real.astype(np.float32)
    assert (m["kid"], m["kid_std"]) == pytest.approx(kid(f32, r32, subsets=100, subset_size=n // 2, seed=seed),
                                                     rel=1e-6, abs=1e-9)
    shuffled = p_fake[np.random.RandomState(seed).permutation(n)]  # as torch-fidelity, seeded by --seed
    assert (m["is"], m["is_std"]) == pytest.approx(naive_is(shuffled, 10), rel=1e-6)
    assert (m["precision"], m["recall"]) == pytest.approx(naive_pr(r32.astype(np.float64), f32.astype(np.float64), 3))
    assert p["kid_subsets"] == 100 and p["is_splits"] == 10 and p["pr_k"] == 3 and p["saved_fakes"]


def test_the_cache_is_reused_and_invalidated_by_a_changed_file(runs, tmp_path):
    folder = write_image_folder(tmp_path / "real", n_per_class=5, size=20)
    fakes = write_image_folder(tmp_path / "fake", n_per_class=4, size=20, classes=("a",))
    extractor = Counting(evaluate_mod.ClassifierFeatures(str(runs / "clf"), CPU, "fp32"))

    def run(data=folder, seed=0):
        before = extractor.images
        r = evaluate_mod.evaluate_folder(str(fakes), data=str(data), root=None, download=False, features=None,
                                         n=100, batch_size=4, seed=seed, device="cpu", precision="fp32",
                                         warn=lambda s: None, metrics=["fid", "kid"], stats_dir=tmp_path / "stats",
                                         extractor=extractor)
        return r, extractor.images - before

    first, embedded = run()
    assert first["protocol"]["reference"] == "computed" and embedded == 10 + 4
    second, embedded = run()
    assert second["protocol"]["reference"] == "cache hit" and embedded == 4  # no real image embedded
    assert second["metrics"] == first["metrics"]
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1
    # The same images picked with another seed (n covers them all) from a copy elsewhere: the same entry
    import shutil

    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "real copy")
    moved, embedded = run(copy, seed=7)
    assert moved["protocol"]["reference"] == "cache hit" and embedded == 4
    assert moved["protocol"]["real_data"].startswith(f"folder {copy}")  # described as this run's data
    with Image.open(folder / "cats" / "img2.png") as im:  # one file of the real folder changes
        im.rotate(90).save(folder / "cats" / "img2.png")
    third, embedded = run()
    assert third["protocol"]["reference"] == "computed" and embedded == 14
    assert third["protocol"]["cache_key"] != first["protocol"]["cache_key"]
    assert third["metrics"]["fid"] != first["metrics"]["fid"]


def test_eval_stats_writes_a_file_that_ref_accepts_and_pytorch_fid_files_work_for_fid(
        runs, tmp_path, monkeypatch, capsys):
    stats = tmp_path / "stats"
    ref = tmp_path / "ref stats.npz"
    code, out, err = run_cli(monkeypatch, capsys, "eval", "stats", "--data", "shapes", "--resolution", 16,
                             "--channels", 1, "--features", runs / "clf", "--n", 50, "--out", ref, "--json")
    assert code == 0, err
    written = json.loads(out)
    with np.load(ref, allow_pickle=False) as z:
        assert sorted(z.files) == ["features", "mu", "protocol", "sigma"]
        assert z["mu"].dtype == np.float64 and z["features"].dtype == np.float32 and z["features"].shape == (50, 128)
        assert json.loads(str(z["protocol"]))["real_shape"] == [1, 16, 16] == written["protocol"]["real_shape"]

    common = ["--features", runs / "clf", "--n", 50, "--stats-dir", stats, "--json"]
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--data", "shapes", *common)
    assert code == 0, err
    from_data = json.loads(out)
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", ref, *common)
    assert code == 0, err
    from_ref = json.loads(out)
    assert from_ref["protocol"]["reference"] == f"file {ref}"
    assert "was not used" not in err
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", ref, "--data", "elsewhere", *common)
    assert code == 0 and json.loads(out)["metrics"] == from_ref["metrics"]
    assert f"--data elsewhere was not used: --ref {ref} supplies the real side" in err  # not silently ignored
    assert from_ref["metrics"] == from_data["metrics"]  # the same real images, the same numbers
    made_by = from_ref["protocol"]["extractor"].removeprefix("classifier:")
    for scored in ([runs / "gan"], ["--fake", runs / "gan" / "samples"]):  # Inception's weights were asked for
        line = one_error_line(*run_cli(monkeypatch, capsys, "eval", *scored, "--ref", ref, "--n", 50)[::2])
        assert line.endswith(f"holds features of classifier:{made_by}: pass --features {made_by} to score against it"), line

    # pytorch-fid's format: only mu and sigma. FID (and IS) work; KID and precision/recall cannot.
    pfid = tmp_path / "pfid.npz"
    full = load_npz(ref)
    np.savez(pfid, mu=full.mu, sigma=full.sigma)
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", pfid, *common)
    assert code == 0, err
    only = json.loads(out)
    assert set(only["metrics"]) == {"fid", "is", "is_std"}
    assert only["metrics"]["fid"] == pytest.approx(from_data["metrics"]["fid"], rel=1e-12)
    assert "does not say how it was computed" in err and "the same features (classifier:" in err  # not "Inception"
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", pfid, "--metrics", "fid", *common[:-1],
                             "--quiet")
    assert (code, out, err) == (0, "", "")  # --quiet: not even that warning
    line = one_error_line(*run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", pfid, "--metrics", "fid,kid",
                                   *common)[::2])
    assert "only mu and sigma" in line and "kid" in line


@pytest.mark.parametrize("content, expect", [
    (b"not a zip at all", "not a readable statistics .npz"),
    (None, "no 'sigma'"),
    ("object", "not a readable statistics .npz"),
    ("npy", "a single .npy array"),  # np.load returns the array itself: no context manager
    ("deflate", "not a readable statistics .npz"),  # zlib.error, which is no OSError
    ({"mu": np.zeros(4), "sigma": np.eye(4), "protocol": np.array("[" * 100000 + "]" * 100000)},
     "not a readable statistics .npz"),  # json's RecursionError
    # FID from a matrix that is no covariance would be a number without meaning.
    ({"mu": np.zeros(4), "sigma": -np.eye(4)}, "'sigma' has negative eigenvalues"),
    ({"mu": np.zeros(4), "sigma": np.eye(4) + np.triu(np.ones((4, 4)), 1)}, "'sigma' is not symmetric"),
    ({"mu": np.zeros(4, complex), "sigma": np.eye(4)}, "'mu' holds complex128 values"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "protocol": np.array('{"n_real": "many"}')},
     "protocol field 'n_real' is malformed"),
    ({"mu": np.zeros(4), "sigma": np.eye(4), "protocol": np.array('{"real_shape": 5}')},
     "protocol field 'real_shape' is malformed"),
])
def test_bad_reference_files_are_one_line_errors(runs, tmp_path, monkeypatch, capsys, content, expect):
    bad = tmp_path / "bad.npz"
    if content is None:
        np.savez(bad, mu=np.zeros(128))
    elif content == "object":  # an array that needs pickle to load: refused, never unpickled
        np.savez(bad, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    elif isinstance(content, dict):
        np.savez(bad, **content)
    elif content == "deflate":  # a compressed file with its sigma's deflate stream damaged
        np.savez_compressed(bad, mu=np.zeros(64), sigma=np.eye(64))
        with zipfile.ZipFile(bad) as z:
            info = z.getinfo("sigma.npy")
        data = bytearray(bad.read_bytes())
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
        start = info.header_offset + 30 + name_len + extra_len
        data[start:start + 3] = b"\xff\xff\xff"
        bad.write_bytes(bytes(data))
    elif content == "npy":
        with open(bad, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        bad.write_bytes(content)
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", bad, "--features", runs / "clf",
                           "--n", 10, "--stats-dir", tmp_path / "stats")
    line = one_error_line(code, err)
    assert expect in line and "bad.npz" in line


def test_save_fakes_points_out_pngs_it_did_not_write(runs, tmp_path, monkeypatch, capsys):
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    (fakes / "000099.png").write_bytes(b"from a larger earlier run")
    code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--features", runs / "clf", "--n", 10,
                             "--metrics", "fid", "--save-fakes", fakes, "--stats-dir", tmp_path / "stats", "--json")
    assert code == 0, err
    assert "--save-fakes" in err and "also holds 1 PNG file this command did not write" in err
    assert len(list(fakes.glob("*.png"))) == 11


def test_save_fakes_sweeps_killed_writers_leftovers_once_not_per_png(runs, tmp_path, monkeypatch, capsys):
    """A PNG writer killed mid-write leaves a hidden temporary PNG; each of thousands of PNGs sweeping the
    whole folder for them made --save-fakes slow down with the square of --n."""
    from aigc_cli import files

    fakes = tmp_path / "fakes"
    fakes.mkdir()
    dead, live = fakes / ".000003.png.0123abcd.png", fakes / ".000004.png.4567cdef.png"
    dead.write_bytes(b"half a png")
    live.write_bytes(b"a writer still at it")
    os.utime(dead, (time.time() - 3600,) * 2)
    sweeps = []
    monkeypatch.setattr(files, "remove_dead_temps", lambda *a, **k: sweeps.append(a) or 0)
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--features", runs / "clf", "--n", 10,
                           "--metrics", "fid", "--save-fakes", fakes, "--stats-dir", tmp_path / "stats")
    assert code == 0, err
    assert not dead.exists() and live.exists() and len(list(fakes.glob("[0-9]*.png"))) == 10
    assert not [a for a in sweeps if Path(a[0]).parent == fakes]


def test_the_statistics_cache_stays_under_the_cache_size_limit_too(runs, tmp_path, monkeypatch, capsys, private_cache_dir):
    stats = private_cache_dir / "stats"  # aigc's own folder: --stats-dir not given
    common = ["--features", runs / "clf", "--metrics", "fid"]

    def eval_n(n, *more):
        code, out, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--n", n, *common, "--json", *more)
        assert code == 0, err
        return json.loads(out)["protocol"], err

    a, b = (eval_n(n)[0]["cache_file"] for n in (10, 12))
    os.utime(a, (OLD, OLD))
    os.utime(b, (OLD + 10, OLD + 10))
    size = os.path.getsize(b)
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", repr(2.2 * size / 2**30))  # room for two
    assert eval_n(10)[0]["reference"] == "cache hit"  # a's use: b is now the one used longest ago
    c, err = eval_n(14)
    assert "removed 1 entry used longest ago" in err and sorted(stats.iterdir()) == sorted(map(Path, (a, c["cache_file"])))
    # A --stats-dir the user names may hold the user's own files: nothing there is removed.
    mine = tmp_path / "mine"
    mine.mkdir()
    theirs = mine / f"{'da39a3ee' * 5}.npz"  # named like an entry (a commit hash, say)
    theirs.write_bytes(b"x" * size)
    os.utime(theirs, (OLD, OLD))
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", repr(1.5 * size / 2**30))
    eval_n(16, "--stats-dir", mine)
    assert theirs.exists() and len(list(mine.iterdir())) == 2
    # A bad value is said before any image is read (here, before the missing --fake folder is noticed).
    monkeypatch.setenv("AIGC_CACHE_MAX_GB", "many")
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--fake", tmp_path / "nowhere", "--data", "shapes", *common)
    assert code == 2 and "AIGC_CACHE_MAX_GB='many'" in err, err


def test_a_statistics_entry_removed_by_another_run_before_its_read_is_a_quiet_miss(runs, monkeypatch, capsys):
    from aigc_cli.metrics import reference

    common = ["eval", runs / "gan", "--n", 10, "--features", runs / "clf", "--metrics", "fid"]
    assert run_cli(monkeypatch, capsys, *common)[0] == 0
    real_load = reference.load_npz

    def removed_first(path, *a, **k):
        Path(path).unlink(missing_ok=True)  # another run making room, just after this one saw the file
        return real_load(path, *a, **k)

    monkeypatch.setattr(reference, "load_npz", removed_first)
    code, out, err = run_cli(monkeypatch, capsys, *common, "--json")
    assert code == 0 and json.loads(out)["protocol"]["reference"] == "computed" and "damaged" not in err, err


def test_a_reference_from_another_extractor_precision_is_pointed_out(runs, tmp_path, monkeypatch, capsys):
    ref = tmp_path / "fp32.npz"
    code, _, err = run_cli(monkeypatch, capsys, "eval", "stats", "--data", "shapes", "--features", runs / "clf",
                           "--n", 20, "--out", ref, "--precision", "fp32")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", ref, "--features", runs / "clf",
                           "--n", 20, "--metrics", "fid", "--precision", "bf16")
    assert code == 0 and "computed with the extractor in fp32, these features in bf16" in err, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", ref, "--features", runs / "clf",
                           "--n", 20, "--metrics", "fid", "--precision", "fp32")
    assert code == 0 and "extractor in" not in err, err
    code, _, err = run_cli(monkeypatch, capsys, "eval", runs / "gan", "--ref", ref, "--features", runs / "clf",
                           "--n", 20, "--metrics", "is")
    assert code == 0 and f"--ref {ref} was not used: is needs no real statistics" in err, err


def test_a_statistics_file_with_object_arrays_is_refused_without_unpickling_it(tmp_path):
    from aigc_cli.errors import UsageError
    from aigc_cli.metrics.reference import load_npz

    np.savez(tmp_path / "obj.npz", mu=np.zeros(2), sigma=np.eye(2), protocol=np.array([{}], dtype=object))
    with pytest.raises(UsageError, match=r"holds object \(pickled\) arrays, which aigc does not load"):
        load_npz(tmp_path / "obj.npz")


def test_eval_stats_resolution_alone_sees_the_images_as_a_model_of_that_resolution(tmp_path):
    """`--resolution R` without `--channels` resized the source's native images (shapes drawn at 32, folders
    Lanczos-scaled to their common size) instead of what training at R reads: FID then differed from eval's."""
    from aigc_cli.data import load_images
    from aigc_cli.metrics.reference import load_real
    from conftest import write_image_folder

    from test_data import write_idx

    folder = write_image_folder(tmp_path / "imgs", n_per_class=3)
    grey = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "idx", "train", grey, np.arange(6, dtype=np.uint8) % 2)
    for source, own in (("shapes", 3), (str(folder), 3), (str(tmp_path / "idx"), 1)):
        alone, _ = load_real(source, root=None, download=False, split="train", seed=0, warn=print, resolution=16)
        both, _ = load_real(source, root=None, download=False, split="train", seed=0, warn=print, resolution=16,
                            channels=own)
        trained = load_images(source, channels=own, resolution=16).images
        assert torch.equal(alone, both) and torch.equal(alone, trained)


def test_eval_stats_at_a_resolution_decodes_only_the_picked_images_of_a_folder_too_big_to_hold(runs, tmp_path,
                                                                                             monkeypatch, capsys):
    """`eval stats --resolution` read a folder as training does but never streamed it, whatever its size: every
    file was decoded into memory for --n of them (a folder larger than memory, an out-of-memory kill)."""
    from aigc_cli.config import DataConfig
    from aigc_cli.data import folder, lazy
    from conftest import write_image_folder

    imgs = write_image_folder(tmp_path / "imgs", n_per_class=12)  # 2 classes: 24 files
    decoded, real = [], folder.decode
    for module in (folder, lazy):
        monkeypatch.setattr(module, "decode", lambda path, r: decoded.append(path) or real(path, r))
    monkeypatch.setattr(DataConfig, "device_max_mb", 0)  # as a folder larger than the default 4096 MB
    code, _, err = run_cli(monkeypatch, capsys, "eval", "stats", "--data", imgs, "--features", runs / "clf", "--n", 5,
                           "--resolution", 16, "--out", tmp_path / "s.npz")
    assert code == 0, err
    assert len(decoded) == 5 and (tmp_path / "s.npz").is_file()
