"""Training batches: device-side flips and shifts, the uint8 -> float conversion, streaming
(lazy folder, in-memory arrays, DataLoader workers) giving exactly the device-resident batches,
and seek / resume."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aigc_cli.config import DataConfig, TrainConfig
from aigc_cli.data import load_images
from aigc_cli.data.lazy import HostImages
from aigc_cli.errors import UsageError
from aigc_cli.sampling import from_uint8
from aigc_cli.training.batches import Augment, DeviceBatches, _reflect, make_batches, permutation, to_float
from aigc_cli.training.streaming import StreamBatches
from aigc_cli.training.streaming import _leave_stops_to_the_parent as real_worker_init  # before a test patches it

CPU = torch.device("cpu")
RES = 8


def noise_images(n: int, c: int = 3, res: int = RES, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, c, res, res), dtype=np.uint8))


def cfg(**data):
    """What make_batches reads: the data and train sections (built directly: no model needed)."""
    train = {k: data.pop(k) for k in ("batch_size", "seed") if k in data}
    return SimpleNamespace(data=DataConfig(**data), train=TrainConfig(**{"batch_size": 6, **train}))


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """40 PNGs of RGB noise at the training resolution (decoding is exact), in two class folders."""
    root = tmp_path_factory.mktemp("noise")
    images = noise_images(40, seed=1).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(images):
        d = root / ("a" if i % 3 else "b")
        d.mkdir(exist_ok=True)
        Image.fromarray(img).save(d / f"{i:02d}.png")
    return root


def source_rows(images, batch_size, seed, epoch, index):
    return images[permutation(len(images), seed, epoch)[index * batch_size:(index + 1) * batch_size]]


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("channels_last", [False, True])
def test_conversion_matches_from_uint8_and_layout(channels_last):
    u8 = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)  # every byte value once
    u8 = torch.cat([u8, u8.flip(0), u8.flip(3)], dim=1)
    x = to_float(u8, channels_last)
    assert torch.equal(x, from_uint8(u8)) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert x.is_contiguous(memory_format=fmt)
    b = DeviceBatches(noise_images(12), None, 4, CPU, 0, channels_last=channels_last)
    assert b.next()[0].is_contiguous(memory_format=fmt)


def test_plain_batches_are_the_seeded_permutation():
    images, labels = noise_images(20), torch.arange(20)
    b = DeviceBatches(images, labels, 6, CPU, 3)
    for epoch in range(2):
        for index in range(3):  # 20 // 6 = 3 batches; the 2 left over are dropped
            x, y = b.next()
            rows = permutation(20, 3, epoch)[index * 6:(index + 1) * 6]
            assert torch.equal(x, from_uint8(images[rows])) and torch.equal(y, rows)
    assert b.position() == {"epoch": 1, "image": 18}


# ----------------------------------------------------------------------------- flips and shifts


def test_reflect_is_f_pad_reflect():
    for size in (2, 5, 8):
        line = torch.arange(size, dtype=torch.float32).view(1, 1, size)
        padded = F.pad(line, (size - 1, size - 1), mode="reflect").flatten().long()
        assert torch.equal(_reflect(torch.arange(-(size - 1), 2 * size - 1), size), padded)


def test_hflip_mirrors_about_half_of_the_source_rows():
    images = noise_images(64)
    b = DeviceBatches(images, None, 16, CPU, 5, hflip=True)
    flipped = 0
    for index in range(4):
        x = b.next()[0]
        src = from_uint8(source_rows(images, 16, 5, 0, index))
        for out, s in zip(x, src):
            same, mirror = torch.equal(out, s), torch.equal(out, s.flip(-1))
            assert same != mirror  # each image is exactly its source row or that row's mirror
            flipped += mirror
    assert 16 <= flipped <= 48  # 64 fair coins


def test_translate_keeps_shape_and_shifts_by_at_most_n():
    n_max, images = 2, noise_images(48)
    b = DeviceBatches(images, None, 16, CPU, 7, translate=n_max)
    padded = F.pad(images.float(), (n_max,) * 4, mode="reflect")
    seen = set()
    for index in range(3):
        x = b.next()[0]
        assert x.shape == (16, 3, RES, RES)
        rows = permutation(48, 7, 0)[index * 16:(index + 1) * 16]
        for out, r in zip(x, rows):
            # out[i, j] = src[reflect(i - dy), reflect(j - dx)]: a window of the reflect-padded source
            match = [(dy, dx) for dy in range(-n_max, n_max + 1) for dx in range(-n_max, n_max + 1)
                     if torch.equal(out, from_uint8(padded[r, :, n_max - dy:n_max - dy + RES,
                                                           n_max - dx:n_max - dx + RES].to(torch.uint8)))]
            assert len(match) == 1, match
            seen.add(match[0])
    assert len(seen) >= 8  # the shifts vary, in both directions


def test_augmentation_depends_only_on_the_batch_position():
    images = noise_images(30)
    a = DeviceBatches(images, None, 5, CPU, 1, hflip=True, translate=3)
    first = [a.next()[0] for _ in range(9)]  # into the second epoch
    torch.manual_seed(123)  # the global RNG plays no part
    b = DeviceBatches(images, None, 5, CPU, 1, hflip=True, translate=3)
    b.seek(0, 20)
    assert all(torch.equal(b.next()[0], x) for x in first[4:])
    assert not torch.equal(first[0], first[6])  # a different position gets different draws


# ----------------------------------------------------------------------------- streaming


def device_and_stream(folder, workers, **aug):
    eager = load_images(str(folder), channels=3, resolution=RES, cache=False)
    lazy = load_images(str(folder), channels=3, resolution=RES, cache=False, lazy_above_mb=0)
    assert lazy.lazy and not eager.lazy and lazy.nbytes == eager.nbytes
    assert torch.equal(lazy.labels, eager.labels) and lazy.class_names == eager.class_names == ("a", "b")
    notes = []
    dev = make_batches(eager, cfg(workers=workers, **aug), CPU, note=notes.append)
    stream = make_batches(lazy, cfg(workers=workers, device_max_mb=0, **aug), CPU, note=notes.append)
    assert isinstance(dev, DeviceBatches) and isinstance(stream, StreamBatches)
    assert dev.description == "data: 40 images, 0.0 MB, kept on cpu"  # said only in the description
    assert len(notes) == 1 and "decoded from disk" in notes[0] and "over data.device_max_mb=0" in notes[0]
    return dev, stream


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_folder_equals_device_batches_and_seeks(noise_folder, workers):
    dev, stream = device_and_stream(noise_folder, workers, hflip=True, translate=2)
    # 40 // 6 = 6 batches per epoch: run well into the third epoch
    got = []
    for _ in range(15):
        (xd, yd), (xs, ys) = dev.next(), stream.next()
        assert torch.equal(xd, xs) and torch.equal(yd, ys)
        got.append(xs)
    assert stream.position() == dev.position() == {"epoch": 2, "image": 18}
    # Seek back while the workers have batches prefetched: those are dropped, the order is exact.
    stream.seek(0, 30)
    for x in got[5:9]:
        assert torch.equal(stream.next()[0], x)
    # A fresh object resumed at a saved position continues the same sequence (what resume does).
    again = make_batches(load_images(str(noise_folder), channels=3, resolution=RES, cache=False, lazy_above_mb=0),
                         cfg(workers=workers, device_max_mb=0, hflip=True, translate=2), CPU)
    again.seek(**{"epoch": 1, "image": 36})  # the end of epoch 1: the next batch is epoch 2's first
    assert torch.equal(again.next()[0], got[12]) and again.position() == {"epoch": 2, "image": 6}
    stream.close()
    again.close()


def recording_worker_init(worker_id):
    """Runs in a DataLoader worker (module level: spawn and forkserver pickle it): the signal mask the
    worker started with, and its state once aigc's worker_init_fn has run, into $WORKER_REPORT."""
    import json
    import os
    import signal

    def mask():
        return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))

    at_start = mask()
    real_worker_init(worker_id)
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
    with open(os.environ["WORKER_REPORT"], "w") as f:
        json.dump({"blocked_at_start": at_start, "blocked_after": mask(), "pid": os.getpid(),
                   "ignored_after": sorted(int(s) for s in stops if signal.getsignal(s) == signal.SIG_IGN)}, f)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_workers_start_with_the_stops_blocked_and_ignore_them_once_started(noise_folder, tmp_path, monkeypatch,
                                                                            start_method):
    """A group-wide SIGTERM (`timeout`, SLURM) in the ~20 ms between a worker's start and its
    worker_init_fn killed the worker, and the run with it (exit 1, nothing saved). Workers now start
    with the stops blocked: a signal then waits, and is discarded once the worker ignores it. Under
    forkserver (Python 3.14's default on Linux) starting the resource tracker unblocked two of them."""
    import json
    import multiprocessing
    import os
    import signal

    from aigc_cli.training import streaming

    monkeypatch.setenv("WORKER_REPORT", str(tmp_path / "worker.json"))
    monkeypatch.setattr(streaming, "_leave_stops_to_the_parent", recording_worker_init)
    method = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(start_method, force=True)
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # pytest under nohup: aigc leaves an ignored SIGHUP be
    try:
        mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        _, stream = device_and_stream(noise_folder, 1)
        stream.next()
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before  # this process lets them in again
        stream.close()
    finally:
        multiprocessing.set_start_method(method, force=True)
        signal.signal(signal.SIGHUP, hup)
    stops = sorted(int(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1))
    seen = json.loads((tmp_path / "worker.json").read_text())
    assert seen["pid"] != os.getpid()
    assert set(stops) <= set(seen["blocked_at_start"]), seen  # blocked from the worker's first instruction
    assert not set(stops) & set(seen["blocked_after"]) and seen["ignored_after"] == stops, seen


