"""Feature extractors for `aigc eval`: Inception (the default, as pytorch-fid) or the penultimate layer
of a domain classifier trained with `aigc train`. Each has `.name`, a `.protocol` dict (what a result
or a cached reference statistic depends on) and `.embed(images_uint8, batch_size) -> (features, probs)`,
float64 on the CPU."""

from __future__ import annotations

import hashlib

import torch

from .. import checkpoint as ckpt_io
from ..data.transforms import conform
from ..errors import UsageError
from ..sampling import from_uint8
from ..training.precision import Precision

PRECISIONS = ("fp32", "bf16", "fp16")


def extractor_precision(precision: str | Precision) -> str:
    """The extractor's precision: `auto` means fp32, so reference statistics and published numbers
    (computed in fp32) stay comparable; an explicit bf16/fp16 is honoured."""
    name = precision.name if isinstance(precision, Precision) else precision
    return "fp32" if name in ("auto", "", None) else name


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A content hash of a state dict: names, dtypes, element counts and bytes, in sorted order. (Each tensor
    is flattened before its shape is hashed, so the shape itself is not; the names and the model's config fix
    the shapes. Left so: hashing them now would change every classifier's weights_sha256, and with it the
    statistics cache keys, the --ref files' extractor match and a resumed run's best.)"""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ClassifierFeatures:
    """The penultimate layer of a classifier trained by `aigc train` on the domain's labelled data."""

    def __init__(self, path: str, device: torch.device, amp: Precision | str, option: str = "--features",
                 warn=None):
        try:  # with `warn`, a run folder whose newest checkpoint is damaged gives its newest that reads
            ck = ckpt_io.load(path, warn=None if warn is None else lambda text: warn(f"{option} {text}"))
        except UsageError as e:  # name the option too: the checkpoint being scored is another file
            text = str(e)
            raise UsageError(f"{option} {text}" if text.startswith(str(path)) else f"{option} {path}: {text}") from None
        if ck.config.model.kind != "classifier":
            raise UsageError(f"{option} {path}: expected a classifier checkpoint, got a {ck.config.model.kind}")
        if isinstance(amp, str):
            amp = Precision(extractor_precision(amp), torch.device(device))
        self.C = ckpt_io.build_net(ck, "C").to(device).eval()
        self.cfg, self.device, self.amp = ck.config.model, torch.device(device), amp
        self.data_source, self.data_root = ck.config.data.source, ck.config.data.root or None
        self.name = f"classifier:{ck.step_file}"  # absolute, and not last.safetensors, which moves on
        self.protocol = {
            "extractor": self.name,
            "weights_sha256": state_sha256(ck.net_state("C")),
            "resize": f"conformed to the classifier's input ({self.cfg.channels}x{self.cfg.resolution}x"
                      f"{self.cfg.resolution}, antialiased bilinear, centre crop)",
            "input": "uint8 -> [-1, 1]",
            "feature_dim": self.C.head.in_features,
            "num_classes": self.C.head.out_features,
            "precision": amp.name,
            "extractor_resolution": self.cfg.resolution,
            "extractor_channels": self.cfg.channels,
        }

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and class probabilities (for the Inception Score), float64 on the CPU
        (on_device: float32 on the classifier's device)."""
        feats, probs = [], []
        for chunk in images.split(max(1, batch_size)):
            chunk = conform(chunk.cpu(), self.cfg.channels, self.cfg.resolution)
            with self.amp.autocast():
                f = self.C.features(from_uint8(chunk.to(self.device)))
                logits = self.C.head(f)
            feats.append(f.float())
            probs.append(torch.softmax(logits.float(), 1))
        if on_device:
            return torch.cat(feats), torch.cat(probs)
        return torch.cat(feats).cpu().double(), torch.cat(probs).cpu().double()

    def __call__(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.embed(images, batch_size)[0]


def make_extractor(features: str | None, inception_weights: str | None, device: torch.device | str,
                   precision: str | Precision = "fp32", option: str = "--features", warn=None):
    """features None or "": Inception (pool3 features, 1008-way probabilities), with the weights from
    `inception_weights`, else $AIGC_INCEPTION_WEIGHTS or the cache (see metrics/weights.py); missing
    weights are a UsageError here, before any work. Otherwise a classifier checkpoint or run folder
    (`warn`: see ClassifierFeatures)."""
    device = torch.device(device)
    prec = extractor_precision(precision)
    if prec not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {prec!r}")
    if features:
        if inception_weights:
            raise UsageError("--inception-weights applies to the Inception extractor; "
                             "it cannot be combined with --features CLASSIFIER_CKPT")
        return ClassifierFeatures(features, device, Precision(prec, device), option, warn)
    from .inception import InceptionFeatures  # noqa: PLC0415 - heavy, and only this path needs it

    return InceptionFeatures(inception_weights, device, prec)
