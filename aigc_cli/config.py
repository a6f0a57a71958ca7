"""The run configuration: typed sections, preset loading, `--set` overrides and validation.

A Config is built once from a preset plus command-line overrides, validated before any heavy work,
written into the run folder as TOML and into every checkpoint as JSON, and never mutated afterwards.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UsageError, not_utf8_shown


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "dcgan"  # a key of aigc_cli.models.FAMILIES
    resolution: int = 64  # square images, pixels per side
    channels: int = 1  # 1 (grayscale) or 3 (RGB); data is converted to this
    latent_dim: int = 100
    g_width: int = 64  # base width of the generator / decoder (DCGAN's ngf)
    d_width: int = 64  # base width of the discriminator / encoder / classifier (DCGAN's ndf)
    hidden: int = 128  # hidden units of the MLP GAN
    num_classes: int = 0  # set from the data for models that use labels
    conditional: bool = False  # class-conditional: G with conditional BN, D with a projection head (VAE: labels in E and G)
    spectral_norm: bool = False  # spectral normalisation on every D layer (SNGAN); resnet_gan always has it
    d_norm: str = "batch"  # DCGAN discriminator normalisation: batch | layer | none (WGAN-GP wants no batch norm)
    likelihood: str = "gaussian"  # VAE decoder distribution: gaussian | bernoulli


@dataclass(frozen=True)
class DataConfig:
    source: str = "shapes"  # shapes | mnist | fashion-mnist | cifar10 | a folder path
    root: str = ""  # where torchvision datasets live (default: $AIGC_DATA_ROOT or ~/.cache/aigc/datasets)
    download: bool = False  # allow torchvision to download a missing dataset
    limit: int = 0  # use only the first N images (0: all)
    strict: bool = False  # any unreadable image file is an error (default: skip it with a warning)
    cache: bool = True  # keep decoded images on disk ($AIGC_CACHE_DIR, keyed by content hash) so reruns start at once
    device_max_mb: int = 4096  # decoded data up to this size lives on the training device; larger streams through workers
    workers: int = -1  # DataLoader worker processes for streamed (large) data; -1: one per CPU core but one, at most 16
    hflip: bool = False  # random horizontal flips, applied on the training device
    translate: int = 0  # random shifts of up to N pixels (reflect padding), applied on the training device


@dataclass(frozen=True)
class LossConfig:
    gan: str = "bce"  # bce (non-saturating, on logits) | hinge | wgan-gp
    gp_weight: float = 10.0  # WGAN-GP gradient penalty weight (lambda)
    r1_gamma: float = 0.0  # R1 penalty on real images (0: off), for bce and hinge
    vae_beta: float = 1.0  # weight of the KL term (1: the plain ELBO)
    recon_sigma: float = 0.1  # std of the VAE's Gaussian decoder, on the [-1, 1] pixel scale
    kl_warmup: int = 0  # steps over which the KL weight rises linearly from 0 to vae_beta (0: none)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    epochs: int = 0  # when > 0, overrides steps: this many passes over the data
    batch_size: int = 64
    lr_g: float = 2e-4  # generator (and VAE, classifier) learning rate
    lr_d: float = 2e-4  # discriminator learning rate
    beta1: float = 0.5
    beta2: float = 0.999
    n_critic: int = 1  # discriminator steps per generator step (WGAN-GP: 5)
    lr_warmup: int = 0  # steps of linear learning-rate warm-up from 0
    lr_decay: str = "none"  # none | linear | cosine: decay to 0 over the run after warm-up
    ema_decay: float = 0.0  # EMA of the generator weights (e.g. 0.999; 0: no EMA); samples and eval use it
    ema_start: int = 0  # step at which the EMA starts following G (before: a plain copy)
    diffaugment: str = ""  # DiffAugment policy for D's inputs: comma list of translation, cutout, color
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    log_every: int = 50  # steps between metrics lines
    sample_every: int = 500  # steps between sample grids (a grid is always written at the end)
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    ckpt_minutes: float = 30.0  # also a checkpoint when this many minutes have passed since the last (0: by steps only)
    keep_checkpoints: int = 3  # step checkpoints kept besides last.safetensors
    n_samples: int = 64  # images in the training sample grids
    best_metric: str = "auto"  # logged value that picks best.safetensors (auto: eval_metric when eval_every > 0; else neg_elbo for VAEs, loss for classifiers, none for GANs)
    eval_every: int = 0  # steps between evaluations of the (EMA) generator during training (0: never)
    eval_metric: str = "fid"  # metric logged at each evaluation that picks best.safetensors: fid | kid | is | precision | recall
    eval_n: int = 5000  # generated (and at most this many real) images per evaluation during training
    eval_features: str = ""  # feature extractor for those evaluations: "" = Inception, or a classifier checkpoint path
    cuda_graph: str = "auto"  # auto | on | off: capture the whole training step in one CUDA graph (auto: on CUDA where the step allows)
    channels_last: str = "auto"  # auto | on | off: channels-last memory format for conv models (auto: on CUDA and CPU)
    fuse_norm_act: str = "auto"  # auto | on | off: torch.compile each BatchNorm + ReLU/LeakyReLU pair into fused kernels (the first steps compile; auto: on CUDA)
    subpixel_convs: str = "auto"  # auto | on | off: run D's first and G's last 4x4 stride-2 layers (on the image's 1 or 3 channels) as sub-pixel convolutions, the same function (auto: one-channel images in CUDA steps captured in a graph, where it was measured faster)
    max_recoveries: int = 3  # rollbacks after non-finite values before giving up with exit code 3
    recover_lr_factor: float = 0.5  # learning rates are multiplied by this at each rollback
    recover_to_bf16: bool = True  # at a rollback, switch fp16 to bf16 where the device supports it


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items() if not isinstance(v, dict)]
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"

    def with_overrides(self, assignments: dict[str, Any]) -> "Config":
        """Return a copy with dotted keys (`train.lr_g`) set; values are converted and type-checked."""
        data = self.to_dict()
        for key, value in assignments.items():
            section, name = _split_key(key)
            ftype = _field_types(section)[name]
            if section is None:
                data[name] = _convert(key, value, ftype, from_text=True)
            else:
                data[section][name] = _convert(key, value, ftype, from_text=True)
        return config_from_dict(data)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig, "train": TrainConfig}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
GAN_LOSSES = ("bce", "hinge", "wgan-gp")
EVAL_METRICS = ("fid", "kid", "is", "precision", "recall")  # lower is better for fid and kid


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return _toml_string(str(v))


def _toml_string(text: str) -> str:
    """A TOML basic string in ASCII. Not json.dumps: JSON writes a character beyond U+FFFF (an emoji in a
    description or a folder name) as a surrogate pair of \\u escapes, which TOML refuses (it takes
    \\UXXXXXXXX). A lone surrogate (a file-name byte that is not UTF-8) has no TOML form at all."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= o < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\U{o:08x}" if o > 0xFFFF else f"\\u{o:04x}")
    return '"' + "".join(out) + '"'


