"""`aigc sample`: images from a checkpoint, run folder or exported generator."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .output import emit_json, handles_errors, human_console


def parse_classes(text: str | None) -> list[int] | None:
    from ..errors import UsageError

    if text is None:
        return None
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
        if not classes:
            raise ValueError
        return classes
    except ValueError:
        raise UsageError(f"--class expects a class number or a comma list such as 0,2,5, got {text!r}") from None


@handles_errors
def sample(
    checkpoint: str = typer.Argument(..., help="Checkpoint file, run folder (its newest checkpoint) or exported .safetensors."),
    n: int = typer.Option(64, "--n", "-n", help="Number of images."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Latent seed: the same seed gives the same images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Grid PNG path (default: samples.png, unless --individual is given)."),
    nrow: Optional[int] = typer.Option(None, "--nrow", help="Images per grid row (default: about sqrt(n))."),
    individual: Optional[Path] = typer.Option(None, "--individual", help="Also write one PNG per image into this folder."),
    classes: Optional[str] = typer.Option(None, "--class", help="Conditional models: a class or a comma list (e.g. 3 or 0,2,5); one class per grid row (default: all classes)."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Use the raw generator weights, not their EMA."),
    batch_size: int = typer.Option(512, "--batch-size", "-b", help="Images generated per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", "--precision", help="auto, bf16, fp16 or fp32."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the written paths."),
) -> None:
    """Generate images (VAE: decode prior samples) into a PNG grid and/or one PNG per image."""
    from .. import checkpoint as ckpt_io
    from ..errors import UsageError
    from ..sampling import class_labels, generate, generator_from, latents, save_grid, save_individual

    if n < 1 or batch_size < 1 or (nrow is not None and nrow < 1):
        raise UsageError("--n, --batch-size and --nrow must be positive")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise UsageError(f"--precision must be auto, bf16, fp16 or fp32, got '{precision}'")
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name ending in .png")
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: sample grids are PNG files; use a name ending in .png")
    if individual is not None and individual.exists() and not individual.is_dir():
        raise UsageError(f"--individual {individual}: exists and is not a folder")
    ck = ckpt_io.load(checkpoint)
    wanted = parse_classes(classes)
    G, amp = generator_from(ck, device, precision, ema=not no_ema)
    labels, per_row = class_labels(ck, wanted, n)
    n = len(labels) if labels is not None else n
    nrow = nrow or per_row
    console = human_console(json_out)
    with console.status(f"generating {n} images"):
        images = generate(G, latents(n, ck.config.model.latent_dim, seed), amp, batch_size, labels=labels)
    result = {"checkpoint": str(ck.path), "n": n, "seed": seed}
    if out is not None or individual is None:
        out = out or Path("samples.png")
        save_grid(images, out, nrow or max(1, round(math.sqrt(n))))
        result["grid"] = str(out)
    if individual is not None:
        save_individual(images, individual)
        result["individual"] = str(individual)
    if json_out:
        emit_json(result)
    else:
        console.print(f"wrote {n} images: " + ", ".join(str(result[k]) for k in ("grid", "individual") if k in result))
