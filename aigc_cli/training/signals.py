"""Signal handling in the Lightning style: a handler only sets a flag, the loop acts at a step boundary.

SIGINT / SIGTERM / SIGHUP: finish the step, save, exit 130 / 143 / 129. A second SIGINT stops at once; checkpoint
writes are atomic, so the last good file survives. SIGUSR1 (what SLURM sends before preemption with
--signal=USR1@SECONDS): save and go on, or save and exit 75 with --exit-on-usr1.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
if hasattr(signal, "SIGHUP"):  # the terminal or ssh session closed: killed on the spot, nothing saved, before
    EXIT_CODES[signal.SIGHUP] = 129


def stop_signals() -> list[int]:
    """The stops to handle: a SIGHUP that is ignored (`nohup aigc train ...`) stays ignored."""
    return [s for s in EXIT_CODES if s != getattr(signal, "SIGHUP", None) or signal.getsignal(s) != signal.SIG_IGN]
USR1_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", i.e. requeue and resume


RETRY_S = 0.05  # a stop that landed inside an import is tried again this much later (SIGALRM)
_CAN_RETRY = hasattr(signal, "setitimer")


def in_import(frame) -> bool:
    """Whether the interrupted code is inside an import (importlib's frames on the stack). An exception
    raised there from a signal handler can be swallowed by C code that called the import (torch's own
    `import numpy`, seen: `sample` then exited 0 after all its work) or leave importlib's locks held (seen:
    a process hung for good); so a stop waits until the import is done."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def retry_soon() -> bool:
    """Ask for a SIGALRM in RETRY_S seconds (False where there are no interval timers)."""
    if _CAN_RETRY:
        signal.setitimer(signal.ITIMER_REAL, RETRY_S)
    return _CAN_RETRY


class RaiseOutsideImports:
    """For a signal handler that stops a command by raising `make()`: raised at once, or, where the signal
    landed inside an import, as soon as a retry finds it done. `pending` says a stop is still to be raised
    (the command may end first: then its caller raises it). Main thread only."""

    def __init__(self, make):
        self.make, self.pending, self._old = make, False, None

    def __call__(self, frame) -> None:
        if in_import(frame) and retry_soon():
            self.pending = True
            return
        self.pending = False
        raise self.make()

    def _alarm(self, signum, frame) -> None:
        if self.pending:
            self(frame)

    def __enter__(self):
        if _CAN_RETRY:
            self._old = signal.signal(signal.SIGALRM, self._alarm)
        return self

    def __exit__(self, *exc) -> None:
        if _CAN_RETRY:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)


class StoppedNow(BaseException):
    """A stop raised where the signal landed (see StopFlag.at_once). A BaseException, so that no library's
    `except Exception` on the way swallows it."""


class StopFlag:
    def __init__(self):
        self.signum: int | None = None  # a pending stop (SIGINT/SIGTERM/SIGHUP)
        self.save_requested = False  # a pending SIGUSR1
        self._old: dict[int, object] = {}
        self._at_once = False  # inside at_once(), and StoppedNow not asked for yet
        self._raiser = RaiseOutsideImports(StoppedNow)
        self._raising = False  # the raiser's SIGALRM handler is installed

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.save_requested = True
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        if self.signum is None:  # the first stop names the exit: a SIGTERM then a SIGINT is still 143 (requeued)
            self.signum = signum
        if self._at_once:
            self._at_once = False  # a second signal must not break the clean-up the first one started
            self._raiser(frame)

    @contextlib.contextmanager
    def at_once(self) -> Iterator[None]:
        """For work before anything is worth saving that may take minutes (decoding a large image folder):
        a stop raises StoppedNow there and then, rather than waiting for the work to end. Only around work
        whose files are all written atomically (aigc's caches are; torchvision's downloads are not), so
        the exception leaves none half-done."""
        if self.signum is not None:
            raise StoppedNow
        self._at_once = True
        try:
            yield
        finally:
            self._at_once = self._raiser.pending = False  # a retry still due: the loop's own check stops

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._raising = self._raiser.__enter__() is not None
            for s in (*stop_signals(), signal.SIGUSR1):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._raising:
            self._raiser.__exit__()
        return False

    @property
    def name(self) -> str:
        """SIGINT, SIGTERM or SIGHUP: what the stop messages say."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)
