"""The pool against a real PostgreSQL: cap, waiting, return states, dead connections.

Concurrency claims are proven on the server's side, by counting the pool's
backends in pg_stat_activity through a unique application_name, and at the
proxy, which counts every connection attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_gevent_pool import (
    ConnectionPool,
    PoolClosed,
    PoolTimeout,
    PoolUnavailable,
    TooManyRequests,
    timing,
)

from . import support
from .proxy import Proxy
from .support import DRIVER, Workers, backends, db, is_active, sleep, terminate, wait_until

PoolFactory = Callable[..., ConnectionPool]

# libpq's PGTransactionStatusType, as both drivers report it in
# ``conn.info.transaction_status`` (psycopg2: an int; psycopg 3: an IntEnum).
IDLE, INTRANS, INERROR = 0, 2, 3


@pytest.fixture
def make_pool(dsn: str, app_name: str) -> Iterator[PoolFactory]:
    made: list[ConnectionPool] = []

    def make(target_dsn: str | None = None, **options: Any) -> ConnectionPool:
        target = target_dsn or dsn
        pool = ConnectionPool(
            lambda: support.connect(target, application_name=app_name),
            driver=DRIVER,
            name=app_name,
            options=options,
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def proxy(dsn: str) -> Iterator[Proxy]:
    with Proxy(dsn) as p:
        yield p


def query(conn: Any, sql: str = "SELECT 1") -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0] if cur.description else None


def waiting(pool: ConnectionPool) -> int:
    return int(pool.get_stats()["requests_waiting"])


# ----------------------------------------------------------------- the cap


def test_cap_holds_on_the_server_with_slow_connects_and_200_workers(
    make_pool: PoolFactory, proxy: Proxy, admin: Any, app_name: str, workers: Workers
) -> None:
    """Connects take 200 ms: a pool counting only finished connects would overshoot."""
    proxy.connect_delay = 0.2
    pool = make_pool(proxy.dsn(), MAX_CONNS=5, POOL_TIMEOUT=60)
    peak = 0
    done = False

    def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, backends(admin, app_name))
            sleep(0.01)

    def borrow() -> int:
        with pool.connection() as conn:
            return int(query(conn, "SELECT pg_backend_pid()"))

    sampler = Workers()
    sampler.spawn(sample)
    for _ in range(200):
        workers.spawn(borrow)
    workers.join(120)
    done = True
    sampler.join()
    assert workers.errors == []
    assert len(workers.results) == 200
    assert proxy.accepted <= 5, "more connection attempts than MAX_CONNS"
    assert 1 <= peak <= 5
    assert len(set(workers.results)) <= 5
    stats = pool.get_stats()
    assert stats["connections_num"] <= 5
    assert stats["pool_size"] <= 5
    pool.check_invariants()


def test_reuse_conns_closes_returned_connections_beyond_it(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    pool = make_pool(MAX_CONNS=3, REUSE_CONNS=1)
    conns = [pool.getconn() for _ in range(3)]
    assert backends(admin, app_name) == 3
    for conn in conns:
        pool.putconn(conn)
    assert sum(bool(conn.closed) for conn in conns) == 2
    wait_until(lambda: backends(admin, app_name) == 1, what="two backends to close")
    assert pool.get_stats()["pool_available"] == 1
    pool.check_invariants()


def test_a_returned_connection_is_reused(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=2)
    conn = pool.getconn()
    pid = query(conn, "SELECT pg_backend_pid()")
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert query(again, "SELECT pg_backend_pid()") == pid
    assert pool.get_stats()["connections_num"] == 1


# ----------------------------------------------------------- waiting


def test_exhaustion_raises_pool_timeout_with_the_state_in_its_message(
    make_pool: PoolFactory, app_name: str
) -> None:
    pool = make_pool(MAX_CONNS=2, POOL_TIMEOUT=0.3)
    held = [pool.getconn(), pool.getconn()]
    with pytest.raises(PoolTimeout) as err:
        pool.getconn()
    message = str(err.value)
    assert isinstance(err.value, db.OperationalError)
    assert message.startswith(f"pool {app_name!r}: no connection available after 0.")
    assert "(MAX_CONNS=2)" in message
    assert "in use=2, idle=0, opening=0, waiting=0)" in message
    stats = pool.get_stats()
    assert stats["requests_timeouts"] == 1
    assert stats["requests_wait_max_ms"] >= 300
    assert stats["requests_waiting"] == 0
    for conn in held:
        pool.putconn(conn)
    pool.check_invariants()


def test_a_checkout_timeout_logs_who_holds_the_connections_rate_limited(
    make_pool: PoolFactory, workers: Workers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="django_gevent_pool")
    pool = make_pool(MAX_CONNS=2, POOL_TIMEOUT=0.2)
    release = threading.Event()

    def run_a_query() -> None:
        with pool.connection() as conn:
            query(conn, "SELECT pg_sleep(2)")

    def sit_in_a_transaction() -> None:
        with pool.connection() as conn:
            query(conn)  # autocommit is off: BEGIN was sent, the transaction stays open
            release.wait(10)
            conn.rollback()

    busy = workers.spawn(run_a_query)
    idle_in_tx = workers.spawn(sit_in_a_transaction)
    wait_until(lambda: pool.get_stats()["pool_in_use"] == 2, what="both connections lent")
    sleep(0.1)  # let both reach their state on the connection
    with pytest.raises(PoolTimeout):
        pool.getconn()
    with pytest.raises(PoolTimeout):
        pool.getconn()  # within the interval: no second report
    release.set()
    workers.join()
    reports = [r.getMessage() for r in caplog.records if "are held by" in r.getMessage()]
    assert len(reports) == 1
    report = reports[0]
    assert f"pool {pool.name!r}: a checkout timed out after 0.2" in report
    assert "the 2 connection(s) in use are held by (longest first):" in report
    lines = {line for line in report.splitlines() if " for " in line and " s, " in line}
    assert any(busy.name in line and "running a query" in line for line in lines), report
    assert any(idle_in_tx.name in line and "idle in a transaction" in line for line in lines)
    assert "Set OPTIONS['LEAK_TIMEOUT']" in report
    assert pool.get_stats()["requests_timeouts"] == 2
    pool.check_invariants()


def test_with_leak_timeout_the_holders_log_shows_where_the_longest_holder_borrowed(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="django_gevent_pool")
    pool = make_pool(MAX_CONNS=1, POOL_TIMEOUT=0.1, LEAK_TIMEOUT=60)

    def borrow_here_and_keep() -> Any:
        return pool.getconn()

    held = borrow_here_and_keep()
    with pytest.raises(PoolTimeout):
        pool.getconn()
    pool.putconn(held)
    [report] = [r.getMessage() for r in caplog.records if "are held by" in r.getMessage()]
    assert "The longest holder borrowed it here:" in report
    where = report.split("The longest holder borrowed it here:", 1)[1]
    frames = [line.strip() for line in where.splitlines() if line.strip().startswith("File ")]
    # Innermost frame first to last: the borrower's own call, none of the pool's frames.
    assert frames[-1].endswith("in borrow_here_and_keep"), frames[-3:]
    assert "Set OPTIONS['LEAK_TIMEOUT']" not in report


def test_wait_percentiles_and_the_per_context_tally(
    make_pool: PoolFactory, workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=1)
    for _ in range(3):
        with pool.connection():
            pass
    held = pool.getconn()

    def wait_for_it() -> tuple[int, float]:
        with timing.tally_waits() as tally:
            with pool.connection():
                pass
        return tally.checkouts, tally.seconds

    with timing.tally_waits() as mine:
        workers.spawn(wait_for_it)
        wait_until(lambda: waiting(pool) == 1, what="the waiter")
        sleep(0.2)
        pool.putconn(held)
        workers.join()
    assert mine.checkouts == 0  # the other context's checkout is not counted here
    [(checkouts, seconds)] = workers.results
    assert checkouts == 1 and seconds >= 0.2
    stats = pool.get_stats()
    assert stats["requests_num"] == 5
    assert stats["requests_wait_p99_ms"] >= 200
    assert stats["requests_wait_p50_ms"] < stats["requests_wait_p99_ms"]
    assert stats["requests_wait_p50_ms"] <= stats["requests_wait_p95_ms"]
    pool.pop_stats()
    assert pool.get_stats()["requests_wait_p99_ms"] == 0
    assert timing.current_tally() is None


def test_a_checkout_that_fails_counts_in_the_percentiles_and_the_tally(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool(MAX_CONNS=1, POOL_TIMEOUT=0.3)
    for _ in range(3):
        with pool.connection():
            pass  # three fast checkouts
    held = pool.getconn()
    with timing.tally_waits() as tally, pytest.raises(PoolTimeout):
        pool.getconn()
    assert tally.checkouts == 1 and tally.seconds >= 0.3
    pool.putconn(held)
    stats = pool.get_stats()
    assert stats["requests_timeouts"] == 1
    # Five checkouts, the slowest one the timeout: the p99 is it, the median is not.
    assert stats["requests_wait_p99_ms"] >= 300 > stats["requests_wait_p50_ms"]


def test_usage_and_connect_times_are_counted(make_pool: PoolFactory, proxy: Proxy) -> None:
    proxy.connect_delay = 0.2
    pool = make_pool(proxy.dsn(), MAX_CONNS=1)
    with pool.connection():
        sleep(0.3)
    stats = pool.get_stats()
    assert stats["connections_num"] == 1
    assert stats["connections_ms"] >= 200, "the slow connect"
    assert stats["usage_ms"] >= 300, "the time it was lent"
    proxy.refuse()
    pool.close()
    pool = make_pool(proxy.dsn(), MAX_CONNS=1)
    with pytest.raises(db.OperationalError):
        pool.getconn()
    stats = pool.get_stats()
    assert stats["connections_errors"] == 1
    assert stats["connections_ms"] > 0, "a failed attempt's time counts too"
    assert stats["usage_ms"] == 0, "nothing was lent"


@pytest.mark.gevent_only
def test_a_waiting_checkout_never_times_out_early_after_a_busy_greenlet(
    make_pool: PoolFactory,
) -> None:
    """The wait's timer counts from now, not from the hub's cached time of its last loop."""
    import time

    import gevent

    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    gevent.sleep(0)  # the hub runs a loop and caches its time ...
    busy_until = time.monotonic() + 0.3
    while time.monotonic() < busy_until:
        pass  # ... which then goes stale: this greenlet keeps the CPU without yielding
    started = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    pool.putconn(held)


def test_checkout_timeout_argument_overrides_the_default(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1, POOL_TIMEOUT=60)
    held = pool.getconn()
    with pytest.raises(PoolTimeout, match=r"after 0\.1"):
        pool.getconn(timeout=0.1)
    pool.putconn(held)


def test_max_waiting_fails_fast_beyond_the_bound(make_pool: PoolFactory, workers: Workers) -> None:
    pool = make_pool(MAX_CONNS=1, MAX_WAITING=2, POOL_TIMEOUT=30)
    held = pool.getconn()

    def borrow() -> str:
        with pool.connection():
            return "served"

    workers.spawn(borrow)
    workers.spawn(borrow)
    wait_until(lambda: waiting(pool) == 2, what="two waiters")
    with pytest.raises(TooManyRequests, match=r"2 checkouts already waiting \(MAX_WAITING=2\)"):
        pool.getconn()
    assert waiting(pool) == 2
    pool.putconn(held)
    workers.join()
    assert workers.results == ["served", "served"]
    assert pool.get_stats()["requests_too_many"] == 1
    pool.check_invariants()


def test_waiters_are_served_first_in_first_out(make_pool: PoolFactory, workers: Workers) -> None:
    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    order: list[int] = []

    def borrow(i: int) -> None:
        conn = pool.getconn()
        order.append(i)
        pool.putconn(conn)

    for i in range(10):
        workers.spawn(borrow, i)
        wait_until(lambda i=i: waiting(pool) == i + 1, what=f"waiter {i} queued")
    pool.putconn(held)
    workers.join()
    assert workers.errors == []
    assert order == list(range(10))


def test_a_new_checkout_does_not_jump_the_queue(make_pool: PoolFactory, workers: Workers) -> None:
    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    served: list[str] = []

    def borrow(name: str) -> None:
        with pool.connection():
            served.append(name)

    workers.spawn(borrow, "queued")
    wait_until(lambda: waiting(pool) == 1, what="the first waiter")
    pool.putconn(held)  # handed to the queued waiter, not left idle for anyone
    assert pool.get_stats()["pool_available"] == 0
    borrow("late")
    workers.join()
    assert served == ["queued", "late"]


@pytest.mark.gevent_only
def test_killed_waiters_leak_nothing(make_pool: PoolFactory) -> None:
    import gevent

    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    # Killed while waiting.
    waiters = [gevent.spawn(pool.getconn) for _ in range(5)]
    wait_until(lambda: waiting(pool) == 5, what="five waiters")
    gevent.killall(waiters)
    assert waiting(pool) == 0
    # Killed just as it is handed the connection: the kill is scheduled first,
    # so the greenlet never runs with it; the connection must go on to the next
    # waiter instead of being lost.
    first = gevent.spawn(pool.getconn)
    second = gevent.spawn(pool.getconn)
    wait_until(lambda: waiting(pool) == 2, what="two waiters")
    first.kill(block=False)
    pool.putconn(held)
    conn = second.get(timeout=5)
    assert first.dead and isinstance(first.value, gevent.GreenletExit)
    pool.check_invariants()
    # An outer gevent.Timeout around a checkout is a kill too.
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.05):
        pool.getconn()
    pool.putconn(conn)
    again = pool.getconn(timeout=1)
    assert query(again) == 1
    pool.putconn(again)
    stats = pool.get_stats()
    assert stats["pool_size"] == 1
    assert stats["requests_waiting"] == 0
    pool.check_invariants()


# ------------------------------------------------------ the return path


def test_idle_return_is_kept_as_is(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    conn.autocommit = True
    query(conn)
    pool.putconn(conn)
    stats = pool.get_stats()
    assert (stats["pool_available"], stats["returns_rolled_back"], stats["returns_bad"]) == (
        1,
        0,
        0,
    )


def test_intrans_return_is_rolled_back_and_kept(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    query(conn, "CREATE TEMP TABLE t_intrans (x int)")
    assert conn.info.transaction_status == INTRANS
    pool.putconn(conn)
    assert conn.info.transaction_status == IDLE
    again = pool.getconn()
    assert again is conn
    with pytest.raises(db.errors.UndefinedTable):
        query(again, "SELECT * FROM t_intrans")  # the rollback undid it
    again.rollback()
    pool.putconn(again)
    assert pool.get_stats()["returns_rolled_back"] == 1


def test_inerror_return_is_rolled_back_and_kept(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    with pytest.raises(db.errors.DivisionByZero):
        query(conn, "SELECT 1/0")
    assert conn.info.transaction_status == INERROR
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert query(again) == 1
    pool.putconn(again)


def test_closed_return_is_discarded_and_its_slot_goes_to_a_waiter(
    make_pool: PoolFactory, workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    workers.spawn(lambda: query(pool.getconn(timeout=5)))
    wait_until(lambda: waiting(pool) == 1, what="a waiter")
    conn.close()
    pool.putconn(conn)
    workers.join()
    assert workers.errors == []
    assert workers.results == [1]
    assert pool.get_stats()["returns_bad"] == 1


def test_unknown_status_after_a_lost_backend_is_discarded(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    terminate(admin, app_name)
    with pytest.raises(db.OperationalError):
        query(conn)
    assert conn.closed
    pool.putconn(conn)
    fresh = pool.getconn()
    assert fresh is not conn
    assert query(fresh) == 1
    pool.putconn(fresh)
    pool.check_invariants()


@pytest.mark.gevent_only
def test_active_return_is_discarded_and_the_query_stops(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    import gevent

    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    conn.autocommit = True
    runner = gevent.spawn(query, conn, "SELECT pg_sleep(30)")
    wait_until(lambda: is_active(conn), what="the query to start")
    pool.putconn(conn)  # must not block on the driver's connection lock, held by the runner
    assert pool.get_stats()["pool_size"] == 0, "the slot is free at once"
    wait_until(lambda: backends(admin, app_name) == 0, what="the backend to go")
    runner.join(5)
    assert isinstance(runner.exception, db.Error), "the query was cut short"
    with pytest.raises((db.OperationalError, db.InterfaceError)):
        query(conn)  # whoever still holds it finds it dead (or already closed)
    assert conn.closed
    fresh = pool.getconn(timeout=5)
    assert query(fresh) == 1
    pool.putconn(fresh)
    assert pool.get_stats()["returns_bad"] == 1


def running_queries(admin: Any, app_name: str) -> int:
    """How many of ``app_name``'s backends are running a query right now."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active'",
            [app_name],
        )
        return int(cur.fetchone()[0])


