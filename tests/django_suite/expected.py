"""Tests of Django's own suite that fail through our engine, on purpose, and why.

``run.py`` fails on any failure or error of Django's suite not listed here, and
on any deviation listed here that no longer fails. ``stock_too`` says whether
Django's stock PostgreSQL backend (psycopg2, and in gevent mode the same gevent
wait callback) fails it too in this environment; ``run.py --backend both``
checks that claim. Only deviations that are ours need a reason about us.

Not listed because not run: in gevent mode, Django's async tests (``async def``
test methods, every ``*_async`` one among them) are left out by ``runner.py``:
the async ORM fails under gevent's monkey-patching with the stock backend too
(``SynchronousOnlyOperation``), which ``run.py --include-async --backend both``
shows.
"""

from __future__ import annotations

from dataclasses import dataclass

BOTH = frozenset({"gevent", "threads"})
GEVENT = frozenset({"gevent"})


@dataclass(frozen=True)
class Deviation:
    """One test of Django's suite expected to fail, in which modes, and why."""

    test: str  # the unittest id: app.module.Class.test_method
    modes: frozenset[str]
    stock_too: bool
    reason: str


_HEALTH_CHECKS = (
    "A pooled connection goes back to the pool at every request end "
    "(close_if_unusable_or_obsolete), whatever CONN_MAX_AGE says: the pool, not "
    "the greenlet that served a request, keeps connections alive (README.rst, "
    "Options: CONN_MAX_AGE and CONN_HEALTH_CHECKS). These tests expect the "
    "wrapper to keep one persistent connection across simulated requests, and "
    "CONN_HEALTH_CHECKS to check it at the next request's first query; here the "
    "next request borrows again, and the pool's checkout check (local on every "
    "checkout, a real ping after PING_AFTER idle seconds) does that job."
)

EXPECTED: list[Deviation] = [
    *(
        Deviation(
            f"backends.base.test_base.ConnectionHealthChecksTests.{name}",
            BOTH,
            stock_too=False,
            reason=_HEALTH_CHECKS,
        )
        for name in (
            "test_health_checks_disabled",
            "test_health_checks_enabled",
            "test_health_checks_enabled_errors_occurred",
            "test_set_autocommit_health_checks_enabled",
        )
    ),
    Deviation(
        "backends.postgresql.tests.Tests.test_connect_pool_setting_ignored_for_psycopg2",
        BOTH,
        stock_too=False,
        reason=(
            "OPTIONS['pool'] = True is refused with ImproperlyConfigured, as Django does, "
            "but with our message (the alias, 'django-gevent-pool is the pool here: remove "
            "the key or set it to False') instead of Django's 'Database pooling requires "
            "psycopg >= 3', whose fix (install psycopg 3) is the wrong one with this backend."
        ),
    ),
    Deviation(
        "backends.postgresql.tests.Tests.test_copy_to_expert_cursors",
        GEVENT,
        stock_too=True,
        reason=(
            "psycopg2 refuses COPY while a gevent wait callback is installed (the stock "
            "backend fails it too, with psycogreen's callback). Ours raises CopyBlocksTheHub "
            "saying to run the COPY inside django_gevent_pool.blocking_copy(), which lifts "
            "the callback and blocks the hub for the COPY's duration; lifting it silently "
            "would stall every greenlet of a serving process unannounced."
        ),
    ),
]
