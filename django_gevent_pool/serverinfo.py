"""What the PostgreSQL server says about the pooled aliases, through short-lived connections.

Used by the system checks and the ``pool_connections`` management command.
Nothing here borrows from a pool or creates one: each look is a plain
psycopg2 connection made from the alias's own connection parameters (as
Django's ``get_connection_params()`` builds them), with a short connect
timeout, a distinct ``application_name`` and a statement timeout, closed as
soon as the look is done.

Settings are read from ``settings.DATABASES`` itself (with Django's defaults
filled in on a copy), not from ``django.db.connections``, whose settings are
cached for the life of the process.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg2
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from . import sync
from .drivers.psycopg2_waiting import ensure_cooperative
from .options import PoolOptions
from .pgbouncer import detect_pool_mode

#: Every ENGINE of this package starts with this.
ENGINE_PREFIX = "django_gevent_pool.backends."
#: libpq's default port, for labels and grouping.
DEFAULT_PORT = "5432"
#: Seconds a look at the server may take to connect (libpq counts whole seconds, at least 2).
CONNECT_TIMEOUT = 3


class ServerUnreachable(Exception):
    """The server could not be reached, or did not answer in time; the message says why."""


@dataclass(frozen=True)
class ServerLimits:
    """The server's connection limits, from ``pg_settings``."""

    max_connections: int
    superuser_reserved_connections: int
    #: PostgreSQL 16+ (``reserved_connections``); 0 on older servers.
    reserved_connections: int = 0

    @property
    def reserved(self) -> int:
        """Slots ordinary roles cannot use."""
        return self.superuser_reserved_connections + self.reserved_connections

    @property
    def usable(self) -> int:
        """Connections ordinary roles can open: ``max_connections`` minus the reserved slots."""
        return max(0, self.max_connections - self.reserved)


def is_pooled_engine(engine: Any) -> bool:
    """True for the ENGINE strings of this package's backends."""
    return isinstance(engine, str) and engine.startswith(ENGINE_PREFIX)


def is_mysql_engine(engine: Any) -> bool:
    """True for this package's MySQL engine (its server is read with PyMySQL, not libpq)."""
    return isinstance(engine, str) and engine.rstrip(".") == ENGINE_PREFIX + "mysql"


#: The keys of Django's MySQL connection parameters a look at the server keeps.
_MYSQL_KEYS = (
    "host",
    "port",
    "user",
    "password",
    "unix_socket",
    "database",
    "ssl",
    "ssl_ca",
    "ssl_cert",
    "ssl_key",
    "ssl_disabled",
    "ssl_verify_cert",
    "ssl_verify_identity",
    "charset",
)


def mysql_connection_params(
    alias: str, settings_dict: dict[str, Any], *, timeout: float = CONNECT_TIMEOUT
) -> dict[str, Any]:
    """PyMySQL connect arguments for a short look at a MySQL alias's server.

    Built by the engine's own ``get_connection_params()`` on a throwaway
    wrapper (nothing connects), keeping only where and who (no converters,
    no ``init_command``), every step bounded by ``timeout`` seconds.
    """
    from django.db.utils import load_backend

    alias_pool_options(alias, settings_dict)
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
    params = {k: v for k, v in wrapper.get_connection_params().items() if k in _MYSQL_KEYS}
    for key in ("connect_timeout", "read_timeout", "write_timeout"):
        params[key] = timeout
    return params


def mysql_server_label(params: Mapping[str, Any]) -> str:
    """``host:port`` of PyMySQL connection parameters (``local socket`` over a Unix socket)."""
    if params.get("unix_socket") and not params.get("host"):
        return f"local socket {params['unix_socket']}"
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 3306}"


def configured_databases() -> dict[str, dict[str, Any]]:
    """``settings.DATABASES`` with Django's defaults filled in, on copies.

    Returns an empty dict when ``DATABASES`` itself is unusable (Django
    reports that on its own).
    """
    from django.db.utils import ConnectionHandler

    raw = getattr(settings, "DATABASES", None)
    if not isinstance(raw, Mapping):
        return {}
    copies: dict[str, dict[str, Any]] = {}
    for alias, settings_dict in raw.items():
        if not isinstance(settings_dict, Mapping):
            return {}
        copy = dict(settings_dict)
        for key in ("OPTIONS", "TEST"):
            if isinstance(copy.get(key), Mapping):
                copy[key] = dict(copy[key])
        copies[alias] = copy
    try:
        configured: dict[str, dict[str, Any]] = ConnectionHandler(copies).settings
    except ImproperlyConfigured:
        return {}
    return configured


def pooled_databases() -> dict[str, dict[str, Any]]:
    """The aliases whose ENGINE is one of this package's, in settings order."""
    return {
        alias: settings_dict
        for alias, settings_dict in configured_databases().items()
        if is_pooled_engine(settings_dict.get("ENGINE"))
    }


def alias_pool_options(alias: str, settings_dict: Mapping[str, Any]) -> PoolOptions:
    """The validated pool options of ``alias``.

    Raises ``ImproperlyConfigured`` with the backend's own message (naming the
    alias, the key and what is allowed) when OPTIONS is refused.
    """
    options = settings_dict.get("OPTIONS")
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]: OPTIONS must be a dict, got {type(options).__name__}"
        )
    # The backend's own validation (pool options and Django's isolation_level),
    # imported here: the backend module imports this one.
    from .backends.base import pool_options_for
    from .backends.stock import engine_driver

    driver = engine_driver(str(settings_dict.get("ENGINE", "")))
    return pool_options_for(alias, dict(options), driver)[0]


