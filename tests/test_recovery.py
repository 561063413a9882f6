"""Recovery within a second: a server restart, a network outage, a failover, MIN_CONNS refill.

Every fault is real and injected while 24 workers (greenlets, or OS threads in
threads mode) loop checkout -> query -> return: a throwaway embedded server
(``devserver.EmbeddedServer``, never the shared one) is restarted, or stopped
while its streaming standby is promoted; the loopback proxy refuses and cuts
connections. The promises (README.rst, "Recovery"):

- once the server is reachable again, the pool serves within 1 s;
- while it fails, a checkout fails within min(POOL_TIMEOUT, 2 s), chained from
  the last connect error, and at most one connect attempt is in flight;
- MIN_CONNS is opened at first use and refilled after losses within ~1 s.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_gevent_pool import ConnectionPool, PoolUnavailable, devserver
from django_gevent_pool.devserver import EmbeddedServer

from .proxy import Proxy
from .support import DRIVER, Workers, backends, connect, db, is_active, sleep, wait_until

WORKERS = 24
# A noisy, shared 2-core machine: the 1 s promise is asserted with this slack.
SLACK = 0.5
SERVES_WITHIN = 1.0 + SLACK
FAILS_WITHIN = 2.0 + SLACK


def _need_binaries() -> None:
    if devserver.postgres_binaries() is None:
        pytest.skip(
            "no PostgreSQL binaries for a throwaway server: pgserver (the test extra; "
            "no wheel for this Python?) nor a PostgreSQL installed on the machine"
        )


@pytest.fixture(scope="module")
def throwaway() -> Iterator[EmbeddedServer]:
    _need_binaries()
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@dataclasses.dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    phase: str  # "checkout" or "query"
    error: BaseException | None = None
    port: int | None = None


class Load:
    """``WORKERS`` loops of checkout -> ``work(conn)`` -> return, every outcome timestamped.

    Each loop ends at :meth:`stop` or after ``seconds``, whichever is first.
    """

    def __init__(
        self,
        pool: ConnectionPool,
        workers: Workers,
        work: Callable[[Any], Any],
        *,
        seconds: float = 30.0,
        driver: Any = db,
    ) -> None:
        """``driver``: the module of the errors the pool's connections raise (psycopg's)."""
        self.pool = pool
        self.work = work
        self.driver = driver
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = False
        self._until = time.monotonic() + seconds
        self._workers = workers
        for _ in range(WORKERS):
            workers.spawn(self._loop)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _loop(self) -> None:
        while not self._stop and time.monotonic() < self._until:
            started = time.monotonic()
            try:
                conn = self.pool.getconn()
            except self.driver.OperationalError as exc:
                self._record(Outcome(started, time.monotonic(), False, "checkout", exc))
                sleep(0.01)
                continue
            try:
                port = self.work(conn)
            except self.driver.Error as exc:
                self._record(Outcome(started, time.monotonic(), False, "query", exc))
            else:
                self._record(Outcome(started, time.monotonic(), True, "query", port=port))
            finally:
                self.pool.putconn(conn)
            sleep(0.005)

    def stop(self) -> None:
        self._stop = True
        self._workers.join(30)

    def successes_since(self, t: float) -> int:
        return sum(1 for o in self.outcomes if o.ok and o.started >= t)

    def assert_recovered(self, back: float, what: str) -> None:
        """Served within 1 s of ``back``; nothing started 1 s after it failed."""
        served = [o.ended for o in self.outcomes if o.ok and o.started >= back]
        assert served, f"nothing served after {what}"
        first = min(served) - back
        assert first < SERVES_WITHIN, f"first success {first:.2f} s after {what}"
        late = [o for o in self.outcomes if not o.ok and o.started >= back + SERVES_WITHIN]
        assert not late, f"failures more than 1 s after {what}: {late[:3]}"

    def assert_checkouts_failed_fast(self) -> None:
        """Each failed checkout gave up within 2 s, chained from the last connect error."""
        failed = [o for o in self.outcomes if not o.ok and o.phase == "checkout"]
        for outcome in failed:
            assert outcome.ended - outcome.started < FAILS_WITHIN, outcome
            if isinstance(outcome.error, PoolUnavailable):
                assert isinstance(outcome.error.__cause__, self.driver.Error), outcome


class CountingConnect:
    """A connect function that tracks attempts in flight while the pool is failing."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: ConnectionPool | None = None
        self.attempts = 0
        self.in_flight = 0
        self.most_while_failing = 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.attempts += 1
            self.in_flight += 1
            if self.pool is not None and self.pool._backoff.failures > 0:
                self.most_while_failing = max(self.most_while_failing, self.in_flight)
        try:
            conn = connect(self.dsn)
            conn.autocommit = True
            return conn
        finally:
            with self._lock:
                self.in_flight -= 1


