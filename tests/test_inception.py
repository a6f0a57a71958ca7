"""The FID Inception extractor: same numbers as pytorch-fid, and the weights file found, hash-checked and
loaded safely (weights_only), or refused with a one-line message that says how to get it.

The real weights (95 MB) are not downloaded: a randomly initialised state dict with the exact layout of
`pt_inception-2015-12-05-6726825d.pth` goes through the real loading path with the test-only flag that
lets an unverified hash through."""

from __future__ import annotations

import hashlib
import io
import json
import math
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_cli.errors import UsageError
from aigc_cli.metrics import inception as inc
from aigc_cli.metrics import weights as W

N_RGB, N_GREY = 2, 1


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The FID Inception layout with random weights that keep activations O(1): He-initialised convs,
    BatchNorm running mean ~0 and variance ~1, and an fc bias large enough to matter."""
    net = inc.FIDInceptionV3()
    g = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    with torch.no_grad():
        for key, v in state.items():
            if key.endswith("conv.weight"):
                v.normal_(0, math.sqrt(2 / v[0].numel()), generator=g)
            elif key.endswith("bn.weight") or key.endswith("running_var"):
                v.uniform_(0.8, 1.2, generator=g)
            elif key.endswith("bn.bias") or key.endswith("running_mean"):
                v.normal_(0, 0.1, generator=g)
            elif key == "fc.weight":
                v.normal_(0, 3 / math.sqrt(inc.FEATURE_DIM), generator=g)
            elif key == "fc.bias":
                v.normal_(0, 2, generator=g)
    return state


@pytest.fixture(scope="module")
def weights_state():
    return random_state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, weights_state) -> Path:
    path = tmp_path_factory.mktemp("weights") / W.WEIGHTS_FILENAME
    torch.save(weights_state, path)
    return path


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No weights from the environment or the real hub cache; an empty TORCH_HOME per test."""
    monkeypatch.delenv(W.ENV_PATH, raising=False)
    monkeypatch.delenv(W.ENV_UNVERIFIED, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)


@pytest.fixture
def unverified_ok(monkeypatch):
    monkeypatch.setenv(W.ENV_UNVERIFIED, "1")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_layout_is_pytorch_fids(weights_state):
    """Same state dict keys, order and shapes as pytorch-fid's fid_inception_v3() (its download patched out)."""
    import pytorch_fid.inception as pfi

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=weights_state):
        ref = pfi.fid_inception_v3()
    ours = inc.FIDInceptionV3().state_dict()
    assert [(k, tuple(v.shape)) for k, v in ref.state_dict().items()] == [(k, tuple(v.shape)) for k, v in ours.items()]
    assert ours["fc.weight"].shape == (1008, 2048)


def _write_pngs(folder: Path, images: torch.Tensor) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, im in enumerate(images):
        arr = im.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
        files.append(str(folder / f"{i}.png"))
        pil.save(files[-1])
    return files


