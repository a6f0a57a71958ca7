"""Signal handling in the Lightning style: a handler only sets a flag, the loop acts at a step boundary.

SIGINT / SIGTERM: finish the step, save, exit 130 / 143. A second SIGINT stops at once; checkpoint
writes are atomic, so the last good file survives. SIGUSR1 (what SLURM sends before preemption with
--signal=USR1@SECONDS): save and go on, or save and exit 75 with --exit-on-usr1.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
USR1_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: "try again later", i.e. requeue and resume


class StoppedNow(BaseException):
    """A stop raised where the signal landed (see StopFlag.at_once). A BaseException, so that no library's
    `except Exception` on the way swallows it."""


class StopFlag:
    def __init__(self):
        self.signum: int | None = None  # a pending stop (SIGINT/SIGTERM)
        self.save_requested = False  # a pending SIGUSR1
        self._old: dict[int, object] = {}
        self._at_once = False

    def _handle(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.save_requested = True
            return
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user wants out now
        self.signum = signum
        if self._at_once:
            self._at_once = False  # a second signal must not break the clean-up the first one started
            raise StoppedNow

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
            self._at_once = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (*EXIT_CODES, signal.SIGUSR1):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    @property
    def name(self) -> str:
        """SIGINT or SIGTERM: what the stop messages say."""
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 130)
