"""When a failing server may be tried again: the pool's connect backoff.

While connects fail, the next attempt waits a delay that doubles from
:data:`BASE` with each failed round up to :data:`MAX`, jittered down by up to
half: short, so a server that is back is served within a second. The pool
pairs it with single flight (one attempt in flight while failing), so a
failing server sees no herd.

A :class:`Backoff` holds no lock: the pool changes and reads it under its own.
"""

from __future__ import annotations

import random

BASE = 0.05
MAX = 0.5


class Backoff:
    """Failed connect rounds in a row, when the next attempt may go, and the last error."""

    __slots__ = ("failing_since", "failures", "last_error", "last_failed_at", "retry_at")

    def __init__(self) -> None:
        self.failures = 0  # failed rounds in a row; 0: healthy
        self.retry_at = float("-inf")  # no attempt before this, while failing
        self.last_error: BaseException | None = None
        self.last_failed_at = float("-inf")
        self.failing_since = float("-inf")

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def may_try(self, now: float) -> bool:
        """Has the delay since the last failed round passed?"""
        return now >= self.retry_at

    def succeeded(self) -> None:
        """A connect worked: the server is healthy again, no delay."""
        self.failures = 0
        self.retry_at = float("-inf")

    def failed(self, exc: BaseException, started: float, now: float) -> None:
        """A connect that began at ``started`` failed at ``now`` with ``exc``.

        Attempts that began before the last recorded failure belong to the
        same round (connects already in flight when the outage began): they
        do not grow the delay.
        """
        if started >= self.last_failed_at:
            if self.failures == 0:
                self.failing_since = now
            self.failures += 1
            delay = min(MAX, BASE * 2 ** (self.failures - 1))
            self.retry_at = now + delay * random.uniform(0.5, 1.0)
        self.last_failed_at = now
        self.last_error = exc