@pytest.mark.gevent_only
@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_a_greenlet_interrupted_mid_query_cancels_it_and_its_connection_is_discarded(
    make_pool: PoolFactory, admin: Any, app_name: str, how: str
) -> None:
    """Killed, or past an outer gevent.Timeout, in the middle of a query: the query
    stops on the server (psycopg2: the wait callback cancels it; psycopg 3 leaves
    the connection ACTIVE with the query running, so the driver must cancel and
    cut it), the connection is discarded, and its slot is free."""
    import gevent

    pool = make_pool(MAX_CONNS=1)

    def run() -> None:
        with pool.connection() as conn:
            conn.autocommit = True
            if how == "timeout":
                with gevent.Timeout(0.3):
                    query(conn, "SELECT pg_sleep(30)")
            else:
                query(conn, "SELECT pg_sleep(30)")

    job = gevent.spawn(run)
    wait_until(lambda: running_queries(admin, app_name) == 1, what="the query to run")
    started = time.monotonic()
    if how == "kill":
        job.kill(block=True, timeout=5)
    else:
        job.join(5)
    assert job.dead and time.monotonic() - started < 1.0, "the interruption waited"
    if how == "timeout":
        assert isinstance(job.exception, gevent.Timeout), job.exception
    else:
        assert isinstance(job.value, gevent.GreenletExit), job.exception
    # pg_sleep(30) would keep the backend for 30 s: it goes within seconds only
    # if the query was cancelled (the backend then reads the closed socket).
    wait_until(lambda: backends(admin, app_name) == 0, what="the cancelled backend to go")
    stats = pool.get_stats()
    assert stats["pool_size"] == 0 and stats["pool_in_use"] == 0, stats
    assert stats["returns_bad"] == 1, "the interrupted connection was kept"
    with pool.connection(timeout=5) as fresh:
        assert query(fresh) == 1
    pool.check_invariants()