def test_more_workers_than_usable_cpus_is_one_note_not_torchs_warning(noise_folder):
    import warnings

    from aigc_cli.training.batches import usable_cpus

    cpus = usable_cpus()
    lazy = load_images(str(noise_folder), channels=3, resolution=RES, cache=False, lazy_above_mb=0)
    notes = []
    with warnings.catch_warnings(record=True) as shown:  # the filters in force are kept, as in a real run
        stream = make_batches(lazy, cfg(workers=cpus + 1, device_max_mb=0), CPU, note=notes.append)
        try:
            stream.next()  # torch checks the worker count when the workers start
        finally:
            stream.close()
    assert len(notes) == 2 and notes[1].startswith(f"data.workers={cpus + 1} is more than the {cpus} CPU"), notes
    assert not [w for w in shown if "worker processes" in str(w.message)]


def test_in_memory_data_over_the_limit_streams_from_host_memory():
    images, labels = noise_images(50, c=1), torch.arange(50) % 7
    data = SimpleNamespace(images=images, labels=labels, lazy=False, nbytes=images.numel())
    notes = []
    stream = make_batches(data, cfg(device_max_mb=0, translate=1, hflip=True, seed=4), CPU, note=notes.append)
    dev = DeviceBatches(images, labels, 6, CPU, 4, translate=1, hflip=True)
    assert isinstance(stream, StreamBatches) and isinstance(stream.source, HostImages)
    assert notes == ["data: 50 images, 0.0 MB decoded, streamed from CPU memory (over data.device_max_mb=0)"]
    for _ in range(10):
        (xd, yd), (xs, ys) = dev.next(), stream.next()
        assert torch.equal(xd, xs) and torch.equal(yd, ys)