def _field_types(section: str | None) -> dict[str, type]:
    cls = Config if section is None else SECTIONS[section]
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: hints[f.type] for f in fields(cls) if f.type in hints}


def all_keys() -> list[str]:
    keys = [k for k in _field_types(None)]
    for section in SECTIONS:
        keys += [f"{section}.{k}" for k in _field_types(section)]
    return keys


def _split_key(key: str) -> tuple[str | None, str]:
    section, _, name = key.rpartition(".")
    section = section or None
    if (section is not None and section not in SECTIONS) or name not in _field_types(section):
        if section is None or section in SECTIONS:  # a known section: guess and list within it
            names = list(_field_types(section))
            close = [f"{section}.{c}" if section else c for c in difflib.get_close_matches(name, names, n=1)]
            listed = f"{section + '.* ' if section else 'top-level '}keys: {', '.join(names)}"
        else:
            close, listed = difflib.get_close_matches(key, all_keys(), n=1), f"valid keys: {', '.join(all_keys())}"
        # Better guesses first: the key in other case (train.LR_G), or a section left out (batch_size) or
        # another one's (train.hflip: data.hflip; no name is in two sections).
        begun = [k for k in all_keys() if section in SECTIONS and k.startswith(f"{section}.{name.lower()}")]
        close = ([k for k in all_keys() if k.lower() == key.lower()]
                 or [k for k in all_keys() if k.rpartition(".")[2] == name.lower() and k != key]
                 or (begun if len(begun) == 1 else close))
        raise UsageError(f"unknown config key {key!r}; " + (f"did you mean {close[0]!r}? ({listed})" if close else listed))
    return section, name


