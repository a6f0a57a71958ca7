"""`aigc train`: a preset plus overrides -> a run folder with checkpoints, sample grids and metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from .output import emit_json, handles_errors, human_console


def next_run_dir(name: str, base: Path = Path("runs")) -> Path:
    """runs/<preset>-NNN with the next free number, so reruns never overwrite earlier work."""
    taken = [int(m.group(1)) for p in base.glob(f"{name}-*") if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)", p.name))]
    return base / f"{name}-{max(taken, default=0) + 1:03d}"


@handles_errors
def train(
    preset: str = typer.Option(..., "--preset", "-p", help="Preset name (see `aigc presets list`) or a path to a TOML file."),
    data: Optional[str] = typer.Option(None, "--data", help="Data source: shapes, mnist, fashion-mnist, cifar10, or an image/IDX folder."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder holding torchvision datasets."),
    download: bool = typer.Option(False, "--download", help="Allow downloading a missing torchvision dataset."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<preset>-NNN)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (overrides the preset)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the data (overrides --steps)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per step."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, bf16, fp16 or fp32 (auto: bf16 on a capable GPU, fp32 on CPU)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for weights, data order and latents."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override any config key, e.g. --set train.lr_g=1e-4 (repeatable)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout; progress goes to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors (and --json output)."),
) -> None:
    """Train a model from a preset; writes checkpoints, sample grids and metrics.jsonl to the run folder."""
    from ..config import load_preset, parse_assignments
    from ..errors import UsageError

    cfg = load_preset(preset)
    assignments = parse_assignments(overrides or [])
    flags = {"data.source": data, "data.root": data_root, "data.download": True if download else None,
             "train.steps": steps, "train.epochs": epochs, "train.batch_size": batch_size,
             "train.precision": precision, "train.device": device, "train.seed": seed}
    assignments.update({k: v for k, v in flags.items() if v is not None})
    cfg = cfg.with_overrides(assignments)  # validates every value before any data or model is touched
    if steps is not None and epochs is None and cfg.train.epochs:
        cfg = cfg.with_overrides({"train.epochs": 0})  # an explicit --steps wins over a preset's epochs

    run_dir = out if out is not None else next_run_dir(cfg.name)
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("*.safetensors")):
        raise UsageError(f"--out {run_dir}: already holds a run; choose another folder or remove it")
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir}: exists and is not a folder")

    from ..training.loop import train as run_training
    from .output import ConsoleReporter

    console = human_console(json_out, quiet)
    summary = run_training(cfg, run_dir, ConsoleReporter(console))
    if json_out:
        emit_json(summary)
    else:
        console.print(f"done: {summary['steps']} steps in {summary['seconds']:.1f}s; checkpoint {summary['checkpoint']}")
        if "samples" in summary:
            console.print(f"samples: {summary['samples']}")
        if "test_accuracy" in summary:
            console.print(f"held-out accuracy: {summary['test_accuracy']:.4f}")