@pytest.mark.parametrize("kind", ["device", "stream"])
def test_a_batch_size_changed_mid_epoch_goes_on_from_the_next_image(kind):
    """A resume at another batch size (less memory, a bigger GPU) finishes the epoch with the images not
    yet drawn: counted in batches, 2 batches of 6 became 2 batches of 4, and 4 images were seen twice."""
    images, labels = noise_images(30, c=1), torch.arange(30)

    def batches(size):
        if kind == "device":
            return DeviceBatches(images, labels, size, CPU, 2)
        return StreamBatches(HostImages(images, labels, pin=False), size, CPU, 2)

    first = batches(6)
    seen = [first.next()[1] for _ in range(2)]
    second = batches(4)
    second.seek(**first.position())
    seen += [second.next()[1] for _ in range(4)]
    assert second.position() == {"epoch": 0, "image": 28}
    drawn = torch.cat(seen)
    assert torch.equal(drawn, permutation(30, 2, 0)[:28])  # each image once, in the epoch's order
    assert torch.equal(second.next()[1], permutation(30, 2, 1)[:4])  # 2 left over: dropped, as always


def test_a_data_position_counted_in_batches_is_read_as_images():
    """Checkpoints written before positions counted images held (epoch, index) in their own batches."""
    import json

    from aigc_cli.training.state import data_position

    meta = {"aigc.data_position": json.dumps({"epoch": 3, "index": 5}),
            "aigc.config": json.dumps({"train": {"batch_size": 64}})}
    assert data_position(meta) == {"epoch": 3, "image": 320}
    meta["aigc.data_position"] = json.dumps({"epoch": 3, "image": 100})
    assert data_position(meta) == {"epoch": 3, "image": 100}
    for bad in ({"epoch": 3}, {"epoch": -1, "image": 0}, {"epoch": 1, "image": 2, "index": 3}, [1, 2]):
        meta["aigc.data_position"] = json.dumps(bad)
        with pytest.raises(ValueError):
            data_position(meta)

