"""A silent network never freezes the process: bounded pings, non-blocking cancels and closes.

The network goes silent the way a NAT or a load balancer that dropped an idle
flow makes it, or a partition: the loopback proxy stops forwarding bytes, no
RST, and still accepts new connections (whose bytes go nowhere either, so a
cancel request's own connection is silenced too). Each scenario runs with 20+
workers in a process of its own (tests/silent_network_child.py) beside a
ticker, whose largest gap is how long that process stood still: a regression
that freezes it fails here, after the parent's bound, instead of hanging the
suite. The promises (README.rst, "Silent network"):

- a checkout's ping ends within min(its deadline, 1.5 s); a connection that
  does not answer is cut and replaced, or the checkout fails within
  POOL_TIMEOUT;
- cancelling a query (its greenlet timed out, or the connection returned
  while the query runs) never blocks, whatever the network does;
- a return's rollback ends within 2 s; discarding and closing connections
  never wait on the network;
- with README's recipe a query on a network gone silent fails within its
  bound, and the pool replaces its connection;
- once the network is back, the pool serves within 1 s.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from django_gevent_pool import ConnectionPool, cancel, sync
from django_gevent_pool.drivers import get_driver

from .proxy import Proxy
from .support import DRIVER, MODE, Workers, connect, sleep, wait_until

ROOT = Path(__file__).resolve().parent.parent
# A noisy, shared 2-core machine: bounds are asserted with this slack.
SLACK = 0.5
# The longest the child may stand still: the ticker sleeps 10 ms; a 2-core
# machine running 24 workers, a proxy and a server beside it adds some.
MAX_GAP = 0.3 if MODE == "gevent" else 0.5
SERVES_WITHIN = 1.0 + SLACK
# The parent's bound on a child that does not finish: then the proxy resumes
# (which unfreezes a frozen child, whose ticker gap then tells the story).
CHILD_BOUND = 30.0


def run_child(scenario: str, proxy: Proxy, direct: str, app_name: str) -> dict[str, Any]:
    """Run one scenario in a child process, serving its STALL/RESUME requests."""
    lines: queue.Queue[str | None] = queue.Queue()
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.silent_network_child",
                scenario,
                proxy.dsn(),
                direct,
                app_name,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=ROOT,
            env={**os.environ, "DGP_TEST_MODE": MODE},
        )
        assert proc.stdin is not None and proc.stdout is not None
        stdout, stdin = proc.stdout, proc.stdin

        def read() -> None:
            for line in stdout:
                lines.put(line.strip())
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        result: dict[str, Any] | None = None
        overran = False
        deadline = time.monotonic() + CHILD_BOUND
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    if overran:
                        break
                    # Frozen, or waiting for ever: let the network speak again and
                    # give it a little longer to report how long it stood still.
                    overran = True
                    proxy.resume()
                    deadline = time.monotonic() + 10.0
                    continue
                if line is None:
                    break
                if line in ("STALL", "RESUME"):
                    if line == "STALL":
                        proxy.stall()
                    else:
                        proxy.resume()
                    stdin.write("OK\n")
                    stdin.flush()
                elif line.startswith("RESULT "):
                    result = json.loads(line[len("RESULT ") :])
        finally:
            proxy.resume()
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            stderr.seek(0)
            errors = stderr.read()
    assert result is not None, f"the child reported nothing; its stderr:\n{errors[-4000:]}"
    assert not overran, f"the child ran past {CHILD_BOUND} s (frozen?): {result}"
    return result


@pytest.fixture
def proxy(dsn: str) -> Any:
    with Proxy(dsn) as p:
        yield p


def test_a_ping_on_a_silent_network_is_bounded_and_the_hub_runs_on(
    proxy: Proxy, dsn: str, app_name: str
) -> None:
    """The issue's pool: MAX_CONNS=2, PING_AFTER=0, POOL_TIMEOUT=2, one idle connection."""
    result = run_child("ping", proxy, dsn, app_name)
    assert result["left"] == 0 and result["finished"] == 24, result
    if MODE == "gevent":
        # Nothing answers: the ping is cut at 1.5 s, the connects end at the
        # checkout's deadline; every checkout fails within POOL_TIMEOUT.
        assert result["outcomes"] == ["PoolTimeout"], result
        assert result["longest"] <= 2.0 + SLACK, result
    else:
        # A plain thread cannot be interrupted in a connect: libpq's
        # connect_timeout (2 s here) bounds the one that follows the ping.
        assert set(result["outcomes"]) <= {"PoolTimeout", "PoolUnavailable", "OperationalError"}
        assert result["longest"] <= 1.5 + 2.0 + SLACK, result
    assert result["gap"] < MAX_GAP, result
    assert result["stats"]["pings"] >= 1 and result["stats"]["connections_lost"] >= 1, result
    assert result["served"] <= SERVES_WITHIN, result


