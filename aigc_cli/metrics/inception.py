"""The Inception-v3 network of FID, as pytorch-fid runs it, and the `aigc eval` feature extractor on it.

`FIDInceptionV3` is pytorch-fid's `fid_inception_v3()` written out (torchvision's Inception3 layout with
the FID blocks: average pools that leave the zero padding out of the mean, a max pool in the last block,
1008 classes), so its state dict has exactly the keys and shapes of `pt_inception-2015-12-05-6726825d.pth`.
Nothing is imported from pytorch-fid or downloaded here; the weights come from `weights.py`.

`InceptionFeatures` does what pytorch-fid does to an image file: uint8 RGB (grey repeated to three
channels, as PIL's convert('RGB')) -> float32 [0, 1] -> bilinear resize to 299x299 (align_corners=False)
-> [-1, 1] -> the 2048-d global average pool. For the Inception Score it also returns the 1008-way
softmax of the pool features times the fc weights, without the fc bias: torch-fidelity's
`logits_unbiased`, its default for the Inception Score (as the original TensorFlow code computed it).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from . import weights as W

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BasicConv2d(nn.Module):
    """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU, named `conv` and `bn` as in torchvision."""

    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the padded zeros out of the mean.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (`max_pool=False`: TF-style average pool) and Mixed_7c (`max_pool=True`: the FID
    network's max pool, most likely a slip in the original graph, kept for identical numbers)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 (state dict keys as `pt_inception-2015-12-05-6726825d.pth`).

    `forward` takes float images in [-1, 1] at 299x299 and returns the (N, 2048) pool features;
    `logits` maps those to the 1008 class logits."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)

    def logits(self, pool: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Class logits of the pool features; without the bias by default (torch-fidelity's
        `logits_unbiased`, which its Inception Score uses)."""
        out = pool @ self.fc.weight.t()
        return out + self.fc.bias if bias else out


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1 or 3, H, W) on any device -> float32 (N, 3, 299, 299) in [-1, 1], in pytorch-fid's
    order of operations (ToTensor's /255, bilinear resize, then 2x - 1) so the numbers are the same."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    x = images.to(torch.float32).div(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


_NETS: dict[tuple, FIDInceptionV3] = {}
_NETS_LOCK = threading.Lock()


def load_network(info: W.WeightsFile, device: torch.device) -> FIDInceptionV3:
    """The network with the verified weights file's state dict, in eval mode on `device`; built once
    per (file, size, mtime, device) in this process."""
    key = (*info.cache_key, str(device))
    with _NETS_LOCK:
        net = _NETS.get(key)
        if net is None:
            with torch.device("meta"):
                net = FIDInceptionV3()  # no random init of 24M parameters only to overwrite them
            reference = {k: v.shape for k, v in net.state_dict().items()}
            state = W.load_state_dict(info, reference)
            net.load_state_dict(state, assign=True)
            net = net.to(device).eval().requires_grad_(False)
            _NETS[key] = net
    return net


@contextlib.contextmanager
def _cuda_settings(device: torch.device, strict_fp32: bool):
    """On CUDA: cuDNN autotuning, and IEEE fp32 convolutions (no TF32) when computing in fp32, so the
    features agree with fp32 on the CPU. The previous settings are restored afterwards."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    old_benchmark = cudnn.benchmark
    conv = getattr(cudnn, "conv", None)
    new_api = conv is not None and hasattr(conv, "fp32_precision")
    old_tf32 = conv.fp32_precision if new_api else cudnn.allow_tf32
    cudnn.benchmark = True
    if strict_fp32:
        if new_api:
            conv.fp32_precision = "ieee"
        else:
            cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.benchmark = old_benchmark
        if strict_fp32:
            if new_api:
                conv.fp32_precision = old_tf32
            else:
                cudnn.allow_tf32 = old_tf32


class InceptionFeatures:
    """FID's Inception-v3 pool features (2048-d) and 1008-way class probabilities, as pytorch-fid.

    `weights` is an explicit path to `pt_inception-2015-12-05-6726825d.pth` or None (then
    $AIGC_INCEPTION_WEIGHTS, then the torch hub cache); see `weights.resolve_weights_path`."""

    name = "inception-v3-fid"

    def __init__(self, weights: str | None, device: torch.device | str, precision: str = "fp32"):
        precision = getattr(precision, "name", precision) or "fp32"
        if precision == "auto":
            precision = "fp32"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device, self.precision = torch.device(device), precision
        self.weights = W.verified_weights(weights)
        self.net = load_network(self.weights, self.device)
        self.protocol = {
            "extractor": "inception-v3-fid (pytorch-fid layout)",
            "weights": os.path.basename(self.weights.path),  # the file used; its hash says which weights
            "weights_sha256": self.weights.sha256,
            "weights_verified": self.weights.verified,
            "resize": f"bilinear to {INPUT_SIZE}x{INPUT_SIZE}, align_corners=False",
            "input": "uint8 RGB (grey repeated to 3 channels) -> [0,1] -> [-1,1]",
            "feature_dim": FEATURE_DIM,
            "num_classes": NUM_CLASSES,
            "is_logits": "pool features x fc weights, no bias (torch-fidelity's logits_unbiased)",
            "precision": precision,
        }

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int, on_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, 1 or 3, H, W) -> (features float64 (N, 2048), probs float64 (N, 1008)),
        both on the CPU. Chunks of `batch_size` go to the device as uint8 and are converted there.
        on_device: float32 results left on the extractor's device (no copy back, no wait for it)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        feats, probs = [], []
        with _cuda_settings(self.device, strict_fp32=self.precision == "fp32"):
            for chunk in images.split(max(1, int(batch_size))):
                x = preprocess(chunk.to(self.device))  # resize and scale in fp32 whatever the precision
                with self._autocast():
                    pool = self.net(x)
                pool = pool.float()
                logits = self.net.logits(pool)  # fp32, outside autocast
                feats.append(pool)
                probs.append(torch.softmax(logits, 1))
        if not feats:
            return torch.zeros(0, FEATURE_DIM, dtype=torch.float64), torch.zeros(0, NUM_CLASSES, dtype=torch.float64)
        if on_device:
            return torch.cat(feats), torch.cat(probs)
        return torch.cat(feats).cpu().double(), torch.cat(probs).cpu().double()

    def __call__(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.embed(images, batch_size)[0]
