"""A gevent-aware, greenlet-safe pool of PostgreSQL connections (psycopg2, psycopg 3) for Django."""

from __future__ import annotations

from .copying import CopyBlocksTheHub, blocking_copy
from .drivers.psycopg2_waiting import is_psycopg2_cooperative, patch_psycopg2
from .errors import (
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    PoolUnavailable,
    TooManyRequests,
)
from .options import PoolOptions
from .pool import ConnectionPool

__version__ = "1.0.0"

__all__ = [
    "ConnectionPool",
    "CopyBlocksTheHub",
    "PoolClosed",
    "PoolConfigError",
    "PoolError",
    "PoolOptions",
    "PoolTimeout",
    "PoolUnavailable",
    "TooManyRequests",
    "__version__",
    "blocking_copy",
    "is_psycopg2_cooperative",
    "is_psycopg_cooperative",
    "patch_psycopg",
    "patch_psycopg2",
]


def __getattr__(name: str) -> object:
    # psycopg 3's functions, imported on first use: psycopg 3 may not be installed.
    if name in ("patch_psycopg", "is_psycopg_cooperative"):
        from .drivers import psycopg_waiting

        return getattr(psycopg_waiting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
