"""Images from a folder of files (png/jpg/jpeg/jpe/jfif/webp/bmp/gif), searched recursively.

Files come from users and the internet, so each one is treated as hostile: it is decoded in
isolation and either gives a correct image or is rejected with a one-line reason. Rejected files
are skipped with one warning each (or stop the load with `strict`). In particular:
  * only PNG, JPEG (and its MPO variant), WebP, BMP and GIF decoders are ever run, whatever the
    extension says, so no other PIL plugin (e.g. EPS, which starts Ghostscript) sees our files;
  * an image declaring more than MAX_IMAGE_PIXELS pixels is rejected from its header, before
    any pixel memory is allocated (a "decompression bomb": a tiny file that inflates to GBs);
  * truncated files are errors (PIL's LOAD_TRUNCATED_IMAGES is never turned on);
  * only the first frame of an animated GIF/PNG/WebP is used.
Nothing here changes PIL's settings or toggles warning filters, so decoding in threads is safe. One
filter is set once, at import: PIL's DecompressionBombWarning (images between its two limits) would
print two raw lines before this module's own one-line note rejects the same file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from aigc_cli.errors import UsageError, counted, one_line

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif")
# Image files aigc does not read: ones PIL needs plug-ins for (HEIC, AVIF, JPEG XL), has no reader for (raw
# camera files, EXR, SVG), or reads in modes no conversion here is tested for (TIFF's float and 32-bit ones).
# Said in a warning, where other files (.txt, .json) are left out silently.
UNREAD_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".nef", ".arw", ".exr",
                     ".hdr", ".svg")
# PIL format names we let decode a file (content decides, not the extension: a JPEG saved as
# .png is common and fine). "JPEG" also covers MPO, the JPEG variant some cameras write.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
# The largest image accepted, in pixels: PIL's own default limit (about 89.5 megapixels, a
# 9459 x 9459 image, ~270 MB as RGB). Checked on the header, before decoding anything.
MAX_IMAGE_PIXELS = 89_478_485
_BATCH = 1024            # files decoded per round, so `limit` stops early on huge folders


class RejectedImage(Exception):
    """A file that is not a usable image; the message is the one-line reason."""


def list_images(folder: str, problems: list[tuple[str, str | None]] | None = None) -> list[str]:
    """Sorted relative paths of image files under `folder`, skipping hidden files and folders
    (e.g. macOS "._x.jpg" resource forks, which look like images but are not). Links to folders are
    followed (class folders linked in from elsewhere are a common layout), each folder once, so a link
    loop ends. The whole real tree is walked first, in name order, then the links found in it, in the order
    found (each one's tree in name order): a folder keeps its real path (and its class) whatever links point
    into it, and which path a folder reached only through links keeps does not depend on the file system. What cannot be used goes into `problems` as (warning, error under --strict or None): a
    subfolder that cannot be read (an error: a class must not vanish unseen), files of image types aigc
    does not read (an error: images must not vanish unseen either) or a folder reached again (no error).
    The folder itself unreadable is a UsageError."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()

    def unreadable(e: OSError) -> None:
        if os.path.abspath(e.filename) == os.path.abspath(folder):
            raise UsageError(f"cannot read the image folder {one_line(folder)}: {e.strerror}")
        if problems is not None:
            what = f"folder {one_line(os.path.relpath(e.filename, folder))}/: {e.strerror}"
            problems.append((f"skipping {what}", f"cannot use {what}"))

    links: list[str] = []

    def walk(top: str, follow: bool) -> None:
        for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable, followlinks=follow):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                if problems is not None:
                    problems.append((f"skipping folder {one_line(os.path.relpath(dirpath, folder))}/: the same folder "
                                     "as one listed already (through a link)", None))
                continue
            seen.add((st.st_dev, st.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not follow:  # links wait until the whole real tree is listed
                links.extend(os.path.join(dirpath, d) for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            for name in filenames:
                if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                    found.append(os.path.relpath(os.path.join(dirpath, name), folder))
                elif not name.startswith(".") and name.lower().endswith(UNREAD_EXTENSIONS):
                    unread.append(os.path.relpath(os.path.join(dirpath, name), folder))

    unread: list[str] = []
    walk(folder, follow=False)
    for link in links:
        walk(link, follow=True)
    if unread and problems is not None:
        types = sorted({os.path.splitext(rel)[1].lower() for rel in unread})
        first = min(unread)
        problems.append((f"left out {counted(len(unread), 'file')} of {'types' if len(types) > 1 else 'a type'} aigc does "
                         f"not read ({', '.join(types)}); convert {'them' if len(unread) > 1 else 'it'} to PNG or JPEG",
                         f"cannot use image file {one_line(first)}: aigc does not read "
                         f"{os.path.splitext(first)[1]} files; convert them to PNG or JPEG"))
    return sorted(found)


def refuse_run_folder(path: str, what: str) -> None:
    """An aigc run folder given as images (`eval --data runs/x`, `--fake runs/x`) would be read as its sample
    grids: a UsageError instead, naming the option that takes a run folder."""
    checkpoints = os.path.join(path, "checkpoints")
    if os.path.isfile(os.path.join(path, "config.toml")) and os.path.isdir(checkpoints) and any(
            name.endswith(".safetensors") for name in os.listdir(checkpoints)):
        raise UsageError(f"{what} {one_line(path)}: is an aigc run folder, whose images are sample grids, not a "
                         "data set; to score the run, give the folder as `aigc eval`'s CHECKPOINT")


def skipped_summary(skipped: int, examined: int, folder: str) -> str:
    """The line that ends a folder's per-file skip warnings (training's and evaluation's readers)."""
    return f"skipped {skipped} of {examined} files under {one_line(folder)} (unreadable or not images)"


def report_listing(problems: list[tuple[str, str | None]], warn: Callable[[str], None], strict: bool) -> None:
    """What list_images could not use: one warning each; with strict, the first that has an error is it."""
    errors = [error for _, error in problems if error is not None]
    if errors and strict:
        raise UsageError(errors[0])
    for text, _ in problems:
        warn(text)


def pixel_limit() -> int:
    """MAX_IMAGE_PIXELS, or PIL's limit if someone lowered it: any image PIL would warn about
    as a possible decompression bomb is rejected too (without touching warning filters)."""
    pil = Image.MAX_IMAGE_PIXELS
    return min(MAX_IMAGE_PIXELS, pil) if pil else MAX_IMAGE_PIXELS


def _check_size(width: int, height: int) -> None:
    limit = pixel_limit()
    if width * height > limit:
        raise RejectedImage(f"declares {width}x{height} = {width * height} pixels, over the limit of "
                            f"{limit} (possible decompression bomb); not decoded")


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header. PIL's WebP reader allocates the canvas while opening the
    file, so the size is checked here first; other formats allocate only in load()."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(head[26:28], "little") & 0x3FFF,
                int.from_bytes(head[28:30], "little") & 0x3FFF)
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; transparency is composited on black, 16-bit is scaled down."""
    if img.mode in ("P", "L", "RGB", "1") and img.info.get("transparency") is not None:
        img = img.convert("RGBA")  # palette alpha, or a tRNS "this colour is transparent" key
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (0, 0, 0))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode.startswith("I") or img.mode == "F":
        # 16/32-bit grey: PIL's own convert clips at 255 (nearly all white), so rescale instead.
        # Integer modes are taken as 16-bit (what PNG stores); floats as 0..1 if they fit.
        arr = np.asarray(img)
        if img.mode == "F":
            arr = np.nan_to_num(arr.astype(np.float32, copy=False))
            scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
            grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        else:  # v * 255 / 65535 rounded, in integers (4 bytes a pixel, not a float64 copy)
            grey = ((np.clip(arr, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            key = img.info.get("transparency")
            if isinstance(key, int):  # a 16-bit grey PNG's tRNS key: that value is transparent, so black
                grey[arr == key] = 0
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, HSV, RGB


@contextlib.contextmanager
def open_image(path: str) -> Iterator[Image.Image]:
    """A PIL image of a file, header read only, with the safeguards every reader here shares: a regular
    file (a FIFO would block open() for good), not empty, an allowed format, and the pixel limit checked
    from the header (WebP's before PIL allocates its canvas). Raises RejectedImage or PIL's errors."""
    # O_NONBLOCK: a file swapped for a FIFO since it was listed must not block the open either.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RejectedImage("not a regular file")
        if st.st_size == 0:
            raise RejectedImage("empty file (0 bytes)")
        size = _webp_size(f.read(30))
        if size is not None:
            _check_size(*size)
        f.seek(0)
        # Image.open reads only the header. It raises DecompressionBombError itself above twice
        # PIL's limit; between the limits it would only warn, so the size is checked here, with
        # our own limit, before load() allocates anything.
        with Image.open(f, formats=FORMATS) as img:  # first frame of animations
            _check_size(*img.size)
            yield img


def decode(path: str, resolution: int) -> np.ndarray:
    """One file as (resolution, resolution, 3) uint8: shorter side scaled, centre-cropped.

    Raises RejectedImage (or whatever PIL raises) when the file is not a usable image.
    """
    with open_image(path) as img:
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft keeps it >= the target size.
        img.draft("RGB", (resolution, resolution))
        img.load()
        _check_size(*img.size)  # a GIF frame may extend the canvas while loading
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - unreadable EXIF: keep the pixels as stored
            pass
        img = to_rgb(img)
        # fit() crops the centre to a square first, then resizes: same result as
        # scale-then-crop, with less work.
        img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)


def describe_error(e: BaseException) -> str:
    """A short, one-line reason for a decode failure."""
    if isinstance(e, RejectedImage):
        reason = str(e)
    elif isinstance(e, Image.DecompressionBombError):
        detail = str(e).split(", could be")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        reason = f"possible decompression bomb, not decoded ({detail})"
    elif isinstance(e, UnidentifiedImageError):
        reason = "not a PNG, JPEG, WebP, BMP or GIF image (contents not recognised)"
    elif isinstance(e, OSError) and "truncated" in str(e):
        reason = f"truncated image data ({e})"
    elif isinstance(e, OSError) and e.strerror:
        reason = e.strerror  # permission denied, I/O error, ... (the path is named elsewhere)
    else:
        reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return one_line(reason)


def stat_problem(path: str) -> str | None:
    """Why a stat() already shows `path` cannot be an image (a special file, which would block a reader
    for good; a dangling link; an empty file), or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        return describe_error(e)
    return "not a regular file" if not stat.S_ISREG(st.st_mode) else "empty file (0 bytes)" if st.st_size == 0 else None


def _try_decode(folder: str, rel: str, resolution: int) -> np.ndarray | str:
    try:
        return decode(os.path.join(folder, rel), resolution)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "reject this file"
        return describe_error(e)


def load_folder(folder: str, resolution: int, limit: int, warn: Callable[[str], None], *, strict: bool = False,
                paths: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, tuple[str, ...], int]:
    """Decode a folder; returns images (N, 3, R, R), labels or None, class names, skipped count.

    Files are taken in sorted order until `limit` (0: all) decode. Each file that does not
    decode gets one `warn` line (its path relative to `folder`, and the reason), and a final line
    counts them; with `strict`, the first such file raises UsageError instead.
    Class folders: when every image sits inside a first-level subfolder, the label is the index
    of that subfolder's name among the sorted names; otherwise there are no labels.
    `paths`: list_images(folder) when the caller has it already (a million files take seconds to list).
    """
    if not os.path.isdir(folder):
        raise UsageError(f"image folder {one_line(folder)} does not exist; pass an existing folder or one of "
                         "the built-in sources")
    paths = list_images(folder) if paths is None else paths
    if not paths:
        raise UsageError(f"no images ({'/'.join(EXTENSIONS)}) found under {one_line(folder)}; "
                         "point at a folder that holds images" + data_folder_hint(folder))
    wanted = min(limit, len(paths)) if limit > 0 else len(paths)
    # Filled in place (not stacked at the end) so peak memory is one copy of the data set.
    out = np.empty((wanted, 3, resolution, resolution), dtype=np.uint8)
    kept: list[str] = []
    skipped = examined = 0
    Image.init()  # load PIL's plugins once, here, rather than racing to from the threads
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pos = 0
        while pos < len(paths) and len(kept) < wanted:
            # Decode about as many as are still needed (with slack for bad files), not all.
            batch = paths[pos:pos + min(_BATCH, wanted - len(kept) + 16)]
            pos += len(batch)
            futures: list[Future] = [pool.submit(_try_decode, folder, rel, resolution) for rel in batch]
            try:
                for rel, future in zip(batch, futures):
                    if len(kept) == wanted:
                        break  # enough images: the rest of the batch is neither used nor judged
                    result = future.result()
                    examined += 1
                    if isinstance(result, np.ndarray):
                        out[len(kept)] = result.transpose(2, 0, 1)
                        kept.append(rel)
                        continue
                    if strict:
                        raise UsageError(f"cannot use image file {one_line(os.path.join(folder, rel))}: "
                                         f"{result} (stopped by --strict; without it, unreadable "
                                         "files are skipped with a warning)")
                    skipped += 1
                    warn(f"skipping {one_line(rel)}: {result}")
            finally:
                for future in futures:
                    future.cancel()  # not-yet-started decodes, when stopping early
    if skipped:
        warn(skipped_summary(skipped, examined, folder))
    if not kept:
        raise UsageError(f"none of the {len(paths)} image files under {one_line(folder)} could be read "
                         f"(all {skipped} rejected, reasons above); check that they are valid images")
    images = torch.from_numpy(out[:len(kept)])
    labels, classes = class_labels(kept, among=paths[:wanted], folder=folder)
    say_unseen_classes([c for i, c in enumerate(classes) if labels is not None and not bool((labels == i).any())], warn)
    if labels is not None:
        say_limited_classes(limit, len(kept), classes, paths, warn)
    return images, labels, classes, skipped


def folder_kind(path: str) -> str:
    """What a data folder holds: "idx" (MNIST-like files), "cifar" (CIFAR-10 binary batches) or "folder" (images)."""
    from . import cifar, idx  # noqa: PLC0415

    return "idx" if idx.is_idx_folder(path) else "cifar" if cifar.is_cifar_bin_folder(path) else "folder"


def data_folder_hint(folder: str) -> str:
    """"; ...": a subfolder (two levels down at most) that holds IDX or CIFAR-10 files, for a --data that
    names the folder above them (`--data ~/datasets` for ~/datasets/fashion-mnist) and found no images."""

    def subfolders(path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return sorted(e.path for e in it if e.is_dir() and not e.name.startswith("."))[:200]
        except OSError:
            return []

    for sub in subfolders(folder):
        for candidate in (sub, *subfolders(sub)):
            kind = {"idx": "IDX", "cifar": "CIFAR-10"}.get(folder_kind(candidate))
            if kind:
                return f"; {one_line(candidate)} holds {kind} files: pass that folder as --data"
    return ""


def unlabelled_reason(folder: str) -> str:
    """Why an image folder has no class labels, for the error a conditional model or classifier gives:
    images directly in it next to class subfolders is an easy mistake to miss."""
    if not os.path.isdir(folder):
        return ""
    paths = [p for p in list_images(folder) if stat_problem(os.path.join(folder, p)) is None]  # as class_labels
    loose = [p for p in paths if os.sep not in p]
    if not loose or len(loose) == len(paths):
        return ""
    verb = "sits" if len(loose) == 1 else "sit"
    said = f"; {len(loose)} of its {len(paths)} image files {verb} directly in {one_line(folder)}"
    problem = _try_decode(folder, loose[0], 8)
    if isinstance(problem, str):  # streamed, whether a file decodes is known only later: its place decides
        return f"{said} next to its class subfolders, e.g. {one_line(loose[0])}, which is no readable image ({problem}): delete it"
    return f"{said} (e.g. {one_line(loose[0])}) next to its class subfolders: move them into one"


def say_unseen_classes(unseen: list[str], warn) -> None:
    if unseen:
        warn(f"class folder{'s' * (len(unseen) > 1)} {', '.join(one_line(c) for c in unseen)}: none of "
             f"{'their' if len(unseen) > 1 else 'its'} images could be read; the classes keep the numbers their "
             "folder names give them, and a conditional model or classifier never sees "
             f"{'these' if len(unseen) > 1 else 'this one'}")


def say_limited_classes(limit: int, kept: int, classes: tuple[str, ...], paths: list[str], warn) -> None:
    """data.limit keeps the first files in name order, and class folders come in name order: the first N
    may hold only some of the classes."""
    listed = class_labels(paths)[1] if limit > 0 else ()
    if len(classes) < len(listed):
        warn(f"data.limit={limit} keeps the first {kept} images in file-name order, from {len(classes)} of the "
             f"folder's {len(listed)} classes ({', '.join(one_line(c) for c in classes)}): a conditional model or a "
             "classifier learns only those")


def class_labels(rel_paths: list[str], among: list[str] = (), folder: str | None = None) -> tuple[torch.Tensor | None, tuple[str, ...]]:
    """Labels from first-level subfolders (indices into their sorted names), and those names;
    (None, ()) when any image sits directly in the folder. `among`: more files whose class folders
    are numbered too (all those listed, when rel_paths are the ones that decoded), so that a class
    folder none of whose files can be read keeps its number, and the others theirs, in memory as
    when streamed (where a bad file is only found, and replaced, while training). For the same
    reason a file of `among` directly in `folder` (when given) means no labels even if it does not decode,
    unless a stat() already rules it out (a dangling link, an empty file): streamed, it is never listed."""
    parts = [p.split(os.sep) for p in rel_paths]
    loose = (p for p in among if os.sep not in p)
    if any(len(p) < 2 for p in parts) or (folder is not None and any(stat_problem(os.path.join(folder, p)) is None
                                                                     for p in loose)):
        return None, ()
    classes = sorted({p[0] for p in parts} | {p.split(os.sep)[0] for p in among if os.sep in p})
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), tuple(classes)
