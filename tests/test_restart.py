"""A real server restart, on a throwaway embedded PostgreSQL (never the shared one).

Only a query in flight at the moment of the restart may fail; no idle
connection killed by the restart is ever handed to a caller; the pool recovers
with no restart of the app.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from django_gevent_pool import ConnectionPool

from .support import Workers, wait_until


@pytest.fixture(scope="module")
def throwaway() -> Iterator[Any]:
    pgserver = pytest.importorskip("pgserver", reason="the embedded server is a test extra")
    with tempfile.TemporaryDirectory(prefix="dgp-restart-") as datadir:
        server = pgserver.get_server(datadir, cleanup_mode="stop")
        try:
            yield server
        finally:
            server.cleanup()


def restart(server: Any) -> None:
    from pgserver._commands import pg_ctl

    # "fast": the server terminates every session (admin shutdown), then comes back.
    pg_ctl(
        ["-w", "restart", "-m", "fast"], pgdata=server.pgdata, user=server.system_user, timeout=60
    )


def test_a_restart_fails_only_queries_in_flight_and_the_pool_recovers(
    throwaway: Any, workers: Workers
) -> None:
    params = parse_dsn(throwaway.get_uri())
    dsn = " ".join(f"{k}={v}" for k, v in params.items() if v != "")
    pool = ConnectionPool(
        lambda: psycopg2.connect(dsn), name="restart", options={"MAX_CONNS": 4, "PING_AFTER": None}
    )
    try:
        idle = [pool.getconn() for _ in range(3)]
        for conn in idle:
            conn.autocommit = True
            pool.putconn(conn)
        busy = pool.getconn()

        def in_flight() -> None:
            with busy.cursor() as cur:
                cur.execute("SELECT pg_sleep(30)")

        workers.spawn(in_flight)
        wait_until(
            lambda: busy.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_ACTIVE,
            what="the in-flight query to start",
        )
        restart(throwaway)
        workers.join(30)
        assert len(workers.errors) == 1, "the query in flight fails"
        assert isinstance(workers.errors[0], psycopg2.OperationalError)
        pool.putconn(busy)  # broken: discarded, its slot freed
        # Every checkout after the restart gets a working connection, none of the
        # three idle ones the restart killed.
        for _ in range(8):
            with pool.connection() as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                assert cur.fetchone() == (1,)
                assert all(conn is not dead for dead in idle)
        stats = pool.get_stats()
        assert stats["connections_lost"] >= 1
        assert stats["returns_bad"] == 1
        pool.check_invariants()
    finally:
        pool.close()
