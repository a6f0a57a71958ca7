"""Checkpoints and exported artifacts: one safetensors file each, JSON metadata, atomic writes.

Tensors are namespaced by what they belong to: `G.*`, `G_ema.*`, `D.*`, `E.*`, `C.*` (network weights and
buffers); training checkpoints add the resumable state written by training/state.py (`opt.*`, `rng.*`).
Metadata keys (strings) include aigc.format, aigc.kind (checkpoint|export), aigc.model, aigc.config (JSON),
aigc.step, aigc.images_seen, aigc.precision, aigc.created and aigc.torch; the writers (here,
training/state.py, training/loop.py, training/run_folder.py, export.py) add the rest (optimizer and RNG
state, the best, class names, the EMA's statistics). Loading never executes code (safetensors holds only
tensors) and validates header, metadata and config before anything is built.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Config, config_from_dict, value_error_reason
from .errors import UsageError, first_line
from . import safetensors_file
from .files import atomic_write

FORMAT = 1
STEP_RE = re.compile(r"step-(\d+)\.safetensors")


def step_of(path: Path) -> int:
    """The step in a step-NNNNNNN.safetensors name (-1 for any other name); sort by this, not by name,
    so that 8+ digit steps come last."""
    m = STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else -1


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    config: Config

    @property
    def kind(self) -> str:
        return self.meta["aigc.kind"]

    @property
    def step(self) -> int:
        return int(self.meta["aigc.step"])

    @property
    def images_seen(self) -> int:
        return int(self.meta.get("aigc.images_seen", 0))

    @property
    def class_names(self) -> list[str]:
        """The training data's class names, index by index (empty when it had none, or an older file)."""
        try:
            names = json.loads(self.meta.get("aigc.class_names", "[]"))
        except json.JSONDecodeError:
            return []
        if not isinstance(names, list) or 0 < self.config.model.num_classes != len(names):
            return []  # names that do not match the model's classes would mislabel `sample --class`
        return [str(n) for n in names]

    @property
    def class_counts(self) -> list[int]:
        """How many training images each class had (empty when the model has no classes, or an older file):
        the class mix `aigc eval` draws a conditional model's images with."""
        try:
            counts = json.loads(self.meta.get("aigc.class_counts", "[]"))
        except json.JSONDecodeError:
            return []
        ok = (isinstance(counts, list) and len(counts) == self.config.model.num_classes
              and all(type(c) is int and c >= 0 for c in counts) and sum(counts) > 0)
        return counts if ok else []

    @property
    def step_file(self) -> Path:
        """The file to name for these weights: for last.safetensors or best.safetensors, links that the
        next save replaces, the step file holding the same checkpoint (same metadata, so a save between
        resolving the link and reading it cannot mislead), else the file itself."""
        path = Path(self.path).resolve()
        twin = path.parent / f"step-{self.step:07d}.safetensors"
        if self.kind == "checkpoint" and not path.name.startswith("step-") and twin.is_file():
            if read_meta(twin) == self.meta:
                return twin
        return path

    def numbered_classes(self) -> str:
        """'0 cats, 1 dogs, ...': what `aigc sample --class K` draws."""
        return ", ".join(f"{i} {class_shown(name)}" for i, name in enumerate(self.class_names))

    def net_state(self, name: str) -> dict[str, torch.Tensor]:
        return net_state(self.tensors, name)

    def generator_weights(self, ema: bool = True) -> tuple[str, str]:
        """(tensor prefix to load, what the weights are: "G" or "G_ema"). A training checkpoint's EMA
        when it has one (unless ema=False); an export holds one set under "G" and says in aigc.weights
        which it was, so asking an EMA export for the raw weights is refused rather than ignored."""
        if self.kind == "export":
            label = "G_ema" if self.meta.get("aigc.weights") == "G_ema" else "G"
            if not ema and label == "G_ema":
                raise UsageError(f"--no-ema: {self.path} is an export of the EMA weights only; the raw weights "
                                 "are in its training checkpoint (`aigc export --no-ema` exports them)")
            return "G", label
        name = "G_ema" if ema and self.net_state("G_ema") else "G"
        return name, name

    def load_net(self, name: str, net: torch.nn.Module) -> None:
        load_net(self.tensors, name, net, self.path)


