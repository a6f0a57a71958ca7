"""Quality benchmark: DCGAN, WGAN-GP, SNGAN, a conditional SNGAN and a VAE trained on real
Fashion-MNIST for the same number of images, each scored with the domain-classifier FID and KID of
`aigc eval` at several points; writes a markdown table and a plot of FID against images seen.

Runs the real `aigc` command. Not part of `make test`. Example (the CPU table in benchmarks/README.md):

    python benchmarks/quality.py --data /usr/share/datasets/fashion-mnist --images 30000 --scale small

`--scale small` halves network widths so a CPU run stays short; `--scale paper` keeps the presets'.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODELS = [  # (label, preset, overrides shared by both scales)
    ("DCGAN", "fashion-mnist-dcgan", ["model.resolution=32"]),
    ("WGAN-GP", "fashion-mnist-wgan-gp", []),
    ("SNGAN", "fashion-mnist-sngan", []),
    ("cond. SNGAN", "fashion-mnist-cond-sngan", []),
    ("VAE", "fashion-mnist-vae", []),
]
SMALL = ["model.g_width=32", "model.d_width=32"]  # ResNet GANs: 64/64 below


def aigc() -> list[str]:
    exe = Path(sys.executable).with_name("aigc")
    return [str(exe)] if exe.exists() else [shutil.which("aigc") or "aigc"]


def run_json(args: list[str]) -> dict:
    proc = subprocess.run(aigc() + args + ["--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): aigc {shlex.join(args)}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST source (IDX folder or name)")
    p.add_argument("--images", type=int, default=30000, help="real images shown to each model's D (or the VAE)")
    p.add_argument("--evals", type=int, default=4, help="evaluation points per model")
    p.add_argument("--n", type=int, default=2000, help="images per FID/KID evaluation")
    p.add_argument("--scale", choices=("small", "paper"), default="small")
    p.add_argument("--classifier-steps", type=int, default=1500)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quality"))
    a = p.parse_args()
    for name, least in (("images", 1), ("evals", 1), ("n", 2), ("classifier_steps", 1)):  # aigc eval: --n >= 2
        if getattr(a, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(a, name)}")
    a.out.mkdir(parents=True, exist_ok=True)
    common = ["--data", a.data, "--device", a.device]

    clf = a.out / "classifier"
    if not (clf / "checkpoints" / "last.safetensors").exists():
        s = run_json(["train", "--preset", "fashion-mnist-classifier", "--out", str(clf), "--steps",
                      str(a.classifier_steps), *common])
        print(f"classifier: held-out accuracy {s['test_accuracy']}", flush=True)

    rows, curves = [], {}
    for label, preset, extra in MODELS:
        run = a.out / preset
        batch, n_critic = preset_batch(preset)
        steps = max(a.evals, a.images // (batch * n_critic))
        scale = [] if a.scale == "paper" else (["model.g_width=64", "model.d_width=64"] if "sngan" in preset else SMALL)
        overrides = [*extra, *scale, f"train.ckpt_every={max(1, steps // a.evals)}", "train.keep_checkpoints=0",
                     "train.log_every=50", f"train.sample_every={steps}"]
        if run.exists():
            shutil.rmtree(run)
        t0 = time.time()
        summary = run_json(["train", "--preset", preset, "--out", str(run), "--steps", str(steps), *common,
                            *sets(overrides)])
        train_s = time.time() - t0
        points = []
        for ck in sorted((run / "checkpoints").glob("step-*.safetensors")):
            r = run_json(["eval", str(ck), "--features", str(clf), "--n", str(a.n), *common])
            info = run_json(["info", str(ck)])
            points.append((info["images_seen"], r["metrics"]["fid"], r["metrics"]["kid"]))
            print(f"{label:12s} step {info['step']:6d} images {info['images_seen']:7d} "
                  f"FID {r['metrics']['fid']:8.2f} KID {r['metrics']['kid']:8.3f}", flush=True)
        curves[label] = points
        rows.append((label, preset, steps, summary["images_seen"], summary["seconds"], train_s, points))

    command = "python " + shlex.join(sys.argv)
    write_table(a.out / "quality.md", rows, a, command)
    write_plot(a.out / "fid_vs_images.png", curves)
    print((a.out / "quality.md").read_text())


def preset_batch(preset: str) -> tuple[int, int]:
    import tomllib

    from aigc_cli.config import preset_text

    t = tomllib.loads(preset_text(preset)).get("train", {})
    return t.get("batch_size", 64), t.get("n_critic", 1)


def write_table(path: Path, rows, a, command: str) -> None:
    lines = [f"Fashion-MNIST 32x32, {a.images} real images per model, scale `{a.scale}`, "
             f"FID/KID in the features of `fashion-mnist-classifier` ({a.n} generated vs {a.n} real).", "",
             f"Command: `{command}`", "",
             "| model | preset | G steps | images seen | train s | img/s | FID final | FID best | KID final |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, preset, steps, seen, secs, _, points in rows:
        fid_final, kid_final = points[-1][1], points[-1][2]
        lines.append(f"| {label} | `{preset}` | {steps} | {seen} | {secs:.0f} | {seen / max(secs, 1e-9):.0f} | "
                     f"{fid_final:.1f} | {min(p[1] for p in points):.1f} | {kid_final:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, curves: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot written", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("real images seen")
    ax.set_ylabel("FID (domain classifier features)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
