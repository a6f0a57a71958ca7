"""The `aigc` command: one small module per subcommand; each parses options, calls the core, prints."""

from __future__ import annotations

import os

import typer

from . import eval as eval_cmd
from . import export, info, presets, sample, train

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)  # help: _options


def _say_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"aigc {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", metavar="", callback=_say_version, is_eager=True,
                                          help="Print aigc's version and exit.")) -> None:
    """Train, sample, evaluate and export image generative models (GANs, VAEs)."""


app.command("train")(train.train)
app.command("sample")(sample.sample)
app.command("eval")(eval_cmd.evaluate)
# `aigc eval stats ...`: eval's positional CHECKPOINT leaves no room for a subcommand, so main() sends
# those arguments to this one-command app instead.
# Flags without a value that `eval` and `eval stats` share: they may come before the word `stats`.
STATS_FLAGS = {"-q", "--quiet", "--json", "--download", "--download-weights"}
# ... and so may its options that take a value (`aigc eval --features clf stats --data x --out r.npz`).
STATS_OPTIONS = {"--data", "--out", "-o", "--n", "-n", "--features", "--inception-weights", "--resolution", "--channels",
                 "--split", "--data-root", "--batch-size", "-b", "--seed", "--device", "--precision"}
# eval's own options: skipped too, so that `aigc eval --metrics fid stats ...` reaches `stats`, which names
# the option it does not take (rather than `eval` reading "stats" as a checkpoint and tripping over --out).
EVAL_ONLY_FLAGS = {"--no-ema"}
EVAL_ONLY_OPTIONS = {"--metrics", "--stats-dir", "--ref", "--fake", "--save-fakes"}
eval_stats_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
eval_stats_app.command()(eval_cmd.stats)
app.command("export")(export.export)
app.command("info")(info.info)
app.add_typer(presets.app, name="presets")


# Values that are not paths although they may start with "~" (a class folder named so).
NOT_PATHS = {"--class", "--set", "--metrics"}
# Options naming what a command writes: "-" there is the Unix "standard output", which they cannot be (a
# folder named "-" was made instead, where other options' checks refused it only by its file ending).
WRITE_OPTIONS = {"--out", "-o", "--individual", "--npz", "--save-fakes"}


def tidy_args(args: list[str]) -> list[str]:
    """What a shell leaves undone: `~` is expanded where the shell does not (`--out=~/x`, a quoted
    "~/x"); an empty argument is refused, since it is an unset variable far more often than a choice
    (an empty --out used to mean the current folder, and a run's files were scattered there)."""

    out = []
    for i, a in enumerate(args):
        option, eq, value = a.partition("=") if a.startswith("--") else ("", "", a)
        if a == "" or (eq and value == ""):
            after = option or (args[i - 1] if i and args[i - 1].startswith("-") else "")
            raise ValueError(f"an empty {'value for ' + after if after else 'argument'} (an unset shell variable?)")
        if value == "-" and (option if eq else args[i - 1] if i else "") in WRITE_OPTIONS:
            raise ValueError(f"{option or args[i - 1]} -: standard output is not supported here; name a file or folder")
        path_like = option not in NOT_PATHS if eq else not a.startswith("-") and (not i or args[i - 1] not in NOT_PATHS)
        if value.startswith("~") and path_like:
            a = f"{option}={os.path.expanduser(value)}" if eq else os.path.expanduser(value)
        out.append(a)
    return out


def main() -> None:
    """Run the app, printing usage errors as one plain line (exit 2) instead of a boxed panel. A Ctrl-C
    before a command has begun (typer returns 130 for it, silently) is a stop like any later one."""
    import sys

    from . import output

    output._stop_said = False  # main() runs more than once in one process under the tests
    output._stdout_lost = None
    try:
        code = _run(sys.argv[1:])
    except KeyboardInterrupt:
        code = 130
    except SystemExit as e:
        # Typer prints help through a plain rich Console, which ends with exit 1 when the reader has gone
        # (`aigc train --help | head`); our own consoles carry on instead (output.discard_output).
        if e.code != 1 or not isinstance(e.__context__, BrokenPipeError):
            raise
        code = 0
    if code == 130 and not output.stop_said():
        output._to_stderr("stopped: SIGINT (Ctrl-C)\n")
    sys.exit(code)


