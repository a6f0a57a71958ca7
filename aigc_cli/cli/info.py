"""`aigc info`: what a checkpoint or exported artifact holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .output import check_result_written, emit_json, handles_errors, human_console, stdout_is_result, warn


@handles_errors
def info(
    checkpoint: str = typer.Argument(..., metavar="CHECKPOINT", help="Checkpoint file, run folder or exported .safetensors."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON object."),
) -> None:
    """Print model kind, step, images seen, parameter counts, precision and config."""
    from .. import checkpoint as ckpt_io
    from ..errors import one_line
    from ..models import FAMILIES
    from ..training.run_folder import TRANSIENT_KEY
    from ..training.state import recorded_best

    ck = ckpt_io.load(checkpoint, warn=warn)
    # absolute, as sample and eval name a checkpoint: the step file behind last/best, which the next save replaces
    result = {"path": str(ck.step_file), "kind": ck.kind, "model": ck.config.model.kind, "step": ck.step,
              "images_seen": ck.images_seen, "parameters": ckpt_io.param_counts(ck),
              "precision": ck.meta.get("aigc.precision", ""), "dtype": ck.meta.get("aigc.dtype", "fp32"),
              "created": ck.meta.get("aigc.created", ""), "torch": ck.meta.get("aigc.torch", ""),
              "format": int(ck.meta["aigc.format"]), "config": ck.config.to_dict()}
    if ck.class_names:
        result["class_names"] = ck.class_names
    chosen_by, value, best_step = recorded_best(ck.meta)
    if chosen_by and value is not None:  # the run's best when this was saved: what best.safetensors then held
        result["best"] = {"metric": chosen_by, "value": value, "step": best_step}
    if ck.meta.get(TRANSIENT_KEY):  # "time": written by train.ckpt_minutes; the run's next save deletes it
        result["saved_for"] = ck.meta[TRANSIENT_KEY]
    if ck.kind == "export":  # which weights it holds, and where from
        result.update(weights=ck.generator_weights()[1], source=ck.meta.get("aigc.source", ""))
    if json_out:
        emit_json(result)
        return
    lines = [f"{result['path']}: {result['kind']} of a {result['model']} (format {result['format']})",
             f"step {result['step']}, {result['images_seen']:,} images seen, trained in {result['precision']}, "
             f"weights {result['dtype']}, created {result['created']} with torch {result['torch']}"]
    if "weights" in result:
        what = ("the decoder" if ck.config.model.kind == "vae" else  # a VAE has no EMA
                "the EMA generator" if result["weights"] == "G_ema" else "the raw generator")
        lines.append(f"exported {what} "
                     f"from {result['source'] or 'an unrecorded checkpoint'}")
    if "best" in result:
        best = result["best"]
        at = "" if best["step"] is None else " (this checkpoint)" if best["step"] == ck.step else f" at step {best['step']}"
        lines.append(f"the run's best when this was saved: {best['metric']} {best['value']:.6g}{at}")
    if "saved_for" in result:  # only the run's own step files are pruned: best.safetensors and set-aside branches stay
        lines.append("written by train.ckpt_minutes" + (
            ", in a branch set aside (kept)" if Path(result["path"]).parent.name != "checkpoints" else
            ": the run's next checkpoint deletes its step file; best.safetensors stays" if Path(ck.path).name == "best.safetensors"
            else ": the run's next checkpoint deletes this step file (copy it to keep it)"))
    if "class_names" in result:
        sampled = ck.config.model.conditional and FAMILIES[ck.config.model.kind].generative
        lines.append(f"classes{' (for `aigc sample --class`)' if sampled else ''}: {ck.numbered_classes()}")
    lines.append("parameters: " + ", ".join(f"{k} {v:,}" for k, v in result["parameters"].items()))
    stdout_is_result()
    c = human_console()
    for line in lines:  # metadata is anyone's text: no terminal escape sequences reach the terminal
        c.print(one_line(line))
    c.print("config: " + json.dumps(result["config"], indent=2))  # JSON escapes control characters itself
    check_result_written()