def test_features_and_probs_match_pytorch_fid(tmp_path, monkeypatch, unverified_ok, weights_file, weights_state):
    """(a) Our features equal pytorch-fid's InceptionV3([3]) on the same weights and the same image files
    (RGB 32x32 and grey 24x40, read by its own ImagePathDataset + ToTensor), and our probabilities are the
    1008-way softmax of its pool features times its fc weights (no bias: torch-fidelity's logits_unbiased)."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import get_activations

    monkeypatch.setenv(W.ENV_PATH, str(weights_file))
    g = torch.Generator().manual_seed(1)
    rgb = torch.randint(0, 256, (N_RGB, 3, 32, 32), dtype=torch.uint8, generator=g)
    grey = torch.randint(0, 256, (N_GREY, 1, 24, 40), dtype=torch.uint8, generator=g)

    ext = inc.InceptionFeatures(None, torch.device("cpu"))
    f_rgb, p_rgb = ext.embed(rgb, batch_size=1)  # two chunks
    f_grey, p_grey = ext.embed(grey, batch_size=8)
    ours_f, ours_p = torch.cat([f_rgb, f_grey]), torch.cat([p_rgb, p_grey])
    assert ours_f.dtype == ours_p.dtype == torch.float64
    assert ours_f.shape == (N_RGB + N_GREY, 2048) and ours_p.shape == (N_RGB + N_GREY, 1008)

    with mock.patch.object(pfi, "load_state_dict_from_url", return_value=weights_state):
        ref_model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        fc = pfi.fid_inception_v3().fc
    ref_f = np.concatenate([
        get_activations(_write_pngs(tmp_path / "rgb", rgb), ref_model, batch_size=1, device="cpu", num_workers=0),
        get_activations(_write_pngs(tmp_path / "grey", grey), ref_model, batch_size=1, device="cpu",
                        num_workers=0)])
    ref_f = torch.from_numpy(ref_f).double()
    assert ref_f.abs().max() > 0.1 and ref_f.std(0).mean() > 1e-3  # the random net gives varied features
    rel = (ours_f - ref_f).abs().max() / ref_f.abs().max()
    assert rel < 1e-4, f"max relative difference {rel:.2e}"

    with torch.no_grad():
        logits = ref_f.float() @ fc.weight.t()
        ref_p = torch.softmax(logits, 1).double()
        biased = torch.softmax(fc(ref_f.float()), 1).double()
    assert (ours_p - ref_p).abs().max() < 1e-4
    assert torch.allclose(ours_p.sum(1), torch.ones(len(ours_p), dtype=torch.float64))
    assert (ours_p - biased).abs().max() > 1e-2  # the choice of logits is visible in the probabilities

    # The extractor's interface: __call__ is the features; the protocol names the unverified file.
    assert torch.equal(ext(rgb[:1], 1), f_rgb[:1])
    proto = ext.protocol
    assert proto["weights_verified"] is False
    assert proto["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest() != W.WEIGHTS_SHA256
    assert proto["feature_dim"] == 2048 and proto["precision"] == "fp32" and proto["weights"] == W.WEIGHTS_FILENAME


def test_grey_is_repeated_and_bad_input_refused(monkeypatch, unverified_ok, weights_file):
    monkeypatch.setenv(W.ENV_PATH, str(weights_file))
    ext = inc.InceptionFeatures(None, torch.device("cpu"))
    grey = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(inc.preprocess(grey), inc.preprocess(grey.repeat(1, 3, 1, 1)))
    x = inc.preprocess(grey)
    assert x.shape == (1, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError):
        ext.embed(grey.float(), 4)
    with pytest.raises(ValueError):
        ext.embed(torch.zeros(1, 4, 8, 8, dtype=torch.uint8), 4)
    f, p = ext.embed(grey[:0], 4)
    assert f.shape == (0, 2048) and p.shape == (0, 1008)


def test_wrong_hash_refused_without_the_test_flag(weights_file):
    """(b) The random file is not the published one: refused, naming the file and both hashes."""
    actual = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    with pytest.raises(UsageError) as e:
        inc.InceptionFeatures(str(weights_file), torch.device("cpu"))
    msg = one_line(e)
    assert W.WEIGHTS_SHA256 in msg and actual in msg and str(weights_file) in msg
    with pytest.raises(UsageError):  # any value but "1" leaves the check on
        with mock.patch.dict("os.environ", {W.ENV_UNVERIFIED: "true"}):
            W.verified_weights(str(weights_file))


def test_missing_file_says_where_to_put_it(tmp_path):
    """(c) Nothing anywhere: the message names the hub cache path, the URL, the env var, the option and
    --download-weights. An explicit path that does not exist is named as such."""
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / W.WEIGHTS_FILENAME
    assert W.hub_cache_path() == hub
    with pytest.raises(UsageError) as e:
        inc.InceptionFeatures(None, torch.device("cpu"))
    msg = one_line(e)
    for part in (str(hub), W.WEIGHTS_URL, "--download-weights", W.ENV_PATH, "--inception-weights"):
        assert part in msg
    missing = tmp_path / "nowhere" / "w.pth"
    with pytest.raises(UsageError) as e:
        W.verified_weights(str(missing))
    assert str(missing) in one_line(e) and "--download-weights" in str(e.value)


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", ["not-torch", "empty", "list", "tensor", "missing-key", "extra-key", "wrong-shape",
                                  "int-weights", "nan"])
def test_bad_files_refused(tmp_path, unverified_ok, weights_state, case):
    """(d) Not a torch file, not a state dict, a missing or extra key, a wrong shape or dtype."""
    path = tmp_path / W.WEIGHTS_FILENAME
    state = dict(weights_state)
    if case == "not-torch":
        path.write_bytes(b"<html>404 Not Found</html>")
        expect = "cannot load"
    elif case == "empty":
        path.write_bytes(b"")
        expect = "empty or cut short"
    elif case == "list":
        _save(path, [state["fc.bias"]])
        expect = "does not hold a state dict"
    elif case == "tensor":
        _save(path, state["fc.bias"])
        expect = "does not hold a state dict"
    elif case == "missing-key":
        del state["Mixed_6c.branch7x7_2.bn.running_var"]
        _save(path, state)
        expect = "missing key(s), first Mixed_6c.branch7x7_2.bn.running_var"
    elif case == "extra-key":
        state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
        _save(path, state)
        expect = "unexpected key(s), first AuxLogits.fc.weight"
    elif case == "wrong-shape":
        state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
        _save(path, state)
        expect = "fc.weight has shape (1000, 2048), expected (1008, 2048)"
    elif case == "int-weights":
        state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"].to(torch.int32)
        _save(path, state)
        expect = "expected floating point"
    else:
        state["Mixed_7c.branch_pool.bn.running_var"] = torch.full((192,), float("nan"))
        _save(path, state)
        expect = "Mixed_7c.branch_pool.bn.running_var contains NaN"
    with pytest.raises(UsageError) as e:
        inc.InceptionFeatures(str(path), torch.device("cpu"))
    assert expect in one_line(e) and str(path) in str(e.value)


def test_file_without_batchnorm_counters_loads(tmp_path, unverified_ok, weights_state):
    """Files saved by old PyTorch have no num_batches_tracked; they are not used in evaluation."""
    state = {k: v for k, v in weights_state.items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(weights_state)
    path = _save(tmp_path / "old.pth", state)
    ext = inc.InceptionFeatures(str(path), torch.device("cpu"))
    assert torch.equal(ext.net.fc.bias, weights_state["fc.bias"])
    assert all(v.device.type == "cpu" for v in ext.net.state_dict().values())  # nothing left on "meta"


def test_path_precedence(tmp_path, monkeypatch):
    """(e) --inception-weights, then $AIGC_INCEPTION_WEIGHTS, then the hub cache; a folder means the
    file of that name inside it."""
    hub = W.hub_cache_path()
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"hub")
    env = tmp_path / "env" / W.WEIGHTS_FILENAME
    env.parent.mkdir()
    env.write_bytes(b"env")
    explicit = tmp_path / "explicit.pth"
    explicit.write_bytes(b"explicit")
    assert W.resolve_weights_path(None) == hub
    monkeypatch.setenv(W.ENV_PATH, str(env))
    assert W.resolve_weights_path(None) == env
    assert W.resolve_weights_path(str(explicit)) == explicit
    monkeypatch.setenv(W.ENV_PATH, str(env.parent))  # a folder
    assert W.resolve_weights_path(None) == env
    monkeypatch.setenv(W.ENV_PATH, str(tmp_path / "gone.pth"))  # set but wrong: no silent fallback to hub
    with pytest.raises(UsageError) as e:
        W.resolve_weights_path(None)
    assert W.ENV_PATH in one_line(e) and "gone.pth" in str(e.value)


def test_end_to_end_with_explicit_path_over_env(tmp_path, monkeypatch, unverified_ok, weights_file):
    monkeypatch.setenv(W.ENV_PATH, str(tmp_path / "gone.pth"))
    ext = inc.InceptionFeatures(str(weights_file), torch.device("cpu"))
    assert ext.weights.path == weights_file


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))  # runs when unpickled by a plain pickle load


def test_pickle_payload_is_refused_not_run(tmp_path, unverified_ok, weights_state):
    """(f) A file with a non-tensor object in it: weights_only loading refuses it before it can run."""
    marker = tmp_path / "payload-ran"
    state = dict(weights_state)
    state["fc.bias"] = _Payload(marker)
    path = _save(tmp_path / W.WEIGHTS_FILENAME, state)
    with pytest.raises(UsageError) as e:
        inc.InceptionFeatures(str(path), torch.device("cpu"))
    assert "weights_only=True" in one_line(e) and "nothing in it was run" in str(e.value)
    assert not marker.exists()
    # The payload is live: an unrestricted load would have run it (which is why it is never done).
    small = _save(tmp_path / "small.pth", {"x": _Payload(marker)})
    torch.load(small, weights_only=False)
    assert marker.exists()


def test_hash_is_cached_per_path_size_mtime(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(W.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert W.file_sha256(path) == real(b"abc").hexdigest()
    assert W.file_sha256(path) == real(b"abc").hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"abcd")  # new size (and mtime): hashed again
    assert W.file_sha256(path) == real(b"abcd").hexdigest()
    assert len(calls) == 2


class _Response(io.BytesIO):
    """A stand-in for urlopen's response; fails after `fail_after` bytes when set."""

    def __init__(self, data: bytes, fail_after: int | None = None):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(min(n, 1000) if n and n > 0 else 1000)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_offline_leaves_nothing(tmp_path, monkeypatch, no_network):
    """(g) No network: a one-line UsageError that says where to put the file by hand; no partial file."""
    def offline(*a, **k):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError) as e:
        W.download_weights()
    hub = W.hub_cache_path()
    msg = one_line(e)
    assert "could not download" in msg and str(hub) in msg and "name resolution" in msg
    assert _leftovers(hub.parent) == []

    # Cut off half-way: the temporary file is removed, nothing at the destination.
    dest = tmp_path / "dl" / W.WEIGHTS_FILENAME
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(b"x" * 5000, fail_after=2000))
    with pytest.raises(UsageError) as e:
        W.download_weights(dest)
    assert "Connection reset" in one_line(e)
    assert _leftovers(dest.parent) == []