def _run(args: list[str]) -> int:
    """Typer has moved click inside itself across versions, so its exceptions are matched by shape
    (exit_code + format_message) rather than imported from one place."""
    from .output import _to_stderr, discard_output

    _help_width()
    try:
        args = tidy_args(args)
    except ValueError as e:
        _to_stderr(f"error: {e}\n")
        return 2
    target, prog = app, "aigc"
    if args[:1] == ["eval"]:  # a checkpoint or run folder called "stats" is ./stats
        i = 1
        while i < len(args):  # `aigc eval -q stats ...` as `aigc eval stats -q ...`
            valued = STATS_OPTIONS | EVAL_ONLY_OPTIONS
            if args[i] in STATS_FLAGS | EVAL_ONLY_FLAGS or args[i].split("=", 1)[0] in valued and "=" in args[i]:
                i += 1
            elif args[i] in valued:
                i += 2
            else:
                break
        if args[i:i + 1] == ["stats"]:
            target, prog, args = eval_stats_app, "aigc eval stats", args[1:i] + args[i + 1:]
    try:
        code = _command(target)(args=args, prog_name=prog, standalone_mode=False)
    except OSError as e:  # printing help (commands map their own): `--help >/dev/full`, a closed terminal
        discard_output()
        _to_stderr(f"error: stdout: {e.strerror or e}\n")
        return 2
    except Exception as e:
        name = type(e).__name__
        if name == "Abort":  # click wraps a Ctrl-C (some versions) or the end of input in it
            if isinstance(e.__cause__ or e.__context__, KeyboardInterrupt):
                return 130
            _to_stderr("error: unexpected end of input\n")
            return 2
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if name == "NoArgsIsHelpError":  # a bare group (`aigc`, `aigc presets`) shows its help
            e.show()
            return 0
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        if prog == "aigc eval stats" and os.path.exists("stats"):  # `aigc eval "$RUN"` with RUN=stats
            hint += "; to score the checkpoint or run folder here named stats, write ./stats"
        _to_stderr(f"error: {e.format_message()}{hint}\n")
        code = e.exit_code
    return code if isinstance(code, int) else 0


def _command(target: typer.Typer):
    """The click command typer builds (what calling the app runs), with --help shown as the flag it is:
    typer 0.29 printed `--help <bool>`, as if it took a value. Our own flags say so with metavar="".
    No option reads an environment variable, yet typer asks click to show one: click 8.2.0 and 8.2.1
    then ended every option error with `(env var: 'None')`."""
    command = typer.main.get_command(target)

    def walk(cmd) -> None:
        # made once per command and cached (click 8.2+; before, each call made a new one: no <bool> there)
        help_option = cmd.get_help_option(cmd.context_class(cmd, **(cmd.context_settings or {})))
        if help_option is not None:
            help_option.metavar = ""
        for param in cmd.params:
            if getattr(param, "envvar", None) is None:
                param.show_envvar = False
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(command)
    return command


def _help_width() -> None:
    """Help piped to a file or a pager would be laid out 80 columns wide, where the help column of
    `aigc eval` is too narrow for a file name or an environment variable and rich cuts them with an
    ellipsis. Lay it out 100 wide there, unless the user set a width (COLUMNS, TERMINAL_WIDTH)."""
    import sys

    if not sys.stdout.isatty() and not (os.environ.get("COLUMNS") or os.environ.get("TERMINAL_WIDTH")):
        import typer.rich_utils

        if getattr(typer.rich_utils, "MAX_WIDTH", 0) is None:
            typer.rich_utils.MAX_WIDTH = 100
