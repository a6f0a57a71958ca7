"""DiffAugment, EMA of weights, and the learning-rate schedule (aigc_cli.training.augment/ema/schedule)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aigc_cli.training import augment
from aigc_cli.training.augment import OPS, diff_augment, parse_policy
from aigc_cli.training.ema import EMA
from aigc_cli.training.schedule import lr_factor, set_lr

# --------------------------------------------------------------------------------------------- DiffAugment


def _batch(n=4, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def test_parse_policy():
    assert parse_policy("translation,cutout") == ("translation", "cutout")
    assert parse_policy("color, translation ,cutout") == ("color", "translation", "cutout")
    assert parse_policy("") == ()
    for bad in ("flip", "translation,zoom", "Color"):
        with pytest.raises(ValueError):
            parse_policy(bad)
    with pytest.raises(ValueError):
        diff_augment(_batch(), ("rotate",))


def test_empty_policy_returns_same_object():
    x = _batch()
    assert diff_augment(x, ()) is x
    assert diff_augment(x, parse_policy("")) is x


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 28])
@pytest.mark.parametrize("policy", [(op,) for op in OPS] + [OPS])
def test_ops_keep_shape_dtype_device(policy, size, channels):
    x = _batch(n=3, c=channels, size=size)
    y = diff_augment(x, policy)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()


def test_translation_moves_a_pixel_by_at_most_an_eighth():
    n, size = 64, 32
    max_shift = size // 8
    x = torch.zeros(n, 1, size, size)
    r, c = 13, 18
    x[:, :, r, c] = 1.0
    torch.manual_seed(0)
    y = diff_augment(x, ("translation",))
    shifts = set()
    for i in range(n):
        nz = y[i, 0].nonzero()
        assert nz.shape[0] == 1 and y[i, 0].sum() == 1.0  # the pixel moved, nothing else appeared
        dr, dc = nz[0, 0].item() - r, nz[0, 1].item() - c
        assert abs(dr) <= max_shift and abs(dc) <= max_shift
        shifts.add((dr, dc))
    assert len(shifts) > 5  # shifts differ per image

    # A constant image: translated content is the image shifted with zero padding (never wrapped/replicated).
    ones = torch.ones(n, 3, size, size)
    torch.manual_seed(1)
    y = diff_augment(ones, ("translation",))
    for i in range(n):
        img = y[i, 0]
        assert torch.equal(y[i], img.expand(3, size, size))
        rows = img.sum(1).nonzero().flatten()
        cols = img.sum(0).nonzero().flatten()
        h = rows.numel()
        w = cols.numel()
        assert h >= size - max_shift and w >= size - max_shift
        # the ones form one contiguous block touching the opposite border; the rest is zero
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        assert rows[0] == 0 or rows[-1] == size - 1
        assert cols[0] == 0 or cols[-1] == size - 1
        assert img.sum() == h * w


@pytest.mark.parametrize("size", [8, 16, 15])
def test_cutout_zeros_one_half_size_square(size):
    n = 200
    half = int(size * 0.5 + 0.5)
    x = torch.ones(n, 3, size, size)
    torch.manual_seed(0)
    y = diff_augment(x, ("cutout",))
    full = 0
    for i in range(n):
        assert torch.equal(y[i], y[i, :1].expand_as(y[i]))  # the same region in every channel
        zero = y[i, 0] == 0
        assert set(y[i, 0].unique().tolist()) <= {0.0, 1.0}
        rows = zero.any(1).nonzero().flatten()
        cols = zero.any(0).nonzero().flatten()
        # zeros form a single axis-aligned rectangle ...
        assert zero.sum() == rows.numel() * cols.numel()
        assert rows[-1] - rows[0] + 1 == rows.numel() and cols[-1] - cols[0] + 1 == cols.numel()
        # ... that is the half-size square, or that square clipped at the border
        assert 1 <= rows.numel() <= half and 1 <= cols.numel() <= half
        if rows.numel() < half:
            assert rows[0] == 0 or rows[-1] == size - 1
        if cols.numel() < half:
            assert cols[0] == 0 or cols[-1] == size - 1
        full += int(zero.sum() == half * half)
    assert full > 0


def test_color_changes_values_within_reference_ranges():
    x = _batch(n=8)
    torch.manual_seed(0)
    y = diff_augment(x, ("color",))
    assert not torch.allclose(x, y)
    # brightness alone would be a per-image constant shift; saturation/contrast make it non-constant
    assert ((y - x).flatten(1).std(1) > 0).all()

    # 1 channel: saturation is a no-op, brightness+contrast are per-image affine maps with slope in [0.5, 1.5]
    g = _batch(n=8, c=1)
    torch.manual_seed(0)
    yg = diff_augment(g, ("color",))
    for i in range(8):
        a = torch.stack([g[i].flatten(), torch.ones(g[i].numel())], 1)
        sol = torch.linalg.lstsq(a, yg[i].flatten().unsqueeze(1)).solution.flatten()
        assert 0.5 - 1e-4 <= sol[0] <= 1.5 + 1e-4
        assert torch.allclose(a @ sol, yg[i].flatten(), atol=1e-5)


@pytest.mark.parametrize("policy", [(op,) for op in OPS] + [OPS])
def test_gradients_flow(policy):
    x = _batch(n=4, c=3, size=16).requires_grad_(True)
    torch.manual_seed(0)
    y = diff_augment(x, policy)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_seeded_runs_are_reproducible():
    x = _batch()
    torch.manual_seed(123)
    a = diff_augment(x, OPS)
    torch.manual_seed(123)
    b = diff_augment(x, OPS)
    assert torch.equal(a, b)
    c = diff_augment(x, OPS)
    assert not torch.equal(a, c)

    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    a = diff_augment(x, OPS, generator=g1)
    torch.manual_seed(1)  # the global RNG is not used when a generator is given
    b = diff_augment(x, OPS, generator=g2)
    assert torch.equal(a, b)


def test_bf16_under_autocast():
    x = _batch().to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = diff_augment(x, OPS)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- EMA


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.lin(x))


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_closed_form():
    model = _Net()
    _fill(model, 0.0)
    ema = EMA(model, decay=0.75, warmup=False)
    _fill(model, 1.0)
    k = 5
    for step in range(k):
        ema.update(model, step)
    # e_k = d*e_{k-1} + (1-d)*1 with e_0 = 0  ->  e_k = 1 - d**k  (all dyadic, so exact in fp32)
    expected = 1.0 - 0.75**k
    for p in ema.model.parameters():
        assert torch.equal(p, torch.full_like(p, expected))
    # then the weights jump to 2: e_{k+j} = 2 - (2 - e_k) * d**j
    _fill(model, 2.0)
    for step in range(k, k + 3):
        ema.update(model, step)
    expected = 2.0 - (2.0 - expected) * 0.75**3
    for p in ema.model.parameters():
        assert torch.equal(p, torch.full_like(p, expected))
    # the source model is untouched
    for p in model.parameters():
        assert torch.equal(p, torch.full_like(p, 2.0))


def test_ema_copies_before_start():
    model = _Net()
    ema = EMA(model, decay=0.5, start=3, warmup=False)
    for step in range(3):
        _fill(model, float(step + 1))
        ema.update(model, step)
        for pe, pm in zip(ema.model.parameters(), model.parameters()):
            assert torch.equal(pe, pm)
    _fill(model, 5.0)
    ema.update(model, 3)  # first averaged step: 0.5*3 + 0.5*5
    for p in ema.model.parameters():
        assert torch.equal(p, torch.full_like(p, 4.0))


def test_ema_warmup_follows_early_weights_closely():
    model = _Net()
    _fill(model, 0.0)
    ema = EMA(model, decay=0.999, start=2)
    _fill(model, 1.0)
    ema.update(model, 2)  # k = 0: d = min(0.999, 1/10) = 0.1
    for p in ema.model.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.9))
    for step in range(3, 10_000):
        ema.update(model, step)
    assert all(torch.allclose(p, torch.ones_like(p), atol=1e-6) for p in ema.model.parameters())
    late = EMA(model, decay=0.999, start=0)
    _fill(late.model, 0.0)
    late.update(model, 100_000)  # long after the warm-up: d is the configured decay
    assert all(torch.allclose(p, torch.full_like(p, 0.001), rtol=1e-4) for p in late.model.parameters())


def test_ema_copies_buffers_and_has_no_grad():
    model = _Net()
    ema = EMA(model, decay=0.9)
    assert not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    model(torch.randn(8, 3))  # updates BN running stats
    model(torch.randn(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(model, 10)
    for (name, be), bm in zip(ema.model.named_buffers(), model.buffers()):
        assert torch.equal(be, bm), name
    assert int(ema.model.bn.num_batches_tracked) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.training and not ema.model.training
    # the copy is independent storage, and its state dict round-trips through self.model
    assert all(pe.data_ptr() != pm.data_ptr() for pe, pm in zip(ema.model.parameters(), model.parameters()))
    other = EMA(_Net(), decay=0.9)
    other.model.load_state_dict(ema.model.state_dict())
    for a, b in zip(other.model.state_dict().values(), ema.model.state_dict().values()):
        assert torch.equal(a, b)


def _generator(conditional: bool):
    from conftest import tiny

    from aigc_cli.models import build_nets

    cfg = tiny("dcgan", conditional=conditional, num_classes=3 if conditional else 0)
    torch.manual_seed(0)
    return cfg, build_nets(cfg.model)["G"]


@pytest.mark.parametrize("conditional", [False, True])
def test_settled_ema_has_the_batch_norm_statistics_of_its_own_weights(conditional):
    """The EMA copy sampled with the live G's statistics (FID 37 against 34 with its own)."""
    import contextlib
    import copy

    from aigc_cli.training import ema as ema_mod

    cfg, G = _generator(conditional)
    ema = EMA(G, decay=0.5)
    with torch.no_grad():  # the average drifts from G; G's statistics are of G's own batches
        for p in G.parameters():
            p.mul_(1.5)
    G.train()
    G(torch.randn(16, 8), torch.randint(3, (16,)) if conditional else None)
    ema.update(G, 10)
    layers = [m for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) >= 2 and not ema.settled
    copied = [m.running_var.clone() for m in layers]
    probe = copy.deepcopy(ema.model).train()  # the averaged weights, to measure by hand
    rng = torch.get_rng_state()
    ema.settle_norm_stats(cfg, contextlib.nullcontext())
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    assert ema.settled and not ema.model.training and all(m.momentum == 0.1 for m in layers)
    assert all(not torch.allclose(m.running_var, c) for m, c in zip(layers, copied))

    # By hand: the batch statistics of each layer's input over the same generated batches, averaged
    seen: dict[int, list] = {}
    for k, m in enumerate(m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)):
        m.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append((i[0].mean((0, 2, 3)), i[0].var((0, 2, 3)))))
    assert cfg.train.batch_size == 16
    gen = torch.Generator().manual_seed(cfg.train.seed ^ ema_mod.SEED_MIX)  # not the seed the grids draw with
    with torch.no_grad():
        for _ in range(round(ema_mod.NORM_STATS_IMAGES / 16)):
            z = torch.randn(16, 8, generator=gen)
            probe(z, torch.randint(3, (16,), generator=gen) if conditional else None)
    for k, m in enumerate(layers):
        mean, var = (torch.stack(v).mean(0) for v in zip(*seen[k]))
        assert torch.allclose(m.running_mean, mean, atol=1e-5) and torch.allclose(m.running_var, var, rtol=1e-4)

    again = [m.running_var.clone() for m in layers]
    ema.settle_norm_stats(cfg, contextlib.nullcontext())
    assert all(torch.equal(m.running_var, a) for m, a in zip(layers, again))  # settled: nothing redone
    ema.update(G, 11)
    assert not ema.settled and all(torch.equal(m.running_var, c) for m, c in zip(layers, copied))


