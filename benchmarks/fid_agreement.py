"""Our FID against pytorch-fid's on the same two image folders and the same weights file.

    python benchmarks/fid_agreement.py FOLDER_A FOLDER_B [--weights pt_inception-2015-12-05-6726825d.pth]
    python benchmarks/fid_agreement.py --make-folders DIR --data /usr/share/datasets/fashion-mnist --n 5000 \\
        --random-weights          # no real weights at hand: both tools get the same random layout weights

Ours runs as the real `aigc eval --fake A --data B --metrics fid --json`; pytorch-fid runs through its
own `calculate_fid_given_paths` with its weight loading pointed at the same file (torch.load with
weights_only=True). Needs `pip install pytorch-fid`. The issue asks for agreement within 0.5%.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folders(out: Path, data: str, n: int) -> tuple[Path, Path]:
    """Two folders of n PNGs each from a real data source: plain images, and blurred noisy ones."""
    sys.path.insert(0, str(ROOT))
    from aigc_cli.data import load_images

    images = load_images(data, channels=1, resolution=32, limit=2 * n, warn=lambda s: None).images
    a, b = out / "a", out / "b"
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(images[i, 0].numpy()).save(a / f"{i:05d}.png")
        x = images[n + i, 0].numpy().astype(np.float32)
        x = np.clip(x * 0.8 + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
        Image.fromarray(x).save(b / f"{i:05d}.png")
    return a, b


# The statistics cache and random weights (95 MB) of one run, removed at exit.
SCRATCH = Path(tempfile.mkdtemp(prefix="fid-agreement-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` stops with SIGTERM: atexit still runs


def ours(a: Path, b: Path, weights: Path, device: str, env: dict) -> float:
    cmd = [sys.executable, "-m", "aigc_cli", "eval", "--fake", str(a), "--data", str(b), "--metrics", "fid",
           "--inception-weights", str(weights), "--device", device, "--precision", "fp32", "--json",
           "--n", "1000000", "--stats-dir", tempfile.mkdtemp(dir=SCRATCH)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"aigc eval failed ({p.returncode}): {p.stderr.strip()}")
    return json.loads(p.stdout)["metrics"]["fid"]


def _sqrtm_without_disp() -> None:
    """pytorch-fid 0.3.0 calls scipy.linalg.sqrtm(..., disp=False), which newer SciPy dropped (a TypeError
    on the H200 machine's SciPy): give it the old call's (root, error estimate) answer, computed as SciPy's
    disp=False did, so their side of the comparison still runs their code."""
    import inspect
    import types

    import numpy as np
    import pytorch_fid.fid_score as pfs
    from scipy import linalg

    if "disp" in inspect.signature(linalg.sqrtm).parameters:
        return

    def sqrtm(a, disp=True, **kw):
        root = linalg.sqrtm(a, **kw)
        if disp:
            return root
        return root, np.linalg.norm(root @ root - a, "fro") ** 2 / np.linalg.norm(a, "fro")

    pfs.linalg = types.SimpleNamespace(**{**{k: getattr(linalg, k) for k in dir(linalg) if not k.startswith("_")},
                                          "sqrtm": sqrtm})


def theirs(a: Path, b: Path, weights: Path, device: str) -> float:
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_fid_given_paths

    pfi.load_state_dict_from_url = lambda *args, **kw: torch.load(weights, map_location="cpu", weights_only=True)
    _sqrtm_without_disp()
    return float(calculate_fid_given_paths([str(a), str(b)], 50, device, 2048, num_workers=min(8, os.cpu_count() or 1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="*", type=Path, help="two image folders")
    ap.add_argument("--weights", type=Path, help="the FID Inception weights file (default: aigc's lookup)")
    ap.add_argument("--random-weights", action="store_true",
                    help="write random weights in the real file's layout and use them for both (hash check off)")
    ap.add_argument("--make-folders", type=Path, help="write two folders of --n PNGs here from --data")
    ap.add_argument("--data", default="fashion-mnist", help="source for --make-folders")
    ap.add_argument("--n", type=int, default=5000, help="images per made folder (> 2048 for a full-rank covariance)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if args.make_folders:
        a, b = make_folders(args.make_folders, args.data, args.n)
    elif len(args.folders) == 2:
        a, b = args.folders
    else:
        ap.error("give two folders or --make-folders DIR")
    weights = args.weights
    if args.random_weights:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_inception import random_state_dict
        weights = SCRATCH / "random-inception.pth"
        torch.save(random_state_dict(), weights)
        env["AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS"] = "1"
    if weights is None:
        sys.path.insert(0, str(ROOT))
        from aigc_cli.metrics.weights import resolve_weights_path
        weights = resolve_weights_path(None)
    t0 = time.perf_counter()
    f_ours = ours(a, b, weights, args.device, env)
    t1 = time.perf_counter()
    f_theirs = theirs(a, b, weights, args.device)
    t2 = time.perf_counter()
    rel = abs(f_ours - f_theirs) / max(abs(f_theirs), 1e-12)
    print(json.dumps({"aigc_fid": f_ours, "pytorch_fid": f_theirs, "relative_difference": rel,
                      "aigc_s": round(t1 - t0, 1), "pytorch_fid_s": round(t2 - t1, 1), "device": args.device,
                      "weights": str(weights), "random_weights": args.random_weights,
                      "folders": [str(a), str(b)]}, indent=1))
    print(f"aigc {f_ours:.4f}  pytorch-fid {f_theirs:.4f}  difference {100 * rel:.3f}% "
          f"({'within' if rel <= 0.005 else 'OUTSIDE'} 0.5%)")


if __name__ == "__main__":
    main()
