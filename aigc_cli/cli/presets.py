"""`aigc presets list|show`."""

from __future__ import annotations

import os

import typer
from rich.table import Table

from ..config import is_preset_file, load_preset, preset_file_text, preset_names, preset_text
from .output import check_result_written, emit_json, handles_errors, human_console, stdout_is_result, write_out

app = typer.Typer(no_args_is_help=True, help="List and show the built-in training presets.")


@app.command("list")
@handles_errors
def list_presets(json_out: bool = typer.Option(False, "--json", metavar="",
                                               help="Print one JSON object: the presets, each with its name, model, data, resolution and description.")) -> None:
    """List the presets with their model, data and resolution."""
    stdout_is_result()
    rows = [(name, cfg.model.kind, cfg.data.source, str(cfg.model.resolution), cfg.description)
            for name, cfg in ((name, load_preset(name)) for name in preset_names())]
    if json_out:  # for scripts: the table is laid out for people (box rules, cut descriptions)
        emit_json({"presets": [{"name": r[0], "model": r[1], "data": r[2], "resolution": int(r[3]),
                                "description": r[4]} for r in rows]})
        check_result_written()
        return
    table = Table(caption="`aigc presets show NAME` prints a preset in full, its description included")
    # Names are what `--preset` takes: never cut or wrapped, whatever the width. One line a preset (a
    # wrapped description made 300 lines at 80 columns): on a terminal the description is cut to the width
    # left; in a pipe or a log (no COLUMNS set) it is whole, however long the line.
    widths = [max(len(title), *(len(r[i]) for r in rows)) for i, title in enumerate(("name", "model", "data", "res"))]
    for width, title in zip(widths, ("name", "model", "data", "res")):
        table.add_column(title, no_wrap=True, min_width=width)
    console = human_console()
    fixed = sum(w + 3 for w in widths) + 4  # each column's padding and rule, the outer rules
    if not console.is_terminal and not os.environ.get("COLUMNS"):  # a pipe or a log: whole descriptions
        console.width = fixed + max(len(r[4]) for r in rows) + 3
    left = console.width - fixed
    table.add_column("description", width=max(12, left), no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    check_result_written()


@app.command("show")
@handles_errors
def show(name: str = typer.Argument(..., metavar="NAME", help="Preset name, as listed by `aigc presets list`, or a TOML file "
                                                "(as `aigc train --preset` takes it)."),
         full: bool = typer.Option(False, "--full", metavar="", help="Print every config key with the value training would use, defaults included (as the run's config.toml records it), not the file as written.")) -> None:
    """Print a preset's TOML (a file: once it is checked as `aigc train` would check it)."""
    cfg = load_preset(name)  # validates it and gives the one-line error for unknown names
    if full:
        write_out(cfg.to_toml())
        return
    write_out(preset_text(name) if not is_preset_file(name) else preset_file_text(name))