def test_download_checks_hash_before_rename(tmp_path, monkeypatch):
    data = b"not the inception weights" * 100
    dest = tmp_path / "dl" / W.WEIGHTS_FILENAME
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(data))
    with pytest.raises(UsageError) as e:
        W.download_weights(dest)
    assert W.WEIGHTS_SHA256 in one_line(e) and hashlib.sha256(data).hexdigest() in str(e.value)
    assert _leftovers(dest.parent) == []
    # When the bytes are right they land at the destination in one piece, and only there.
    monkeypatch.setattr(W, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())
    seen = []
    assert W.download_weights(dest, report=lambda done, total: seen.append((done, total))) == dest
    assert dest.read_bytes() == data and _leftovers(dest.parent) == [W.WEIGHTS_FILENAME]
    assert seen[-1] == (len(data), len(data))
    # Already there and right: not fetched again.
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded again"))
    assert W.download_weights(dest) == dest
    assert W.ensure_weights(str(dest), download=True) == dest
    # --download-weights fetches to where the file is looked for: here $AIGC_INCEPTION_WEIGHTS, and a
    # wrong file there is replaced.
    env_dest = tmp_path / "env" / "w.pth"
    env_dest.parent.mkdir()
    env_dest.write_bytes(b"stale")
    monkeypatch.setenv(W.ENV_PATH, str(env_dest))
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(data))
    assert W.ensure_weights(None, download=True) == env_dest
    assert env_dest.read_bytes() == data and _leftovers(env_dest.parent) == ["w.pth"]
    assert not W.hub_cache_path().exists()


