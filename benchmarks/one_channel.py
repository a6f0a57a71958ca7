"""The DCGAN's one-channel layers, timed in other formulations: where the rest of the 100k images/s goal is.

A profile on an H200 (benchmarks/README.md, 2026-11-29) put about 5-6 ms of the 12-13 ms step at batch 1024
in D's first convolution (1 -> 64 channels), G's last transposed convolution (64 -> 1) and the activation
copies beside them: cuDNN runs a one-channel convolution on a slow generic kernel. This script times, for
each of the two layers, forward + backward (input and weight gradients) at one batch size, in:

- channels_last: as aigc trains now;
- nchw: the layer in the contiguous format, its neighbours' tensors converted (the conversions are timed);
- s2d / s2d8 (D's first conv): space-to-depth, the same convolution as pad 1 + pixel_unshuffle(2) and a
  2x2 stride-1 convolution over 4 channels (s2d8: zero-padded to 8 channels, which tensor-core kernels want);
- d2s / d2s8 (G's last conv): depth-to-space, the same transposed convolution as a 3x3 convolution to the 4
  sub-pixel phases and pixel_shuffle(2) (d2s8: zero kernels pad the 4 phases to 8 output channels, sliced off).

Every variant's output is checked against the layer's own in fp32 first (max abs difference printed; one off
by more than 1e-4 of the output's scale stops the script). s2d and d2s are train.subpixel_convs' rewrites
(aigc_cli/training/subpixel.py), here timed with the rewritten weight as the leaf; in training, the forward
pass derives it from the 4x4 kernel each step, which keeps the checkpoint's layout.
`--whole-step N` then times aigc's own eager DCGAN training step (fashion-mnist-dcgan, random data, the
device's default precision) with train.subpixel_convs off and on, alternating over N rounds of 4 steps.
Not part of `make test`. `python benchmarks/one_channel.py --device cpu --batch 64 --repeats 3` runs it here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from aigc_cli.training.subpixel import space_to_depth_weight, sub_pixel_weight

CL = torch.channels_last


def s2d_weight(w: torch.Tensor, channels: int = 4) -> torch.Tensor:
    """(O, 1, 4, 4) stride-2 pad-1 kernel -> (O, channels, 2, 2) over pixel_unshuffle(2) of the padded input
    (aigc's own rewrite, zero-padded to `channels`)."""
    w2 = space_to_depth_weight(w)
    return F.pad(w2, (0, 0, 0, 0, 0, channels - 4)) if channels > 4 else w2


def s2d_conv(x: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    u = F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2)
    if w2.shape[1] > 4:
        u = F.pad(u, (0, 0, 0, 0, 0, w2.shape[1] - 4))
    return F.conv2d(u.contiguous(memory_format=CL), w2)


def d2s_convt(h: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(F.conv2d(h, w3, padding=1), 2)


def d2s8_convt(h: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """d2s with the 4 phases zero-padded to 8 output channels (w3 padded), the padding sliced off."""
    return F.pixel_shuffle(F.conv2d(h, w3, padding=1)[:, :4], 2)


def variants(n: int, width: int, device: torch.device):
    """(layer, name, make_input, fn(x, w), weight) for each variant; inputs in the format its neighbours use."""
    g = torch.Generator().manual_seed(0)
    wd = (torch.randn(width, 1, 4, 4, generator=g) * 0.02).to(device)  # D's first conv
    wg = (torch.randn(width, 1, 4, 4, generator=g) * 0.02).to(device)  # G's last transposed conv
    xd = torch.randn(n, 1, 64, 64, generator=g).to(device)
    hg = torch.randn(n, width, 32, 32, generator=g).to(device)
    return [
        ("D first conv", "channels_last", xd.contiguous(memory_format=CL), lambda x, w: F.conv2d(x, w, None, 2, 1), wd.contiguous(memory_format=CL)),
        ("D first conv", "nchw", xd, lambda x, w: F.conv2d(x, w, None, 2, 1).contiguous(memory_format=CL), wd),
        ("D first conv", "s2d", xd, s2d_conv, s2d_weight(wd).contiguous(memory_format=CL)),
        ("D first conv", "s2d8", xd, s2d_conv, s2d_weight(wd, 8).contiguous(memory_format=CL)),
        ("G last conv", "channels_last", hg.contiguous(memory_format=CL), lambda h, w: F.conv_transpose2d(h, w, None, 2, 1), wg.contiguous(memory_format=CL)),
        ("G last conv", "nchw", hg.contiguous(memory_format=CL), lambda h, w: F.conv_transpose2d(h.contiguous(), w, None, 2, 1), wg),
        ("G last conv", "d2s", hg.contiguous(memory_format=CL), d2s_convt, sub_pixel_weight(wg).contiguous(memory_format=CL)),
        ("G last conv", "d2s8", hg.contiguous(memory_format=CL), d2s8_convt,
         F.pad(sub_pixel_weight(wg), (0, 0, 0, 0, 0, 0, 0, 4)).contiguous(memory_format=CL)),
    ]


def check(device: torch.device, width: int) -> dict:
    """Each variant against its layer's own result, fp32, batch 4: a wrong formulation must not be timed."""
    out = {}
    ref = {}
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions (torch's default on CUDA) differ by 1e-3: not a check
    for layer, name, x, fn, w in variants(4, width, device):
        y = fn(x.float(), w.float())
        ref.setdefault(layer, y)
        out[f"{layer} / {name}"] = diff = float((y - ref[layer]).abs().max())
        if diff > 1e-4 * float(ref[layer].abs().max()):
            raise SystemExit(f"{layer} / {name} computes something else: max abs difference {diff:.3g}")
    torch.backends.cudnn.allow_tf32 = True
    return out


def time_variant(x, fn, w, dtype, repeats: int, steps: int, device: torch.device) -> float:
    """ms per forward + backward (input and weight gradients), median of repeats."""
    x = x.to(dtype).detach().requires_grad_(True)
    w = w.to(dtype).detach().requires_grad_(True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    grad = None
    times = []
    for r in range(repeats + 1):  # the first round warms up (cuDNN's benchmark search)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            y = fn(x, w)
            if grad is None:
                grad = torch.randn_like(y)
            y.backward(grad)
        sync()
        if r:
            times.append((time.perf_counter() - t0) * 1e3 / steps)
    return sorted(times)[len(times) // 2]


def whole_step(device: torch.device, batch: int, rounds: int) -> dict:
    """ms per eager aigc GAN step (median), the same networks without and with the sub-pixel rewrites."""
    import copy

    from aigc_cli.config import load_preset
    from aigc_cli.models import build_nets
    from aigc_cli.training import subpixel
    from aigc_cli.training.precision import Precision, resolve_precision
    from aigc_cli.training.steps import STEPS, Aids, make_optimizers, optimizer_flags

    torch.manual_seed(0)
    cfg = load_preset("fashion-mnist-dcgan")
    base = build_nets(cfg.model)
    setups = {}
    for name in ("off", "on"):
        nets = {k: copy.deepcopy(v).to(device).train().to(memory_format=CL) for k, v in base.items()}
        if name == "on":
            assert subpixel.use_subpixel(nets["G"], CL) + subpixel.use_subpixel(nets["D"], CL) == 2
        setups[name] = nets, make_optimizers("gan", nets, cfg.train, optimizer_flags(device, capturable=False))
    x = (torch.rand(batch, 1, 64, 64, device=device) * 2 - 1).contiguous(memory_format=CL)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    amp = Precision(resolve_precision("auto", device), device)
    times: dict = {k: [] for k in setups}
    for r in range(rounds + 1):  # round 0 warms up; the order alternates against drift
        for name in (("off", "on") if r % 2 else ("on", "off")):
            nets, opts = setups[name]
            for _ in range(4):
                t0 = time.perf_counter()
                float(STEPS["gan"](nets, opts, amp, lambda: (x, y), cfg, 0, Aids())["loss_d"])  # syncs
                if r:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch": batch, "precision": amp.name, "step_ms": {k: round(v, 2) for k, v in ms.items()},
            "speedup": round(ms["off"] / ms["on"], 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--width", type=int, default=64, help="channels beside the one-channel side (the DCGAN's 64)")
    p.add_argument("--dtype", default="auto", help="bf16 on CUDA, fp32 elsewhere (auto), or bf16/fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="forward + backward passes per timed repeat")
    p.add_argument("--whole-step", type=int, default=0, metavar="N",
                   help="also time aigc's whole eager step with train.subpixel_convs off and on, N rounds")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(a.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    result = {"max_abs_diff_fp32": check(device, a.width), "ms": {}}
    for layer, name, x, fn, w in variants(a.batch, a.width, device):
        result["ms"][f"{layer} / {name}"] = round(time_variant(x, fn, w, dtype, a.repeats, a.steps, device), 4)
    print(f"batch {a.batch}, {dtype}, {device}: ms per forward + backward (median of {a.repeats})")
    for k, ms in result["ms"].items():
        print(f"  {k:28s} {ms:9.4f}   (fp32 check: max abs diff {result['max_abs_diff_fp32'][k]:.2e})")
    if a.whole_step:
        result["whole_step"] = w = whole_step(device, a.batch, a.whole_step)
        print(f"whole aigc step, batch {a.batch}, {w['precision']}: {w['step_ms']['off']:.1f} ms off, "
              f"{w['step_ms']['on']:.1f} ms with train.subpixel_convs: {w['speedup']:.3f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
