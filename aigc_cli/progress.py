"""How far long image work has got (generating, embedding), for whoever shows it: the command line sets
a listener around a command; library code only says `phase(...)` and `advance(k)`, which cost nothing
when nobody listens (training's own evaluations, tests, other callers)."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Protocol


class Listener(Protocol):
    def phase(self, label: str, total: int | None) -> None: ...
    def advance(self, k: int) -> None: ...


_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("aigc_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    token = _listener.set(listener)
    try:
        yield listener
    finally:
        _listener.reset(token)


def phase(label: str, total: int | None = None) -> None:
    """A new stretch of work begins: `total` images (None: unknown)."""
    if (listener := _listener.get()) is not None:
        listener.phase(label, total)


def advance(k: int) -> None:
    """k more images of the current phase are done."""
    if (listener := _listener.get()) is not None:
        listener.advance(k)