def net_state(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    prefix = f"{name}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_net(tensors: dict[str, torch.Tensor], name: str, net: torch.nn.Module, origin) -> None:
    """Load one network's weights, with a one-line error naming the file when they do not fit."""
    state = net_state(tensors, name)
    if not state:
        raise UsageError(f"{origin}: holds no weights for network '{name}'")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UsageError(f"{origin}: weights do not fit the model in its config ({first[-1].strip()})") from None


CLASS_NUMBER = re.compile(r"-?[0-9]{1,18}")  # ASCII digits, as checkpoint metadata: "²" or "٣" is no number


def class_shown(name: str) -> str:
    """A class name as lists and messages show it: quoted where it could be misread (a comma, spaces at
    its ends, a quote, or a number, which --class would read as one); cut at 60 characters, as names
    come from anyone's folder names or metadata."""
    plain = name and name == name.strip() and not set(",'\"") & set(name) and not CLASS_NUMBER.fullmatch(name)
    text = name if plain else repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- writing -----------------------------------------------------------------------------

def created_now() -> str:
    """Local time with its UTC offset as RFC 3339 writes it (`+01:00`), which Python before 3.11 and
    other tools parse; strftime's `%z` gave `+0100`."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def base_meta(cfg: Config, kind: str, step: int, images_seen: int, precision: str) -> dict[str, str]:
    return {"aigc.format": str(FORMAT), "aigc.kind": kind, "aigc.model": cfg.model.kind,
            "aigc.config": cfg.to_json(), "aigc.step": str(step), "aigc.images_seen": str(images_seen),
            "aigc.precision": precision, "aigc.created": created_now(),
            "aigc.torch": torch.__version__}


def write_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target, so a crash
    or a full disk never leaves a half-written file where a good one was."""
    with atomic_write(path) as tmp:
        safetensors_file.write(tmp, tensors, meta)


# ---- reading -----------------------------------------------------------------------------

def step_files(folder: Path) -> list[Path]:
    """The step-N.safetensors files of a checkpoints folder, newest first. Other names that the glob
    matches (a user's step-0000100-copy.safetensors) are not aigc's: never pruned, resumed or replaced."""
    return sorted((f for f in folder.glob("step-*.safetensors") if step_of(f) >= 0), key=step_of, reverse=True)


def resolve(path_or_run: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its newest checkpoint)."""
    p = Path(path_or_run)
    if p.is_dir():
        ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        if (ckdir / "last.safetensors").is_file():
            return ckdir / "last.safetensors"
        steps = step_files(ckdir)
        if steps:
            return steps[0]
        if (ckdir / "best.safetensors").is_file():  # all that was kept of a run (the others deleted for space)
            return ckdir / "best.safetensors"
        raise UsageError(f"{p}: no checkpoint found in this folder (expected checkpoints/last.safetensors, "
                         "step-N.safetensors or best.safetensors)")
    if not p.exists():
        raise UsageError(f"{p}: no such checkpoint file or run folder")
    if not p.is_file():  # a FIFO or device would block or never end
        raise UsageError(f"{p}: not a regular file")
    return p


def load(path_or_run: str | os.PathLike, *, device: str = "cpu", warn=None) -> Checkpoint:
    """The checkpoint at a path, or a run folder's newest. With `warn`, a run folder whose newest file is
    damaged (a disk that filled up, a copy cut short) gives its newest step file that reads, and `warn`
    says so; without, the damage is the error (`--resume auto` does its own search)."""
    path = resolve(path_or_run)
    if warn is None or not Path(path_or_run).is_dir():
        return _load(path, device)
    try:
        return _load(path, device)
    except UsageError as damaged:
        steps = step_files(path.parent)
        twin = next((s for s in steps if s != path and _same_file(s, path)), None)  # last is a link to a step file
        for older in steps:
            if older == path or older == twin:
                continue
            try:
                ck = _load(older, device)
            except UsageError:
                continue
            warn(f"{damaged}" + (f" (it is {twin.name})" if twin else "")
                 + f"; using {older}, the newest checkpoint of the folder that reads")
            return ck
        raise


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)  # last.safetensors is a link to a step file: damaged too
    except OSError:
        return False


def _load(path: Path, device: str) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            meta = dict(f.metadata() or {})
            if "aigc.format" not in meta:
                raise UsageError(f"{path}: not an aigc checkpoint (a safetensors file without aigc metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except UsageError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        if path.suffix.lower() == ".onnx":
            raise UsageError(f"{path}: an ONNX model, for runtimes such as onnxruntime; aigc reads its "
                             "checkpoints and .safetensors exports") from None
        if path.suffix.lower() == ".npz":
            raise UsageError(f"{path}: an .npz file (images from `aigc sample --npz`, or statistics from `aigc eval "
                             "stats`), not a checkpoint: score images with `aigc eval --fake`") from None
        raise UsageError(f"{path}: not a readable safetensors checkpoint ({first_line(e)})") from None
    if meta["aigc.format"] != str(FORMAT):
        raise UsageError(f"{path}: checkpoint format {meta['aigc.format']!r} is not supported (this aigc reads {FORMAT})")
    if meta.get("aigc.kind") not in ("checkpoint", "export"):
        raise UsageError(f"{path}: unknown aigc.kind {meta.get('aigc.kind')!r}")
    if "aigc.config" not in meta:
        raise UsageError(f"{path}: metadata aigc.config is missing (damaged, or not written by aigc)")
    try:
        cfg = config_from_dict(json.loads(meta.get("aigc.config", "")))
    except (ValueError, UsageError) as e:  # ValueError: bad JSON, or an integer of over 4300 digits
        reason = value_error_reason(e) if isinstance(e, ValueError) else str(e)
        raise UsageError(f"{path}: its stored config is invalid ({reason})") from None
    except RecursionError:
        raise UsageError(f"{path}: its stored config is invalid (nested too deeply)") from None
    if cfg.model.conditional and cfg.model.num_classes < 1:  # training sets it from the data: never 0
        raise UsageError(f"{path}: its stored config is invalid (a conditional model with model.num_classes "
                         f"{cfg.model.num_classes})")
    if meta.get("aigc.model") != cfg.model.kind:
        raise UsageError(f"{path}: aigc.model {meta.get('aigc.model')!r} does not match its config ({cfg.model.kind})")
    if "aigc.step" not in meta:  # every aigc file has it: `info` said step 0 and a resume failed on a KeyError
        raise UsageError(f"{path}: metadata aigc.step is missing (damaged, or not written by aigc)")
    for key in ("aigc.step", "aigc.images_seen"):
        if not COUNT_RE.fullmatch(meta.get(key, "0")):  # ASCII digits only: str.isdigit() takes "²" and "٣"
            raise UsageError(f"{path}: metadata {key} is not a non-negative integer")
    check_tensors(path, tensors, cfg, meta["aigc.kind"])
    _check_class_names(path, meta.get("aigc.class_names"))
    return Checkpoint(path, tensors, meta, cfg)


def _check_class_names(path: Path, text: str | None) -> None:
    """aigc writes the data's class names as a JSON list of distinct strings; anything else was made by
    hand or damaged, and would make `sample --class NAME` pick the wrong class."""
    if text is None:
        return
    try:
        names = json.loads(text)
    except (ValueError, RecursionError):
        names = None
    if (not isinstance(names, list) or not all(isinstance(x, str) for x in names)
            or len(set(names)) != len(names)):
        raise UsageError(f"{path}: metadata aigc.class_names is not a list of distinct class names")


COUNT_RE = re.compile(r"[0-9]{1,18}")
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def shapes_of(cfg: Config) -> dict[str, torch.nn.Module]:
    """The config's networks built on the meta device: their names, shapes and dtypes without memory
    or initialisation, whatever sizes a (possibly hostile) config asks for. G_ema has G's layout."""
    from .models import build_shapes

    try:
        nets = build_shapes(cfg.model)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise UsageError(f"its model cannot be built from the config ({first_line(e)})") from None
    if "G" in nets:
        nets["G_ema"] = nets["G"]
    return nets


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], cfg: Config, kind: str = "checkpoint") -> None:
    """Every network the file holds has exactly the tensors its config builds, with their shapes, floating
    weights where weights are floating, and finite values: so `info` and `export` vouch for what they show
    and write, and a damaged or diverged file is refused rather than drawing black images."""
    try:
        nets = shapes_of(cfg)
    except UsageError as e:
        raise UsageError(f"{path}: {e}") from None
    held = {k.split(".", 1)[0] for k in tensors}
    if kind == "export":  # the generator only, under "G" (aigc.weights says whether it was the EMA)
        others = sorted(held - {"G"})
        if others or "G" not in held:
            raise UsageError(f"{path}: an export holds the generator's G.* tensors only; this one "
                             + (f"also holds {others[0]}.*" if others else "has none"))
    else:  # a training checkpoint holds every network of its model (G_ema only when EMA is on)
        missing = [name for name in nets if name != "G_ema" and name not in held]
        if missing:
            raise UsageError(f"{path}: holds no weights for network '{missing[0]}', which its {cfg.model.kind} has")
    for name in sorted(held & set(nets)):
        expected, got = nets[name].state_dict(), net_state(tensors, name)
        problems = ([f"missing {name}.{k}" for k in expected if k not in got]
                    + [f"unexpected {name}.{k}" for k in got if k not in expected]
                    + [f"{name}.{k} has shape {list(got[k].shape)}, the config builds {list(v.shape)}"
                       for k, v in expected.items() if k in got and got[k].shape != v.shape])
        if problems:
            raise UsageError(f"{path}: weights do not fit the model in its config ({problems[0]}"
                             + (f", and {len(problems) - 1} more" if len(problems) > 1 else "") + ")")
        for k, v in got.items():
            if expected[k].is_floating_point() and v.dtype not in WEIGHT_DTYPES:
                raise UsageError(f"{path}: {name}.{k} has dtype {str(v.dtype).replace('torch.', '')}, not a "
                                 "floating type aigc writes (fp32, fp16, bf16)")
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise UsageError(f"{path}: {name}.{k} holds NaN or infinite values (a damaged file, or one "
                                 "saved from a diverged run); use an earlier checkpoint")
            if k.endswith("running_var") and bool((v < 0).any()):  # a variance is never negative: NaN images
                raise UsageError(f"{path}: {name}.{k} holds negative variances (a damaged file); use another checkpoint")