class _Spy(torch.nn.Module):
    """Stands in for the network (a bf16 pass of the real one costs seconds on a CPU): records the
    autocast state it runs under and the input it gets."""

    def __init__(self, net):
        super().__init__()
        self.fc, self.seen = net.fc, []

    def forward(self, x):
        self.seen.append((x.dtype, tuple(x.shape), torch.is_autocast_enabled("cpu"),
                          torch.get_autocast_dtype("cpu")))
        return torch.nn.functional.linear(x.mean((2, 3)), torch.ones(inc.FEATURE_DIM, 3))  # autocast: bf16 out

    logits = inc.FIDInceptionV3.logits


def test_precision_runs_under_autocast_and_is_recorded(monkeypatch, unverified_ok, weights_file):
    monkeypatch.setenv(W.ENV_PATH, str(weights_file))
    f32 = inc.InceptionFeatures(None, torch.device("cpu"))
    b16 = inc.InceptionFeatures(None, torch.device("cpu"), precision="bf16")
    assert b16.net is f32.net  # one network per (file, device) in the process
    assert b16.protocol["precision"] == "bf16" and f32.protocol["precision"] == "fp32"
    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for ext, autocast in ((b16, True), (f32, False)):
        ext.net = _Spy(f32.net)
        f, p = ext.embed(imgs, 2)
        assert f.dtype == p.dtype == torch.float64 and f.shape == (3, 2048) and p.shape == (3, 1008)
        assert torch.allclose(p.sum(1), torch.ones(3, dtype=torch.float64))
        # resize and scaling happen in fp32 before autocast; the network runs under it only when asked
        assert ext.net.seen == [(torch.float32, (2, 3, 299, 299), autocast, torch.bfloat16),
                                (torch.float32, (1, 3, 299, 299), autocast, torch.bfloat16)]
    with pytest.raises(ValueError):
        inc.InceptionFeatures(None, torch.device("cpu"), precision="int8")


def test_eval_download_weights_alone_fetches_them(tmp_path, monkeypatch, capsys):
    """The missing-weights message says to run `aigc eval --download-weights`: alone, it only fetches."""
    from conftest import run_cli

    data = b"pretend weights" * 50
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(W.ENV_PATH, raising=False)
    monkeypatch.setattr(W, "WEIGHTS_SHA256", hashlib.sha256(data).hexdigest())

    def offline(*a, **k):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--download-weights")
    assert code == 2 and "could not download" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _Response(data))
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--download-weights")
    assert code == 0, err
    assert W.hub_cache_path().read_bytes() == data and "Inception weights ready" in out and "checked" in out
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--download-weights", "--json")
    assert code == 0 and json.loads(out) == {"inception_weights": str(W.hub_cache_path()),
                                             "sha256": W.WEIGHTS_SHA256, "verified": True}