@pytest.mark.parametrize("fails", ["stop", "error"])
def test_settling_stopped_midway_puts_the_copied_statistics_back(fails):
    """A signal while the statistics are measured (a minute for an SNGAN on a CPU) must not wait for the
    end; what it leaves must be the copied statistics, whole, not a half-measured average."""
    import contextlib

    cfg, G = _generator(False)
    ema = EMA(G, decay=0.5)
    G.train()
    G(torch.randn(16, 8), None)
    ema.update(G, 10)
    layers = [m for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d)]
    copied = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in layers]
    asked = []

    def should_stop():
        asked.append(1)
        if len(asked) == 3 and fails == "error":
            raise RuntimeError("out of memory")
        return len(asked) == 3

    with pytest.raises(RuntimeError) if fails == "error" else contextlib.nullcontext():
        ema.settle_norm_stats(cfg, contextlib.nullcontext(), should_stop)
    assert len(asked) == 3 and not ema.settled and not ema.model.training
    assert all(m.momentum == 0.1 for m in layers)
    for m, kept in zip(layers, copied):
        assert all(torch.equal(b, k) for b, k in zip((m.running_mean, m.running_var, m.num_batches_tracked), kept))
    ema.settle_norm_stats(cfg, contextlib.nullcontext(), lambda: False)
    assert ema.settled and len(asked) == 3
    assert all(not torch.equal(m.running_var, kept[1]) for m, kept in zip(layers, copied))


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError):
        EMA(_Net(), decay=1.5)


