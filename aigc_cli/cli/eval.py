"""`aigc eval`: FID and KID against real data in a domain classifier's feature space (+ VAE scores)."""

from __future__ import annotations

from typing import Optional

import typer

from .output import emit_json, handles_errors, human_console, warn


@handles_errors
def evaluate(
    checkpoint: str = typer.Argument(..., help="Checkpoint file, run folder or exported generator."),
    data: Optional[str] = typer.Option(None, "--data", help="Real data source (default: the one it was trained on)."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder holding torchvision datasets."),
    download: bool = typer.Option(False, "--download", help="Allow downloading a missing torchvision dataset."),
    features: Optional[str] = typer.Option(None, "--features", help="Classifier checkpoint (or run folder) whose penultimate layer gives the features; required for now."),
    n: int = typer.Option(10000, "--n", "-n", help="Generated images (and at most this many real ones)."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for latents and the real subset."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto, bf16, fp16 or fp32."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Score the raw generator weights, not their EMA."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with metrics and protocol."),
) -> None:
    """Score a generative model: Fréchet distance and KID (VAE: also reconstruction MSE and negative ELBO)."""
    from .. import checkpoint as ckpt_io
    from ..errors import UsageError
    from ..metrics.evaluate import evaluate as run_eval

    if n < 2 or batch_size < 1:
        raise UsageError("--n must be at least 2 and --batch-size positive")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16, fp16 or fp32, got '{precision}'")
    ck = ckpt_io.load(checkpoint)
    console = human_console(json_out)
    with console.status(f"evaluating: generating {n} images and embedding them with real ones"):
        result = run_eval(ck, data=data or ck.config.data.source, root=data_root or ck.config.data.root or None,
                          download=download, features=features, n=n, batch_size=batch_size, seed=seed,
                          device=device, precision=precision, warn=warn, ema=not no_ema)
    if json_out:
        emit_json(result)
        return
    p = result["protocol"]
    console.print(f"{result['checkpoint']} (step {result['step']}) vs {p['real_data']}: "
                  f"{p['n_fake']} generated, {p['n_real']} real, features {p['extractor']}")
    for k, v in result["metrics"].items():
        if isinstance(v, float):
            console.print(f"  {k:<10} {v:.6g}")
