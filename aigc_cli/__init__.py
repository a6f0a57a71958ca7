"""aigc: train, sample, evaluate and export image generative models from the command line."""

__version__ = "0.1.0"


def main() -> None:
    """The `aigc` command. Python takes a moment to import the CLI (typer, rich); a Ctrl-C then is a
    stop like any later one: one line and exit code 130, not a KeyboardInterrupt traceback."""
    import signal
    import sys

    if hasattr(signal, "SIGUSR1"):  # a batch system's "save now" before training began (or after it ended):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # nothing to save, and its default action is to kill
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("stopped: SIGINT (Ctrl-C)\n")
        sys.exit(130)
    run()
