"""The pool on PyMySQL through a restart of its server: served again within a second.

A throwaway MariaDB of the test's own (``mysql_support.ThrowawayMariaDB``, on
a free loopback port; never the shared server) is restarted, or killed and
started again after an outage, while 24 workers (greenlets, or OS threads in
threads mode) loop checkout -> query -> return. The promises are the
PostgreSQL ones (README.rst, "Recovery"): once the server accepts again, the
pool serves within 1 s; while it is down, a checkout fails within
min(POOL_TIMEOUT, 2 s), chained from the last connect error, with at most one
connect attempt in flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from django_gevent_pool import ConnectionPool
from django_gevent_pool.drivers import pymysql as mysql_driver

from .mysql_support import ThrowawayMariaDB, only_in_mysql_runs
from .support import Workers, sleep, wait_until
from .test_recovery import SERVES_WITHIN, Load

pymysql = pytest.importorskip("pymysql")
only_in_mysql_runs()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThrowawayMariaDB]:
    mariadb = ThrowawayMariaDB(str(tmp_path_factory.mktemp("mariadb")))
    mariadb.start()
    try:
        yield mariadb
    finally:
        mariadb.stop(kill=True)


def select_one(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")


class CountingConnect:
    """Connects to the throwaway server, counting attempts in flight while the pool fails."""

    def __init__(self, server: ThrowawayMariaDB) -> None:
        self.params = {**server.params(), "autocommit": True, "connect_timeout": 2}
        self.pool: ConnectionPool | None = None
        self.in_flight = 0
        self.most_while_failing = 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.in_flight += 1
            if self.pool is not None and self.pool._backoff.failures > 0:
                self.most_while_failing = max(self.most_while_failing, self.in_flight)
        try:
            return mysql_driver.connect(**self.params)
        finally:
            with self._lock:
                self.in_flight -= 1


def make_pool(connect: CountingConnect, **options: Any) -> ConnectionPool:
    pool = ConnectionPool(
        connect, driver="pymysql", name="mysql-recovery", options={"MAX_CONNS": 20, **options}
    )
    connect.pool = pool
    return pool


def test_a_restart_under_load_is_served_again_within_a_second(
    server: ThrowawayMariaDB, workers: Workers
) -> None:
    connect = CountingConnect(server)
    pool = make_pool(connect)
    try:
        load = Load(pool, workers, select_one, driver=pymysql)
        wait_until(lambda: load.successes_since(0) >= 200, what="the load to warm up")
        down = time.monotonic()
        server.stop()  # a clean shutdown: every session is closed
        server.start()
        back = time.monotonic()
        wait_until(lambda: time.monotonic() - back > 2.5, what="two seconds of load after")
        load.stop()
        assert not workers.errors, workers.errors[:3]
        load.assert_recovered(back, "the restart")
        load.assert_checkouts_failed_fast()
        failed = [o for o in load.outcomes if not o.ok]
        assert all(down - 0.1 <= o.ended <= back + SERVES_WITHIN for o in failed), failed[:3]
        assert connect.most_while_failing <= 1, "single flight while the server fails"
        assert pool.get_stats()["pool_size"] <= 20
        pool.check_invariants()
    finally:
        pool.close()


def test_a_killed_server_back_after_an_outage_is_served_again_within_a_second(
    server: ThrowawayMariaDB, workers: Workers
) -> None:
    connect = CountingConnect(server)
    pool = make_pool(connect, POOL_TIMEOUT=5)
    try:
        load = Load(pool, workers, select_one, driver=pymysql)
        wait_until(lambda: load.successes_since(0) >= 200, what="the load to warm up")
        server.stop(kill=True)  # SIGKILL: sockets reset, nothing said
        down = time.monotonic()
        sleep(1.5)
        starting = time.monotonic()
        server.start()
        back = time.monotonic()
        wait_until(lambda: time.monotonic() - back > 2.5, what="two seconds of load after")
        load.stop()
        assert not workers.errors, workers.errors[:3]
        served_down = [o for o in load.outcomes if o.ok and down + 0.2 <= o.ended < starting]
        assert not served_down, f"served while the server was down: {served_down[:3]}"
        assert any(not o.ok and o.started >= down for o in load.outcomes)
        load.assert_recovered(back, "the server came back")
        load.assert_checkouts_failed_fast()
        assert connect.most_while_failing <= 1, "single flight while the server fails"
        pool.check_invariants()
    finally:
        pool.close()
