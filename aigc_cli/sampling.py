"""Latents, batched generation and PNG output. Same seed -> same latents -> same images (the same bytes
on one machine at one batch size: kernels may round differently for another batch shape)."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image

from .checkpoint import Checkpoint, build_net
from .errors import UsageError
from .files import atomic_write, check_name_lengths, remove_dead_temps_in, remove_empty, write_refused
from .models import FAMILIES
from .training.ema import EMA_NORMS_KEY, NORM_STATS_IMAGES, settle_norm_stats
from .training.precision import Precision, resolve_device, resolve_precision, slow_precision_note


def latents(n: int, dim: int, seed: int) -> torch.Tensor:
    """Drawn on the CPU from their own generator, so they do not depend on the device or global RNG.
    Row k is the same for any n > k: torch's CPU normal_ draws blocks of 16 values and a count that
    is not a multiple of 16 draws its last values another way, so a multiple of 16 is drawn and the
    rest dropped (`--n 1` and `--n 40` begin with the same image)."""
    return _normal_rows(n, dim, torch.Generator().manual_seed(seed))


def _normal_rows(k: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """k rows of standard normal values: a whole number of torch's 16-value blocks, the rest dropped."""
    return torch.randn(-(-k * dim // 16) * 16, generator=g)[:k * dim].view(k, dim)


def latent_batches(n: int, dim: int, seed: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The rows of latents(n, dim, seed), the same values, at most `batch_size` rows at a time (or the
    few rows that make 16 values), so that n need not fit in memory at once: pieces of a multiple of
    16 values draw exactly what one call would (tests/test_sampling.py checks all this)."""
    g = torch.Generator().manual_seed(seed)
    unit = 16 // math.gcd(dim, 16)  # the fewest rows that hold a multiple of 16 values
    rows = max(unit, batch_size // unit * unit)
    done = 0
    while done < n:
        k = min(rows, n - done)  # only the last piece can hold a count of values that is no multiple of 16
        yield _normal_rows(k, dim, g)
        done += k


def truncate(z: torch.Tensor, threshold: float) -> torch.Tensor:
    """The truncation trick (BigGAN): each value drawn from a standard normal truncated to
    [-threshold, threshold]. Made by mapping each value's normal quantile into the truncated range
    rather than by redrawing the values outside it, so that a value depends on nothing but the one
    drawn (the same for any batch size), and a smaller threshold moves each image smoothly towards
    the typical ones."""
    lo = torch.special.ndtr(torch.tensor(-threshold, dtype=torch.float64))
    u = torch.special.ndtr(z.double())
    return torch.special.ndtri(lo + u * (1 - 2 * lo)).clamp_(-threshold, threshold).to(z.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int | torch.Tensor) -> torch.Tensor:
    """Points from each row of `a` to the same row of `b` along the great circle, at `steps` even
    fractions from 0 to 1 (or at the given fractions): rows (len(a) * steps, dim), walk by walk.
    Gaussian latents keep their typical norm along it, where a straight line passes through the
    rarely drawn middle (washed-out images halfway)."""
    t = fractions(0, steps, steps) if isinstance(steps, int) else steps.double()
    t = t.view(1, -1, 1)
    a64, b64 = a.double().unsqueeze(1), b.double().unsqueeze(1)
    cos = torch.nn.functional.cosine_similarity(a64, b64, dim=-1).clamp(-1, 1).unsqueeze(-1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    near = sin.abs() < 1e-6  # (anti)parallel: the straight line is as good
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / torch.where(near, 1, sin))
    wb = torch.where(near, t, torch.sin(t * omega) / torch.where(near, 1, sin))
    return (wa * a64 + wb * b64).reshape(-1, a.shape[1]).to(a.dtype)


def fractions(start: int, stop: int, steps: int) -> torch.Tensor:
    """Points start..stop-1 of a walk of `steps` as fractions of the way, computed the same way for any
    piece of it (a walk longer than a batch is made piece by piece, never whole)."""
    return torch.arange(start, stop, dtype=torch.float64) / (steps - 1)


def sample_latents(n: int, dim: int, seed: int, batch_size: int, truncation: float | None = None,
                   walk: int | None = None) -> Iterator[torch.Tensor]:
    """The latents `aigc sample` generates from, at most about `batch_size` rows at a time. walk=K:
    n // K walks of K images each, walk w from latent 2w to latent 2w + 1 of the seed's draw (image
    2w and 2w + 1 without walks); a walk longer than the batch comes in pieces. truncation: see
    truncate; with walks, of their ends."""
    draws = (truncate(z, truncation) if truncation else z for z in latent_batches(
        n if not walk else 2 * (n // walk), dim, seed, batch_size if not walk else max(2, batch_size // walk * 2)))
    if not walk:
        yield from draws
        return
    group = max(1, batch_size // walk)  # whole walks a piece, where they fit
    ends = torch.empty(0, dim)
    for z in draws:
        ends = torch.cat([ends, z])
        while len(ends) >= 2 * group:
            yield from _walk_pieces(ends[0:2 * group:2], ends[1:2 * group:2], walk, batch_size)
            ends = ends[2 * group:]
    if len(ends):
        yield from _walk_pieces(ends[0::2], ends[1::2], walk, batch_size)


def _walk_pieces(a: torch.Tensor, b: torch.Tensor, steps: int, batch_size: int) -> Iterator[torch.Tensor]:
    if len(a) * steps <= batch_size:
        yield slerp(a, b, steps)
    else:  # one walk longer than a batch
        for start in range(0, steps, batch_size):
            yield slerp(a, b, fractions(start, min(steps, start + batch_size), steps))


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the models' pixel scale (to_uint8 is the inverse)."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


@torch.inference_mode()
def generate(G: torch.nn.Module, z: torch.Tensor, amp: Precision, batch_size: int = 512,
             labels: torch.Tensor | None = None, to_cpu: bool = True) -> torch.Tensor:
    """uint8 images (N, C, H, W) on the CPU (to_cpu=False: on G's device), generated in batches under
    autocast; `labels` (N,) for a conditional generator."""
    device = next(G.parameters()).device
    out = []
    for i, chunk in enumerate(z.split(batch_size)):
        y = None if labels is None else labels[i * batch_size:(i + 1) * batch_size].to(device)
        with amp.autocast():
            img = to_uint8(G(chunk.to(device), y))
        out.append(img.cpu() if to_cpu else img)
    return torch.cat(out)


def class_labels(ckpt: Checkpoint, classes: list[int] | None, n: int) -> tuple[torch.Tensor | None, int | None]:
    """For about `n` images of a conditional model: the classes drawn, one per grid row, and how many
    images of each (the row length). classes None: every class. An unconditional model takes none."""
    m = ckpt.config.model
    if not m.conditional:
        if classes:
            raise UsageError(f"{ckpt.path}: --class needs a class-conditional model; this {m.kind} is unconditional")
        return None, None
    classes = classes if classes else list(range(m.num_classes))
    bad = [c for c in classes if not 0 <= c < m.num_classes]
    if bad:
        listed = f" ({ckpt.numbered_classes()})" if 0 < len(ckpt.class_names) <= 20 else ""
        raise UsageError(f"--class {bad[0]}: this model has classes 0..{m.num_classes - 1}{listed}")
    # Image i is of class classes[i // per_class]: labels are made batch by batch, so any n fits in memory.
    return torch.tensor(classes), max(1, n // len(classes))


def save_png(img: torch.Tensor, path: str | os.PathLike, sweep: bool = True) -> None:
    """A uint8 (C, H, W) tensor to a PNG, written to a temporary name then renamed (sweep: see
    files.atomic_write; not for --individual, where each sweep would list a folder of thousands)."""
    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr, mode="L" if arr.shape[2] == 1 else "RGB")
    # Not fsynced: a grid is cheap to make again, and --individual writes thousands of files.
    with atomic_write(path, ".png", durable=False, sweep=sweep) as tmp:
        pil.save(tmp, format="PNG")


# A grid is one PNG held whole in memory: 2**28 pixels (16k x 16k) is already more than image viewers
# open comfortably; more images than that go one file each (--individual).
GRID_MAX_PIXELS = 1 << 28


def check_grid_size(n: int, nrow: int, resolution: int) -> None:
    cell = resolution + 2  # make_grid's padding
    w, h = min(n, nrow) * cell + 2, -(-n // nrow) * cell + 2
    if w * h > GRID_MAX_PIXELS:
        raise UsageError(f"--n {n}: a grid of {n} images would be {w}x{h} pixels; write them one PNG each "
                         "with --individual DIR (and no --out)")


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """uint8 (N, C, H, W) -> one (C, rows*(H+p)+p, cols*(W+p)+p) image on black, as torchvision's
    make_grid lays it out (written here: importing torchvision costs every `aigc sample` 2 s)."""
    n, c, h, w = images.shape
    if n == 1:  # torchvision returns a lone image as it is, unpadded
        return images[0]
    cols = min(n, nrow)
    rows = -(-n // cols)
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding, dtype=images.dtype)
    for i in range(n):
        r, k = divmod(i, cols)
        top, left = r * (h + padding) + padding, k * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    save_png(make_grid(images, max(1, nrow)), path)


def png_name(k: int, n: int) -> str:
    """The name of image k of n written one PNG per image: 000000.png ..., with more digits past a million
    (0000000.png ... 1000000.png), so that sorted by name (as --fake and --data list a folder) they are in order."""
    return f"{k:0{max(6, len(str(n - 1)))}d}.png"


def save_individual(batches: Iterable[torch.Tensor], folder: str | os.PathLike, n: int,
                    workers: int | None = None) -> int:
    """One PNG per image (png_name: 000000.png, 000001.png, ...) of n, from batches of uint8 images, encoded on a
    thread pool: PIL's zlib compression releases the GIL, so encoding scales with the cores and runs
    while the next batch is generated. At most two batches wait, which bounds memory for any n.
    Returns the number written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count, waiting = 0, deque()
    pool = ThreadPoolExecutor(max_workers=workers or min(32, os.cpu_count() or 1))
    try:
        for images in batches:
            waiting.append([pool.submit(save_png, img, folder / png_name(count + i, n), False) for i, img in enumerate(images)])
            count += len(images)
            while len(waiting) > 2:
                for f in waiting.popleft():
                    f.result()  # re-raises the first error
        for fs in waiting:
            for f in fs:
                f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return count


def pngs_in(folder: str | os.PathLike | None) -> set[str]:
    """Names of the PNG files in `folder` (none when it is None or not there yet)."""
    try:
        # hidden names are writers' temporary files (swept, or live), not images: --fake skips them too
        return ({e.name for e in os.scandir(folder) if e.name.endswith(".png") and not e.name.startswith(".")}
                if folder is not None else set())
    except OSError:
        return set()


@contextlib.contextmanager
def filling(folder: str | os.PathLike | None, n: int, what: str, warn) -> Iterator[None]:
    """Around a command that writes n PNGs (000000.png ...) into `folder` (nothing when None): the folder is
    made and checked writable before any work. If the command fails after writing some but not all of
    them (a signal, a full disk), a warning says the folder holds an incomplete set, which a later `aigc
    eval --fake` would score as if it were whole; folders it made (parents too) and left empty are removed."""
    if folder is None:
        yield
        return
    folder = Path(folder)
    check_name_lengths(folder, what)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first: removed in that order
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{what}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        why = write_refused(folder)
    except OSError as e:
        why = (e.strerror or str(e)).lower()
    if why is not None:
        remove_empty(made)
        raise UsageError(f"{what}: cannot create files there ({why})")
    # What killed writers (kill -9, the OOM killer) left of their PNGs: hidden files that tools globbing
    # *.png would take for images. Swept once here; each PNG is then written without a sweep of its own.
    remove_dead_temps_in(folder, r"\.[0-9]{6,}\.png\.", ".png")
    start = time.time_ns() - 1_000_000_000  # a second of slack for coarse file-system timestamps
    try:
        yield
    except BaseException:
        written = _written_since(folder, start)
        if 0 < written < n:
            warn(f"{what}: stopped after {written} of the {n} images were written; the folder holds an incomplete set")
        remove_empty(made)  # the folders it made, while they are empty (a parent made for nothing too)
        raise


def _written_since(folder: Path, start_ns: int) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.name.endswith(".png") and e.name[:-4].isdigit()
                   and e.stat().st_mtime_ns >= start_ns)
    except OSError:
        return 0


def warn_stale_pngs(before: set[str], n: int, what: str, warn) -> None:
    """After writing 000000.png ... for n images: say if the folder also holds PNGs from before
    (an earlier, larger run), which a later `aigc eval --fake DIR` would score too."""
    stale = [name for name in before if not (name[:-4].isdigit() and int(name[:-4]) < n
                                             and name == png_name(int(name[:-4]), n))]
    if stale:
        warn(f"{what}: also holds {len(stale)} PNG file{'s' if len(stale) > 1 else ''} this command did not "
             "write (from an earlier run?)")


def check_generates(ckpt: Checkpoint) -> None:
    family = FAMILIES[ckpt.config.model.kind]
    if not family.generative:
        raise UsageError(f"{ckpt.path}: holds a {family.name}, which does not generate images")


def generator_from(ckpt: Checkpoint, device: str = "auto", precision: str = "auto", ema: bool = True, warn=None):
    """Rebuild the generator (a VAE's decoder) from the config stored in the checkpoint; its EMA
    weights when it has them (unless ema=False). `warn` hears of a precision that is slow there."""
    check_generates(ckpt)
    dev = resolve_device(device)
    source, label = ckpt.generator_weights(ema)
    G = build_net(ckpt, "G", source)
    G.to(dev).eval()
    amp = Precision(resolve_precision(precision, dev), dev)
    if warn is not None and (slow := slow_precision_note(amp.name, dev)):
        warn(slow)
    if copied_norms(ckpt, label) and settle_norm_stats(G, ckpt.config, amp.autocast()) and warn is not None:
        warn(f"measured the EMA generator's batch-norm statistics on {NORM_STATS_IMAGES:,} images: "
             f"{ckpt.step_file.name} holds the live G's (saved for a signal or by time, or by aigc before 2026-11-30)")
    return G, amp


def copied_norms(ckpt: Checkpoint, label: str) -> bool:
    """Whether the EMA generator in this file has the live G's batch-norm statistics, not its own: training
    measures them at its regular saves, not at one a signal asks for (nor did aigc before 2026-11-30)."""
    return label == "G_ema" and ckpt.meta.get(EMA_NORMS_KEY) != "settled"
