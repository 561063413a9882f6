"""A real server restart, on a throwaway embedded PostgreSQL (never the shared one).

Only a query in flight at the moment of the restart may fail; no idle
connection killed by the restart is ever handed to a caller; the pool recovers
with no restart of the app.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest

from django_gevent_pool import ConnectionPool
from django_gevent_pool.devserver import EmbeddedServer

from .support import Workers, wait_until


@pytest.fixture(scope="module")
def throwaway() -> Iterator[EmbeddedServer]:
    pytest.importorskip("pgserver", reason="the embedded server is a test extra")
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def test_a_restart_fails_only_queries_in_flight_and_the_pool_recovers(
    throwaway: EmbeddedServer, workers: Workers
) -> None:
    dsn = throwaway.dsn()
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
        throwaway.restart()  # "fast": every session is terminated, then it comes back
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
