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
    "is_cooperative",
    "is_psycopg2_cooperative",
    "is_psycopg_cooperative",
    "patch_drivers",
    "patch_psycopg",
    "patch_psycopg2",
    "pinned",
]


def patch_drivers() -> None:
    """Make every installed driver yield to gevent: psycopg2's wait callback, psycopg 3's waits.

    Idempotent. For a gunicorn ``post_fork`` hook or the top of a monkey-patched
    script when you want it explicit; pools also do it on their own for their
    driver once gevent has patched ``socket``.
    """
    patch_psycopg2()
    try:
        from .drivers import psycopg_waiting
    except ImportError:  # psycopg 3 is not installed
        return
    psycopg_waiting.patch_psycopg()


def is_cooperative(driver: str = "psycopg2") -> bool:
    """True when ``driver`` (``"psycopg2"`` or ``"psycopg"``) waits through the gevent hub."""
    from .drivers import get_driver

    return get_driver(driver).is_cooperative()


def __getattr__(name: str) -> object:
    # The Django part, imported on first use: the pool itself needs no Django.
    if name == "pinned":
        from .backends.base import pinned

        return pinned
    # psycopg 3's functions, imported on first use: psycopg 3 may not be installed.
    if name in ("patch_psycopg", "is_psycopg_cooperative"):
        from .drivers import psycopg_waiting

        return getattr(psycopg_waiting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
