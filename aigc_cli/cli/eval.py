"""`aigc eval`: FID, KID, IS and precision/recall of a checkpoint (or a folder of generated images)
against real data, in Inception's or a domain classifier's feature space (+ VAE scores); and
`aigc eval stats`, which writes real data's reference statistics to an npz."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .output import QUIET_HELP, check_result_written, emit_json, stdout_is_result, handles_errors, human_console, seed_in_range, showing_progress, sigterm_interrupts, warner

METRICS_HELP = ("Comma list of fid, kid, is, precision, recall (VAE: also recon_mse, neg_elbo, bpd); "
                "only these are computed (default: all that apply).")
# No word here (punctuation included) may be wider than the help column at 80 columns, 23 characters
# in `aigc eval stats`: rich would cut it with an ellipsis (tests/test_help.py checks).
WEIGHTS_HELP = ("pytorch-fid's Inception weights file, for the default extractor (default: the file named "
                "by the environment variable AIGC_INCEPTION_WEIGHTS if it is set, else the torch hub cache, "
                "where --download-weights puts it).")
FEATURES_HELP = ("Classifier checkpoint (or run folder) whose penultimate layer gives the features, "
                 "instead of Inception.")
STATS_DIR_HELP = "Cache of real-data reference statistics (default: $AIGC_CACHE_DIR/stats, AIGC_CACHE_DIR defaulting to ~/.cache/aigc)."


def _check_common(n: int, batch_size: int, precision: str) -> None:
    from ..config import PRECISIONS
    from ..errors import UsageError

    from .sample import MAX_N

    if n < 2:
        raise UsageError(f"--n must be at least 2, got {n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    for option, value in (("--n", n), ("--batch-size", batch_size)):
        if value > MAX_N:  # torch fails past 2^63 with a traceback
            raise UsageError(f"{option} must be at most {MAX_N:,}, got {value:,}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got '{precision}'")


@handles_errors
@sigterm_interrupts
def evaluate(
    checkpoint: Optional[str] = typer.Argument(None, metavar="CHECKPOINT", help="Checkpoint file, run folder or exported generator (omit with --fake)."),
    data: Optional[str] = typer.Option(None, "--data", metavar="SOURCE", help="Real data source (default: the one it was trained on; required with --fake unless --ref is given)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", metavar="DIR", help="Folder holding torchvision datasets."),
    download: bool = typer.Option(False, "--download", metavar="", help="Allow downloading a missing torchvision dataset."),
    features: Optional[str] = typer.Option(None, "--features", metavar="RUN|FILE", help=FEATURES_HELP),
    metrics: Optional[str] = typer.Option(None, "--metrics", metavar="LIST", help=METRICS_HELP),
    n: int = typer.Option(10000, "--n", "-n", metavar="N", help="Generated images (and at most this many real ones)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", metavar="N", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", metavar="SEED", callback=seed_in_range, help="Seed for latents and the real subset."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", metavar="PRECISION", help="auto, bf16, fp16 or fp32 (auto: the generator in bf16 on a GPU that has it, the extractor in fp32)."),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", metavar="FILE", help=WEIGHTS_HELP),
    download_weights: bool = typer.Option(False, "--download-weights", metavar="", help="Download the pytorch-fid Inception weights into the cache first (checked against their sha256)."),
    stats_dir: Optional[str] = typer.Option(None, "--stats-dir", metavar="DIR", help=STATS_DIR_HELP),
    ref: Optional[str] = typer.Option(None, "--ref", metavar="FILE", help="Precomputed reference statistics (.npz from `aigc eval stats`, or pytorch-fid's with only mu and sigma: FID only) instead of real data."),
    fake: Optional[str] = typer.Option(None, "--fake", metavar="DIR|FILE", help="Score this folder of generated images (from any tool), or a .npz of them (arr_0 uint8 (N, H, W, C), as `aigc sample --npz` and guided-diffusion write it), instead of a checkpoint."),
    save_fakes: Optional[str] = typer.Option(None, "--save-fakes", metavar="DIR|FILE", help="Also write the generated images as PNGs into this folder, or into one .npz (a name ending in .npz: arr_0 uint8 (N, H, W, C), arr_1 the classes of a conditional model, as `aigc sample --npz`)."),
    no_ema: bool = typer.Option(False, "--no-ema", metavar="", help="Score the raw generator weights, not their EMA."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object with metrics and protocol."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help=QUIET_HELP),
) -> None:
    """Score a generative model: FID, KID, IS, precision/recall (VAE: also MSE, ELBO, bits/dim).

    `aigc eval stats --data SOURCE --out ref.npz` precomputes reference statistics for `--ref`."""
    from .. import checkpoint as ckpt_io
    from ..data.cache import max_bytes
    from ..errors import UsageError
    from ..metrics.evaluate import evaluate as run_eval
    from ..metrics.evaluate import evaluate_folder, parse_metrics
    from ..files import check_name_lengths, check_writable
    from ..image_npz import check_replaceable, is_npz
    from ..sampling import filling, pngs_in, warn_stale_pngs

    if checkpoint and fake:
        raise UsageError("give either a CHECKPOINT or --fake DIR, not both")
    if download_weights and not checkpoint and not fake:  # fetch only (the missing-weights error says to)
        from ..metrics.weights import ensure_weights, verified_weights

        path = ensure_weights(inception_weights, download=True)
        info = verified_weights(path)
        if json_out:
            emit_json({"inception_weights": str(path), "sha256": info.sha256, "verified": info.verified})
        else:
            human_console(False, quiet).print(f"Inception weights ready: {path} (SHA-256 {info.sha256[:12]}..., "
                                      + ("checked)" if info.verified else "NOT checked: test override)"))
        return
    if not checkpoint and not fake:
        raise UsageError("nothing to score: give a CHECKPOINT (or run folder), or --fake DIR with --data SOURCE")
    if fake and save_fakes:
        raise UsageError("--save-fakes applies to a checkpoint; --fake images are files already")
    if save_fakes:
        check_name_lengths(Path(save_fakes), "--save-fakes")  # before the checks below stat it
    npz_fakes = bool(save_fakes) and is_npz(save_fakes)
    if npz_fakes:
        if ref and Path(ref).expanduser().resolve() == Path(save_fakes).expanduser().resolve():
            raise UsageError(f"--save-fakes {save_fakes}: is the --ref file, which it would overwrite")
        check_writable(save_fakes, "--save-fakes")  # now, not after generating and scoring
        check_replaceable(save_fakes, "--save-fakes", images=True)
    elif save_fakes and Path(save_fakes).exists() and not Path(save_fakes).is_dir():
        raise UsageError(f"--save-fakes {save_fakes}: exists and is not a folder")
    if fake and no_ema:
        raise UsageError("--no-ema applies to a checkpoint; --fake images are files already")
    _check_common(n, batch_size, precision)
    max_bytes()  # a bad AIGC_CACHE_MAX_GB is said before any image is read, not at the cache write
    asked = parse_metrics(metrics)
    warn = warner(quiet)
    console = human_console(json_out, quiet)
    common = dict(features=features, n=n, batch_size=batch_size, seed=seed, device=device, precision=precision,
                  warn=warn, metrics=asked, inception_weights=inception_weights,
                  stats_dir=stats_dir or "default", ref=ref, download_weights=download_weights)
    if fake:
        with showing_progress(console, f"reading the images in {fake}"):
            result = evaluate_folder(fake, data=data, root=data_root, download=download, **common)
        title = f"{result['fake_folder']}"
        if ref and data:
            warn(f"--data {data} was not used: --ref {ref} supplies the real side")
        elif data and "n_real" not in result["protocol"]:
            names = [k for k in result["metrics"] if not k.endswith("_std")]
            warn(f"--data {data} was not used: {', '.join(names)} need{'s' if len(names) == 1 else ''} no real images")
    else:
        ck = ckpt_io.load(checkpoint, warn=warn)
        folder = None if npz_fakes else save_fakes
        before = pngs_in(folder)
        with (filling(folder, n, f"--save-fakes {save_fakes}", warn),
              showing_progress(console, "evaluating")):
            result = run_eval(ck, data=data or ck.config.data.source,
                              root=data_root or ck.config.data.root or None, download=download, ema=not no_ema,
                              save_fakes=save_fakes, **common)
        title = f"{result['checkpoint']} (step {result['step']})"
        if ref and data and "heldout_data" not in result["protocol"]:  # a VAE's held-out scores read --data
            warn(f"--data {data} was not used: --ref {ref} supplies the real side")
        if folder:
            warn_stale_pngs(before, n, f"--save-fakes {save_fakes}", warn)
    if json_out:
        emit_json(result)
        return
    stdout_is_result()
    p = result["protocol"]
    against = f" vs {p.get('real_data', p.get('reference', ''))}" if "reference" in p else ""
    counts = ([f"{p['n_fake']} generated"] if p.get("n_fake") else []) + (
        [f"{p['n_real']} real ({p['reference']})"] if "n_real" in p else []) + (
        [f"{p['n_heldout']} held-out" if p.get("heldout_split") == "test" else
         f"{p['n_heldout']} of its training images for the VAE scores"] if "n_heldout" in p else []) + (
        [f"features {p['extractor']}"] if "extractor" in p else [])
    console.print(f"{title}{against}" + (f": {', '.join(counts)}" if counts else ""))
    for k, v in result["metrics"].items():
        console.print(f"  {k:<10} {v:.6g}" if isinstance(v, float) else f"  {k:<10} n/a")
    check_result_written()


@handles_errors
@sigterm_interrupts
def stats(
    data: str = typer.Option(..., "--data", metavar="SOURCE", help="Real data source: a built-in name or a folder (images, IDX, CIFAR-10 binary)."),
    out: str = typer.Option(..., "--out", "-o", metavar="FILE", help="The .npz to write (mu, sigma, features, protocol); `aigc eval --ref` reads it."),
    n: int = typer.Option(10000, "--n", "-n", metavar="N", help="At most this many real images (a seeded subset)."),
    features: Optional[str] = typer.Option(None, "--features", metavar="RUN|FILE", help=FEATURES_HELP),
    inception_weights: Optional[str] = typer.Option(None, "--inception-weights", metavar="FILE", help=WEIGHTS_HELP),
    download_weights: bool = typer.Option(False, "--download-weights", metavar="", help="Download the pytorch-fid Inception weights into the cache first."),
    resolution: Optional[int] = typer.Option(None, "--resolution", metavar="PIXELS", min=4, max=4096, help="Conform the images to this square size first, as a model of that resolution sees them (default: their own size)."),
    channels: Optional[int] = typer.Option(None, "--channels", metavar="1|3", help="Conform the images to 1 (grey) or 3 (RGB) channels first (default: their own)."),
    split: str = typer.Option("train", "--split", metavar="train|test", help="Which split of --data: train, or the held-out test images (built-in, IDX and CIFAR-10 folders; an image folder has none)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", metavar="DIR", help="Folder holding torchvision datasets."),
    download: bool = typer.Option(False, "--download", metavar="", help="Allow downloading a missing torchvision dataset."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", metavar="N", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", metavar="SEED", callback=seed_in_range, help="Seed for the real subset."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", metavar="PRECISION", help="auto (fp32), bf16, fp16 or fp32 for the extractor."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object: the file written and its protocol."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help=QUIET_HELP),
) -> None:
    """Write reference statistics of real data (for `aigc eval --ref`)."""
    from ..errors import UsageError
    from ..metrics.evaluate import write_stats

    _check_common(n, batch_size, precision)
    if channels not in (None, 1, 3):
        raise UsageError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, got {split!r}")
    from ..data import has_test_split

    if split == "test" and not has_test_split(data):
        raise UsageError(f"--split test: {data} is an image folder, which has no held-out split (its images are "
                         "one set); leave --split out, or point --data at a folder of held-out images")
    console = human_console(json_out, quiet)
    with showing_progress(console, f"loading {data}"):
        result = write_stats(data, out, root=data_root, download=download, features=features, n=n,
                             batch_size=batch_size, seed=seed, device=device, precision=precision, warn=warner(quiet),
                             split=split, resolution=resolution, channels=channels,
                             inception_weights=inception_weights, download_weights=download_weights)
    if json_out:
        emit_json(result)
        return
    p = result["protocol"]
    console.print(f"wrote {result['out']}: {p['n_real']} images of {p['real_data']}, "
                  f"{result['feature_dim']} features from {p.get('extractor')}")
    for k in sorted(p):
        console.print(f"  {k}: {p[k]}")
