"""Pool options: names, defaults and validation.

The names are the ones users write in ``DATABASES[alias]["OPTIONS"]``; they
are upper case so they cannot collide with libpq's connection parameters,
which are all lower case and go through to psycopg2 untouched.

Validation happens before anything connects and raises
:class:`~django_gevent_pool.errors.PoolConfigError` naming the pool, the key
and what is allowed. The Django layer re-raises it as ``ImproperlyConfigured``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import PoolConfigError

#: Default number of open connections per process and alias (django-db-geventpool's).
DEFAULT_MAX_CONNS = 4
DEFAULT_POOL_TIMEOUT = 30.0
DEFAULT_MAX_LIFETIME = 3600.0
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_PING_AFTER = 5.0

#: The values of ``POOL_MODE``: how long a Django connection holds a pooled one.
POOL_MODES = ("session", "transaction")

# Names that other pools use for their settings. Written in OPTIONS they would
# reach libpq as connection parameters and fail there with a confusing error,
# or worse be silently ignored; refuse them and say what we call them.
_FOREIGN_NAMES = {
    "max_conns": "MAX_CONNS",
    "reuse_conns": "REUSE_CONNS",
    "min_conns": "MIN_CONNS",
    "max_size": "MAX_CONNS",
    "min_size": "MIN_CONNS",
    "pool_size": "MAX_CONNS",
    "max_overflow": "MAX_CONNS",
    "max_idle": "IDLE_TIMEOUT",
    "idle_timeout": "IDLE_TIMEOUT",
    "max_lifetime": "MAX_LIFETIME",
    "pool_recycle": "MAX_LIFETIME",
    "max_waiting": "MAX_WAITING",
    "pool_timeout": "POOL_TIMEOUT",
    "timeout": "POOL_TIMEOUT",
    "pool_pre_ping": "PING_AFTER",
    "ping_after": "PING_AFTER",
    "leak_timeout": "LEAK_TIMEOUT",
    "reset_query": "RESET_QUERY",
    "pool_mode": "POOL_MODE",
    "host_max_conns": "HOST_MAX_CONNS",
    "host_lock_dir": "HOST_LOCK_DIR",
    "reconnect_timeout": "POOL_TIMEOUT",
    "CONN_MAX_AGE": "CONN_MAX_AGE (a top-level DATABASES key, not an OPTIONS key)",
    "POOL_SIZE": "MAX_CONNS",
    "MAX_OVERFLOW": "MAX_CONNS",
    "MIN_SIZE": "MIN_CONNS",
    "MAX_SIZE": "MAX_CONNS",
    "MAX_CONN": "MAX_CONNS",
    "REUSE_CONN": "REUSE_CONNS",
    "MIN_CONN": "MIN_CONNS",
    "TIMEOUT": "POOL_TIMEOUT",
}


@dataclass(frozen=True)
class PoolOptions:
    """Validated pool settings. Build it with :meth:`from_mapping`."""

    MAX_CONNS: int = DEFAULT_MAX_CONNS
    REUSE_CONNS: int | None = None
    MIN_CONNS: int = 0
    POOL_TIMEOUT: float = DEFAULT_POOL_TIMEOUT
    MAX_WAITING: int = 0
    MAX_LIFETIME: float | None = DEFAULT_MAX_LIFETIME
    IDLE_TIMEOUT: float | None = DEFAULT_IDLE_TIMEOUT
    PING_AFTER: float | None = DEFAULT_PING_AFTER
    LEAK_TIMEOUT: float | None = None
    RESET_QUERY: str | None = None
    POOL_MODE: str = "session"
    HOST_MAX_CONNS: int | None = None
    HOST_LOCK_DIR: str | None = None

    @property
    def reuse_conns(self) -> int:
        """REUSE_CONNS with its default (MAX_CONNS) applied."""
        return self.MAX_CONNS if self.REUSE_CONNS is None else self.REUSE_CONNS

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in table order (computed once: called on every connect)."""
        return _NAMES

    @classmethod
    def from_mapping(
        cls, options: Mapping[str, Any], *, name: str = "pool"
    ) -> tuple[PoolOptions, dict[str, Any]]:
        """Split ``options`` into pool settings and connection parameters.

        Returns ``(pool_options, connection_params)``: the second holds every
        key that is not ours, untouched, for psycopg2/libpq. ``"pool": False``
        (or ``None``), which django-db-geventpool asks for on Django >= 5.1, is
        accepted and dropped.

        Raises :class:`PoolConfigError` naming ``name``, the key and what is
        allowed, for an unknown pool-looking key or a bad value.
        """
        ours: dict[str, Any] = {}
        rest: dict[str, Any] = {}
        known = cls.names()
        for key, value in options.items():
            if key in known:
                ours[key] = value
            elif key == "pool":
                if value not in (False, None):
                    raise PoolConfigError(
                        f"{name}: OPTIONS['pool'] = {value!r} asks for Django's own pool; "
                        "django-gevent-pool is the pool here: remove the key or set it to False"
                    )
            elif key in _FOREIGN_NAMES:
                raise PoolConfigError(
                    f"{name}: OPTIONS[{key!r}] is not a django-gevent-pool option; "
                    f"did you mean {_FOREIGN_NAMES[key]}? Allowed pool options: {', '.join(known)}"
                )
            elif isinstance(key, str) and key.isupper():
                raise PoolConfigError(
                    f"{name}: unknown pool option OPTIONS[{key!r}]; "
                    f"allowed: {', '.join(known)} (libpq parameters are lower case)"
                )
            else:
                rest[key] = value
        return cls._validated(ours, name), rest

    @classmethod
    def _validated(cls, raw: Mapping[str, Any], name: str) -> PoolOptions:
        def fail(key: str, allowed: str) -> PoolConfigError:
            return PoolConfigError(f"{name}: OPTIONS[{key!r}] must be {allowed}, got {raw[key]!r}")

        def integer(key: str, default: int | None, low: int, high: int | None = None) -> Any:
            if key not in raw:
                return default
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise fail(key, _int_range(low, high))
            if value < low or (high is not None and value > high):
                raise fail(key, _int_range(low, high))
            return value

        def seconds(key: str, default: float | None, *, nullable: bool, zero: bool) -> Any:
            if key not in raw:
                return default
            value = raw[key]
            what = "a number of seconds " + (">= 0" if zero else "> 0")
            if nullable:
                what += " or None"
            if value is None and nullable:
                return None
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and not zero)
            ):
                raise fail(key, what)
            return float(value)

        host_max = None if raw.get("HOST_MAX_CONNS") is None else integer("HOST_MAX_CONNS", None, 1)
        # With a host budget, one busy process may use all of it unless told less.
        max_conns = integer("MAX_CONNS", host_max or DEFAULT_MAX_CONNS, 1)
        if host_max is not None and max_conns > host_max:
            raise PoolConfigError(
                f"{name}: OPTIONS['MAX_CONNS'] ({max_conns}) cannot be larger than "
                f"HOST_MAX_CONNS ({host_max}): no process may open more than the host's budget"
            )
        lock_dir = raw.get("HOST_LOCK_DIR")
        if lock_dir is not None and (
            not isinstance(lock_dir, str) or not lock_dir.startswith("/") or "\0" in lock_dir
        ):
            raise fail("HOST_LOCK_DIR", "an absolute directory path or None")
        if lock_dir is not None and host_max is None:
            raise PoolConfigError(
                f"{name}: OPTIONS['HOST_LOCK_DIR'] is set but HOST_MAX_CONNS is not: "
                "the directory holds the host budget's lock files; set both or neither"
            )
        reuse = (
            None if raw.get("REUSE_CONNS") is None else integer("REUSE_CONNS", None, 0, max_conns)
        )
        min_conns = integer("MIN_CONNS", 0, 0, max_conns)
        reuse_effective = max_conns if reuse is None else reuse
        if min_conns > reuse_effective:
            raise PoolConfigError(
                f"{name}: OPTIONS['MIN_CONNS'] ({min_conns}) cannot be larger than "
                f"REUSE_CONNS ({reuse_effective}): connections kept open must also be kept idle"
            )
        reset = raw.get("RESET_QUERY")
        if reset is not None and (not isinstance(reset, str) or not reset.strip()):
            raise fail("RESET_QUERY", "a non-empty SQL string or None")
        mode = raw.get("POOL_MODE", "session")
        if not isinstance(mode, str) or mode not in POOL_MODES:
            raise fail("POOL_MODE", " or ".join(repr(m) for m in POOL_MODES))
        return cls(
            MAX_CONNS=max_conns,
            REUSE_CONNS=reuse,
            MIN_CONNS=min_conns,
            POOL_TIMEOUT=seconds("POOL_TIMEOUT", DEFAULT_POOL_TIMEOUT, nullable=False, zero=False),
            MAX_WAITING=integer("MAX_WAITING", 0, 0),
            MAX_LIFETIME=seconds("MAX_LIFETIME", DEFAULT_MAX_LIFETIME, nullable=True, zero=False),
            IDLE_TIMEOUT=seconds("IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT, nullable=True, zero=False),
            PING_AFTER=seconds("PING_AFTER", DEFAULT_PING_AFTER, nullable=True, zero=True),
            LEAK_TIMEOUT=seconds("LEAK_TIMEOUT", None, nullable=True, zero=False),
            RESET_QUERY=reset,
            POOL_MODE=mode,
            HOST_MAX_CONNS=host_max,
            HOST_LOCK_DIR=lock_dir,
        )


def _int_range(low: int, high: int | None) -> str:
    if high is None:
        return f"an integer >= {low}"
    return f"an integer from {low} to {high}"


_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PoolOptions))
