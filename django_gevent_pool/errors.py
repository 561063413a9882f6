"""Errors raised by the pool.

The classes here are what callers catch (``except PoolTimeout``). What a pool
raises is its driver's flavour of them (:func:`flavoured`): a subclass of both
the class here and the driver's ``OperationalError`` (``psycopg2``'s, or
``psycopg``'s), so Django's ``wrap_database_errors`` turns it into
:class:`django.db.OperationalError` chained from ours, and code that already
handles a failed connection attempt handles an exhausted or closed pool the
same way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple


class PoolError(Exception):
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


class Flavour(NamedTuple):
    """The pool errors of one driver: each subclasses ours and the driver's error."""

    PoolTimeout: type[PoolTimeout]
    PoolClosed: type[PoolClosed]
    PoolUnavailable: type[PoolUnavailable]
    TooManyRequests: type[TooManyRequests]
    #: What a wrong return raises (a connection returned twice, or not ours).
    ProgrammingError: type[Exception]


@functools.cache
def flavoured(operational: type[Exception], programming: type[Exception]) -> Flavour:
    """The pool errors as subclasses of a driver's ``OperationalError`` (made once per driver).

    Each is named like ours and lives in this module, so tracebacks read
    ``django_gevent_pool.errors.PoolTimeout`` whatever the driver.
    """

    def make(base: type[PoolError]) -> type:
        return type(
            base.__name__,
            (base, operational),
            {"__module__": __name__, "__doc__": base.__doc__, "__qualname__": base.__qualname__},
        )

    return Flavour(
        make(PoolTimeout),
        make(PoolClosed),
        make(PoolUnavailable),
        make(TooManyRequests),
        programming,
    )
