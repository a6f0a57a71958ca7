"""Real-data reference statistics for FID/KID/precision-recall, and their cache.

A reference is the mean and covariance (float64) of the real images' features plus the features
themselves (float32, for KID and precision/recall). It is cached in the stats dir
($AIGC_CACHE_DIR/stats, AIGC_CACHE_DIR defaulting to ~/.cache/aigc) as `<key>.npz`, where the key
hashes everything the numbers depend on: the bytes of the uint8 images actually used, in order (after
subsetting and conversion, so the sample count, seed and split are in it), their shape, and the
extractor's protocol (its weights' hash, resize, precision ...). Change any of them and the key changes.

The npz files (ours, `aigc eval stats --out`, or pytorch-fid's) hold `mu` and `sigma` (pytorch-fid's
names), and ours also `features` and `protocol` (a JSON string). They are read with
allow_pickle=False: a file that needs pickle is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import progress
from ..data.cache import room_for
from ..data.native import load_folder_native
from ..errors import UsageError
from ..files import atomic_write

CACHE_FORMAT = 2


# --------------------------------------------------------------------------------------------------
# Feature statistics, accumulated batch by batch


class FeatureStats:
    """Running mean and covariance (float64) of features arriving in batches, without holding them
    all (keep=True also keeps them, as float32, for KID and precision/recall).

    The sums live where the features arrive (on a GPU: float64 there, no copy back per batch and no
    host sync until the end), and are taken around a shift (the first batch's mean), so the
    covariance does not lose digits to cancellation when the features' mean is large next to their
    spread. Non-finite features are reported when the statistics are read."""

    def __init__(self, keep: bool):
        self.keep, self.n = keep, 0
        self.shift = self.s1 = self.s2 = self.finite = None
        self.kept: list[torch.Tensor] = []

    @torch.inference_mode()
    def add(self, feats) -> None:
        f = torch.as_tensor(feats)
        if f.ndim != 2 or not len(f):
            return
        f64 = f.double()
        if self.shift is None:
            self.shift = f64.mean(0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=f.device)
            self.finite = torch.ones((), dtype=torch.bool, device=f.device)
        self.finite &= torch.isfinite(f64).all()  # read at the end: no sync here
        c = f64 - self.shift
        self.s1 += c.sum(0)
        self.s2.addmm_(c.T, c)
        self.n += len(f)
        if self.keep:
            self.kept.append(f.float())

    def _check(self) -> None:
        if self.finite is not None and not bool(self.finite):
            raise UsageError("the feature extractor produced NaN or infinite values (try --precision fp32)")

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise UsageError(f"need at least 2 images for feature statistics, got {self.n}")
        self._check()
        m = self.s1 / self.n
        sigma = (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1)
        return (self.shift + m).cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy()

    def features(self) -> np.ndarray | None:
        if not (self.keep and self.kept):
            return None
        self._check()
        return torch.cat(self.kept).cpu().numpy()


# --------------------------------------------------------------------------------------------------
# Reference statistics and their npz files


@dataclass
class Reference:
    mu: np.ndarray                 # (D,) float64
    sigma: np.ndarray              # (D, D) float64
    features: np.ndarray | None    # (N, D) float32, or None (a pytorch-fid file has only mu and sigma)
    protocol: dict = field(default_factory=dict)
    source: str = "computed"       # "computed", "cache hit" or "file PATH"

    @property
    def n(self) -> int | None:
        if self.features is not None:
            return len(self.features)
        return self.protocol.get("n_real")


def save_npz(path: str | os.PathLike, ref: Reference) -> Path:
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over `path`."""
    arrays = {"mu": ref.mu.astype(np.float64), "sigma": ref.sigma.astype(np.float64),
              "protocol": np.array(json.dumps(ref.protocol, sort_keys=True))}
    if ref.features is not None:
        arrays["features"] = ref.features.astype(np.float32)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_npz(path: str | os.PathLike, what: str = "--ref", check_covariance: bool = True) -> Reference:
    """Our npz or a pytorch-fid one (`mu`, `sigma` only). Anything else is a one-line UsageError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
        if not hasattr(z, "files"):  # a plain array (.npy bytes, whatever the name): no context manager
            raise UsageError(f"{what} {path}: a single .npy array, expected an .npz with 'mu' and 'sigma'")
        with z:
            missing = [k for k in ("mu", "sigma") if k not in z.files]
            if missing:
                raise UsageError(f"{what} {path}: no {' or '.join(repr(k) for k in missing)} array in it "
                                 f"(has: {', '.join(z.files) or 'nothing'}); expected reference statistics")
            arrays = {k: z[k] for k in ("mu", "sigma", "features") if k in z.files}
            for name, a in arrays.items():
                if a.dtype.kind not in "fiu":  # complex values would lose their imaginary part unseen
                    raise UsageError(f"{what} {path}: '{name}' holds {a.dtype} values, expected real numbers")
            mu, sigma = np.asarray(arrays["mu"], np.float64), np.asarray(arrays["sigma"], np.float64)
            features = np.asarray(arrays["features"], np.float32) if "features" in arrays else None
            protocol = json.loads(str(z["protocol"])) if "protocol" in z.files else {}
    except UsageError:
        raise
    # zlib.error: a damaged compressed member; RecursionError: a protocol of deeply nested JSON; RuntimeError:
    # an encrypted member; NotImplementedError: a compression zipfile does not read (Deflate64)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RecursionError, RuntimeError,
            NotImplementedError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if "Object arrays cannot be loaded" in reason:  # an npz of object arrays
            reason = "it holds object (pickled) arrays, which aigc does not load"
        elif "pickle" in reason:  # neither zip nor .npy: numpy takes it for a pickle and advises unpickling
            reason = "not an .npz (zip) file"
        raise UsageError(f"{what} {path}: not a readable statistics .npz ({reason})") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d):
        raise UsageError(f"{what} {path}: 'mu' must be (D,) and 'sigma' (D, D), got {mu.shape} and {sigma.shape}")
    if features is not None and (features.ndim != 2 or features.shape[1] != d or len(features) < 2):
        raise UsageError(f"{what} {path}: 'features' must be (N >= 2, {d}), got {features.shape}")
    for name, a in (("mu", mu), ("sigma", sigma), ("features", features)):
        if a is not None and not np.isfinite(a).all():
            raise UsageError(f"{what} {path}: '{name}' holds NaN or infinite values")
    if not isinstance(protocol, dict):
        raise UsageError(f"{what} {path}: 'protocol' is not a JSON object")
    for key, ok in PROTOCOL_FIELDS.items():
        if key in protocol and not ok(protocol[key]):
            raise UsageError(f"{what} {path}: protocol field {key!r} is malformed ({json.dumps(protocol[key])[:40]})")
    if check_covariance:
        _check_covariance(sigma, f"{what} {path}")
    return Reference(mu, sigma, features, protocol, source=f"file {path}")


def _check_covariance(sigma: np.ndarray, where: str) -> None:
    """A covariance is symmetric and positive semi-definite; FID computed from anything else is a number
    without meaning (a negated sigma gave a plausible-looking 1.1 where the truth was 4.7)."""
    scale = max(1.0, float(np.abs(sigma).max()))
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9 * scale):
        raise UsageError(f"{where}: 'sigma' is not symmetric, so it is not a covariance matrix")
    if np.linalg.eigvalsh((sigma + sigma.T) / 2).min() < -1e-6 * scale:
        raise UsageError(f"{where}: 'sigma' has negative eigenvalues, so it is not a covariance matrix")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# Protocol fields aigc reads back from a reference file, and what each must be.
PROTOCOL_FIELDS = {
    "n_real": _count, "feature_dim": _count,
    "real_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(_count(x) and x > 0 for x in v),
    **{k: (lambda v: isinstance(v, str)) for k in ("extractor", "weights_sha256", "extractor_precision", "real_data",
                                                   "real_split", "cache_key", "cache_file")},
}


# --------------------------------------------------------------------------------------------------
# The cache


def default_stats_dir() -> Path:
    from ..data.cache import cache_root

    return Path(cache_root()) / "stats"


def content_sha256(images: torch.Tensor) -> str:
    """sha256 of a uint8 (N, C, H, W) tensor: its shape, then its bytes."""
    t = images.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1)
    step = 64 * 1024 * 1024
    for start in range(0, flat.numel(), step):
        h.update(flat[start:start + step].numpy().tobytes())
    return h.hexdigest()


# Protocol entries that name files rather than what the numbers depend on (the weights' hash does).
_PATH_KEYS = {"extractor", "checkpoint", "weights", "weights_file", "weights_path", "weights file"}


def cache_key(*, shape, content: str, extractor_protocol: dict) -> str:
    """What the statistics depend on and nothing else: the uint8 images used, in order (their count
    and the source, split and seed that picked them are in that hash), and the extractor. Another
    seed that picks the same images, or the same files in another folder, finds the same entry."""
    ext = {k: v for k, v in extractor_protocol.items() if k not in _PATH_KEYS}
    ext["kind"] = str(extractor_protocol.get("extractor", "")).split(":")[0]
    blob = json.dumps({"format": CACHE_FORMAT, "shape": list(shape), "content_sha256": content, "extractor": ext},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class EvaluationStopped(Exception):
    """Embedding given up for a signal (`should_stop()` true before a batch): during training the
    checkpoint, or the exit, comes first."""


@torch.inference_mode()
def embed_all(extractor, images: torch.Tensor, batch_size: int, keep: bool = True,
              should_stop: Callable[[], bool] | None = None) -> FeatureStats:
    acc = FeatureStats(keep=keep)
    for chunk in images.split(max(1, batch_size)):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        acc.add(extractor.embed(chunk, batch_size, on_device=True)[0])
        progress.advance(len(chunk))
    return acc


def compute_reference(extractor, images: torch.Tensor, batch_size: int, protocol: dict,
                      should_stop: Callable[[], bool] | None = None) -> Reference:
    if len(images) < 2:  # say which side, before any embedding
        raise UsageError(f"the real data ({protocol.get('real_source', 'given')}) has {len(images)} image"
                         f"{'s' if len(images) != 1 else ''}; feature statistics need at least 2")
    progress.phase("embedding real images", len(images))
    acc = embed_all(extractor, images, batch_size, should_stop=should_stop)
    mu, sigma = acc.mu_sigma()
    return Reference(mu, sigma, acc.features(), protocol, source="computed")


def reference_for(images: torch.Tensor, *, extractor, data: str, data_name: str, split: str, seed: int,
                  batch_size: int, stats_dir: str | os.PathLike | None, warn: Callable[[str], None],
                  should_stop: Callable[[], bool] | None = None) -> Reference:
    """Reference statistics of `images` (uint8, already subset and converted): from the cache when an
    entry with the same key exists, else computed and stored there. stats_dir None: no cache."""
    content = content_sha256(images)
    shape = tuple(images.shape[1:])
    key = cache_key(shape=shape, content=content, extractor_protocol=extractor.protocol)
    protocol = {"cache_key": key, "real_data": data_name, "real_source": data, "real_split": split,
                "n_real": len(images), "seed": seed, "real_shape": list(shape), "real_content_sha256": content,
                **{f"extractor_{k}" if k in ("precision",) else k: v for k, v in extractor.protocol.items()}}
    path = Path(stats_dir) / f"{key[:40]}.npz" if stats_dir else None
    if path is not None and path.is_file():
        try:
            # Written by aigc from features it checked, under a key of their content: the 2048-dim
            # eigendecomposition (0.7 s on two cores) is for files a user brings.
            ref = load_npz(path, "cached statistics", check_covariance=False)
            if ref.protocol.get("cache_key") == key and ref.features is not None:
                ref.source, ref.protocol = "cache hit", {**protocol, "cache_file": str(path)}
                with contextlib.suppress(OSError):  # its last use, which the size limit goes by
                    os.utime(path)
                return ref
        except UsageError as e:
            if path.is_file():  # else removed meanwhile, by another run making room: a plain miss
                warn(f"ignoring a damaged cache entry ({e}); recomputing it")
    ref = compute_reference(extractor, images, batch_size, protocol, should_stop)
    if path is not None and _room_for_stats(path, ref, warn):
        try:
            save_npz(path, ref)
            ref.protocol["cache_file"] = str(path)
        except OSError as e:
            warn(f"could not write the statistics cache {path} ({e.strerror or e}); continuing without it")
    return ref


def _room_for_stats(path: Path, ref: Reference, warn: Callable[[str], None]) -> bool:
    """Room under AIGC_CACHE_MAX_GB in aigc's own statistics folder; a --stats-dir the user named may hold
    the user's files, which a name alone cannot tell from entries: nothing there is removed."""
    try:
        ours = path.parent.resolve() == default_stats_dir().resolve()
    except OSError:
        ours = False
    size = ref.mu.nbytes + ref.sigma.nbytes + (ref.features.nbytes if ref.features is not None else 0)
    return not ours or room_for(str(path.parent), size, warn, "the real-image statistics", r"[0-9a-f]{40}\.npz")


# --------------------------------------------------------------------------------------------------
# Real images at their own size (for Inception, which resizes inside the network, as pytorch-fid)

NATIVE = {"mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}


def _own_channels(source: str) -> int:
    """The channels a source's images have as load_real reads them natively: folders decode to RGB."""
    from ..data.folder import folder_kind

    if source in NATIVE:
        return NATIVE[source][0]
    path = os.path.expanduser(source)
    if source != "shapes" and os.path.isdir(path) and folder_kind(path) == "idx":
        return 1  # IDX images are single-channel (load_idx_folder gives N x 1 x H x W)
    return 3


def load_real(source: str, *, root: str | None, download: bool, split: str, seed: int,
              warn: Callable[[str], None], strict: bool = False, channels: int | None = None,
              resolution: int | None = None, native_resolution: int = 32, limit: int = 0,
              n: int | None = None, lazy_above_mb: int | None = None) -> tuple[torch.Tensor, str]:
    """Images of a data source as uint8 (N, C, H, W) and a description. With channels and resolution,
    exactly as training sees them (data.load_images). Without, at the source's own size: an image
    folder at its images' size (RGB), MNIST-like 1x28x28, CIFAR-10 3x32x32, `shapes` drawn at
    `native_resolution`; a given channels alone is then applied on top (a resolution alone gets the
    source's own channels and takes training's path). limit > 0: only
    the source's first `limit` images (data.limit). n: an image folder read at its own size decodes
    only the seeded subset real_indices(total, n, seed) takes (other sources are in memory already);
    so does, with channels and resolution, a folder whose decoded images would exceed lazy_above_mb (as
    training streams it: the images come back lazy, and only those real_reference picks are decoded)."""
    from ..data import cifar, idx, load_images
    from ..data.folder import folder_kind
    from ..data.transforms import to_channels

    if resolution is not None and channels is None:  # as a model of that resolution sees them: by training's path
        channels = _own_channels(source)
    if channels is not None and resolution is not None:
        data = load_images(source, channels=channels, resolution=resolution, root=root, download=download,
                           split=split, seed=seed, warn=warn, strict=strict, limit=limit,
                           lazy_above_mb=lazy_above_mb if split == "train" else None)
        return data.images, data.name
    if source in NATIVE or source == "shapes":
        c, r = NATIVE.get(source, (3, native_resolution))
        data = load_images(source, channels=c, resolution=r, root=root, download=download, split=split,
                           seed=seed, warn=warn, strict=strict, limit=limit)
        images, name = data.images, data.name
    else:
        path = os.path.expanduser(source)
        if not os.path.isdir(path):
            raise UsageError(f"data source {source!r} is not a built-in source or an existing folder")
        kind = folder_kind(path)
        if kind == "idx":
            images, name = idx.load_idx_folder(path, split)[0], f"IDX folder {path} ({split})"
        elif kind == "cifar":
            images, name = cifar.load_cifar_bin_folder(path, split)[0], f"CIFAR-10 folder {path} ({split})"
        else:
            images = load_folder_native(path, warn=warn, strict=strict, what="data folder", limit=limit, n=n, seed=seed)
            name = f"folder {path}"
        if limit > 0:
            images = images[:limit]  # a no-op on the folder, which applied it before decoding
        name = f"{name} ({len(images)} images, {images.shape[3]}x{images.shape[2]})"
    if channels is not None:
        images = to_channels(images, channels)
    return images.contiguous(), name


def data_identity(source: str) -> str:
    """What names a data source in a cache key: a built-in name, or a folder's real path."""
    from ..data import BUILTIN_SOURCES

    if source in BUILTIN_SOURCES:
        return source
    return os.path.realpath(os.path.expanduser(source))