def test_discard_flag_closes_a_healthy_connection(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    pool.putconn(conn, discard=True)
    assert conn.closed
    assert pool.get_stats()["pool_size"] == 0


def test_returning_a_foreign_or_twice_returned_connection_is_refused(
    make_pool: PoolFactory, dsn: str
) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(db.ProgrammingError, match="already returned"):
        pool.putconn(conn)
    stranger = support.connect(dsn)
    with pytest.raises(db.ProgrammingError, match="did not lend"):
        pool.putconn(stranger)
    stranger.close()
    pool.check_invariants()


# ------------------------------------------------- dead idle connections


def test_terminated_idle_connections_are_never_handed_out(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    """The local socket check alone catches them: pings are switched off."""
    pool = make_pool(MAX_CONNS=3, PING_AFTER=None)
    conns = [pool.getconn() for _ in range(3)]
    for conn in conns:
        conn.autocommit = True
        pool.putconn(conn)
    assert terminate(admin, app_name) == 3
    fresh = [pool.getconn() for _ in range(3)]
    assert all(query(conn) == 1 for conn in fresh)
    assert not set(map(id, fresh)) & set(map(id, conns))
    for conn in fresh:
        pool.putconn(conn)
    stats = pool.get_stats()
    assert stats["connections_lost"] >= 1
    assert stats["pings"] == 0
    pool.check_invariants()


def test_after_a_loss_older_idle_connections_are_pinged(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    pool = make_pool(MAX_CONNS=3, PING_AFTER=None)
    conns = [pool.getconn() for _ in range(3)]
    for conn in conns:
        conn.autocommit = True
    pids = [query(conn, "SELECT pg_backend_pid()") for conn in conns]
    for conn in reversed(conns):
        pool.putconn(conn)  # conns[0] on top of the idle stack
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [pids[0]])
    wait_until(lambda: backends(admin, app_name) == 2, what="one backend to go")
    first = pool.getconn()  # conns[0] is found dead, conns[1] is taken and pinged
    second = pool.getconn()  # conns[2]: pinged too, created before the loss
    assert {id(first), id(second)} == {id(conns[1]), id(conns[2])}
    assert pool.get_stats()["pings"] == 2
    pool.putconn(first)
    pool.putconn(second)
    assert pool.getconn() is not None and pool.get_stats()["pings"] == 2, "pinged only once"


def test_ping_policy_follows_ping_after(make_pool: PoolFactory) -> None:
    lazy = make_pool(MAX_CONNS=1, PING_AFTER=3600)
    conn = lazy.getconn()
    lazy.putconn(conn)
    lazy.putconn(lazy.getconn())
    assert lazy.get_stats()["pings"] == 0
    eager = make_pool(MAX_CONNS=1, PING_AFTER=0)
    eager.putconn(eager.getconn())
    conn = eager.getconn()
    assert eager.get_stats()["pings"] == 1
    assert conn.info.transaction_status == IDLE
    assert conn.autocommit is False, "the ping restores autocommit"
    eager.putconn(conn)


def test_a_stalled_connection_fails_its_ping_and_is_replaced(
    make_pool: PoolFactory, proxy: Proxy, dsn: str
) -> None:
    pool = make_pool(proxy.dsn(), MAX_CONNS=1, PING_AFTER=0, POOL_TIMEOUT=10)
    pool.putconn(pool.getconn())
    proxy.cut()  # the network dies under the idle connection
    conn = pool.getconn()
    assert query(conn) == 1
    pool.putconn(conn)


# ------------------------------------------------------ failing connects


def test_database_down_single_flight_bounded_failures_and_recovery(
    proxy: Proxy, app_name: str, workers: Workers
) -> None:
    """While the server refuses: one connect in flight at a time, each checkout
    fails within 2 s (not its 30 s timeout) chained from the last connect error;
    once it accepts again the pool serves within 1 s."""
    attempts = [0]
    in_flight = [0, 0]  # now, most ever
    target = proxy.dsn(connect_timeout=2)

    def connect() -> Any:
        attempts[0] += 1
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            return support.connect(target, application_name=app_name)
        finally:
            in_flight[0] -= 1

    pool = ConnectionPool(connect, driver=DRIVER, name=app_name, options={"MAX_CONNS": 25})
    try:
        proxy.refuse()
        with pytest.raises(db.OperationalError) as first:
            pool.getconn()
        assert not isinstance(first.value, PoolUnavailable), "the real error comes first"
        # A burst of 50 during the outage, each willing to wait 30 s.
        started = time.monotonic()
        for _ in range(50):
            workers.spawn(pool.getconn, 30)
        workers.join(10)
        elapsed = time.monotonic() - started
        assert len(workers.errors) == 50
        assert all(isinstance(e, PoolUnavailable) for e in workers.errors), workers.errors
        assert all(isinstance(e.__cause__, db.OperationalError) for e in workers.errors)
        assert "the server is failing" in str(workers.errors[0])
        assert "Connection refused" in str(workers.errors[0])
        assert elapsed < 2.0 + 1.0, f"checkouts gave up after {elapsed:.2f} s"
        assert in_flight[1] == 1, "single flight: one connect at a time while failing"
        # Spaced by the backoff (0.05 s doubling to at most 0.5 s): a handful, not 50.
        assert 3 <= attempts[0] <= 14, attempts[0]
        stats = pool.get_stats()
        assert stats["pool_size"] == 0 and stats["requests_waiting"] == 0
        assert stats["connections_errors"] == attempts[0]
        pool.check_invariants()
        # Recovery needs no restart, and comes within a second.
        proxy.accept_again()
        back = time.monotonic()
        served_after = None
        while time.monotonic() - back < 5:
            try:
                conn = pool.getconn()
            except PoolUnavailable:
                continue
            served_after = time.monotonic() - back
            pool.putconn(conn)
            break
        assert served_after is not None and served_after < 1.0, served_after
        assert pool.get_stats()["pool_size"] == 1
        pool.check_invariants()
    finally:
        pool.close()


@pytest.mark.gevent_only
def test_a_connect_past_the_deadline_raises_pool_timeout_and_frees_the_slot(
    make_pool: PoolFactory, proxy: Proxy
) -> None:
    proxy.connect_delay = 1.0
    pool = make_pool(proxy.dsn(), MAX_CONNS=1, POOL_TIMEOUT=0.2)
    with pytest.raises(PoolTimeout, match="connecting took longer than the checkout timeout"):
        pool.getconn()
    stats = pool.get_stats()
    assert stats["pool_size"] == 0
    assert stats["requests_timeouts"] == 1 and stats["requests_errors"] == 1
    assert stats["connections_errors"] == 0, "the checkout ran out of time, the server did not fail"
    assert stats["connections_ms"] >= 150, "the time spent connecting is counted"
    proxy.connect_delay = 0
    conn = pool.getconn(timeout=5)
    pool.putconn(conn)


@pytest.mark.gevent_only
def test_a_checkout_handed_a_slot_late_says_it_waited_for_the_full_pool(
    make_pool: PoolFactory, proxy: Proxy, workers: Workers
) -> None:
    """Queued most of its timeout, then handed a freed slot: the message must not
    blame the database alone."""
    pool = make_pool(proxy.dsn(), MAX_CONNS=1, POOL_TIMEOUT=1.0)
    held = pool.getconn()
    proxy.connect_delay = 1.0  # the late connect cannot finish in what is left
    workers.spawn(pool.getconn)
    wait_until(lambda: waiting(pool) == 1, what="a queued checkout")
    sleep(0.8)
    pool.putconn(held, discard=True)  # its slot goes to the waiter
    workers.join(5)
    [error] = workers.errors
    assert isinstance(error, PoolTimeout)
    message = str(error)
    assert "connecting took longer than the checkout timeout allowed" in message
    waited = float(message.split("allowed: ")[1].split(" s went to waiting")[0])
    assert 0.7 <= waited <= 1.0, message
    assert "waiting for a free slot (a full pool)" in message
    pool.check_invariants()


@pytest.mark.gevent_only
def test_a_connect_killed_midway_gives_its_slot_back(make_pool: PoolFactory, proxy: Proxy) -> None:
    import gevent

    proxy.connect_delay = 5.0
    pool = make_pool(proxy.dsn(), MAX_CONNS=1)
    opener = gevent.spawn(pool.getconn)
    wait_until(lambda: pool.get_stats()["pool_opening"] == 1, what="the connect to start")
    opener.kill()
    assert pool.get_stats()["pool_size"] == 0
    pool.check_invariants()


# ---------------------------------------------------------------- closing


def test_close_fails_waiters_and_closes_returns(make_pool: PoolFactory, workers: Workers) -> None:
    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    workers.spawn(pool.getconn)
    wait_until(lambda: waiting(pool) == 1, what="a waiter")
    pool.close()
    workers.join()
    assert len(workers.errors) == 1 and isinstance(workers.errors[0], PoolClosed)
    pool.putconn(held)
    assert held.closed
    with pytest.raises(PoolClosed):
        pool.getconn()
    assert pool.get_stats()["pool_size"] == 0


def test_repr_shows_name_and_counts(make_pool: PoolFactory, app_name: str) -> None:
    pool = make_pool(MAX_CONNS=3)
    conn = pool.getconn()
    assert repr(pool) == (f"<ConnectionPool {app_name!r} max=3 size=1 in_use=1 idle=0 waiting=0>")
    pool.putconn(conn)


# ---------------------------------------------------- greenlets and threads


def test_many_workers_share_few_connections(
    make_pool: PoolFactory, admin: Any, app_name: str, workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=3, POOL_TIMEOUT=60)

    def work() -> int:
        total = 0
        for _ in range(20):
            with pool.connection() as conn:
                total += query(conn)
        return total

    for _ in range(30):
        workers.spawn(work)
    workers.join(120)
    assert workers.errors == []
    assert workers.results == [20] * 30
    assert pool.get_stats()["connections_num"] <= 3
    assert backends(admin, app_name) <= 3
    pool.check_invariants()


@pytest.mark.gevent_only
def test_os_threads_and_greenlets_at_once(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    """Real OS threads (each with its own hub) and greenlets borrow from one pool."""
    import gevent
    from gevent import monkey

    start_thread = monkey.get_original("_thread", "start_new_thread")
    pool = make_pool(MAX_CONNS=3, POOL_TIMEOUT=60)
    errors: list[BaseException] = []
    counts: list[str] = []

    def work(kind: str) -> None:
        try:
            for _ in range(30):
                with pool.connection() as conn:
                    query(conn, "SELECT pg_sleep(0.001)")
            counts.append(kind)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(3):
        start_thread(work, ("thread",))
    greenlets = [gevent.spawn(work, "greenlet") for _ in range(20)]
    gevent.joinall(greenlets, timeout=60)
    wait_until(lambda: len(counts) + len(errors) == 23, what="the OS threads", timeout=60)
    assert errors == []
    assert sorted(counts) == ["greenlet"] * 20 + ["thread"] * 3
    assert pool.get_stats()["connections_num"] <= 3
    pool.check_invariants()
    assert backends(admin, app_name) <= 3


# ------------------------------------------------------------ housekeeping


def test_maintain_closes_idle_and_old_connections_and_keeps_the_minimum(
    dsn: str, app_name: str, admin: Any
) -> None:
    now = [1000.0]
    pool = ConnectionPool(
        lambda: support.connect(dsn, application_name=app_name),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 3, "MIN_CONNS": 1, "IDLE_TIMEOUT": 10, "MAX_LIFETIME": 100},
        clock=lambda: now[0],
        background=False,
    )
    try:
        conns = [pool.getconn() for _ in range(3)]
        for conn in conns:
            pool.putconn(conn)
        now[0] += 11  # all idle past IDLE_TIMEOUT: all but MIN_CONNS close
        assert pool.maintain() is False
        wait_until(lambda: backends(admin, app_name) == 1, what="idle connections to close")
        assert pool.get_stats()["pool_available"] == 1
        now[0] += 100  # the kept one is past MAX_LIFETIME: retired, then reopened
        assert pool.maintain() is True
        stats = pool.get_stats()
        assert stats["pool_available"] == 1 and stats["connections_num"] == 4
        assert pool.maintain() is False, "one at a time, and only up to MIN_CONNS"
        pool.check_invariants()
    finally:
        pool.close()


def test_min_conns_are_opened_ahead_of_need_one_at_a_time(
    dsn: str, app_name: str, admin: Any
) -> None:
    pool = ConnectionPool(
        lambda: support.connect(dsn, application_name=app_name),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 4, "MIN_CONNS": 3},
        background=False,
    )
    try:
        opened = 0
        while pool.maintain():
            opened += 1
            assert backends(admin, app_name) == opened
        assert opened == 3
        assert pool.get_stats()["pool_available"] == 3
    finally:
        pool.close()


def test_idle_connections_close_in_the_background_with_no_traffic(
    make_pool: PoolFactory, admin: Any, app_name: str
) -> None:
    """django-db-geventpool's issue 68: nothing closes idle connections without traffic."""
    pool = make_pool(MAX_CONNS=3, MIN_CONNS=1, IDLE_TIMEOUT=0.3)
    conns = [pool.getconn() for _ in range(3)]
    for conn in conns:
        pool.putconn(conn)
    assert backends(admin, app_name) == 3
    wait_until(lambda: backends(admin, app_name) == 1, what="the background to close idle ones")
    assert pool.get_stats()["pool_available"] == 1


def test_a_connection_held_too_long_is_reported_with_its_borrower(
    make_pool: PoolFactory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(MAX_CONNS=2, LEAK_TIMEOUT=0.2)
    caplog.set_level("WARNING", logger="django_gevent_pool")

    def leaky_borrower() -> Any:
        return pool.getconn()

    conn = leaky_borrower()
    quick = pool.getconn()
    pool.putconn(quick)  # returned in time: never reported

    def reported() -> list[str]:
        return [r.getMessage() for r in caplog.records if "has been held for" in r.getMessage()]

    wait_until(lambda: bool(reported()), what="the leak warning")
    sleep(0.3)  # more maintenance rounds: still one warning for one checkout
    assert len(reported()) == 1
    assert "LEAK_TIMEOUT=0.2" in reported()[0]
    assert "in leaky_borrower" in reported()[0]
    pool.putconn(conn)
    came_back = [r.getMessage() for r in caplog.records if "came back after" in r.getMessage()]
    assert len(came_back) == 1 and "in leaky_borrower" in came_back[0]


# ------------------------------------------------------------------ drain


def test_drain_stops_lending_waits_for_returns_then_closes_everything(
    make_pool: PoolFactory, admin: Any, app_name: str, workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=3)
    idle = pool.getconn()
    held = [pool.getconn(), pool.getconn()]
    pool.putconn(idle)
    workers.spawn(pool.drain, 10)
    wait_until(lambda: pool.closed, what="the drain to start")
    with pytest.raises(PoolClosed):
        pool.getconn()
    wait_until(lambda: backends(admin, app_name) == 2, what="the idle one to close at once")
    for conn in held:
        sleep(0.05)
        pool.putconn(conn)
        assert conn.closed
    workers.join()
    assert workers.results == [True]
    assert backends(admin, app_name) == 0


def test_drain_gives_up_at_its_deadline(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1)
    held = pool.getconn()
    assert pool.drain(0.1) is False
    pool.putconn(held)  # late: closed on return
    assert held.closed
    assert pool.get_stats()["pool_size"] == 0


# ----------------------------------------------------------- session state


def test_reset_query_clears_session_state_on_return(make_pool: PoolFactory) -> None:
    plain = make_pool(MAX_CONNS=1)
    reset = make_pool(MAX_CONNS=1, RESET_QUERY="DISCARD ALL")
    for pool, expected in ((plain, "kept"), (reset, None)):
        conn = pool.getconn()
        conn.autocommit = True
        query(conn, "SET dgp.marker = 'kept'")
        pool.putconn(conn)
        again = pool.getconn()
        assert again is conn
        marker = query(again, "SELECT current_setting('dgp.marker', true)")
        # After DISCARD ALL a custom setting reads as NULL or '' depending on the server.
        assert marker == expected if expected else marker in (None, "")
        pool.putconn(again)


def test_a_failing_reset_query_discards_the_connection(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1, RESET_QUERY="SELECT no_such_function()")
    conn = pool.getconn()
    pool.putconn(conn)
    assert conn.closed
    assert pool.get_stats()["returns_bad"] == 1


def test_retirements_are_spread_out_not_all_at_once(dsn: str, app_name: str) -> None:
    now = [0.0]
    pool = ConnectionPool(
        lambda: support.connect(dsn, application_name=app_name),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 10, "MAX_LIFETIME": 100, "IDLE_TIMEOUT": None},
        clock=lambda: now[0],
        background=False,
    )
    try:
        conns = [pool.getconn() for _ in range(10)]  # all opened at the same instant
        for conn in conns:
            pool.putconn(conn)
        retired_at: list[float] = []
        for tick in range(80, 101):
            now[0] = float(tick)
            before = pool.get_stats()["pool_size"]
            pool.maintain()
            retired_at += [now[0]] * int(before - pool.get_stats()["pool_size"])
        assert len(retired_at) == 10, "all retired by MAX_LIFETIME"
        assert min(retired_at) >= 90, "jittered down by at most 10%"
        assert len(set(retired_at)) >= 3, "not all at once"
    finally:
        pool.close()


def test_a_waiting_checkout_with_a_huge_timeout_waits_and_is_served(
    make_pool: PoolFactory, workers: Workers
) -> None:
    """POOL_TIMEOUT=1e10 ("wait for ever"): OS threads used to raise OverflowError."""
    pool = make_pool(MAX_CONNS=1, POOL_TIMEOUT=1e10)
    held = pool.getconn()
    workers.spawn(pool.getconn)
    wait_until(lambda: waiting(pool) == 1, what="a waiting checkout")
    sleep(0.05)
    assert not workers.errors, workers.errors
    pool.putconn(held)
    workers.join(10)
    assert not workers.errors and len(workers.results) == 1
    pool.putconn(workers.results[0])
    pool.check_invariants()


def test_discarding_a_connection_another_worker_is_querying_on_never_waits_for_it(
    make_pool: PoolFactory, workers: Workers
) -> None:
    """putconn(discard=True) mid-query took the close() path: it waited on the driver's
    connection lock, held by the querying greenlet (the whole hub frozen)."""
    pool = make_pool(MAX_CONNS=2)
    conn = pool.getconn()
    conn.autocommit = True

    def long_query() -> None:
        query(conn, "SELECT pg_sleep(20)")

    workers.spawn(long_query)
    wait_until(lambda: is_active(conn), what="the query to run")
    started = time.monotonic()
    pool.putconn(conn, discard=True)
    assert time.monotonic() - started < 1.0, "the discard waited for the query"
    workers.join(5)
    assert len(workers.errors) == 1 and isinstance(workers.errors[0], db.Error)
    stats = pool.get_stats()
    assert stats["pool_size"] == 0 and stats["returns_bad"] == 1
    with pool.connection() as fresh:
        assert query(fresh) == 1
    pool.check_invariants()


class _YieldingHandler(logging.Handler):
    """A log handler that switches greenlets, as one shipping logs over a patched socket."""

    def emit(self, record: logging.LogRecord) -> None:
        import gevent

        gevent.sleep(0.2)


@pytest.mark.gevent_only
@pytest.mark.parametrize("where", ["checkout check", "leak return", "connect failure"])
def test_a_timeout_inside_a_yielding_log_handler_leaks_no_slot(
    make_pool: PoolFactory, admin: Any, app_name: str, proxy: Proxy, where: str
) -> None:
    import gevent

    handler = _YieldingHandler(level=logging.WARNING)
    log = logging.getLogger("django_gevent_pool")
    if where == "connect failure":
        pool = make_pool(proxy.dsn(), MAX_CONNS=2)
        proxy.refuse()
        action: Callable[[], Any] = pool.getconn
    elif where == "checkout check":
        pool = make_pool(MAX_CONNS=2, PING_AFTER=None)
        pool.putconn(pool.getconn())
        terminate(admin, app_name)  # the idle one is found dead: a warning, then a new one
        action = pool.getconn
    else:
        pool = make_pool(MAX_CONNS=2, LEAK_TIMEOUT=0.01)
        conn = pool.getconn()
        sleep(0.05)
        pool._warn_leaks(time.monotonic())  # held past LEAK_TIMEOUT: flagged (and logged)

        def action() -> None:
            pool.putconn(conn)

    log.addHandler(handler)
    try:
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
            action()
    finally:
        log.removeHandler(handler)
    stats = pool.get_stats()
    assert stats["pool_in_use"] == 0 and stats["pool_opening"] == 0, stats
    pool.check_invariants()


def test_a_second_return_after_the_connection_was_lent_again_is_refused(
    make_pool: PoolFactory, workers: Workers
) -> None:
    """It used to be accepted, and a third borrower got the second one's connection."""
    pool = make_pool(MAX_CONNS=1)
    conn, lease = pool.checkout()
    pool.putconn(conn, lease=lease)
    second, second_lease = pool.checkout()
    assert second is conn and second_lease != lease, "LIFO: the same connection, a new lease"
    with pytest.raises(db.ProgrammingError, match="another checkout holds"):
        pool.putconn(conn, lease=lease)
    assert pool.get_stats()["pool_in_use"] == 1, "still lent to the second borrower"
    pool.putconn(second, lease=second_lease)
    with pytest.raises(db.ProgrammingError, match="already returned"):
        pool.putconn(second, lease=second_lease)
    pool.check_invariants()


@pytest.mark.gevent_only
def test_a_stale_return_from_another_greenlet_without_a_lease_is_refused(
    make_pool: PoolFactory,
) -> None:
    import gevent

    pool = make_pool(MAX_CONNS=1)
    first = pool.getconn()
    pool.putconn(first)
    borrowed = gevent.event.Event()
    release = gevent.event.Event()

    def second_borrower() -> None:
        conn = pool.getconn()
        borrowed.set()
        release.wait(10)
        pool.putconn(conn)

    glet = gevent.spawn(second_borrower)
    borrowed.wait(5)
    with pytest.raises(db.ProgrammingError, match="another checkout holds"):
        pool.putconn(first)  # the same object, now the second borrower's
    release.set()
    glet.join(5)
    assert glet.successful()
    assert pool.get_stats()["pool_in_use"] == 0
    pool.check_invariants()
