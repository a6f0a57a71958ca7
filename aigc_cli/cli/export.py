"""`aigc export`: a generator-only artifact, safetensors or ONNX."""

from __future__ import annotations

from pathlib import Path

import typer

from .output import QUIET_HELP, emit_json, handles_errors, human_console, sigterm_interrupts, warner


@handles_errors
@sigterm_interrupts
def export(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint file, run folder, or an export (to change its dtype)."),
    out: Path = typer.Option(..., "--out", "-o", metavar="FILE", help="Output path: .safetensors (for aigc sample/info/eval) or .onnx (an ONNX model for onnxruntime and others; needs pip install 'aigc\\[onnx]')."),
    dtype: str = typer.Option("fp32", "--dtype", metavar="DTYPE", help="Weight dtype: fp32, fp16 or bf16 (ONNX: fp32)."),
    no_ema: bool = typer.Option(False, "--no-ema", metavar="", help="Export the raw generator weights, not their EMA."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object describing the artifact."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help=QUIET_HELP),
) -> None:
    """Write the generator (a VAE's decoder) with its config: safetensors, which `aigc sample` and `aigc info` accept, or ONNX."""
    from .. import checkpoint as ckpt_io
    from ..errors import one_line
    from ..export import export_generator

    warn = warner(quiet)  # one for both: each message once
    result = export_generator(ckpt_io.load(checkpoint, warn=warn), out, dtype, ema=not no_ema, warn=warn)
    if json_out:
        emit_json(result)
    else:
        kind = f"ONNX opset {result['opset']}, " if result["format"] == "onnx" else ""
        human_console(quiet=quiet).print(one_line(f"wrote {result['out']} ({kind}{result['parameters']:,} parameters, "
                                                  f"{dtype}, {result['bytes']:,} bytes)"))