def make_pool(connect: CountingConnect, name: str, **options: Any) -> ConnectionPool:
    pool = ConnectionPool(connect, driver=DRIVER, name=name, options={"MAX_CONNS": 20, **options})
    connect.pool = pool
    return pool


def terminate_all(admin: Any, app_name: str) -> set[int]:
    """pg_terminate_backend every backend of ``app_name``; their pids (no wait for zero:
    MIN_CONNS may open replacements at once)."""
    with admin.cursor() as cur:
        # In the select list: evaluated only for the rows the WHERE kept.
        cur.execute(
            "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [app_name],
        )
        return {row[0] for row in cur.fetchall()}


def replaced(admin: Any, app_name: str, killed: set[int], count: int) -> bool:
    """Exactly ``count`` backends of ``app_name``, none of them one of ``killed``."""
    with admin.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app_name])
        pids = {row[0] for row in cur.fetchall()}
    return len(pids) == count and not pids & killed


def select_port(conn: Any) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT inet_server_port()")
        return int(cur.fetchone()[0])


# ------------------------------------------------------------------ restart


def test_a_fast_restart_under_load_is_served_again_within_a_second(
    throwaway: EmbeddedServer, workers: Workers, app_name: str
) -> None:
    connect = CountingConnect(f"{throwaway.dsn()} application_name={app_name}")
    pool = make_pool(connect, app_name)
    try:
        load = Load(pool, workers, select_port)
        wait_until(lambda: load.successes_since(0) >= 200, what="the load to warm up")
        down = time.monotonic()
        throwaway.restart()  # "fast": every session is terminated, then it is back
        back = time.monotonic()
        wait_until(lambda: time.monotonic() - back > 2.5, what="two seconds of load after")
        load.stop()
        assert not workers.errors, workers.errors[:3]
        load.assert_recovered(back, "the restart")
        load.assert_checkouts_failed_fast()
        # What a ~0.3 s restart costs: failures only around it, none after 1 s.
        failed = [o for o in load.outcomes if not o.ok]
        assert all(down - 0.1 <= o.ended <= back + SERVES_WITHIN for o in failed), failed[:3]
        assert connect.most_while_failing <= 1, "single flight while the server fails"
        stats = pool.get_stats()
        assert stats["pool_size"] <= 20
        pool.check_invariants()
    finally:
        pool.close()


