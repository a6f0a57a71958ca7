"""Every command and option says what it does, and `--help` piped to a file or pager is whole."""

from __future__ import annotations

import subprocess

import pytest
import typer

from conftest import aigc_command

from aigc_cli.cli import app, eval_stats_app


def commands():
    """(path, click command) for every command, `aigc eval stats` included."""
    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, [*path, name])
        else:
            out.append((path, cmd))

    walk(root, [])
    out.append((["eval", "stats"], typer.main.get_command(eval_stats_app)))
    return out


COMMANDS = commands()


def test_every_command_and_option_has_help():
    assert {" ".join(p) for p, _ in COMMANDS} >= {"train", "sample", "eval", "eval stats", "export", "info",
                                                  "presets list", "presets show"}
    for path, cmd in COMMANDS:
        assert (cmd.help or "").strip(), path
        for param in cmd.params:
            if param.name != "help":
                assert len((getattr(param, "help", None) or "").strip()) > 10, (path, param.name)


def test_flags_show_no_value_placeholder_and_arguments_are_named():
    # Typer showed `--json <bool>`, as if the flag took a value (`--json true` is then an error), and
    # `{checkpoint}` for the argument the README calls CHECKPOINT.
    for path, cmd in COMMANDS:
        for param in cmd.params:
            if getattr(param, "is_flag", False) and param.name != "help":
                assert param.metavar == "", (path, param.name)
            elif param.param_type_name == "option" and param.name != "help":
                # a word for what the value is (`--steps N`, `--set KEY=VALUE`), not typer's `<int>`
                assert param.metavar and not param.metavar.startswith("<"), (path, param.name)
            if param.param_type_name == "argument":
                assert param.metavar == param.metavar.upper() != "", (path, param.name)


def test_no_option_shows_an_environment_variable_it_does_not_read():
    # typer sets show_envvar on every option; under click 8.2.0 and 8.2.1 each option error then ended
    # with "(env var: 'None')". What main() runs is _command's click command.
    from aigc_cli.cli import _command

    for target in (app, eval_stats_app):
        stack = [_command(target)]
        while stack:
            cmd = stack.pop()
            stack += getattr(cmd, "commands", {}).values()
            for param in cmd.params:
                assert param.envvar is not None or not getattr(param, "show_envvar", False), (cmd.name, param.name)


def test_command_summaries_have_no_hard_line_breaks():
    # `aigc --help` lists each command with the first paragraph of its help; rich keeps a line break there,
    # so a summary wrapped in the source came out broken mid-sentence in the list.
    for path, cmd in COMMANDS:
        first = (cmd.help or "").strip().split("\n\n")[0]
        assert "\n" not in first, (path, first)


@pytest.mark.parametrize("columns", [None, "80"], ids=["piped", "80 columns"])
@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_help_is_whole(aigc_env, path, columns):
    env = {k: v for k, v in aigc_env.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}  # piped: rich's 80
    if columns:
        env["COLUMNS"] = columns  # what a terminal 80 columns wide gets
    r = subprocess.run([*aigc_command(), *path, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout  # rich cuts a word longer than the help column with an ellipsis
    # typer 0.29 showed `--help <bool>`, and `--seed`'s `[0<=x<=4294967295]` took a third of the width
    assert "<bool>" not in r.stdout and "<=x<=4294967295" not in r.stdout
    cmd = dict((tuple(p), c) for p, c in COMMANDS)[tuple(path)]
    for param in cmd.params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                assert opt in r.stdout, (path, opt)


@pytest.mark.parametrize("columns", [None, "80"], ids=["piped", "80 columns"])
def test_presets_list_shows_every_name_whole(aigc_env, columns):
    from aigc_cli.config import load_preset, preset_names

    env = {k: v for k, v in aigc_env.items() if k not in ("COLUMNS", "TERMINAL_WIDTH")}
    if columns:
        env["COLUMNS"] = columns
    r = subprocess.run([*aigc_command(), "presets", "list"], capture_output=True, text=True, env=env, timeout=60)
    rows = [line for line in r.stdout.splitlines() if line.startswith("│")]
    assert r.returncode == 0 and len(rows) == len(preset_names()), r.stdout  # one line each (wrapped: 300 lines)
    kinds = ("resnet_gan", "dcgan", "vae", "mlp_gan", "classifier")
    for name, row in zip(preset_names(), rows):
        assert row.startswith(f"│ {name} "), (name, row)  # names are what --preset takes: never cut
        assert any(f" {k} " in row for k in kinds), row  # no column dropped for the width
        if columns:
            assert len(row) <= 80, row
        else:  # a pipe or a log: the whole description, greppable
            assert f" {load_preset(name).description} " in row, row


@pytest.mark.parametrize("args", [["train", "--help"], [], ["presets"]], ids=["train --help", "aigc", "presets"])
def test_help_into_a_closed_pipe_exits_0(aigc_env, args):
    """`aigc train --help | head -3`: the reader has gone before the help is written. rich's console
    (which Typer prints help through) exited 1 there, which our exit codes call a bug."""
    p = subprocess.Popen([*aigc_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=aigc_env)
    p.stdout.close()  # long before the command has imported enough to print anything
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()
    assert not err, err.decode()


def test_version_is_said_from_the_one_place_it_is_written(aigc_env):
    import importlib.metadata

    import aigc_cli

    done = subprocess.run([*aigc_command(), "--version"], capture_output=True, text=True, env=aigc_env, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"aigc {aigc_cli.__version__}\n", "")
    assert importlib.metadata.version("aigc") == aigc_cli.__version__  # pyproject reads it from there