def value_error_reason(e: ValueError) -> str:
    """One line for a parser's ValueError; Python's own advice on long integers is not the user's to follow."""
    text = str(e)
    return "an integer of more than 4300 digits" if "integer string conversion" in text else text.splitlines()[0][:200]


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a pasted 5000-digit number)."""
    text = _count_text(value) if isinstance(value, int) and abs(value) >= 10**15 else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _convert(key: str, value: Any, ftype: type, from_text: bool = False) -> Any:
    """Convert a `--set` string (from_text) or a TOML/JSON value to the field's type, or fail with a clear
    message. In a file, a quoted number or boolean is refused: TOML has typed values, and "64" for a batch
    size is more likely a slip than a choice."""
    if isinstance(value, str) and ftype is not str and not from_text:
        raise UsageError(f"config key '{key}' expects {ftype.__name__}, got the string {_shown(value)} "
                         f"(write {'true or false' if ftype is bool else 'numbers'} without quotes)")
    if isinstance(value, str) and ftype is not str:
        text = value.strip()
        if ftype is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
        else:
            try:
                return ftype(text) if ftype is float else int(text, 10)
            except ValueError:
                pass
        raise UsageError(f"config key '{key}' expects {ftype.__name__}, got {_shown(value)}")
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not ftype:
        raise UsageError(f"config key '{key}' expects {ftype.__name__}, got {type(value).__name__} {_shown(value)}")
    return value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (a preset, a checkpoint's JSON); unknown keys fail."""
    if not isinstance(data, dict):
        raise UsageError("config must be a table of sections")
    top: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise UsageError(f"config section '{key}' must be a table")
            values = {}
            for name, v in value.items():
                _split_key(f"{key}.{name}")
                values[name] = _convert(f"{key}.{name}", v, _field_types(key)[name])
            top[key] = SECTIONS[key](**values)
        else:
            _split_key(key)
            top[key] = _convert(key, value, _field_types(None)[key])
    cfg = Config(**top)
    validate(cfg)
    return cfg


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


MAX_WIDTH = 65536
MAX_INT = 10**12  # any integer setting; past it a count, a step or a size is a typo (and may overflow torch)
# Tighter caps, checked when training starts, where one value sizes a single allocation or loop: a typo
# must fail at once, not hours in. Not in validate(): a stored config from before them must still load.
INT_CAPS = {"train.n_samples": 4096, "train.n_critic": 100, "train.batch_size": 2**20, "train.eval_n": 10**7,
            "data.workers": 1024}


def _value(cfg: Config, key: str) -> Any:
    section, _, name = key.rpartition(".")
    return getattr(getattr(cfg, section) if section else cfg, name)


def _numbers(cfg: Config, kind: type):
    """(key, value) of every setting of this type (bools are not ints here)."""
    for section in [None, *SECTIONS]:
        values = cfg if section is None else getattr(cfg, section)
        for f in fields(values):
            v = getattr(values, f.name)
            if isinstance(v, kind) and not isinstance(v, bool):
                yield (f"{section}.{f.name}" if section else f.name), v


def _count_text(v: int) -> str:
    return f"{v:,}" if abs(v) < 10**15 else f"a {len(str(abs(v)))}-digit number"


def _check_floats(cfg: Config) -> None:
    """Every float finite: an inf penalty weight would train NaNs, and NaN slips past every range check."""
    for key, v in _numbers(cfg, float):
        _need(math.isfinite(v), f"{key} must be a finite number, got {v}")


