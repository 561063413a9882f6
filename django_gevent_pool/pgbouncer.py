"""Is the database server actually a PgBouncer, and in which pool mode?

:func:`detect_pool_mode` asks PgBouncer's admin console: it connects to the
virtual database ``pgbouncer`` with the caller's host, port, user and password,
and reads the mode PgBouncer applies to the caller's (database, user) pair,
the way PgBouncer itself picks it: the pool's own mode (``SHOW POOLS``) when
the pool exists, else the user's override (``SHOW USERS``), else the
database's override (``SHOW DATABASES``), else the global ``pool_mode``
(``SHOW CONFIG``). The console answers these from memory: one connection and
a few round trips, no server connection taken from any pool.

Only users listed in PgBouncer's ``admin_users`` or ``stats_users`` may use the
console (any user under ``auth_type = any``); for everyone else, for a plain
PostgreSQL server (which has no such database, or cannot answer ``SHOW
DATABASES``), and for anything unreachable, the answer is None: "not known to be
PgBouncer". No Django here.
"""

from __future__ import annotations

import logging
import selectors
import time
from collections.abc import Mapping
from typing import Any

import psycopg2
import psycopg2.extensions as ext

logger = logging.getLogger("django_gevent_pool")

POOL_MODES = ("session", "transaction", "statement")
ADMIN_DBNAME = "pgbouncer"
APPLICATION_NAME = "django_gevent_pool pool mode check"

# libpq parameters that decide where the console is and how to log in to it.
# Everything else (dbname, options, client_encoding, Django's cursor_factory...)
# is left out: PgBouncer refuses startup parameters it does not track.
_REACH_KEYS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "user",
        "password",
        "passfile",
        "service",
        "sslmode",
        "requiressl",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "sslcompression",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "gssencmode",
        "krbsrvname",
        "gsslib",
        "channel_binding",
        "require_auth",
        "requirepeer",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "target_session_attrs",
        "load_balance_hosts",
    }
)


class _Deadline(Exception):
    """The time budget ran out while connecting or waiting for an answer."""


def detect_pool_mode(conn_params: Mapping[str, Any], timeout: float = 2.0) -> str | None:
    """The pool mode (``"session"``, ``"transaction"``, ``"statement"``) of the PgBouncer
    at ``conn_params``' host and port, for its database and user; None when unknown.

    ``conn_params`` are libpq connection parameters as Django's
    ``get_connection_params()`` returns them (``host``, ``port``, ``user``,
    ``password``, ``dbname``, SSL settings...). The whole check, connecting
    included, takes at most ``timeout`` seconds of wall-clock time (it yields
    to gevent when sockets are patched).

    Returns None, and never raises an ``Exception``, when the server is not a
    PgBouncer (a plain PostgreSQL has no ``pgbouncer`` database or cannot
    answer ``SHOW DATABASES``), when the user may not use the admin console
    (``FATAL: not allowed``), when nothing listens there, when time runs out,
    or on any other error. A killed greenlet's ``GreenletExit`` and an outer
    ``gevent.Timeout`` do propagate.
    """
    try:
        return _detect(conn_params, time.monotonic() + max(0.0, float(timeout)))
    except Exception as exc:
        logger.debug(
            "pool mode check at %s:%s gave no answer: %s",
            conn_params.get("host") or "(default host)",
            conn_params.get("port") or "(default port)",
            " ".join(str(exc).split()) or type(exc).__name__,
        )
        return None


def _detect(conn_params: Mapping[str, Any], deadline: float) -> str | None:
    dbname = conn_params.get("dbname") or conn_params.get("database")
    params = {
        key: str(value)
        for key, value in conn_params.items()
        if key in _REACH_KEYS and value is not None and value != ""
    }
    params["dbname"] = ADMIN_DBNAME
    params["application_name"] = APPLICATION_NAME
    # Asynchronous: no wait callback is involved and our own deadline bounds
    # every step (libpq's connect_timeout does not apply to such connections).
    conn = psycopg2.connect(**params, async_=True)
    try:
        _wait(conn, deadline)
        user = conn.info.user
        dbname = str(dbname or user)  # libpq's default database is the user's name

        databases = _show(conn, "DATABASES", deadline)
        db_row = next((row for row in databases if row.get("name") == dbname), None)
        # A database entry with user= makes every client share that user's pool.
        pool_user = (db_row or {}).get("force_user") or user

        for row in _show(conn, "POOLS", deadline):
            if row.get("database") == dbname and row.get("user") == pool_user:
                mode = _mode(row.get("pool_mode"))
                if mode is not None:
                    return mode
        # No pool yet (nobody connected since PgBouncer started): resolve the
        # mode as PgBouncer will, user override first, then database, then global.
        for row in _show(conn, "USERS", deadline):
            if row.get("name") == pool_user:
                mode = _mode(row.get("pool_mode"))
                if mode is not None:
                    return mode
        if db_row is not None:
            mode = _mode(db_row.get("pool_mode"))
            if mode is not None:
                return mode
        for row in _show(conn, "CONFIG", deadline):
            if row.get("key") == "pool_mode":
                return _mode(row.get("value"))
        return None
    finally:
        conn.close()


def _mode(value: Any) -> str | None:
    """``value`` as one of :data:`POOL_MODES`, or None."""
    if not isinstance(value, str):
        return None
    value = value.strip().lower()
    return value if value in POOL_MODES else None


def _show(conn: Any, what: str, deadline: float) -> list[dict[str, Any]]:
    """``SHOW <what>`` on the console, as one dict per row keyed by column name."""
    with conn.cursor() as cur:
        cur.execute(f"SHOW {what}")
        _wait(conn, deadline)
        if cur.description is None:
            return []
        names = [column.name for column in cur.description]
        return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]


def _wait(conn: Any, deadline: float) -> None:
    """Drive an asynchronous connection until its operation completes or ``deadline``.

    Raises :class:`_Deadline` when time runs out, or the psycopg2 error of a
    failed connect or query.
    """
    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            events = selectors.EVENT_READ
        elif state == ext.POLL_WRITE:
            events = selectors.EVENT_WRITE
        else:
            raise psycopg2.OperationalError(f"bad result from poll: {state!r}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline("timed out")
        # Looked up now, not at import: gevent may have patched selectors since.
        with selectors.DefaultSelector() as selector:
            selector.register(conn.fileno(), events)
            selector.select(remaining)