def read_meta(path: str | os.PathLike) -> dict[str, str] | None:
    """The metadata of a safetensors file without reading its tensors; None if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - any unreadable or foreign file
        return None


def param_counts(ckpt: Checkpoint) -> dict[str, int]:
    """Parameters per network the file holds (buffers such as BN running stats excluded), counted on
    the meta device: load() has checked that the file's tensors have exactly these shapes."""
    nets = shapes_of(ckpt.config)
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()
            if name != "G_ema" and ckpt.net_state(name)}


def build_net(ckpt: Checkpoint, name: str, source: str | None = None) -> torch.nn.Module:
    """One network of the checkpoint's model with the file's weights (those of `source`, default `name`:
    G with the G_ema weights, say), in fp32 on the CPU. Only this network is allocated (an export holds
    G alone, and its config's D is never checked against anything), and nothing is randomly initialised:
    it is laid out on the meta device, given memory, and filled from the file."""
    from .models.layers import materialize_spectral_norm

    state = ckpt.net_state(source or name)
    if not state:
        raise UsageError(f"{ckpt.path}: holds no weights for network '{source or name}'")
    # Module.to_empty's empty_like on meta tensors imports torch's symbolic-shapes machinery (sympy):
    # 0.9 s of every sample/export/eval start-up. A plain empty of each shape costs nothing.
    net = shapes_of(ckpt.config)[name]._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu"))
    materialize_spectral_norm(net)
    net.load_state_dict(state, strict=True)  # every parameter and buffer: shapes were checked by load()
    return net.float()