def test_a_restart_fails_only_queries_in_flight_and_the_pool_recovers(
    throwaway: EmbeddedServer, workers: Workers
) -> None:
    dsn = throwaway.dsn()
    pool = ConnectionPool(
        lambda: connect(dsn),
        driver=DRIVER,
        name="restart",
        options={"MAX_CONNS": 4, "PING_AFTER": None},
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
        wait_until(lambda: is_active(busy), what="the in-flight query to start")
        throwaway.restart()  # "fast": every session is terminated, then it comes back
        workers.join(30)
        assert len(workers.errors) == 1, "the query in flight fails"
        assert isinstance(workers.errors[0], db.OperationalError)
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


def test_a_restart_through_the_django_backend_with_twenty_greenlets(
    throwaway: EmbeddedServer, workers: Workers, app_name: str, django_db_blocker: Any
) -> None:
    """The case as users see it: the Django backend, MAX_CONNS=20, 20 request loops."""
    from django.db import DatabaseError, connections

    from django_gevent_pool.backends.base import close_pools, get_pool

    base = connections["default"].settings_dict
    settings_dict = {
        **base,
        "NAME": "postgres",
        "HOST": throwaway.host,
        "PORT": str(throwaway.port),
        "USER": "postgres",
        "PASSWORD": "",
        "OPTIONS": {"MAX_CONNS": 20, "application_name": app_name},
    }
    wrapper_class = type(connections["default"])
    outcomes: list[tuple[float, float, bool]] = []
    stop = [False]
    until = time.monotonic() + 30

    def request_loop() -> None:
        wrapper = wrapper_class(settings_dict, alias="recovery")
        while not stop[0] and time.monotonic() < until:
            started = time.monotonic()
            try:
                with wrapper.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
                ok = True
            except DatabaseError:
                ok = False
            finally:
                # What request_finished does.
                wrapper.close_if_unusable_or_obsolete()
            outcomes.append((started, time.monotonic(), ok))
            sleep(0.01 if ok else 0.02)

    unblocked = django_db_blocker.unblock()
    unblocked.__enter__()
    try:
        for _ in range(20):
            workers.spawn(request_loop)
        wait_until(lambda: sum(o[2] for o in outcomes) >= 200, what="the load to warm up")
        throwaway.restart()
        back = time.monotonic()
        wait_until(lambda: time.monotonic() - back > 2.5, what="two seconds of load after")
        stop[0] = True
        workers.join(30)
        assert not workers.errors, workers.errors[:3]
        served = [end for start, end, ok in outcomes if ok and start >= back]
        assert served and min(served) - back < SERVES_WITHIN, "served within 1 s of the restart"
        late = [o for o in outcomes if not o[2] and o[0] >= back + SERVES_WITHIN]
        assert not late, f"{len(late)} requests failed more than 1 s after the restart"
        pool = get_pool("recovery")
        assert pool is not None
        pool.check_invariants()
    finally:
        close_pools("recovery")
        unblocked.__exit__(None, None, None)


# ------------------------------------------------------------------ outage


def test_a_three_second_network_outage_is_served_again_within_a_second(
    dsn: str, workers: Workers, app_name: str
) -> None:
    with Proxy(dsn) as proxy:
        connect = CountingConnect(proxy.dsn(application_name=app_name, connect_timeout=2))
        pool = make_pool(connect, app_name, POOL_TIMEOUT=30)
        try:
            load = Load(pool, workers, select_port)
            wait_until(lambda: load.successes_since(0) >= 200, what="the load to warm up")
            proxy.refuse()
            proxy.cut()  # every session lost, nothing reachable
            down = time.monotonic()
            # The sessions lost at once are replaced at once (nobody knew yet):
            # from then on, attempts are single flight and backed off.
            wait_until(lambda: time.monotonic() - down > 0.5, what="the outage to be known")
            attempts_before = connect.attempts
            wait_until(lambda: time.monotonic() - down > 3.0, what="a three-second outage")
            attempts_during = connect.attempts - attempts_before
            proxy.accept_again()
            back = time.monotonic()
            wait_until(lambda: time.monotonic() - back > 2.5, what="two seconds of load after")
            load.stop()
            assert not workers.errors, workers.errors[:3]
            load.assert_recovered(back, "the network came back")
            load.assert_checkouts_failed_fast()
            # Every attempt made wholly inside the outage failed (a checkout may take
            # up to FAILS_WITHIN to give up, so the window is by start *and* end).
            during = [o for o in load.outcomes if o.started > down + 0.2 and o.ended < back]
            assert during and not any(o.ok for o in during), "nothing served while down"
            assert connect.most_while_failing <= 1, "single flight while the server fails"
            # One attempt every 0.25-0.5 s once backed off: no herd from 24 workers.
            assert 2 <= attempts_during <= 2.5 / 0.25 + 2, attempts_during
            pool.check_invariants()
        finally:
            pool.close()


def test_good_idle_connections_keep_serving_while_connects_fail(dsn: str, app_name: str) -> None:
    """A failing connect does not stop the pool from lending the healthy idle ones."""
    with Proxy(dsn) as proxy:
        connect = CountingConnect(proxy.dsn(application_name=app_name, connect_timeout=2))
        pool = make_pool(connect, app_name, MAX_CONNS=4)
        try:
            held = [pool.getconn() for _ in range(2)]
            for conn in held:
                pool.putconn(conn)
            proxy.refuse()  # new connects fail; the two open sessions live on
            more = [pool.getconn() for _ in range(2)]
            with pytest.raises(db.OperationalError):
                pool.getconn()  # needs a third connection
            with pytest.raises(PoolUnavailable) as err:
                pool.getconn(timeout=0.3)
            assert isinstance(err.value, db.OperationalError), "the driver's flavour"
            assert isinstance(err.value.__cause__, db.OperationalError)
            for conn in more:
                assert select_port(conn)
                pool.putconn(conn)
            for _ in range(5):
                with pool.connection() as conn:
                    assert select_port(conn)
            pool.check_invariants()
        finally:
            pool.close()


# ------------------------------------------------------------------ MIN_CONNS


def test_min_conns_is_opened_at_first_use_and_refilled_after_losses(
    dsn: str, admin: Any, app_name: str
) -> None:
    pool = ConnectionPool(
        lambda: connect(dsn, application_name=app_name),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 5, "MIN_CONNS": 3},
    )
    try:
        with pool.connection() as conn:
            assert select_port(conn)
        first_use = time.monotonic()
        wait_until(lambda: backends(admin, app_name) == 3, what="MIN_CONNS open", timeout=5)
        assert time.monotonic() - first_use < SERVES_WITHIN, "prewarmed within 1 s"
        sleep(0.3)
        assert backends(admin, app_name) == 3, "never above the minimum with no traffic"
        killed = terminate_all(admin, app_name)
        assert len(killed) == 3
        lost = time.monotonic()
        wait_until(
            lambda: replaced(admin, app_name, killed, 3), what="MIN_CONNS refilled", timeout=5
        )
        assert time.monotonic() - lost < SERVES_WITHIN, "refilled within ~1 s"
        # The replacements are good: checkouts use them without a failure.
        for _ in range(6):
            with pool.connection() as conn:
                assert select_port(conn)
        stats = pool.get_stats()
        assert stats["connections_lost"] >= 3 and stats["pool_size"] <= 5
        pool.check_invariants()
    finally:
        pool.close()


