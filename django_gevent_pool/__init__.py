"""A gevent-aware, greenlet-safe pool of psycopg2 connections for Django."""

from __future__ import annotations

from .copying import CopyBlocksTheHub, blocking_copy
from .errors import (
    PoolClosed,
    PoolConfigError,
    PoolError,
    PoolTimeout,
    PoolUnavailable,
    TooManyRequests,
)
from .green import is_psycopg2_cooperative, patch_psycopg2
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
    "patch_psycopg2",
]
