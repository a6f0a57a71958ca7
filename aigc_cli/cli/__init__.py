"""The `aigc` command: one small module per subcommand; each parses options, calls the core, prints."""

from __future__ import annotations

import typer

from . import eval as eval_cmd
from . import export, info, presets, sample, train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train, sample, evaluate and export image generative models (GANs, VAEs).")
app.command("train")(train.train)
app.command("sample")(sample.sample)
app.command("eval")(eval_cmd.evaluate)
app.command("export")(export.export)
app.command("info")(info.info)
app.add_typer(presets.app, name="presets")


def main() -> None:
    app(prog_name="aigc")
