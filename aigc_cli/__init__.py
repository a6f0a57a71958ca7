"""aigc: train, sample, evaluate and export image generative models from the command line."""

__version__ = "0.1.0"


def main() -> None:
    """The `aigc` command. Python takes a moment to import the CLI (typer, rich); a Ctrl-C then is a
    stop like any later one: one line and exit code 130, not a KeyboardInterrupt traceback."""
    import signal
    import sys

    _fill_closed_std_streams()
    _tidy_environment()
    if hasattr(signal, "SIGUSR1"):  # a batch system's "save now" before training began (or after it ended):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # nothing to save, and its default action is to kill
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        try:
            sys.stderr.write("stopped: SIGINT (Ctrl-C)\n")
        except OSError:
            pass
        sys.exit(130)
    try:
        run()
    except SystemExit as e:
        if not e.code:  # done: a SIGTERM (or SIGHUP) during the interpreter's shutdown must not turn that into 143
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if hasattr(signal, "SIGHUP"):
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
        raise


def _fill_closed_std_streams() -> None:
    """`aigc ... >&-` (cron, daemons, some CI steps): with file descriptor 0, 1 or 2 closed, Python sets
    sys.stdout (say) to None and every command died on it; worse, the next file opened would get the
    number, and output meant for the terminal would land in a checkpoint. Each closed one gets
    /dev/null, as a stream whose reader has gone does."""
    import os
    import sys

    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, taken in order
            if null != fd:
                os.close(null)
                continue
            if getattr(sys, name) is None:
                setattr(sys, name, open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False))


def _tidy_environment() -> None:
    """What the shell or terminal hands over that would otherwise fail late or silently:
    - stdout or stderr in an encoding that cannot hold a path's characters (PYTHONIOENCODING=ascii, a
      latin-1 locale): a finished run crashed printing its checkpoint's path. Such characters are
      printed as backslash escapes instead.
    - COLUMNS set to 0, a non-number or an absurd width: rich laid out 0 columns and printed nothing.
    - a current folder deleted under the shell: torch's import died with an Intel oneMKL FATAL ERROR."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, OSError):  # not a text file of ours (a test's capture)
            pass
    columns = os.environ.get("COLUMNS")
    if columns is not None and not (columns.isascii() and columns.isdigit() and 1 <= int(columns) <= 10_000):
        del os.environ["COLUMNS"]
    try:
        os.getcwd()
    except FileNotFoundError:
        try:
            sys.stderr.write("error: the current folder no longer exists (it was deleted or moved); cd into another\n")
        except OSError:
            pass
        sys.exit(2)
