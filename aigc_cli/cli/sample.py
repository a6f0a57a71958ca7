"""`aigc sample`: images from a checkpoint, run folder or exported generator."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Optional

import typer

from .output import QUIET_HELP, emit_json, handles_errors, human_console, seed_in_range, showing_progress, sigterm_interrupts, warner


MAX_N = 10**9


def parse_classes(text: str | None, names: list[str], warn=lambda message: None) -> list[int] | None:
    """--class: numbers as training numbered the classes, or their names (the training data's class
    folders, shapes' kinds), mixed in one comma list. A number is a number even where a class folder
    has that name (folders 1..10 number 0..9); the warning says so. A name with a comma or spaces at
    its ends is matched exactly, as the whole value or as one item."""
    from ..checkpoint import CLASS_NUMBER, class_shown
    from ..errors import UsageError

    if text is None:
        return None
    if text in names and not CLASS_NUMBER.fullmatch(text.strip()):
        return [names.index(text)]
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise UsageError(f"--class expects a class number or name, or a comma list such as 0,2,5, got {text!r}")
    if len(items) < len(text.split(",")):  # `0,,2` or `0,2,`: a class left out by a typo more often than a wish
        raise UsageError(f"--class {class_shown(text)}: an empty item in the comma list; give a class number or "
                         "name between each two commas")
    out = []
    for item in items:
        t = item.strip()
        if CLASS_NUMBER.fullmatch(t):
            out.append(int(t))
            if t in names and names.index(t) != int(t):
                warn(f"--class {t} is class number {t}" + (f" ({names[int(t)]!r})" if 0 <= int(t) < len(names) else "")
                     + f"; the class named {t!r} is number {names.index(t)}")
        elif item in names or t in names:
            out.append(names.index(item if item in names else t))
        else:
            folded = [i for i, name in enumerate(names) if name.strip().casefold() == t.casefold()]
            if len(folded) > 1:
                raise UsageError(f"--class {class_shown(t)}: matches the classes " + " and ".join(class_shown(names[i]) for i in folded)
                                 + " but for case; give one exactly, or its number")
            if not folded:
                known = f"this model's classes are {', '.join(map(class_shown, names))}" if names else "this model has no class names"
                raise UsageError(f"--class {class_shown(t)}: not a class number or name ({known})")
            out.append(folded[0])
    return out


@handles_errors
@sigterm_interrupts
def sample(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint file, run folder (its newest checkpoint) or exported .safetensors."),
    n: int = typer.Option(64, "--n", "-n", metavar="N", help="Number of images (at most 10^9; a grid holds far fewer, --individual any)."),
    seed: int = typer.Option(0, "--seed", metavar="SEED", callback=seed_in_range, help="Latent seed: the same seed gives the same images."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="FILE", help="Grid PNG path (default: samples.png, unless --individual is given)."),
    nrow: Optional[int] = typer.Option(None, "--nrow", metavar="N", help="Images per grid row (default: one class per row for two or more classes, else sqrt(n) rounded up)."),
    individual: Optional[Path] = typer.Option(None, "--individual", metavar="DIR", help="Write one PNG per image into this folder (with --out, the grid too)."),
    npz: Optional[Path] = typer.Option(None, "--npz", metavar="FILE", help="Write every image into one .npz file instead (with --out, the grid too): arr_0 uint8 (N, H, W, C), arr_1 the class labels of a conditional model, as guided-diffusion's and StyleGAN's evaluation scripts read them; `aigc eval --fake` reads it too."),
    classes: Optional[str] = typer.Option(None, "--class", metavar="CLASSES", help="Conditional models: a class number or name, or a comma list (e.g. 3, dogs or 0,2,5); one class per grid row (default: all classes; `aigc info` lists them)."),
    truncation: Optional[float] = typer.Option(None, "--truncation", metavar="T", help="Truncation trick: each latent value drawn from a normal cut to [-T, T]; a smaller T (0.5 to 1, say) gives more typical, less varied images (default: no truncation; with --interpolate, of the walks' ends)."),
    interpolate: Optional[int] = typer.Option(None, "--interpolate", metavar="STEPS", help="Latent walks: each grid row goes in this many steps from one latent to another (spherical interpolation); --n is rounded to whole rows."),
    no_ema: bool = typer.Option(False, "--no-ema", metavar="", help="Use the raw generator weights, not their EMA."),
    batch_size: int = typer.Option(512, "--batch-size", "-b", metavar="N", help="Images generated per forward pass (latents are drawn in whole pieces of up to 16 rows, so each image's latent is the same at any batch size)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
    precision: str = typer.Option("auto", "--precision", metavar="PRECISION", help="auto, bf16, fp16 or fp32."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object with the written paths."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help=QUIET_HELP),
) -> None:
    """Generate images (VAE: decode prior samples) into a PNG grid, one PNG per image, and/or one .npz array."""
    import torch

    from .. import checkpoint as ckpt_io
    from ..config import PRECISIONS
    from ..errors import UsageError
    from ..errors import one_line
    from .. import progress
    from ..image_npz import image_npz_writer
    from ..sampling import (check_generates, check_grid_size, class_labels, generate, generator_from,
                            pngs_in, filling, sample_latents, save_grid, save_individual, warn_stale_pngs)

    for option, value in (("--n", n), ("--batch-size", batch_size), ("--nrow", nrow)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be positive, got {value}")
    if truncation is not None and not 0 < truncation < math.inf:
        raise UsageError(f"--truncation must be a positive number (0.5 to 1 is usual), got {truncation}")
    if interpolate is not None and not 2 <= interpolate <= MAX_N:
        raise UsageError(f"--interpolate must be at least 2 (the steps of a walk, both ends included) and at most "
                         f"{MAX_N:,}, got {interpolate}")
    if n > MAX_N:
        raise UsageError(f"--n must be at most {MAX_N:,} (run again with another --seed for more)")
    if batch_size > MAX_N:  # torch cannot even split by a size past 2^63 (a traceback)
        raise UsageError(f"--batch-size must be at most {MAX_N:,}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be {', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}, got '{precision}'")
    from ..files import check_name_lengths, check_writable

    for path, option in ((out, "--out"), (npz, "--npz"), (individual, "--individual")):
        if path is not None:
            check_name_lengths(path, option)  # before the checks below stat it
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name ending in .png")
    if out is not None and out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: sample grids are PNG files; use a name ending in .png")
    if individual is not None and individual.exists() and not individual.is_dir():
        raise UsageError(f"--individual {individual}: exists and is not a folder")
    if npz is not None and npz.suffix.lower() != ".npz":
        raise UsageError(f"--npz {npz}: use a file name ending in .npz")
    for path, option in ((out, "--out"), (npz, "--npz")):
        if path is not None:
            check_writable(path, option)  # now, not after generating every image
    if npz is not None:
        from ..image_npz import check_replaceable

        check_replaceable(npz, "--npz", images=True)
    if out is not None and individual is not None and individual.resolve() in out.resolve().parents:
        raise UsageError(f"--out {out}: is inside the --individual folder, where it would be taken for one more "
                         "sample (by `aigc eval --fake`, say); write the grid elsewhere")
    warn = warner(quiet)
    ck = ckpt_io.load(checkpoint, warn=warn)
    check_generates(ck)
    if classes is not None and not ck.config.model.conditional:
        raise UsageError(f"{ck.path}: --class needs a class-conditional model; this {ck.config.model.kind} is unconditional")
    wanted = parse_classes(classes, ck.class_names, warn)
    drawn, per_row = class_labels(ck, wanted, n)
    if interpolate:  # one walk a row; a conditional model's rows take the classes in turn
        walks = max(1, n // interpolate)
        if walks * interpolate != n:
            warn(f"--n {n} with --interpolate {interpolate}: {walks} walk{'s' * (walks != 1)} of {interpolate} "
                 f"images, {walks * interpolate} in all")
        asked, n, per_row = n, walks * interpolate, interpolate
        if drawn is not None and walks < len(drawn):
            warn(f"--interpolate {interpolate} with --n {asked}: {walks} walk{'s' * (walks != 1)}, so the first "
                 f"{walks} of the {len(drawn)} classes only; --n {len(drawn) * interpolate} gives one walk per class")
    elif drawn is not None and len(drawn) * per_row != n:
        warn(f"--n {n} with {len(drawn)} class{'es' * (len(drawn) != 1)}: {per_row} image{'s' if per_row > 1 else ''} "
             f"per class, {len(drawn) * per_row} in all")
        n = len(drawn) * per_row
    write_grid = out is not None or (individual is None and npz is None)
    if write_grid:
        out = out or Path("samples.png")
        one_class = drawn is not None and len(drawn) == 1 and not interpolate  # a row of 64 would be a strip
        nrow = nrow or (None if one_class else per_row) or math.ceil(math.sqrt(n))
        check_grid_size(n, nrow, ck.config.model.resolution)
    G, amp = generator_from(ck, device, precision, ema=not no_ema, warn=warn)
    dim = ck.config.model.latent_dim

    def labels(start: int, stop: int) -> torch.Tensor:  # image k of row k // per_row, rows taking the classes in turn
        return drawn[torch.arange(start, stop) // per_row % len(drawn)]

    def batches():  # for any n: never more than a few batches of latents or images in memory
        start = 0
        for z in sample_latents(n, dim, seed, batch_size, truncation, interpolate):
            y = None if drawn is None else labels(start, start + len(z))
            start += len(z)
            images = generate(G, z, amp, max(batch_size, len(z)), labels=y)  # one forward pass a piece
            progress.advance(len(images))
            yield images

    console = human_console(json_out, quiet)
    result = {"checkpoint": str(ck.step_file), "n": n, "seed": seed, "truncation": truncation, "interpolate": interpolate}
    before = pngs_in(individual)
    with contextlib.ExitStack() as stack:
        stack.enter_context(filling(individual, n, f"--individual {individual}", warn))
        stack.enter_context(showing_progress(console, "generating"))
        progress.phase("generating", n)
        add_to_npz = None if npz is None else stack.enter_context(
            image_npz_writer(npz, n, labels if drawn is not None else None))
        pieces = batches()
        if write_grid:
            pieces = [torch.cat(list(pieces))]
            save_grid(pieces[0], out, nrow)
            result["grid"] = str(out)
        if add_to_npz is not None:
            pieces = _passing(pieces, add_to_npz)
            result["npz"] = str(npz)
        if individual is not None:
            save_individual(pieces, individual, n)
            result["individual"] = str(individual)
        elif add_to_npz is not None:
            for _ in pieces:
                pass
    warn_stale_pngs(before, n, f"--individual {individual}", warn)
    if json_out:
        emit_json(result)
    else:
        console.print(one_line(f"wrote {n} image{'s' * (n != 1)}: "
                               + ", ".join(str(result[k]) for k in ("grid", "individual", "npz") if k in result)))


def _passing(pieces, add):
    """The batches as they are, each handed to `add` on the way (written once, to every output)."""
    for images in pieces:
        add(images)
        yield images