def test_lazy_folder_reads_like_a_tensor(noise_folder):
    eager = load_images(str(noise_folder), channels=1, resolution=RES, cache=False)
    lazy = load_images(str(noise_folder), channels=1, resolution=RES, cache=False, lazy_above_mb=0, limit=30)
    assert lazy.name.endswith("(30 images, 2 classes, decoded on demand)")
    assert len(lazy.images) == 30 and lazy.images.shape == (30, 1, RES, RES)
    assert torch.equal(lazy.images[:7], eager.images[:7])  # same luma conversion as the eager path
    assert torch.equal(lazy.images[29], eager.images[29])
    assert torch.equal(torch.cat(list(lazy.images.split(8))), eager.images[:30])
    big = load_images(str(noise_folder), channels=3, resolution=RES, cache=False, lazy_above_mb=1)
    assert not big.lazy  # 40 * 192 bytes is under 1 MB: decoded now


def test_a_file_that_fails_in_a_worker_is_replaced_once_warned_and_strict_stops(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    images = noise_images(8, seed=2).permute(0, 2, 3, 1).numpy()
    for i, img in enumerate(images):
        Image.fromarray(img).save(d / f"{i}.png")
    (d / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # passes the up-front stat checks
    (d / "9.png").write_bytes(b"")  # dropped up front
    os.mkfifo(d / "8.png")  # dropped up front too: never opened, so nothing blocks
    warnings = []
    data = load_images(str(d), channels=3, resolution=RES, cache=False, lazy_above_mb=0, warn=warnings.append)
    assert warnings == ["skipping 8.png: not a regular file", "skipping 9.png: empty file (0 bytes)"]
    assert len(data.images) == 8
    stream = StreamBatches(data.images, 8, CPU, 0, workers=2, warn=warnings.append)
    for _ in range(3):  # three epochs, one warning
        x = stream.next()[0]
        assert x.shape == (8, 3, RES, RES)
    stream.close()
    assert warnings[2:] == ["skipping 3.png: not a PNG, JPEG, WebP, BMP or GIF image (contents not recognised); "
                            "4.png is used in its place"]
    # The replacement is the next file in sorted order, so the content is fixed by the seed.
    assert torch.equal(data.images[3], data.images[4])
    strict = StreamBatches(data.images, 8, CPU, 0, workers=0, strict=True)
    with pytest.raises(UsageError, match=r"cannot use image file 3\.png: .*--strict"):
        strict.next()
    with pytest.raises(UsageError, match=r"cannot use image file 8\.png: not a regular file \(stopped by --strict"):
        load_images(str(d), channels=3, resolution=RES, cache=False, lazy_above_mb=0, strict=True)
    with pytest.raises(UsageError, match="fewer than the batch size 9"):
        StreamBatches(data.images, 9, CPU, 0)
    with pytest.raises(UsageError, match="fewer than the batch size 9"):
        DeviceBatches(noise_images(8), None, 9, CPU, 0)


def test_a_folder_where_nothing_decodes_is_a_usage_error(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("a.png", "b.png"):
        (d / name).write_bytes(b"junk")
    data = load_images(str(d), channels=3, resolution=RES, cache=False, lazy_above_mb=0, warn=lambda s: None)
    said = []
    with pytest.raises(UsageError, match="none of the 2 image files could be decoded"):
        StreamBatches(data.images, 2, CPU, 0, warn=said.append).next()
    assert said == []  # no "... is used in its place" with nothing to use


# ----------------------------------------------------------------------------- exact resume


def test_resume_with_flips_and_shifts_is_bit_identical(tmp_path, monkeypatch):
    """K steps + resume == N steps in one go, with flips and shifts on and the data streamed (the
    device-resident kind shares the augmentation and the seek, tested above)."""
    device_max_mb = "0"
    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.errors import Interrupted
    from aigc_cli.training import loop
    from aigc_cli.training.state import find_resume
    from conftest import StopsAt
    from test_resume import run_cfg
    from conftest import Silent

    cfg = run_cfg("dcgan", 7, {"data.hflip": "true", "data.translate": "3", "data.device_max_mb": device_max_mb,
                               "data.workers": "0"})
    loop.train(cfg, tmp_path / "whole", Silent())
    with pytest.raises(Interrupted):
        loop.train(cfg, tmp_path / "split", StopsAt(3))
    resume = find_resume("auto", tmp_path / "split", print)
    assert resume.step == 3
    loop.train(cfg, tmp_path / "split", Silent(), resume=resume)
    whole, split = (ckpt_io.load(tmp_path / name).tensors for name in ("whole", "split"))
    assert whole.keys() == split.keys()
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    # and the flips and shifts did change what D saw: the same run without them ends elsewhere
    plain = run_cfg("dcgan", 7, {"data.device_max_mb": device_max_mb, "data.workers": "0"})
    loop.train(plain, tmp_path / "plain", Silent())
    other = ckpt_io.load(tmp_path / "plain").tensors
    assert any(not torch.equal(other[k], whole[k]) for k in whole if k.startswith("D."))


def test_streamed_folder_with_worker_processes_resumes_bit_identically(tmp_path):
    """A lazy folder read by DataLoader workers: starting the workers must not draw from the global
    RNG (the resumed run starts them at another step than the original, and the latents come from it)."""
    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.errors import Interrupted
    from aigc_cli.training import loop
    from aigc_cli.training.state import find_resume
    from conftest import StopsAt
    from test_resume import run_cfg
    from conftest import Silent

    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    cfg = run_cfg("dcgan", 8, {"data.source": str(folder), "data.limit": "0", "data.device_max_mb": "0",
                               "data.workers": "2"})
    loop.train(cfg, tmp_path / "whole", Silent())
    with pytest.raises(Interrupted):
        loop.train(cfg, tmp_path / "split", StopsAt(3))
    loop.train(cfg, tmp_path / "split", Silent(), resume=find_resume("auto", tmp_path / "split", print))
    whole, split = (ckpt_io.load(tmp_path / name).tensors for name in ("whole", "split"))
    for key in whole:
        assert torch.equal(whole[key], split[key]), key


def test_seek_into_a_later_epoch_continues_that_epochs_order():
    """A resume mid-way through epoch 1 must draw epoch 1's order, not the first epoch's."""
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    run = DeviceBatches(images, None, 3, CPU, seed=7)
    drawn = [run.next()[0] for _ in range(5)]  # epoch 0: 3 batches (one image dropped); epoch 1: 2 so far
    assert run.position() == {"epoch": 1, "image": 6}
    resumed = DeviceBatches(images, None, 3, CPU, seed=7)
    resumed.seek(1, 3)
    assert torch.equal(resumed.next()[0], drawn[4])
    assert torch.equal(resumed.next()[0], run.next()[0])


def test_flips_and_shifts_are_drawn_afresh_each_epoch():
    aug = Augment(seed=3, hflip=True, translate=2, device=CPU)
    r0, c0 = aug.coords(0, 0, 64, 8, 8)
    r1, c1 = aug.coords(1, 0, 64, 8, 8)
    assert not (torch.equal(r0, r1) and torch.equal(c0, c1))  # batch 0 of each epoch: other draws
    again = aug.coords(0, 0, 64, 8, 8)
    assert torch.equal(again[0], r0) and torch.equal(again[1], c0)  # and the same position, the same draws


def test_data_under_device_max_mb_is_kept_on_the_device():
    images = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)  # 2.3 kB, well under 1 MB
    data = SimpleNamespace(images=images, labels=None, lazy=False, nbytes=images.numel())
    cfg = SimpleNamespace(data=DataConfig(device_max_mb=1), train=TrainConfig(batch_size=4))
    batches = make_batches(data, cfg, CPU)
    try:
        assert isinstance(batches, DeviceBatches) and "kept on cpu" in batches.description
    finally:
        batches.close()