def connection_params(
    alias: str,
    settings_dict: dict[str, Any],
    *,
    application_name: str,
    connect_timeout: int = CONNECT_TIMEOUT,
) -> dict[str, Any]:
    """psycopg2 connect arguments for a short look at ``alias``'s server.

    Built by Django's own ``get_connection_params()`` on a throwaway wrapper
    (nothing connects), then: no driver objects (cursor factory, psycopg 3's
    adapters and ``prepare_threshold``), ``application_name``
    replaced so the look is never counted as the app's, and
    ``connect_timeout`` at most ``connect_timeout`` seconds.

    Raises ``ImproperlyConfigured`` when the alias's settings are invalid
    (pool OPTIONS refused by :func:`alias_pool_options`, no NAME...): the
    wrapper itself validates OPTIONS only when it connects.
    """
    from django.db.utils import load_backend

    alias_pool_options(alias, settings_dict)
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias)
    params: dict[str, Any] = dict(wrapper.get_connection_params())
    # Driver objects, not libpq keywords (psycopg 3's adapters map, its
    # prepared-statement threshold): the look uses a plain psycopg2 connection.
    for key in ("cursor_factory", "connection_factory", "context", "prepare_threshold"):
        params.pop(key, None)
    params["application_name"] = application_name
    params["connect_timeout"] = _shorter_timeout(params.get("connect_timeout"), connect_timeout)
    return params


def _shorter_timeout(configured: Any, limit: int) -> int:
    try:
        value = int(configured)
    except (TypeError, ValueError):
        return limit
    return value if 0 < value < limit else limit


def server_label(params: Mapping[str, Any]) -> str:
    """``host:port`` of the connection parameters, as configured (``local socket`` if no host)."""
    host = str(params.get("host") or "") or "local socket"
    port = str(params.get("port") or "") or DEFAULT_PORT
    return f"{host}:{port}"


class _TooSlow(Exception):
    """The look at the server ran past its deadline (gevent only)."""


@contextmanager
def _bounded(seconds: float) -> Iterator[None]:
    """Under a gevent hub, raise ``_TooSlow`` in the block after ``seconds``.

    A wait callback makes psycopg2 connect asynchronously, and libpq's
    ``connect_timeout`` only bounds a blocking connect: the deadline does it
    there. In a thread without a hub, the connect is blocking and libpq's
    ``connect_timeout`` applies.
    """
    if not sync.hub_in_this_thread():
        yield
        return
    import gevent

    with gevent.Timeout(seconds, _TooSlow):
        yield


@contextmanager
def brief_connection(params: Mapping[str, Any], *, timeout: float = 5.0) -> Iterator[Any]:
    """A plain psycopg2 connection for a look at the server, rolled back and closed on exit.

    Everything done on it runs in one read-only transaction whose statements
    time out on the server after ``timeout`` seconds (``SET LOCAL``, so that
    nothing outlives the transaction, even on a server connection that a
    pooler in transaction mode lends to other clients afterwards). Raises
    :class:`ServerUnreachable` (with the server's ``host:port`` and libpq's
    reason) when connecting fails or takes longer than ``timeout``.
    """
    label = server_label(params)
    # psycopg2 waits in the hub only through its wait callback, which a process
    # whose pools use psycopg 3 never installed: this connect would block the hub.
    ensure_cooperative()
    try:
        with _bounded(timeout):
            conn = psycopg2.connect(**params)
    except _TooSlow:
        raise ServerUnreachable(f"{label}: no answer within {timeout:g} s") from None
    except psycopg2.Error as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ServerUnreachable(f"{label}: {reason}") from exc
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SET LOCAL statement_timeout = %s", [f"{int(timeout * 1000)}ms"])
            cur.execute("SET LOCAL transaction_read_only = on")
        yield conn
    finally:
        try:
            conn.rollback()
        except psycopg2.Error:
            pass  # the connection is closed right after anyway
        try:
            conn.close()
        except psycopg2.Error:
            pass  # closing a look-only connection is best effort


def server_limits(conn: Any) -> ServerLimits:
    """Read ``max_connections`` and the reserved slots (``reserved_connections`` on PG 16+)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
        )
        values = {name: int(setting) for name, setting in cur.fetchall()}
    return ServerLimits(
        max_connections=values["max_connections"],
        superuser_reserved_connections=values.get("superuser_reserved_connections", 0),
        reserved_connections=values.get("reserved_connections", 0),
    )


def server_port(conn: Any) -> int | None:
    """The port the server itself listens on (``inet_server_port()``); None over a Unix socket.

    Differs from the configured port when something sits in between: a
    connection pooler such as PgBouncer, or a port forward.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        value = cur.fetchone()[0]
    return None if value is None else int(value)


def configured_port(params: Mapping[str, Any]) -> int | None:
    """The port the connection parameters name (libpq's default 5432 if none); None if unclear."""
    raw = str(params.get("port") or DEFAULT_PORT).split(",")[0].strip()
    try:
        return int(raw)
    except ValueError:
        return None


def pool_mode(params: Mapping[str, Any], timeout: float = 2.0) -> str | None:
    """PgBouncer's pool mode in front of ``params``'s host:port, or None if none or unknown.

    Asks :func:`django_gevent_pool.pgbouncer.detect_pool_mode`, which answers
    None for a plain PostgreSQL server, for a PgBouncer whose admin console
    refuses the alias's user, when nothing answers within ``timeout`` seconds,
    and on any other error: it never raises an ``Exception``, so a check
    calling this never crashes on it.
    """
    return detect_pool_mode(params, timeout=timeout)