# ------------------------------------------------------------------ failover


@pytest.fixture
def primary_and_standby() -> Iterator[tuple[EmbeddedServer, EmbeddedServer]]:
    _need_binaries()
    primary = EmbeddedServer()
    primary.start()
    standby = None
    try:
        conn = connect(primary.dsn())
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE writes (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
        conn.close()
        standby = primary.standby()
        yield primary, standby
    finally:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()


def test_failover_to_a_promoted_standby_writes_again_within_a_second(
    primary_and_standby: tuple[EmbeddedServer, EmbeddedServer], workers: Workers
) -> None:
    """``HOST: "h1,h2"`` with ``target_session_attrs=read-write``, as Patroni setups use."""
    primary, standby = primary_and_standby
    dsn = (
        f"host={primary.host},{standby.host} port={primary.port},{standby.port} "
        "user=postgres dbname=postgres target_session_attrs=read-write connect_timeout=2 "
        "application_name=dgp-failover"
    )
    connect = CountingConnect(dsn)
    pool = make_pool(connect, "failover")

    def write(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO writes DEFAULT VALUES RETURNING inet_server_port()")
            return int(cur.fetchone()[0])

    try:
        load = Load(pool, workers, write)
        wait_until(lambda: load.successes_since(0) >= 200, what="writes to the primary")
        primary.stop()  # "fast": its sessions end, it refuses from now on
        stopped = time.monotonic()
        # The standby is still read-only for a moment: libpq must refuse it.
        wait_until(lambda: time.monotonic() - stopped > 0.5, what="half a second down")
        standby.promote()  # -w: returns once it accepts writes
        promoted = time.monotonic()
        wait_until(lambda: time.monotonic() - promoted > 2.5, what="two seconds of writes")
        load.stop()
        assert not workers.errors, workers.errors[:3]
        load.assert_recovered(promoted, "the promotion")
        load.assert_checkouts_failed_fast()
        ports = {o.port for o in load.outcomes if o.ok and o.started >= promoted}
        assert ports == {standby.port}, "after the promotion every write lands on the new primary"
        # libpq refusing the standby while it is read-only is a failed connect
        # ("session is read-only"); a write failing on a lent connection is not.
        read_only = [o for o in load.outcomes if o.phase == "query" and not o.ok]
        assert all("read-only" not in str(o.error) for o in read_only), read_only[:3]
        before = {o.port for o in load.outcomes if o.ok and o.ended < stopped}
        assert before == {primary.port}
        assert connect.most_while_failing <= 1
        pool.check_invariants()
    finally:
        pool.close()


# ------------------------------------------------------------------ killed mid-way


@pytest.mark.gevent_only
def test_checkouts_killed_while_waiting_for_a_turn_or_connecting_give_everything_back(
    dsn: str, app_name: str
) -> None:
    """GreenletExit and gevent.Timeout at each switch point of the failing path."""
    import gevent

    with Proxy(dsn) as proxy:
        connect = CountingConnect(proxy.dsn(application_name=app_name, connect_timeout=5))
        pool = make_pool(connect, app_name, MAX_CONNS=20)
        try:
            proxy.refuse()
            with pytest.raises(db.OperationalError):
                pool.getconn()
            assert pool._backoff.failures == 1
            # The next attempt hangs in the proxy: one greenlet connects (the turn),
            # the others wait for it.
            proxy.accept_again()
            proxy.connect_delay = 3.0
            greenlets = [gevent.spawn(pool.getconn) for _ in range(12)]
            wait_until(lambda: pool._in_flight == 1, what="one attempt in flight")
            wait_until(lambda: len(pool._turn_waiters) == 11, what="eleven waiting for a turn")
            assert connect.in_flight == 1
            with pytest.raises(gevent.Timeout), gevent.Timeout(0.05):
                pool.getconn()  # an outer timeout while waiting for the turn
            gevent.killall(greenlets)  # the one connecting and those waiting
            assert all(g.dead for g in greenlets)
            stats = pool.get_stats()
            assert stats["pool_size"] == 0 and stats["pool_opening"] == 0, stats
            assert pool._in_flight == 0 and not pool._turn_waiters
            pool.check_invariants()
            # Nothing is stuck: with the server answering again, the pool serves at once.
            proxy.connect_delay = 0.0
            back = time.monotonic()
            while True:
                try:
                    conn = pool.getconn()
                    break
                except PoolUnavailable:
                    assert time.monotonic() - back < SERVES_WITHIN
            assert time.monotonic() - back < SERVES_WITHIN
            assert select_port(conn)
            pool.putconn(conn)
            pool.check_invariants()
        finally:
            pool.close()


@pytest.mark.gevent_only
def test_housekeeping_killed_while_opening_min_conns_gives_the_slot_back(
    dsn: str, app_name: str
) -> None:
    import gevent

    with Proxy(dsn) as proxy:
        proxy.connect_delay = 3.0
        pool = ConnectionPool(
            lambda: connect(proxy.dsn(application_name=app_name)),
            driver=DRIVER,
            name=app_name,
            options={"MAX_CONNS": 3, "MIN_CONNS": 2},
            background=False,
        )
        try:
            housekeeping = gevent.spawn(pool.maintain)
            wait_until(lambda: pool.get_stats()["pool_opening"] == 1, what="a MIN_CONNS connect")
            housekeeping.kill()
            assert isinstance(housekeeping.exception, gevent.GreenletExit) or housekeeping.dead
            stats = pool.get_stats()
            assert stats["pool_size"] == 0 and stats["pool_opening"] == 0, stats
            pool.check_invariants()
            proxy.connect_delay = 0.0
            assert pool.maintain() and pool.maintain()
            assert pool.get_stats()["pool_size"] == 2
            pool.check_invariants()
        finally:
            pool.close()


@pytest.mark.gevent_only
def test_a_killed_housekeeping_greenlet_is_started_again_by_the_next_checkout(
    dsn: str, admin: Any, app_name: str
) -> None:
    """Killed, the housekeeping never ran again: no MIN_CONNS refill, no idle timeout."""

    pool = ConnectionPool(
        lambda: connect(dsn, application_name=app_name),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 4, "MIN_CONNS": 2},
    )
    try:
        with pool.connection():
            pass
        wait_until(lambda: backends(admin, app_name) == 2, what="MIN_CONNS open")
        first = pool._maintainer
        assert first is not None and not first.dead
        first.kill()  # GreenletExit, as gevent.killall() at shutdown or a stray kill does
        assert first.dead
        with pool.connection():
            pass  # the next checkout starts another
        second = pool._maintainer
        assert second is not first and not second.dead
        killed = terminate_all(admin, app_name)
        wait_until(
            lambda: replaced(admin, app_name, killed, 2), what="MIN_CONNS refilled", timeout=5
        )
        pool.check_invariants()
    finally:
        pool.close()
