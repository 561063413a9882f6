"""Errors raised by the pool.

All of them subclass :class:`psycopg2.OperationalError`, so Django's
``wrap_database_errors`` turns them into :class:`django.db.OperationalError`
chained from ours, and code that already handles a failed connection attempt
handles an exhausted or closed pool the same way.
"""

from __future__ import annotations

import psycopg2


class PoolError(psycopg2.OperationalError):
    """Base class for the errors raised by a pool."""


class PoolTimeout(PoolError):
    """No connection could be had within the checkout timeout."""


class PoolClosed(PoolError):
    """The pool was closed; it lends no more connections."""


class PoolUnavailable(PoolError):
    """The server is failing: no connection could be opened within the outage wait (2 s)."""


class TooManyRequests(PoolError):
    """More checkouts are waiting than the pool allows (MAX_WAITING)."""


class PoolConfigError(ValueError):
    """An option has a wrong name, type or value; raised before anything connects."""
