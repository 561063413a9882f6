"""Where the backend's behaviour tests connect: straight to the server, or through PgBouncer.

The ``target`` fixture is parametrized over ``direct`` (the suite's ``default``
alias) and ``pgbouncer`` (an alias with the same settings pointed at a real
PgBouncer in transaction mode, tests/pgbouncer.py, configured as README.rst's
"Behind PgBouncer" says: ``DISABLE_SERVER_SIDE_CURSORS`` on, no
``RESET_QUERY``). A test written against ``target.alias`` runs once each way.

Through PgBouncer, the server backend a client reaches may change between
transactions, so a client *session* is named differently on each target:

- direct: the backend's pid (``pg_backend_pid()``), also seen in ``pg_stat_activity``;
- pgbouncer: the client connection's own TCP port, also seen in PgBouncer's
  ``SHOW CLIENTS`` (column ``port``). The backends serving it are the
  ``remote_pid`` of PgBouncer's ``SHOW SERVERS`` for the test database.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import connections

from django_gevent_pool import ConnectionPool
from django_gevent_pool.backends.base import close_pools, get_pool

from .pgbouncer import PgBouncer

DIRECT_ALIAS = "default"
DIRECT_APP = "dgp-django-tests"  # tests/settings.py
BOUNCER_ALIAS = "via_pgbouncer"
BOUNCER_APP = "dgp-django-tests-pgbouncer"


@dataclass
class Target:
    """A Django alias the behaviour tests run on, and how to look at it from the server side."""

    name: str  # "direct" or "pgbouncer"
    alias: str
    app_name: str  # application_name of the alias's connections
    pgbouncer: PgBouncer | None

    @property
    def via_pgbouncer(self) -> bool:
        return self.pgbouncer is not None

    @property
    def bouncer(self) -> PgBouncer:
        assert self.pgbouncer is not None, "only for the pgbouncer target"
        return self.pgbouncer

    @property
    def conn(self) -> Any:
        """This greenlet's (thread's) wrapper for the alias."""
        return connections[self.alias]

    @property
    def dbname(self) -> str:
        return str(self.conn.settings_dict["NAME"])

    def pool(self) -> ConnectionPool:
        pool = get_pool(self.alias)
        assert pool is not None, f"no pool for {self.alias!r} yet"
        return pool

    def in_use(self) -> int:
        pool = get_pool(self.alias)
        return 0 if pool is None else int(pool.get_stats()["pool_in_use"])

    def stats(self) -> dict[str, float]:
        return dict(self.pool().get_stats())

    def backend_pid(self, conn: Any = None) -> int:
        """The server backend that ran this query (through PgBouncer: this transaction's)."""
        with (conn or self.conn).cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return int(cur.fetchone()[0])

    def session(self, conn: Any = None) -> int:
        """Run a query on the wrapper's connection; return the name of its client session.

        Direct: the backend pid. Through PgBouncer: the client's local TCP port,
        which is the ``port`` PgBouncer lists for it in ``SHOW CLIENTS``.
        """
        wrapper = conn or self.conn
        pid = self.backend_pid(wrapper)
        if not self.via_pgbouncer:
            return pid
        return client_port(wrapper.connection)

    def sessions(self, admin: Any, app_name: str | None = None) -> set[int]:
        """The client sessions of ``app_name`` (default: the alias's) open right now.

        Direct: backends in ``pg_stat_activity``; through PgBouncer: its ``SHOW CLIENTS``.
        Both only on this process's test database: another test run may use the
        same application_name at the same time.
        """
        app_name = app_name or self.app_name
        if not self.via_pgbouncer:
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
                    [app_name, self.dbname],
                )
                return {int(row[0]) for row in cur.fetchall()}
        return {
            int(row["port"]) for row in self.bouncer.clients(self.dbname, application_name=app_name)
        }

    def server_backends(self, admin: Any) -> list[tuple[int, str, str]]:
        """(pid, state, query) of the server backends that serve this alias.

        Direct: those carrying its application_name on this process's test
        database. Through PgBouncer: its server connections to the test database
        (``SHOW SERVERS``), which every client of that database shares.
        """
        with admin.cursor() as cur:
            if not self.via_pgbouncer:
                cur.execute(
                    "SELECT pid, coalesce(state, ''), coalesce(query, '') "
                    "FROM pg_stat_activity WHERE application_name = %s AND datname = %s",
                    [self.app_name, self.dbname],
                )
            else:
                pids = [int(row["remote_pid"]) for row in self.bouncer.servers(self.dbname)]
                cur.execute(
                    "SELECT pid, coalesce(state, ''), coalesce(query, '') "
                    "FROM pg_stat_activity WHERE pid = ANY(%s::int[])",
                    [pids],
                )
            return [(int(pid), state, query) for pid, state, query in cur.fetchall()]


def client_port(raw: Any) -> int:
    """The local TCP port of a connection's socket (either driver's: both have ``fileno()``)."""
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        return int(sock.getsockname()[1])
    finally:
        sock.close()


def bouncer_alias_settings(pgbouncer: PgBouncer) -> dict[str, Any]:
    """``default``'s settings, through ``pgbouncer``, as README.rst's "Behind PgBouncer" says.

    Same database (the test database), same OPTIONS (MAX_CONNS=4 is above
    PgBouncer's default_pool_size=3), its own application_name, server-side
    cursors off, and marked a test mirror of ``default`` so that the test case
    flushes that database once, as ``default``.
    """
    base = connections.settings[DIRECT_ALIAS]
    return {
        **base,
        **pgbouncer.django_settings(base["NAME"]),
        "CONN_MAX_AGE": 0,
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {**base["OPTIONS"], "application_name": BOUNCER_APP},
        "TEST": {**base["TEST"], "NAME": None, "MIRROR": DIRECT_ALIAS},
    }


def forget_alias(alias: str) -> None:
    """Give back this greenlet's (thread's) connection, close the alias's pool, drop its wrapper."""
    for conn in connections.all(initialized_only=True):
        if conn.alias == alias:
            conn.close()
    close_pools(alias)
    with contextlib.suppress(AttributeError):
        del connections[alias]


@pytest.fixture(scope="module", params=["direct", "pgbouncer"], name="target")
def target_fixture(request: pytest.FixtureRequest, django_db_setup: None) -> Iterator[Target]:
    """The alias a behaviour test runs on: ``direct``, then through a transaction-mode PgBouncer.

    The PgBouncer alias is added to the settings for the module (before any
    test case starts: Django lets a test use only the aliases that exist then)
    and removed after. Skips (fails under DGP_REQUIRE_PGBOUNCER=1) when the
    ``pgbouncer`` binary is missing.
    """
    if request.param == "direct":
        yield Target("direct", DIRECT_ALIAS, DIRECT_APP, None)
        return
    pgbouncer: PgBouncer = request.getfixturevalue("pgbouncer_transaction")
    connections.settings[BOUNCER_ALIAS] = bouncer_alias_settings(pgbouncer)
    try:
        yield Target("pgbouncer", BOUNCER_ALIAS, BOUNCER_APP, pgbouncer)
    finally:
        forget_alias(BOUNCER_ALIAS)
        connections.settings.pop(BOUNCER_ALIAS, None)
