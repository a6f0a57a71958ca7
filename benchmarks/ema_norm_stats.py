"""FID of a GAN's EMA generator with the live G's batch-norm statistics copied (as aigc did before
2026-11-30) against its own, settled ones (EMA.settle_norm_stats, what training does now), and of the live G.

For each checkpoint of a run, writes the two EMA variants as checkpoint copies (the same file with other G_ema
buffers) and scores them and the live G with the real `aigc eval`. Not part of `make test`. Example (the table
in benchmarks/README.md, "EMA"):

    aigc train --preset fashion-mnist-classifier --data /usr/share/datasets/fashion-mnist --out clf \\
        --steps 1500 --set model.resolution=32
    aigc train --preset fashion-mnist-dcgan --data /usr/share/datasets/fashion-mnist --out dc --steps 3000 \\
        --set model.resolution=32 --set model.g_width=32 --set model.d_width=32 \\
        --set train.ckpt_every=1000 --set train.keep_checkpoints=0
    python benchmarks/ema_norm_stats.py --run dc --features clf --n 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from aigc_cli import checkpoint as ckpt_io
from aigc_cli.training.ema import EMA_NORMS_KEY, settle_norm_stats


def variant(ck, settle: bool, seed: int) -> dict:
    """The checkpoint's tensors with G_ema's buffers either G's (copied) or measured on G_ema itself."""
    tensors = dict(ck.tensors)
    buffers = [k for k in ck.net_state("G_ema") if "running_" in k or "num_batches" in k]
    if settle:  # as training does it, with the run's seed replaced by `seed`
        G = ckpt_io.build_net(ck, "G", "G_ema")
        settle_norm_stats(G, ck.config.with_overrides({"train.seed": seed}), contextlib.nullcontext())
        state = G.state_dict()
        tensors.update({f"G_ema.{k}": state[k].to(tensors[f"G_ema.{k}"].dtype) for k in buffers})
    else:
        tensors.update({f"G_ema.{k}": tensors[f"G.{k}"] for k in buffers})
    return tensors


def fid(path: Path, args, *extra: str) -> str:
    exe = Path(sys.executable).with_name("aigc")
    cmd = [str(exe) if exe.exists() else "aigc", "eval", str(path), "--features", args.features, "--n", str(args.n),
           "--metrics", "fid,kid", "--device", args.device, "--json", "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    m = json.loads(proc.stdout)["metrics"]
    return f"{m['fid']:.2f} / {m['kid']:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder whose step checkpoints to score")
    p.add_argument("--features", required=True, help="classifier run for `aigc eval --features`")
    p.add_argument("--n", type=int, default=5000, help="generated images per score")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", default="0", help="comma list of seeds for the settled statistics")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"`python benchmarks/ema_norm_stats.py {' '.join(sys.argv[1:])}`\n")
    print("| step | EMA, G's statistics copied | " + " | ".join(f"EMA, own statistics (seed {s})" for s in seeds)
          + " | live G |")
    print("|---" * (3 + len(seeds)) + "|")
    tmp = Path(tempfile.mkdtemp(prefix="ema-stats-"))
    try:
        for path in reversed(ckpt_io.step_files(Path(args.run) / "checkpoints")):  # oldest first
            ck = ckpt_io.load(path)
            cells = []
            for settle, seed in [(False, 0), *((True, s) for s in seeds)]:
                out = tmp / f"{'own' if settle else 'copied'}-{seed}-{path.name}"
                # marked as settled either way, so that `aigc eval` scores the statistics as they are
                ckpt_io.write_atomic(out, variant(ck, settle, seed), {**ck.meta, EMA_NORMS_KEY: "settled"})
                cells.append(fid(out, args))
                out.unlink()
            print(f"| {ck.step} | " + " | ".join(cells) + f" | {fid(path, args, '--no-ema')} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\nFID / KID in the classifier's features (comparable within this table only); one row a checkpoint.")


if __name__ == "__main__":
    main()
