"""The FID Inception weights file: where it is, whether it is the right one, loading it safely, and
(only when asked) downloading it.

The file is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TensorFlow FID graph's weights as
a PyTorch state dict). It is looked for, in order, at an explicit path (`--inception-weights PATH`),
at $AIGC_INCEPTION_WEIGHTS, then in the torch hub cache where pytorch-fid keeps it
(`torch.hub.get_dir()/checkpoints/`). Its SHA-256 must match; it is loaded with
`torch.load(..., weights_only=True)` only, so a file that holds anything but tensors is refused rather
than run. Nothing is downloaded unless `download_weights` is called (`aigc eval --download-weights`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import UsageError, first_line
from ..files import atomic_write

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
ENV_PATH = "AIGC_INCEPTION_WEIGHTS"
# Lets the test suite load randomly initialised weights of the same layout. Named so that nobody sets it
# by accident; results computed with it say "weights_verified": false.
ENV_UNVERIFIED = "AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS"
_CHUNK = 1 << 20
_NET_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def hub_cache_path() -> Path:
    """Where pytorch-fid (torch.hub) keeps the file: $TORCH_HOME/hub/checkpoints/, by default
    ~/.cache/torch/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _how_to_get(where: Path) -> str:
    return (f"download {WEIGHTS_URL} and put it at {where}, or run `aigc eval --download-weights` "
            "to fetch it there")


def resolve_weights_path(explicit: str | os.PathLike | None = None) -> Path:
    """The weights file to use: `explicit` (--inception-weights), else $AIGC_INCEPTION_WEIGHTS, else the
    torch hub cache. A missing file is a one-line UsageError that says what to put where."""
    hub = hub_cache_path()
    if explicit:
        path, origin = Path(explicit).expanduser(), f"--inception-weights {explicit}"
    elif os.environ.get(ENV_PATH):
        path, origin = Path(os.environ[ENV_PATH]).expanduser(), f"{ENV_PATH}={os.environ[ENV_PATH]}"
    else:
        if not hub.is_file():
            raise UsageError(
                f"the FID Inception weights {WEIGHTS_FILENAME} are not in the torch hub cache ({hub}): "
                f"{_how_to_get(hub)}; or point {ENV_PATH} or --inception-weights PATH at a copy of the file")
        return hub
    if path.is_dir():
        path = path / WEIGHTS_FILENAME
    if not path.is_file():
        raise UsageError(f"{origin}: no such file {path}; {_how_to_get(path)}")
    return path


# (resolved path, size, mtime_ns) -> sha256: a file is hashed once per process unless it changes.
_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def _stat_key(path: Path) -> tuple[str, int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise UsageError(f"cannot read the Inception weights {path}: {e.strerror or e}") from None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks; remembered per (path, size, mtime) in this process."""
    path = Path(path)
    key = _stat_key(path)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    except OSError as e:
        raise UsageError(f"cannot read the Inception weights {path}: {e.strerror or e}") from None
    digest = h.hexdigest()
    if _stat_key(path) == key:  # unchanged while hashing: safe to remember
        with _HASH_LOCK:
            _HASHES[key] = digest
    return digest


@dataclass(frozen=True)
class WeightsFile:
    """A weights file whose hash has been checked (or, under the test flag, at least computed)."""

    path: Path
    sha256: str
    verified: bool  # the hash is the published one
    cache_key: tuple[str, int, int]  # (resolved path, size, mtime_ns) when it was hashed


def verified_weights(explicit: str | os.PathLike | None = None) -> WeightsFile:
    """Find the weights file and check its SHA-256. A wrong hash is a UsageError naming the file and
    both hashes, unless $AIGC_UNVERIFIED_INCEPTION_WEIGHTS_FOR_TESTS=1 (then verified=False)."""
    path = resolve_weights_path(explicit)
    key = _stat_key(path)
    digest = file_sha256(path)
    if digest == WEIGHTS_SHA256:
        return WeightsFile(path, digest, True, key)
    if os.environ.get(ENV_UNVERIFIED) == "1":
        return WeightsFile(path, digest, False, key)
    raise UsageError(f"{path} is not the FID Inception weights file: its SHA-256 is {digest}, expected "
                     f"{WEIGHTS_SHA256} ({WEIGHTS_FILENAME} from {WEIGHTS_URL}); replace it, or run "
                     "`aigc eval --download-weights`")


def _load_error(e: BaseException) -> str:
    """One line out of torch.load's error. Its weights_only refusal is a page of advice (including to
    load without weights_only, which this program never does); keep only the reason."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        reason = lines[0].split(". Please")[0].rstrip(".") if lines else "not a plain state dict"
        return f"refused, nothing in it was run ({reason})"
    if isinstance(e, EOFError):
        return "the file is empty or cut short"
    return first_line(e, typed=True)


