"""The generator as an ONNX model: inputs `z` (batch, latent_dim) float32 and, for a class-conditional
model, `labels` (batch,) int64; output `images` (batch, channels, height, width) float32 in [-1, 1]
(pixel = (x + 1) * 127.5). The batch size is free. Runs without aigc or PyTorch (onnxruntime, a
browser, C++). The aigc.* metadata of a safetensors export goes into the model's metadata_props.
Needs the optional `onnx` and `onnxscript` packages (`pip install 'aigc[onnx]'`)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .errors import UsageError
from .files import atomic_write

OPSET = 18
IR_VERSION = 8  # the oldest that holds opset 18: onnxruntime 1.14+ (2023) loads it; onnx 1.16+ writes 10


class _Images(torch.nn.Module):
    """G with the inputs named as the model declares them (None for labels is no graph input)."""

    def __init__(self, G: torch.nn.Module):
        super().__init__()
        self.G = G

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.G(z, labels).float()


def export_onnx(ckpt: ckpt_io.Checkpoint, out: Path, dtype: str, ema: bool, meta: dict[str, str], warn=None) -> dict:
    if dtype != "fp32":
        raise UsageError(f"--dtype {dtype}: ONNX exports are fp32 (the runtimes' CPU kernels are); "
                         "export a .safetensors for fp16 or bf16")
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as e:
        raise UsageError(f"--out {out}: exporting ONNX needs the onnx and onnxscript packages ({e.name} is "
                         "not installed): pip install 'aigc[onnx]'") from None
    if out.is_file():  # as a .safetensors export: only an earlier export of aigc's, or what is no model
        try:
            found = onnx.load(str(out), load_external_data=False)
        except Exception:  # noqa: BLE001 - not ONNX (a write cut short, say): replaced
            found = None
        if found is not None and len(found.graph.node) and found.producer_name != "aigc":
            raise UsageError(f"--out {out}: holds an ONNX model that aigc did not write "
                             f"({found.producer_name or 'no producer named'}), which this would replace; "
                             "name another file or remove it first")
    from . import __version__
    from .sampling import generator_from

    G, _ = generator_from(ckpt, "cpu", "fp32", ema=ema, warn=warn)
    model = _Images(G).eval()
    m = ckpt.config.model
    batch = torch.export.Dim("batch", min=1)
    z = torch.zeros(2, m.latent_dim)
    args, names, shapes = (z,), ["z"], ({0: batch},)
    if m.conditional:
        args, names, shapes = (z, torch.zeros(2, dtype=torch.long)), ["z", "labels"], ({0: batch}, {0: batch})
    with atomic_write(out) as tmp:
        # The exporter prints its progress on stdout (where --json output goes) and warns at length.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(model, args, str(tmp), input_names=names, output_names=["images"],
                                  dynamic_shapes=shapes, opset_version=OPSET, external_data=False, verbose=False)
            except ImportError as e:  # an onnxscript that imports but lacks what this torch needs
                raise UsageError(f"--out {out}: the installed onnx/onnxscript do not work with torch "
                                 f"{torch.__version__} ({e}); pip install -U 'aigc[onnx]'") from None
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, meta)
        proto.ir_version = min(proto.ir_version, IR_VERSION)
        proto.producer_name, proto.producer_version = "aigc", __version__
        onnx.save(proto, str(tmp))
    return {"out": str(out), "format": "onnx", "dtype": dtype, "opset": OPSET, "inputs": names,
            "parameters": ckpt_io.param_counts(ckpt)["G"], "bytes": out.stat().st_size}