def _check_ints(cfg: Config) -> None:
    """Every integer within MAX_INT (after the specific range checks, whose messages say more)."""
    for key, v in _numbers(cfg, int):
        _need(abs(v) <= MAX_INT, f"{key} must be at most {MAX_INT:,}, got {_count_text(v)}")


def validate(cfg: Config) -> None:
    """Range checks that need no data or models, so bad values fail before any heavy work."""
    from .models import FAMILIES  # local: models import torch, config must stay light
    from .training.augment import OPS as AUGMENT_OPS

    _check_floats(cfg)
    m, t, lo = cfg.model, cfg.train, cfg.loss
    _need(m.kind in FAMILIES, f"model.kind {m.kind!r} is unknown; choose one of: {', '.join(FAMILIES)}")
    _need(m.channels in (1, 3), f"model.channels must be 1 or 3, got {m.channels}")
    _need(8 <= m.resolution <= 4096, f"model.resolution must be from 8 to 4096, got {m.resolution}")
    if FAMILIES[m.kind].needs_power_of_two:
        _need(m.resolution & (m.resolution - 1) == 0 and m.resolution >= 16,
              f"model.resolution must be a power of two >= 16 for {m.kind}, got {m.resolution}")
    # The upper bounds are far above any GAN or VAE trained today; they keep a typo (or a hostile stored
    # config) from asking for terabytes.
    for name in ("latent_dim", "g_width", "d_width", "hidden"):
        _need(0 < getattr(m, name) <= MAX_WIDTH, f"model.{name} must be from 1 to {MAX_WIDTH}, got {_count_text(getattr(m, name))}")
    _need(0 <= m.num_classes <= MAX_WIDTH, f"model.num_classes must be from 0 to {MAX_WIDTH}")
    _need(lo.gan in GAN_LOSSES, f"loss.gan {lo.gan!r} is unknown; choose one of: {', '.join(GAN_LOSSES)}")
    _need(lo.gp_weight >= 0 and lo.r1_gamma >= 0, "loss.gp_weight and loss.r1_gamma must be >= 0")
    _need(lo.kl_warmup >= 0, "loss.kl_warmup must be >= 0")
    _need(m.d_norm in ("batch", "layer", "none"), f"model.d_norm must be batch, layer or none, got {m.d_norm!r}")
    _need(m.likelihood in ("gaussian", "bernoulli"), f"model.likelihood must be gaussian or bernoulli, got {m.likelihood!r}")
    if m.conditional:
        _need(FAMILIES[m.kind].supports_conditional, f"model.conditional is not supported for {m.kind}; "
              f"use one of: {', '.join(k for k, f in FAMILIES.items() if f.supports_conditional)}")
    _need(t.n_critic >= 1, "train.n_critic must be >= 1")
    if FAMILIES[m.kind].objective != "gan":
        for key, off in (("ema_decay", 0.0), ("diffaugment", ""), ("n_critic", 1)):
            _need(getattr(t, key) == off, f"train.{key} applies to GANs, not to a {m.kind}")
    _need(not (lo.gan == "wgan-gp" and lo.r1_gamma > 0), "loss.r1_gamma applies to bce and hinge; WGAN-GP has its gradient penalty")
    _need(not (lo.gan == "wgan-gp" and m.kind == "dcgan" and m.d_norm == "batch"),
          "loss.gan=wgan-gp needs model.d_norm=layer or none: batch norm mixes samples, so the per-sample "
          "gradient penalty is no longer valid (Gulrajani et al. 2017)")
    _need(t.lr_warmup >= 0, "train.lr_warmup must be >= 0")
    _need(t.lr_decay in ("none", "linear", "cosine"), f"train.lr_decay must be none, linear or cosine, got {t.lr_decay!r}")
    _need(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _need(t.ema_start >= 0, "train.ema_start must be >= 0")
    bad_aug = {op.strip() for op in t.diffaugment.split(",") if op.strip()} - set(AUGMENT_OPS)
    _need(not bad_aug, f"train.diffaugment: unknown {', '.join(map(repr, sorted(bad_aug)))}; use a comma list of {', '.join(AUGMENT_OPS)}")
    _need(lo.vae_beta >= 0, "loss.vae_beta must be >= 0")
    _need(lo.recon_sigma > 0, "loss.recon_sigma must be positive")
    _need(cfg.data.limit >= 0, "data.limit must be >= 0")
    _need(bool(cfg.data.source), "data.source must not be empty")
    for name in ("steps", "batch_size", "log_every", "sample_every", "ckpt_every", "n_samples"):
        _need(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    _need(t.epochs >= 0, "train.epochs must be >= 0")
    _need(0 <= t.seed < 2**32, f"train.seed must be in [0, 2^32), got {t.seed}")
    _need(t.keep_checkpoints >= 0, "train.keep_checkpoints must be >= 0")
    _need(t.ckpt_minutes >= 0, f"train.ckpt_minutes must be >= 0 (0: checkpoints by steps only), got {t.ckpt_minutes}")
    _need(t.max_recoveries >= 0, "train.max_recoveries must be >= 0")
    _need(0 < t.recover_lr_factor <= 1, f"train.recover_lr_factor must be in (0, 1], got {t.recover_lr_factor}")
    _need(re.fullmatch(r"auto|none|[A-Za-z_][A-Za-z0-9_]*", t.best_metric) is not None,
          f"train.best_metric must be auto, none or a logged value name such as neg_elbo, got {t.best_metric!r}")
    for name in ("lr_g", "lr_d"):
        _need(0 < getattr(t, name) < 1, f"train.{name} must be in (0, 1), got {getattr(t, name)}")
    for name in ("beta1", "beta2"):
        _need(0 <= getattr(t, name) < 1, f"train.{name} must be in [0, 1), got {getattr(t, name)}")
    _need(cfg.data.device_max_mb >= 0, "data.device_max_mb must be >= 0")
    _need(cfg.data.workers >= -1, f"data.workers must be -1 (auto) or >= 0, got {cfg.data.workers}")
    _need(0 <= cfg.data.translate < m.resolution // 2, f"data.translate must be in [0, {m.resolution // 2}), got {cfg.data.translate}")
    _need(t.eval_every >= 0, "train.eval_every must be >= 0")
    _need(t.eval_metric in EVAL_METRICS, f"train.eval_metric must be one of {', '.join(EVAL_METRICS)}, got {t.eval_metric!r}")
    _need(t.eval_n >= 10, f"train.eval_n must be at least 10, got {t.eval_n}")
    if t.best_metric in EVAL_METRICS:
        _need(t.eval_every > 0 and t.best_metric == t.eval_metric,
              f"train.best_metric={t.best_metric} needs train.eval_every > 0 and train.eval_metric={t.best_metric}")
    if t.eval_every:
        _need(FAMILIES[m.kind].generative, f"train.eval_every applies to generative models, not to a {m.kind}")
    for name in ("cuda_graph", "channels_last", "fuse_norm_act", "subpixel_convs"):
        _need(getattr(t, name) in ("auto", "on", "off"), f"train.{name} must be auto, on or off, got {getattr(t, name)!r}")
    _need(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t.precision!r}")
    _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None,
          f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    _check_ints(cfg)


FAMILY_OPTIONS = {"spectral_norm": "dcgan (resnet_gan always has it)", "d_norm": "dcgan", "likelihood": "vae"}


def check_for_training(cfg: Config, base: Config | None = None) -> None:
    """At the start of training: a model option the family does not read (spectral norm on an MLP GAN)
    is refused rather than silently ignored, INT_CAPS hold, and every text is UTF-8. Not part of validate(): a stored config
    from before these checks must still load. `base` is the resumed run's config, whose own values are
    let be."""
    from .models import FAMILIES
    from .training.augment import OPS as AUGMENT_OPS

    for key, v in _numbers(cfg, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a path's bytes in another encoding: config.toml would be TOML nothing reads
            given = f"--data {not_utf8_shown(v)}" if key == "data.source" else f"{key} '{not_utf8_shown(v)}'"
            # paths are stored resolved: a link with a UTF-8 name would not help
            hint = "rename it" if key in ("data.source", "data.root", "train.eval_features") else "choose another"
            raise UsageError(f"{given}: not valid UTF-8, which the run's config.toml cannot hold; {hint}") from None
    for key, v in _numbers(cfg, int):
        cap = INT_CAPS.get(key)
        if cap is not None and abs(v) > cap and (base is None or v != _value(base, key)):
            raise UsageError(f"{key} must be at most {cap:,}, got {_count_text(v)}")
    best = cfg.train.best_metric
    if best not in ("auto", "none", *EVAL_METRICS):
        from .training.steps import logged_values

        logged = logged_values(cfg, FAMILIES[cfg.model.kind].objective)
        # A typo, or a resume that switches off the penalty it names, would leave best.safetensors unwritten
        # or stuck; a resumed run that never logged it (checked by older aigc with a note) is let be.
        if best not in logged and (base is None or best != base.train.best_metric
                                   or best in logged_values(base, FAMILIES[base.model.kind].objective)):
            raise UsageError(f"train.best_metric={best!r} is not a value this run logs ({', '.join(logged)}; "
                             f"with train.eval_every, its eval_metric); choose one of them, auto or none")
    ops = [op.strip() for op in cfg.train.diffaugment.split(",")]
    if cfg.train.diffaugment.strip() and (base is None or cfg.train.diffaugment != base.train.diffaugment):
        twice = sorted({op for op in ops if ops.count(op) > 1 and op})
        if twice or "" in ops:  # a typo more often than a wish: an op twice is applied twice
            raise UsageError(f"train.diffaugment={cfg.train.diffaugment!r}: "
                             + (f"{', '.join(twice)} given twice" if twice else "an empty item")
                             + f"; give a comma list of distinct ops from {', '.join(AUGMENT_OPS)}")
    m, default = cfg.model, ModelConfig()
    for name, owner in FAMILY_OPTIONS.items():
        value = getattr(m, name)
        if (name not in FAMILIES[m.kind].uses and value != getattr(default, name)
                and (base is None or value != getattr(base.model, name))):
            def plain(v):  # as TOML and --set spell it: true, not Python's True
                return str(v).lower() if isinstance(v, bool) else v

            raise UsageError(f"model.{name}={plain(value)} applies to {owner}, not to a {m.kind}; "
                             f"leave it at {plain(getattr(default, name))}")


def unused_settings(cfg: Config, base: Config | None = None) -> list[str]:
    """Notes for settings away from their defaults that this model family (or loss) does not read. Said,
    not refused: a preset of one family switched to another with --set model.kind keeps its other values.
    Values the resumed run (`base`) already had are let be."""
    from .models import FAMILIES

    m, objective = cfg.model, FAMILIES[cfg.model.kind].objective
    unused = {"model.hidden"} if m.kind != "mlp_gan" else {"model.g_width", "model.d_width"}
    if m.kind == "classifier":
        unused |= {"model.g_width", "model.latent_dim"}
    if objective != "gan":
        unused |= {"loss.gan", "loss.gp_weight", "loss.r1_gamma", "train.lr_d"}
    if objective != "vae":
        unused |= {"loss.vae_beta", "loss.recon_sigma", "loss.kl_warmup"}
    because = {}  # read by this family, but not with these settings
    if objective == "gan" and cfg.loss.gan != "wgan-gp":
        because["loss.gp_weight"] = f" with loss.gan={cfg.loss.gan}"
    if objective == "vae" and m.likelihood == "bernoulli":
        because["loss.recon_sigma"] = " with model.likelihood=bernoulli"
    t = cfg.train
    if objective != "gan":
        unused.add("train.ema_start")  # ema_decay itself is refused there (check_for_training)
    elif t.ema_decay == 0:
        because["train.ema_start"] = " with train.ema_decay=0 (no EMA)"
    if not FAMILIES[m.kind].generative:
        unused |= {"train.n_samples", "train.sample_every"}
    if not t.eval_every:
        for key in ("train.eval_metric", "train.eval_n", "train.eval_features"):
            because[key] = " without train.eval_every (no evaluation during training)"
    if objective == "vae" and cfg.loss.vae_beta == 0:
        because["loss.kl_warmup"] = " with loss.vae_beta=0 (no KL term)"
    default, notes = Config(), []
    for key in sorted(unused | set(because)):
        value = _value(cfg, key)
        if value != _value(default, key) and (base is None or value != _value(base, key)):
            shown = str(value).lower() if isinstance(value, bool) else value
            article = "an" if m.kind[0] in "aeiou" or m.kind.startswith("mlp") else "a"
            notes.append(f"{key}={shown} is not read by {article} {m.kind}{because.get(key, '')}; it changes nothing")
    return notes


# ---- presets --------------------------------------------------------------------------------

def _preset_dir():
    try:
        return resources.files("aigc_cli.presets")  # installed: presets/ is packaged as aigc_cli.presets
    except ModuleNotFoundError:  # run from a checkout with PYTHONPATH=. (no install)
        return Path(__file__).resolve().parent.parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    path = _preset_dir() / f"{name}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.is_file():
        if Path(name).is_dir():
            raise UsageError(f"{name}: is a folder, not a preset file (a .toml file or a name from `aigc presets list`)")
        if Path(name).is_file():  # the user's own file, named without the suffix that marks a preset file
            raise UsageError(f"{name}: a preset file's name must end in .toml")
        if Path(name).exists():  # /dev/null, a fifo: "no such preset file" was wrong
            raise UsageError(f"{name}: not a regular file, so not a preset file")
        if name.endswith(".toml") or "/" in name:
            raise UsageError(f"{name}: no such preset file")
        close = difflib.get_close_matches(name, preset_names(), n=1)
        raise UsageError(f"unknown preset {name!r}; " + (f"did you mean {close[0]!r}? (`aigc presets list` shows "
                         "them all)" if close else f"available: {', '.join(preset_names())}"))
    return path.read_text(encoding="utf-8")


def parse_toml(text: str, origin: str) -> Config:
    try:
        data = tomllib.loads(text)
    except ValueError as e:  # TOMLDecodeError, or an integer of over 4300 digits (Python's conversion limit)
        raise UsageError(f"{origin}: invalid TOML: {value_error_reason(e)}") from None
    try:
        return config_from_dict(data)
    except UsageError as e:  # a typo in the user's own file: say which file
        raise UsageError(f"{origin}: {e}") from None


def is_preset_file(name: str) -> bool:
    return name.endswith(".toml") and Path(name).is_file()


def preset_file_text(path: str) -> str:
    """A user's preset file, read as TOML must be: UTF-8 (a Latin-1 or UTF-16 file is one clear error)."""
    try:  # utf-8-sig: a byte-order mark (Windows Notepad writes one) is dropped, not a TOML syntax error
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start}); save the preset file as UTF-8") from None


# What a run name must be to name a folder under runs/: no slashes, globs or leading dots.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def load_preset(name: str) -> Config:
    """A preset by name, or a path to a TOML file of the same shape."""
    if is_preset_file(name):
        cfg = parse_toml(preset_file_text(name), name)
        stem = Path(name).stem  # a file without `name`: runs/<its file name>-NNN, where that can name a folder
        usable = cfg.name == "custom" and RUN_NAME.fullmatch(stem)
        return dataclasses.replace(cfg, name=stem) if usable else cfg
    cfg = parse_toml(preset_text(name), f"preset {name}")
    return cfg if cfg.name != "custom" else dataclasses.replace(cfg, name=name)


def parse_assignments(items: list[str], warn=None) -> dict[str, str]:
    """`--set key=value` strings to a dict; keys are checked here so typos fail early. A key set twice to
    different values takes the last, and `warn` says so (a script that appends its own --set)."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        _split_key(key)
        if warn is not None and key in out and out[key].strip() != value.strip():
            warn(f"--set {key} is given twice ({out[key]!r}, then {value!r}); the last is used")
        out[key] = value
    return out
