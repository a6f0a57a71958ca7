"""aigc: train, sample, evaluate and export image generative models from the command line."""

__version__ = "0.1.0"


def main() -> None:
    """The `aigc` command. Python takes a moment to import the CLI (typer, rich); a Ctrl-C then is a
    stop like any later one: one line and exit code 130, not a KeyboardInterrupt traceback."""
    import sys

    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("stopped: SIGINT (Ctrl-C)\n")
        sys.exit(130)
    run()