def load_state_dict(info: WeightsFile, reference: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) the file and check it against `reference` (key -> shape): every key
    present with that shape, no others. BatchNorm's `num_batches_tracked` counters may be absent (files
    saved by old PyTorch versions lack them; they play no part in evaluation) and are then filled in."""
    path = info.path
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses any non-tensor object (UnpicklingError); or not a torch file
        raise UsageError(f"cannot load the Inception weights {path} as a state dict of tensors "
                         f"(torch.load with weights_only=True): {_load_error(e)}") from None
    if _stat_key(path) != info.cache_key:
        raise UsageError(f"the Inception weights {path} changed while being loaded; run again")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UsageError(f"{path} does not hold a state dict (got a {type(state).__name__}); expected "
                         f"{WEIGHTS_FILENAME} from {WEIGHTS_URL}")
    optional = {k for k in reference if k.endswith(".num_batches_tracked")}
    missing = sorted(set(reference) - set(state) - optional)
    unexpected = sorted(set(state) - set(reference))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]}")
        raise UsageError(f"{path} is not an FID Inception-v3 state dict: {'; '.join(parts)}")
    out: dict[str, torch.Tensor] = {}
    for key, shape in reference.items():
        if key not in state:  # an optional BatchNorm counter
            out[key] = torch.tensor(0, dtype=torch.long)
            continue
        t = state[key]
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"{path}: {key} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(shape):
            raise UsageError(f"{path}: {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if key in optional:
            out[key] = t.to(torch.long)
        elif not t.is_floating_point():
            raise UsageError(f"{path}: {key} has dtype {t.dtype}, expected floating point")
        elif not torch.isfinite(t).all():
            raise UsageError(f"{path}: {key} contains NaN or infinite values")
        else:
            out[key] = t.to(torch.float32)
    return out


def _download_error(url: str, dest: Path, e: BaseException) -> UsageError:
    reason = getattr(e, "reason", None)
    why = first_line(reason, typed=True) if isinstance(reason, BaseException) else str(reason or "") or first_line(e, typed=True)
    return UsageError(f"could not download the Inception weights from {url} ({why}); without network access, "
                      f"download {WEIGHTS_FILENAME} elsewhere and put it at {dest} "
                      f"(or point {ENV_PATH} or --inception-weights at it)")


def download_weights(dest: str | os.PathLike | None = None, *, url: str = WEIGHTS_URL,
                     timeout: float = 60.0, report=None) -> Path:
    """Fetch the weights file to `dest` (default: the torch hub cache path). Written to a temporary file
    next to it, hash-checked, then renamed into place, so `dest` is either absent or complete and right.
    A file already at `dest` with the right hash is kept and nothing is downloaded.
    `report(done_bytes, total_bytes_or_None)`, if given, is called as data arrives."""
    dest = Path(dest).expanduser() if dest else hub_cache_path()
    if dest.is_dir():
        dest = dest / WEIGHTS_FILENAME
    if dest.is_file() and file_sha256(dest) == WEIGHTS_SHA256:
        return dest
    h, done = hashlib.sha256(), 0
    try:
        with atomic_write(dest, ".part") as tmp, open(tmp, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)
            except _NET_ERRORS as e:  # offline, DNS, refused, HTTP error status
                raise _download_error(url, dest, e) from None
            with resp:
                length = (getattr(resp, "headers", None) or {}).get("Content-Length")
                total = int(length) if length and str(length).isdigit() else None
                while True:
                    try:
                        block = resp.read(_CHUNK)
                    except _NET_ERRORS as e:  # reset, timeout, cut short
                        raise _download_error(url, dest, e) from None
                    if not block:
                        break
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if report:
                        report(done, total)
            digest = h.hexdigest()
            if digest != WEIGHTS_SHA256:
                raise UsageError(f"the download from {url} ({done} bytes) has SHA-256 {digest}, expected "
                                 f"{WEIGHTS_SHA256}; nothing was written to {dest}")
    except OSError as e:  # the network's errors became UsageErrors above: this is the disk
        raise UsageError(f"cannot write the Inception weights to {dest}: {e.strerror or e}") from None
    return dest


def ensure_weights(explicit: str | os.PathLike | None = None, download: bool = False) -> Path:
    """For `aigc eval`: the path of the weights file. With `download=True` (--download-weights) it is
    first fetched to where it is looked for (the explicit path, else $AIGC_INCEPTION_WEIGHTS, else the hub
    cache) unless the right file is already there; a wrong file there is replaced."""
    if download:
        target = explicit or os.environ.get(ENV_PATH) or None
        download_weights(Path(target).expanduser() if target else hub_cache_path())
    return resolve_weights_path(explicit)
