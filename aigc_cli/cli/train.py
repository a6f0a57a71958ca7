"""`aigc train`: a preset plus overrides -> a run folder with checkpoints, sample grids and metrics."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import List, Optional

import typer

from .output import QUIET_HELP, emit_json, handles_errors, human_console, seed_in_range, sigterm_raises, warner


def next_run_dir(name: str, base: Path = Path("runs")) -> tuple[Path, list[Path]]:
    """runs/<preset>-NNN with the next free number, so reruns never overwrite earlier work. The folder is
    made here; returned with the folders made for it, deepest first (for run_lock to remove on failure)."""
    from ..config import RUN_NAME
    from ..errors import UsageError
    from ..training.run_folder import check_writable_run

    if not RUN_NAME.fullmatch(name):
        raise UsageError(f"the run name {name!r} cannot name a folder under {base}/ (use letters, digits, "
                         "'.', '_', '+' and '-'); set another name or give --out")
    taken = [int(m.group(1)) for p in base.glob(f"{name}-*") if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)", p.name))]
    number = max(taken, default=0) + 1
    check_writable_run(base / f"{name}-{number:03d}")
    made = [p for p in (base, *base.parents) if not p.exists()]
    while True:  # made here, at once: two commands started together get two folders
        path = base / f"{name}-{number:03d}"
        try:
            path.mkdir(parents=True)
            return path, [path, *made]
        except FileExistsError:
            if not (path.exists() or path.is_symlink()):  # not the number taken: something on the way
                raise
            number += 1


def _check_outside_data(run_dir: Path, source: str) -> None:
    """A run folder inside an image folder that is the data adds its sample grids to the images: a resume
    (which lists the folder again) or the next run trains on them, as a class of their own where the
    folder has classes."""
    from ..data import BUILTIN_SOURCES, folder_kind
    from ..errors import UsageError

    data = Path(source).expanduser()
    if source in BUILTIN_SOURCES or not data.is_dir() or folder_kind(str(data)) != "folder":
        return
    data, run = data.resolve(), run_dir.resolve()
    if run == data or data in run.parents:
        raise UsageError(f"the run folder {run_dir} is inside the image folder --data {source}: its sample grids "
                         "would become training images; give --out a folder outside it")


def resume_run_dir(path: Path) -> Path:
    """The run folder a checkpoint (or a run's checkpoints/ folder) belongs to: run/checkpoints/x.safetensors
    -> run, and run/checkpoints/after-step-N/x.safetensors (a branch set aside) -> run too."""
    path = path.expanduser()
    # As written first: a checkpoints/ that is a link (to a bigger disk) stays in its run. Else where links
    # lead: a link to a checkpoint of some run.
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        folder = candidate if candidate.is_dir() else candidate.parent
        if folder.name.startswith("after-step-") and folder.parent.name == "checkpoints":
            folder = folder.parent
        if folder.name == "checkpoints":
            return folder.parent
    return folder


def _run_target(ckpt, out: Path | None, assignments: dict) -> dict:
    """Going back (`--resume run/checkpoints/step-N.safetensors`, no --preset) continues the run: to the
    length its config.toml now asks for, which a later resume may have raised, not to the one stored in
    that older checkpoint (which was then already reached: "nothing to train"). --steps, --epochs and
    --set train.steps/epochs are applied after this and win."""
    from ..config import load_preset
    from ..errors import UsageError

    if out is None or ckpt.path.resolve().parent != (Path(out) / "checkpoints").resolve():
        return {}
    if {"train.steps", "train.epochs"} & set(assignments) or not (Path(out) / "config.toml").is_file():
        return {}
    try:
        run = load_preset(str(Path(out) / "config.toml"))
    except UsageError:  # edited by hand, or not UTF-8: the checkpoint's own length then
        return {}
    return {"train.steps": run.train.steps, "train.epochs": run.train.epochs}


@handles_errors
def train(
    preset: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAME|FILE", help="Preset name (see `aigc presets list`) or a path to a TOML file; optional with --resume."),
    data: Optional[str] = typer.Option(None, "--data", metavar="SOURCE", help="Data source: shapes, mnist, fashion-mnist, cifar10, or an image/IDX folder."),
    data_root: Optional[str] = typer.Option(None, "--data-root", metavar="DIR", help="Folder holding torchvision datasets."),
    download: bool = typer.Option(False, "--download", metavar="", help="Allow downloading a missing torchvision dataset."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="DIR", help="Run folder (default: runs/<preset>-NNN)."),
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Training steps (overrides the preset)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", metavar="N", help="Passes over the data (instead of --steps)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", metavar="N", help="Images per step."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="PRECISION", help="auto, bf16, fp16 or fp32 (auto: bf16 on a capable GPU, fp32 on CPU)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="SEED", callback=seed_in_range, help="Random seed for weights, data order and latents."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override any config key, e.g. --set train.lr_g=1e-4 (repeatable)."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="auto|PATH", help="auto: continue the run in --out from its newest valid checkpoint (or start fresh); or a checkpoint file / run folder."),
    exit_on_usr1: bool = typer.Option(False, "--exit-on-usr1", metavar="", help="On SIGUSR1 save and exit with code 75 (default: save and go on)."),
    strict: bool = typer.Option(False, "--strict", metavar="", help="Any unreadable image file is an error (default: skip it with a warning)."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print one JSON summary on stdout; progress goes to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help=QUIET_HELP),
) -> None:
    """Train a model from a preset; writes checkpoints, sample grids and metrics.jsonl to the run folder."""
    from ..config import RUN_NAME, check_for_training, is_preset_file, load_preset, parse_assignments
    from ..data import BUILTIN_SOURCES
    from ..data.cache import max_bytes
    from ..errors import Interrupted, UsageError
    from ..files import check_name_lengths
    from ..training.run_folder import check_writable_run, run_lock
    from ..training.state import find_resume

    console = human_console(json_out, quiet)
    warn = warner(quiet)
    max_bytes()  # a bad AIGC_CACHE_MAX_GB is said now, not at a cache write after the data has loaded
    if steps is not None and epochs is not None:
        raise UsageError("give --steps or --epochs, not both (--epochs N means N passes over the data)")
    if epochs is not None and epochs < 1:  # train.epochs=0 means "count in steps": never what --epochs 0 asks
        raise UsageError(f"--epochs must be at least 1, got {epochs}")
    assignments = parse_assignments(overrides or [], warn)
    if "model.num_classes" in assignments:  # training sets it from the data; a --set would be overwritten unseen
        raise UsageError("model.num_classes is set from the data (the classes it holds); drop --set model.num_classes")
    flags = {"data.source": data, "data.root": data_root, "data.download": True if download else None,
             "data.strict": True if strict else None, "train.steps": steps, "train.epochs": epochs,
             "train.batch_size": batch_size, "train.precision": precision, "train.device": device, "train.seed": seed}
    flags = {k: v for k, v in flags.items() if v is not None}

    if resume is not None and resume != "auto" and out is None:
        out = resume_run_dir(Path(resume))
    if resume == "auto" and out is None:
        raise UsageError("--resume auto needs --out, the run folder to continue")
    with contextlib.ExitStack() as held:
        # SIGTERM raises until training's own handler takes over, so that a stop now removes what the command
        # has just made (run_lock) and says `stopped:`, rather than killing the process on the spot.
        with sigterm_raises():
            if out is not None:
                check_name_lengths(out, "--out")  # before the checks below stat it
                if out.exists() and not out.is_dir():
                    raise UsageError(f"--out {out}: exists and is not a folder")
                check_writable_run(out)
                # Held from here to the end: what to resume, and whether the folder holds a run, are decided by
                # one process at a time (a second is refused at once, not after loading the data).
                held.enter_context(run_lock(out))
            ckpt = find_resume(resume, out, warn) if resume is not None else None
            if preset is not None:
                cfg = load_preset(preset)
            elif ckpt is not None:
                cfg = ckpt.config  # resuming without a preset: the run's own config, plus any overrides
                if resume != "auto":
                    cfg = cfg.with_overrides(_run_target(ckpt, out, assignments))
            else:
                raise UsageError("--preset is required (see `aigc presets list`)" +
                                 (f"; --resume auto found no checkpoint in {out}" if resume == "auto" else ""))
            # --set values are checked first even where a flag then overrides them; all before any heavy work.
            with_sets = cfg.with_overrides(assignments)
            try:
                cfg = with_sets.with_overrides(flags)
            except UsageError as e:  # the settings passed: an option's value is wrong, and is named as given
                raise UsageError(_named_as_option(str(e), flags)) from None
            _say_flags_over_settings(flags, assignments, with_sets, cfg, warn)  # values are good: now worth saying
            # Paths are stored absolute, so eval and resume from another working folder find the same files: the
            # data root always (`--download` may be about to make it), the others where they name a file here.
            paths = {"data.source": cfg.data.source if cfg.data.source not in BUILTIN_SOURCES else "",
                     "data.root": cfg.data.root, "train.eval_features": cfg.train.eval_features}
            cfg = cfg.with_overrides({key: str(Path(v).expanduser().resolve()) for key, v in paths.items()
                                      if v and (key == "data.root" or Path(v).expanduser().exists())})
            # Steps asked for win over a preset's epochs: --steps always (flags win over --set), --set train.steps
            # unless a --set train.epochs came with it.
            steps_given = steps is not None or "train.steps" in assignments and "train.epochs" not in assignments
            if steps_given and epochs is None and cfg.train.epochs:
                cfg = cfg.with_overrides({"train.epochs": 0})
            if {"train.steps", "train.epochs"} <= set(assignments) and steps is None and epochs is None and cfg.train.epochs:
                warn(f"--set train.epochs={assignments['train.epochs']} is used over --set "
                     f"train.steps={assignments['train.steps']} (epochs, when set, decide the length)")
            try:
                check_for_training(cfg, ckpt.config if ckpt is not None else None)
            except UsageError as e:
                raise UsageError(_named_as_option(str(e), flags)) from None
            if ckpt is not None:  # an architecture change is refused now, not after loading (or downloading) data
                import dataclasses

                from ..training.state import check_compatible

                # The class count comes from the data (checked once it has loaded); all else must match now.
                same_classes = dataclasses.replace(cfg.model, num_classes=ckpt.config.model.num_classes)
                check_compatible(ckpt.config, dataclasses.replace(cfg, model=same_classes), ckpt.path)

            run_dir = out
            if run_dir is None:
                if preset is not None and is_preset_file(preset) and cfg.name == "custom" and not RUN_NAME.fullmatch(Path(preset).stem):
                    warn(f"the preset file's name {Path(preset).stem!r} cannot name a run folder (letters, digits, '.', "
                         "'_', '+' and '-'), so the run goes to runs/custom-NNN; set `name` in the file, or give --out")
                run_dir, made = next_run_dir(cfg.name)
                held.enter_context(run_lock(run_dir, made=made))
            _check_outside_data(run_dir, cfg.data.source)
            holds_run = any((run_dir / "checkpoints").glob("*.safetensors"))
            if resume is None and holds_run:
                raise UsageError(f"--out {run_dir}: already holds a run; pass --resume auto to continue it, "
                                 "or choose another folder")
            own = (run_dir / "checkpoints").resolve()
            if ckpt is not None and holds_run and ckpt.path.resolve().parent != own:
                aside = ckpt.path.resolve().parent.parent == own
                raise UsageError(f"--out {run_dir}: already holds a run, and --resume {resume} is a checkpoint of "
                                 + ("a branch set aside from it" if aside else "another one")
                                 + "; continue that in a new --out (a fork)")

            from ..training.loop import train as run_training
            from .output import ConsoleReporter

        try:
            summary = run_training(cfg, run_dir, ConsoleReporter(console), resume=ckpt, exit_on_usr1=exit_on_usr1,
                                   run_locked=True)
        except Interrupted as e:  # a stop that saved: scripts get the object too (the `stopped:` line follows)
            if json_out and e.summary is not None:
                try:
                    emit_json(e.summary)
                except OSError as unwritten:  # the stop's own exit code (143: requeue) matters more
                    warn(f"{unwritten.filename}: {unwritten.strerror}; the --json summary of the stop is lost")
            raise
    if json_out:
        emit_json(summary)
    else:
        ran = summary["steps"] - summary["start_step"]
        steps_ran = f"{ran} step{'s' * (ran != 1)}"
        span = (steps_ran if not summary["start_step"] else f"{steps_ran} (step {summary['start_step']} to "
                f"{summary['steps']})" if ran else f"0 steps (already at step {summary['steps']})")
        console.print(f"done: {span} in {summary['seconds']:.1f}s; checkpoint {summary['checkpoint']}")
        if "samples" in summary:
            console.print(f"samples: {summary['samples']}")
        if "test_accuracy" in summary:
            console.print(f"held-out accuracy: {summary['test_accuracy']:.4f} ({summary['accuracy_images']} images)")
        if "train_accuracy" in summary:  # an image folder has no held-out split
            console.print(f"accuracy on {summary['accuracy_images']} training images: {summary['train_accuracy']:.4f} "
                          "(an image folder has no held-out split)")


# The option that sets each key; --steps and --epochs each also decide the other (the run counts in one).
FLAG_OF = {"data.source": "--data", "data.root": "--data-root", "data.download": "--download", "data.strict": "--strict",
           "train.steps": "--steps", "train.epochs": "--epochs", "train.batch_size": "--batch-size",
           "train.precision": "--precision", "train.device": "--device", "train.seed": "--seed"}
ALSO_DECIDES = {"train.steps": "train.epochs", "train.epochs": "train.steps"}


def _named_as_option(message: str, flags: dict) -> str:
    """"train.batch_size must be positive" -> "--batch-size must be positive": the user typed the option."""
    for key in flags:
        if message.startswith(f"{key} "):
            return FLAG_OF[key] + message[len(key):]
    return message


def _say_flags_over_settings(flags: dict, assignments: dict[str, str], with_sets, final, warn) -> None:
    """An option wins over a --set of the same key, as options do; said, since `--steps 1 --set
    train.steps=2` trained 1 step without a word. Compared as parsed values (02 is 2, ~/d is the home's d),
    and an epochs=0 ("count in steps") that --steps overrides is no conflict."""
    def value(cfg, key):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        return os.path.expanduser(v) if isinstance(v, str) else v

    for key, given in flags.items():
        flag = FLAG_OF[key] + ("" if isinstance(given, bool) else f" {given}")
        if key in assignments and value(with_sets, key) != value(final, key):
            warn(f"{flag} is used over --set {key}={assignments[key]}")
        other = ALSO_DECIDES.get(key)
        if other in assignments and value(with_sets, other) and other not in flags:
            warn(f"{flag} is used over --set {other}={assignments[other]}")
