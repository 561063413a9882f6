"""Time spent getting and holding connections, tallied per unit of work (a request, a task).

A pool adds every checkout's wait (queueing, plus connecting or pinging when
that was needed) to the tally of the current context, if one was started, and
every return's time held; the Django layer adds the pins of transaction mode.
Context variables are per greenlet under gevent and per thread otherwise, so
concurrent requests never see each other's tally. With no tally started,
recording is one context-variable lookup.

    with tally_waits() as tally:
        handle_request()
    tally.seconds, tally.checkouts, tally.held, tally.pins
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token

__all__ = [
    "WaitTally",
    "current_tally",
    "record",
    "record_held",
    "record_pin",
    "start_tally",
    "stop_tally",
    "tally_waits",
]


class WaitTally:
    """The checkouts made in one context, the seconds they waited and held, and the pins."""

    __slots__ = ("checkouts", "held", "pins", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.checkouts = 0
        self.held = 0.0
        self.pins = 0

    def __repr__(self) -> str:
        return (
            f"<WaitTally {self.checkouts} checkouts, {self.seconds * 1000.0:.3f} ms waited, "
            f"{self.held * 1000.0:.3f} ms held, {self.pins} pins>"
        )


_tally: ContextVar[WaitTally | None] = ContextVar("django_gevent_pool_wait_tally", default=None)


def record(seconds: float) -> None:
    """Add one checkout that waited ``seconds`` to the current tally, if any."""
    tally = _tally.get()
    if tally is not None:
        tally.seconds += seconds
        tally.checkouts += 1


def record_held(seconds: float) -> None:
    """Add ``seconds`` a connection was held (from checkout to return) to the current tally."""
    tally = _tally.get()
    if tally is not None:
        tally.held += seconds


def record_pin() -> None:
    """Count a transaction-mode pin in the current tally."""
    tally = _tally.get()
    if tally is not None:
        tally.pins += 1


def current_tally() -> WaitTally | None:
    """The tally of the current context, or None when none was started."""
    return _tally.get()


def start_tally() -> tuple[WaitTally, Token[WaitTally | None]]:
    """Start a fresh tally for the current context; pass the token to :func:`stop_tally`."""
    tally = WaitTally()
    return tally, _tally.set(tally)


def stop_tally(token: Token[WaitTally | None]) -> None:
    """End the tally started with ``token``, restoring the one before it."""
    _tally.reset(token)


@contextmanager
def tally_waits() -> Iterator[WaitTally]:
    """Tally the checkouts made inside the ``with`` block."""
    tally, token = start_tally()
    try:
        yield tally
    finally:
        stop_tally(token)