def test_cancelling_queries_on_a_silent_network_never_blocks(
    proxy: Proxy, dsn: str, app_name: str
) -> None:
    """24 queries run; the network goes silent; their callers give up on them.

    In gevent mode 20 of them end by their own ``gevent.Timeout(3)`` (the
    wait callback cancels them) and 4 are returned to the pool while they
    run (putconn on an ACTIVE connection: cancelled and cut); in threads mode
    all 24 are returned while they run. Every cancel request's own
    connection is silenced too.
    """
    result = run_child("cancel", proxy, dsn, app_name)
    assert result["left"] == 0 and result["finished"] == 24, result
    assert "ok" not in result["outcomes"], result
    assert result["gap"] < MAX_GAP, result
    # Cut at once: a return waits for no network round trip (the cancel is
    # sent in the background, within CANCEL_TIMEOUT), and the query's party
    # gets its error at once.
    assert result["severed"] == (4 if MODE == "gevent" else 24), result
    assert result["longest_return"] <= 0.1, result
    # The gevent.Timeout(3) ones end by their own timeout, the others at once.
    assert result["latest_end"] <= (3.0 if MODE == "gevent" else 0.0) + SLACK, result
    assert result["stats"]["returns_bad"] >= result["severed"], result
    assert result["served"] <= SERVES_WITHIN, result


def test_discarding_returning_and_closing_on_a_silent_network_never_block(
    proxy: Proxy, dsn: str, app_name: str
) -> None:
    """A return that must roll back is cut after 2 s; discards and closes take no time."""
    result = run_child("close", proxy, dsn, app_name)
    assert 2.0 <= result["rollback"] <= 2.0 + SLACK, result
    assert result["stats"]["returns_bad"] >= 1 and result["stats"]["connections_lost"] >= 1
    assert result["took"] < 1.0, result
    assert result["gap"] < MAX_GAP, result
    assert result["stats"]["connections_closed"] == 24, result


@pytest.mark.gevent_only
def test_the_readme_recipe_bounds_a_query_on_a_network_gone_silent(
    proxy: Proxy, dsn: str, app_name: str
) -> None:
    """``gevent.Timeout`` around the query: it fails within its bound, the pool replaces it."""
    result = run_child("recipe", proxy, dsn, app_name)
    assert result["left"] == 0 and result["outcome"] == "Timeout", result
    assert result["took"] <= 2.0 + SLACK, result
    assert result["gap"] < MAX_GAP, result
    # The broken connection was discarded when it came back; a new one serves.
    assert result["before"]["returns_bad"] == 1 and result["before"]["pool_size"] == 0, result
    assert result["after"]["connections_num"] == 2, result
    assert result["served"] <= SERVES_WITHIN, result


# ----------------------------------------------- the pieces, on a live network


psycopg2_only = pytest.mark.skipif(
    DRIVER != "psycopg2",
    reason="psycopg2's cancel goes through ctypes on psycopg2's own libpq "
    "(PQcancelCreate, or PQcancel in a thread); psycopg 3's own cancel connection "
    "is the 'psycopg3' case",
)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("libpq17-cancel", marks=psycopg2_only),
        pytest.param("PQcancel-thread", marks=psycopg2_only),
        "psycopg3",
    ],
    ids=lambda how: how,
)
def test_a_cancel_request_stops_the_running_query(
    dsn: str, admin: Any, app_name: str, workers: Workers, how: str
) -> None:
    """Every way of cancelling reaches the server: psycopg2 with libpq 17's
    non-blocking cancel and with PQcancel in a thread, and psycopg 3's own."""
    lib = cancel.libpq()
    assert lib is not None and lib.nonblocking, "psycopg2-binary ships libpq 17"
    if how == "psycopg3":
        psycopg = pytest.importorskip("psycopg")
        # As a pool does: the query must not block the gevent hub.
        get_driver("psycopg").ensure_cooperative()
        conn = psycopg.connect(dsn, application_name=app_name)
        canceled: type[BaseException] = psycopg.errors.QueryCanceled
    else:
        get_driver("psycopg2").ensure_cooperative()
        conn = psycopg2.connect(dsn, application_name=app_name)
        canceled = psycopg2.errors.QueryCanceled
    nonblocking = how != "PQcancel-thread"

    def sleep_long() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(30)")

    try:
        workers.spawn(sleep_long)
        wait_until(lambda: active(admin, app_name), what="the query to run")
        lib.nonblocking = nonblocking
        started = time.monotonic()
        cancel.request_cancel(conn)
        workers.join(10)
        assert time.monotonic() - started < 3.0
        assert [type(e) for e in workers.errors] == [canceled]
    finally:
        lib.nonblocking = True
        conn.close()