# --------------------------------------------------------------------------------------------- schedule


def test_lr_factor_without_warmup():
    total = 100
    for decay in ("none", "linear", "cosine"):
        assert lr_factor(0, total, 0, decay) == 1.0
    assert lr_factor(50, total, 0, "none") == 1.0
    assert lr_factor(99, total, 0, "none") == 1.0
    assert lr_factor(50, total, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(75, total, 0, "linear") == pytest.approx(0.25)
    assert lr_factor(99, total, 0, "linear") == pytest.approx(0.01)
    assert lr_factor(100, total, 0, "linear") == 0.0
    assert lr_factor(50, total, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(25, total, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, total, 0, "cosine") == pytest.approx(0.0, abs=1e-12)


def test_lr_factor_with_warmup():
    total, warmup = 110, 10
    for decay in ("none", "linear", "cosine"):
        assert lr_factor(0, total, warmup, decay) == pytest.approx(0.1)
        assert lr_factor(4, total, warmup, decay) == pytest.approx(0.5)
        assert lr_factor(9, total, warmup, decay) == 1.0
        assert lr_factor(10, total, warmup, decay) == 1.0  # progress 0 right after the warm-up
    assert lr_factor(60, total, warmup, "linear") == pytest.approx(0.5)
    assert lr_factor(60, total, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(110, total, warmup, "linear") == 0.0
    assert lr_factor(110, total, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, total, warmup, "none") == 1.0


@pytest.mark.parametrize("decay", ["none", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_lr_factor_bounded_and_monotone(decay, warmup):
    total = 50
    values = [lr_factor(s, total, warmup, decay) for s in range(total + 5)]
    assert all(0.0 <= v <= 1.0 for v in values)
    warm, rest = values[:warmup], values[warmup:]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(rest, rest[1:]))
    assert all(v > 0 for v in values[:total])  # every step that runs trains with a positive rate


def test_lr_factor_rejects_unknown_decay():
    with pytest.raises(ValueError):
        lr_factor(0, 10, 0, "exp")


def _optimizers():
    a, b = nn.Linear(2, 2), nn.Linear(2, 1)
    return {
        "g": torch.optim.Adam(a.parameters(), lr=2e-4, betas=(0.5, 0.999)),
        "d": torch.optim.Adam([{"params": [b.weight], "lr": 1e-3}, {"params": [b.bias], "lr": 4e-3}]),
    }, (a, b)


def test_set_lr_stores_base_lr_once():
    opts, _ = _optimizers()
    set_lr(opts, 0.5)
    assert [g["base_lr"] for g in opts["g"].param_groups] == [2e-4]
    assert opts["g"].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert [g["base_lr"] for g in opts["d"].param_groups] == [1e-3, 4e-3]
    assert [g["lr"] for g in opts["d"].param_groups] == pytest.approx([5e-4, 2e-3])
    set_lr(opts, 0.25)  # scales the base rate, not the already-scaled one
    assert opts["g"].param_groups[0]["base_lr"] == 2e-4
    assert opts["g"].param_groups[0]["lr"] == pytest.approx(5e-5)
    assert [g["lr"] for g in opts["d"].param_groups] == pytest.approx([2.5e-4, 1e-3])
    set_lr(opts, 1.0)
    assert opts["g"].param_groups[0]["lr"] == 2e-4


def test_base_lr_survives_state_dict_round_trip():
    opts, (a, _) = _optimizers()
    set_lr(opts, 0.1)
    a(torch.randn(3, 2)).sum().backward()
    opts["g"].step()
    saved = {k: o.state_dict() for k, o in opts.items()}

    fresh, _ = _optimizers()
    for k, o in fresh.items():
        o.load_state_dict(saved[k])
    assert [g["base_lr"] for g in fresh["d"].param_groups] == [1e-3, 4e-3]
    assert fresh["g"].param_groups[0]["base_lr"] == 2e-4
    assert fresh["g"].param_groups[0]["lr"] == pytest.approx(2e-5)
    set_lr(fresh, 0.5)  # a resumed run keeps scaling the original rate
    assert fresh["g"].param_groups[0]["lr"] == pytest.approx(1e-4)
    assert fresh["d"].param_groups[1]["lr"] == pytest.approx(2e-3)


def test_epochs_count_real_images_shown_whatever_n_critic():
    from conftest import tiny

    from aigc_cli.training.loop import total_steps

    one_pass = {"train.epochs": "1", "train.batch_size": "16"}
    assert total_steps(tiny("dcgan").with_overrides(one_pass), 160) == 10
    wgan = tiny("dcgan").with_overrides({**one_pass, "loss.gan": "wgan-gp", "model.d_norm": "layer",
                                             "train.n_critic": "5"})
    assert total_steps(wgan, 160) == 2  # 2 steps x 5 critic batches x 16 = the 160 images once
    assert total_steps(wgan.with_overrides({"train.epochs": "3"}), 160) == 6
    assert total_steps(tiny("vae").with_overrides(one_pass), 160) == 10
    assert total_steps(wgan, 40) == 1  # less than one step's worth: still one step


def test_epochs_on_a_resume_after_the_data_shrank_count_the_epochs_left():
    """48 of 64 images drawn at step 6, then resumed on 16 images with 3 epochs: the first epoch is over
    and 2 passes of 2 batches remain. The count went negative: "already at step 6 of 6", nothing trained."""
    from conftest import tiny

    from aigc_cli.training.loop import total_steps

    cfg = tiny("dcgan").with_overrides({"train.epochs": "3", "train.batch_size": "8"})
    assert total_steps(cfg, 16, step=6, position={"epoch": 0, "image": 48}) == 10
    assert total_steps(cfg, 64, step=6, position={"epoch": 0, "image": 48}) == 6 + 2 + 16


def test_epochs_on_a_resume_at_another_batch_size_still_make_that_many_passes(tmp_path):
    """`--epochs 2` after one pass at batch 16 counted 2 passes at batch 32 in steps (8), all of them
    already made: nothing was trained, one pass in all."""
    from conftest import Silent, tiny

    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.training.loop import train
    from aigc_cli.training.state import find_resume

    base = tiny("dcgan").with_overrides({"data.limit": "128", "train.epochs": "1", "train.batch_size": "16"})
    train(base, tmp_path / "run", Silent())
    assert (ckpt_io.load(tmp_path / "run").step, ckpt_io.load(tmp_path / "run").images_seen) == (8, 128)
    summary = train(base.with_overrides({"train.epochs": "2", "train.batch_size": "32"}), tmp_path / "run", Silent(),
                    resume=find_resume("auto", tmp_path / "run", print))
    assert (summary["steps"], summary["images_seen"]) == (12, 256)  # 4 steps of 32: the second pass


def test_epochs_resumed_mid_epoch_at_another_batch_size_end_with_the_last_epoch(tmp_path):
    """Stopped in epoch 1 of 2 at batch 24 (each epoch drops its last 8 images), resumed at batch 16:
    counted from images_seen, the run went on one batch into a third epoch."""
    from conftest import Silent, tiny
    from conftest import StopsAt

    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.errors import Interrupted
    from aigc_cli.training.loop import train
    from aigc_cli.training.state import data_position, find_resume

    base = tiny("dcgan").with_overrides({"data.limit": "512", "train.epochs": "2", "train.batch_size": "24"})
    with pytest.raises(Interrupted):
        train(base, tmp_path / "run", StopsAt(25))  # 21 batches an epoch: 4 batches, 96 images into epoch 1
    resume = find_resume("auto", tmp_path / "run", print)
    assert data_position(resume.meta) == {"epoch": 1, "image": 96}
    summary = train(base.with_overrides({"train.batch_size": "16"}), tmp_path / "run", Silent(), resume=resume)
    assert summary["steps"] == 25 + (512 - 96) // 16  # the rest of epoch 1, and no more
    assert data_position(ckpt_io.load(tmp_path / "run").meta) == {"epoch": 1, "image": 96 + 26 * 16}


def test_a_best_metric_the_run_does_not_log_is_refused_before_training(tmp_path, monkeypatch, capsys):
    # It was a note after the first log interval (none with -q), and the run went on without best.safetensors.
    from conftest import Silent, run_cli, tiny

    from aigc_cli.training.loop import train

    code, _, err = run_cli(monkeypatch, capsys, "train", "--preset", "quickstart", "--out", tmp_path / "r", "-q",
                           "--set", "train.best_metric=loss_dd")
    assert code == 2 and err.startswith("error: train.best_metric='loss_dd' is not a value this run logs (loss_d, "), err
    assert not (tmp_path / "r").exists()
    rep = Silent()
    train(tiny("dcgan").with_overrides({"train.steps": "10", "train.log_every": "5", "train.best_metric": "loss_d"}),
          tmp_path / "ok", rep)
    assert not [n for n in rep.notes if "best_metric" in n] and (tmp_path / "ok" / "checkpoints" / "best.safetensors").exists()


def test_color_is_the_reference_s_ops_in_its_order_and_ranges():
    """DiffAugment's rand_brightness (+U(-0.5, 0.5)), rand_saturation (x U(0, 2) about the pixel's channel mean)
    and rand_contrast (x U(0.5, 1.5) about the image mean), in that order, one draw per image each."""
    from aigc_cli.training import augment

    x = torch.rand(64, 3, 4, 4) * 2 - 1
    got = augment._color(x, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    b, s, c = (torch.rand((64, 1, 1, 1), generator=g) for _ in range(3))
    y = x + (b - 0.5)
    y = (y - y.mean(1, keepdim=True)) * (s * 2) + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * (c + 0.5) + y.mean((1, 2, 3), keepdim=True)
    assert torch.allclose(got, y, atol=1e-6)


def test_translation_zero_fills_and_reaches_every_shift_both_ways():
    from aigc_cli.training import augment

    out = augment._translation(torch.ones(400, 1, 16, 16), torch.Generator().manual_seed(0))  # shifts of -2..2
    rows, cols = out[:, 0].amax(2), out[:, 0].amax(1)  # 0 where a row or column is all fill
    shift = lambda lines: (lines[:, :2] == 0).sum(1) - (lines[:, -2:] == 0).sum(1)  # noqa: E731
    assert set(shift(rows).tolist()) == set(shift(cols).tolist()) == {-2, -1, 0, 1, 2}
    assert set(out.unique().tolist()) == {0.0, 1.0}  # zeros, never the edge repeated


def test_cutout_centres_reach_the_reference_s_whole_range():
    """rand_cutout's offset: randint(0, size + (1 - cut % 2)); the square is centred there and clipped."""
    from aigc_cli.training import augment

    out = augment._cutout(torch.ones(2000, 1, 16, 16), torch.Generator().manual_seed(0))  # 8x8 squares
    cut_rows = (out[:, 0] == 0).any(2)
    first = cut_rows.float().argmax(1)
    assert set(first.tolist()) == set(range(13))  # centre 0..16: the square starts at rows -4..12, clipped


def test_a_tensor_lr_is_scaled_in_place_from_an_unscaled_base():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01), foreach=False)
    lr = opt.param_groups[0]["lr"]
    for _ in range(3):  # the same factor again gives the same rate: the base is not scaled with it
        set_lr({"G": opt}, 0.5)
    assert opt.param_groups[0]["lr"] is lr  # a graphed step reads this tensor: it must not be replaced
    assert lr.item() == pytest.approx(0.005)
    assert opt.param_groups[0]["base_lr"].item() == pytest.approx(0.01)


def test_negative_warmup_is_refused():
    with pytest.raises(ValueError, match="warm-up steps must be >= 0"):
        lr_factor(0, 100, -1, "linear")


def test_translation_of_28_pixel_images_reaches_four_pixels_each_way():
    out = augment._translation(torch.ones(600, 1, 28, 28), torch.Generator().manual_seed(0))
    rows, cols = out[:, 0].amax(2), out[:, 0].amax(1)  # 0 where a row or column is all fill
    shift = lambda lines: (lines[:, :4] == 0).sum(1) - (lines[:, -4:] == 0).sum(1)  # noqa: E731
    assert set(shift(rows).tolist()) == set(shift(cols).tolist()) == set(range(-4, 5))
