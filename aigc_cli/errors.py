"""Exceptions that map to the documented exit codes (see README, "Exit codes"), and one_line, which
keeps every error and warning about a hostile name on a single line."""


def not_utf8_shown(text) -> str:
    """A name from the file system whose bytes are not UTF-8 (lone surrogates in Python), with those bytes
    shown as \\xNN: UTF-8 output cannot print it as it is."""
    import os

    return os.fsencode(text).decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """`text` with control characters (newlines in file names, ...) escaped, so that a warning
    or error about a hostile file is always a single line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def first_line(e: BaseException, typed: bool = False) -> str:
    """An exception's message for a one-line report: its first line (at most 200 characters), or its type's
    name when it has none; typed: "Type: first line" (where the type says what the message does not)."""
    text = str(e).strip()
    line = text.splitlines()[0][:200] if text else ""
    if typed:
        return f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line or type(e).__name__


def counted(n: int, noun: str) -> str:
    """`1 image`, `2 images`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class AigcError(Exception):
    """Base class: an expected failure with a one-line message and an exit code."""

    exit_code = 1


class UsageError(AigcError):
    """Bad input or usage: a file, option or value the user can fix. Exit code 2."""

    exit_code = 2


class DivergedError(AigcError):
    """Training produced non-finite values that could not be recovered. Exit code 3."""

    exit_code = 3


class Interrupted(AigcError):
    """Stopped by SIGINT (130) or SIGTERM (143) after saving a checkpoint (or by SIGUSR1, 75). `summary`:
    what `train --json` prints for a run stopped after it saved (None when nothing was saved)."""

    def __init__(self, message: str, exit_code: int, summary: dict | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary


class Terminated(BaseException):
    """SIGTERM (or SIGHUP, the terminal closed) raised in the main thread of `sample`, `export` and
    `eval`. A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (torch's
    import, a library's error-collecting loader) swallows the stop or wraps it into another error."""

    def __init__(self, name: str = "SIGTERM", exit_code: int = 143):
        super().__init__(name)
        self.name, self.exit_code = name, exit_code