def active(admin: Any, app_name: str) -> bool:
    """Is ``app_name``'s ``pg_sleep`` running? (Not the BEGIN psycopg2 sends first: a
    cancel at that moment finds the client between statements and sends nothing.)"""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND query LIKE %s",
            [app_name, "%pg_sleep%"],
        )
        return bool(cur.fetchone()[0])


def test_a_watchdog_fires_once_after_its_time_and_never_after_disarm() -> None:
    fired: list[float] = []
    started = time.monotonic()
    late = sync.Watchdog(0.05, lambda: fired.append(time.monotonic() - started))
    wait_until(lambda: bool(fired), what="the watchdog to fire", timeout=5)
    sleep(0.1)
    assert len(fired) == 1 and fired[0] >= 0.05
    assert late.disarm() is True and late.disarm() is True
    early = sync.Watchdog(0.05, lambda: fired.append(-1.0))
    assert early.disarm() is False
    sleep(0.2)
    assert len(fired) == 1, "a disarmed watchdog never fires"


def test_wait_fd_waits_for_readiness_and_gives_up_at_its_timeout() -> None:
    left, right = socket.socketpair()
    try:
        started = time.monotonic()
        assert sync.wait_fd(left.fileno(), write=False, timeout=0.1) is False
        assert 0.09 <= time.monotonic() - started < 1.0
        assert sync.wait_fd(left.fileno(), write=True, timeout=1.0) is True
        right.send(b"x")
        assert sync.wait_fd(left.fileno(), write=False, timeout=1.0) is True
    finally:
        left.close()
        right.close()


@pytest.mark.gevent_only
def test_the_housekeeping_connect_for_min_conns_is_bounded_on_a_silent_network(
    proxy: Proxy, app_name: str
) -> None:
    """A MIN_CONNS connect that gets no answer ends at POOL_TIMEOUT; the next round connects."""
    import gevent

    pool = ConnectionPool(
        lambda: connect(proxy.dsn(application_name=app_name)),
        driver=DRIVER,
        name=app_name,
        options={"MIN_CONNS": 1, "POOL_TIMEOUT": 0.5},
        background=False,
    )
    try:
        proxy.stall()
        job = gevent.spawn(pool.maintain)
        job.join(3)
        assert job.dead, "the housekeeping connect never ended"
        assert job.value is False
        stats = pool.get_stats()
        assert stats["connections_errors"] == 1 and stats["pool_size"] == 0, stats
        proxy.resume()
        wait_until(lambda: pool.maintain(), what="the next round to connect", timeout=5)
        assert pool.get_stats()["pool_size"] == 1
        pool.check_invariants()
    finally:
        proxy.resume()
        pool.close()


class _SlowPingConn:
    """Enough of a connection, for either driver, for a ping that takes 0.2 s (a far server)."""

    closed = 0
    autocommit = True
    transaction_status = 0  # libpq's PQTRANS_IDLE, as psycopg 3's pgconn reports it

    def __init__(self) -> None:
        self.sock, self.peer = socket.socketpair()

    # psycopg2's API
    def fileno(self) -> int:
        return self.sock.fileno()

    def get_transaction_status(self) -> int:
        return 0  # psycopg2.extensions.TRANSACTION_STATUS_IDLE

    def cursor(self) -> _SlowPingConn:
        return self

    def __enter__(self) -> _SlowPingConn:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    # psycopg 3's API: conn.pgconn.transaction_status, conn.pgconn.socket
    @property
    def pgconn(self) -> _SlowPingConn:
        return self

    @property
    def socket(self) -> int:
        return self.sock.fileno()

    def execute(self, sql: str) -> None:
        sleep(0.2)
        if DRIVER == "psycopg2":
            # What psycopg2 says after the server's EmptyQueryResponse: it answered.
            raise psycopg2.ProgrammingError("can't execute an empty query")

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def test_a_checkout_with_no_time_to_wait_still_gives_its_ping_the_full_bound() -> None:
    """timeout=0 means "don't queue", not "ping in no time": a 0.2 s ping is not cut."""
    pool = ConnectionPool(_SlowPingConn, driver=DRIVER, options={"MAX_CONNS": 1, "PING_AFTER": 0})
    try:
        first = pool.getconn()
        pool.putconn(first)
        assert pool.getconn(timeout=0) is first
        stats = pool.get_stats()
        assert stats["pings"] == 1 and stats["connections_num"] == 1, stats
    finally:
        pool.close()
