"""Sampling-speed benchmark: what `aigc sample` costs beyond the generator's bare forward pass.

Times, for N images at 64x64 (the `fashion-mnist-dcgan` generator) at one batch size on one device:

- bare:     the generator's forward pass over the latents in batches (inference mode, same autocast), nothing else;
- generate: `aigc_cli.sampling.generate`, what `aigc sample` runs before writing PNGs (the same forward pass,
            plus the conversion to uint8 and the copy to the CPU);
- cli npz / cli grid / cli individual: the whole `aigc sample` command in a subprocess (Python and torch
            start-up, checkpoint loading, generation and one uncompressed .npz, the PNG grid, or one PNG per
            image); "cli start-up" is the same command for one image, i.e. its fixed cost.

bare and generate alternate, --repeats times each, in this process; the median is reported. The weights come
from a checkpoint (--checkpoint), or from a 1-step training run made here (speed does not depend on them).
Not part of `make test`. Example (the CPU numbers in benchmarks/README.md):

    python benchmarks/sample_speed.py --device cpu --n 1024 --batch-size 256
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def aigc() -> list[str]:
    exe = Path(sys.executable).with_name("aigc")
    found = str(exe) if exe.exists() else shutil.which("aigc")
    # Not installed (a checkout run with PYTHONPATH=.): the same command through the module
    return [found] if found else [sys.executable, "-m", "aigc_cli"]


def make_checkpoint(run_dir: Path, data: str) -> Path:
    from aigc_cli.config import load_preset
    from aigc_cli.training.loop import train

    class Quiet:
        def start(self, total_steps, info): pass
        def advance(self, step): pass
        def log(self, record): pass
        def note(self, text): pass
        def finish(self): pass

    cfg = load_preset("fashion-mnist-dcgan").with_overrides({
        "data.source": data, "data.limit": 256, "train.epochs": 0, "train.steps": 1, "train.batch_size": 64,
        "train.device": "cpu", "train.n_samples": 4})
    return Path(train(cfg, run_dir, Quiet())["checkpoint"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint, run folder or exported generator (default: a 1-step run made here)")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="data for that 1-step run")
    p.add_argument("--n", type=int, default=1024, help="images per timing")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cli", action="store_true", help="skip the `aigc sample` subprocess timings")
    a = p.parse_args()
    for name in ("n", "batch_size", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")

    import torch

    from aigc_cli import checkpoint as ckpt_io
    from aigc_cli.sampling import generate, generator_from, latents

    command = "python " + shlex.join(["benchmarks/sample_speed.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory(prefix="sample-speed-") as tmp:
        tmp = Path(tmp)
        ck_path = a.checkpoint or str(make_checkpoint(tmp / "run", a.data))
        ck = ckpt_io.load(ck_path)
        G, amp = generator_from(ck, a.device, a.precision)
        device = next(G.parameters()).device
        z = latents(a.n, ck.config.model.latent_dim, 0)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        @torch.inference_mode()
        def bare():
            for chunk in z.split(a.batch_size):
                with amp.autocast():
                    G(chunk.to(device))
            sync()

        def gen():
            generate(G, z, amp, a.batch_size)
            sync()

        times: dict[str, list[float]] = {"bare": [], "generate": []}
        bare(), gen()  # warm-up (cuDNN algorithm choice, allocator)
        for _ in range(a.repeats):
            for name, fn in (("bare", bare), ("generate", gen)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

        if not a.no_cli:
            base = [*aigc(), "sample", ck_path, "--n", str(a.n), "--batch-size", str(a.batch_size),
                    "--device", a.device, "--precision", a.precision, "--json"]
            start_up = [*aigc(), "sample", ck_path, "--n", "1", "--device", a.device, "--precision", a.precision,
                        "--json", "--out", str(tmp / "one.png")]
            for name, extra in (("cli start-up (--n 1)", None), ("cli npz", ["--npz", str(tmp / "all.npz")]),
                                ("cli grid", ["--out", str(tmp / "grid.png")]),
                                ("cli individual", ["--out", str(tmp / "grid.png"), "--individual", str(tmp / "each")])):
                times[name] = []
                for _ in range(max(1, a.repeats // 2)):
                    shutil.rmtree(tmp / "each", ignore_errors=True)
                    t = time.perf_counter()
                    proc = subprocess.run(start_up if extra is None else base + extra, capture_output=True, text=True)
                    times[name].append(time.perf_counter() - t)
                    if proc.returncode != 0:
                        sys.exit(f"aigc sample failed ({proc.returncode}):\n{proc.stderr[-2000:]}")

    print(f"Command: `{command}`\n")
    print(f"{a.n} images at {ck.config.model.resolution}x{ck.config.model.resolution}, batch {a.batch_size}, "
          f"{device}, {amp.name}; median of {a.repeats} (CLI: {max(1, a.repeats // 2)}) runs\n")
    print("| what | seconds | images/s | vs bare |\n|---|---|---|---|")
    ref = statistics.median(times["bare"])
    for name, ts in times.items():
        s = statistics.median(ts)
        if name.startswith("cli start-up"):
            print(f"| {name} | {s:.3f} | - | - |")
        else:
            print(f"| {name} | {s:.3f} | {a.n / s:.0f} | {s / ref:.2f}x |")


if __name__ == "__main__":
    main()
