"""The pool on PyMySQL against a real MySQL or MariaDB server: cap, return states, kills.

The pool core is the one PostgreSQL uses; what differs lives in
``drivers/pymysql.py`` and is proven here on the server: every session of a
test belongs to a user of its own, so ``information_schema.PROCESSLIST``
counts the pool's connections and shows what they run; ``KILL`` ends them
as an administrator would, and a session's ``wait_timeout`` as the server
does by itself.

The server, the skip when there is none and the runs this module is part of:
``tests/mysql_support.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from django_gevent_pool import ConnectionPool, PoolTimeout
from django_gevent_pool.drivers import Status
from django_gevent_pool.drivers import pymysql as mysql_driver

from .mysql_support import admin, one, only_in_mysql_runs, params, root_params, sessions
from .support import Workers, sleep, wait_until

__all__ = ["admin", "params", "root_params"]  # fixtures

pymysql = pytest.importorskip("pymysql")
only_in_mysql_runs()

PoolFactory = Callable[..., ConnectionPool]

# A noisy, shared 2-core machine: the 1 s promises are asserted with this slack.
SLACK = 0.5
WITHIN = 1.0 + SLACK


@pytest.fixture
def make_pool(params: dict[str, Any]) -> Iterator[PoolFactory]:
    made: list[ConnectionPool] = []

    def make(**options: Any) -> ConnectionPool:
        extra = options.pop("connect", {})
        pool = ConnectionPool(
            lambda: mysql_driver.connect(**{**params, "autocommit": True, **extra}),
            driver="pymysql",
            name=params["user"],
            options=options,
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


@pytest.fixture
def held_lock(admin: Any, params: dict[str, Any]) -> Iterator[str]:
    """A user lock the administrator holds: ``SELECT GET_LOCK(name, n)`` waits on it.

    The long statement the kill tests interrupt: a lock wait, not ``SLEEP()``.
    On MariaDB 10.11 a ``KILL`` of a session in ``SLEEP()`` while others run
    ``SLEEP()`` can stall them all until the ``KILL``'s connection goes away
    (seen here: 2 s, the ``KILL``'s read timeout); a lock wait, like real
    work (``BENCHMARK``), ends at once.
    """
    name = f"dgp_hold_{params['user']}"
    assert one(admin, "SELECT GET_LOCK(%s, 1)", [name]) == 1
    yield name
    one(admin, "SELECT RELEASE_LOCK(%s)", [name])


def open_transactions(admin: Any, conn: Any) -> int:
    """Transactions InnoDB has open for ``conn``'s session, once it shows one (<= 1 s).

    ``INNODB_TRX`` is a cache InnoDB refreshes only when nobody read it for
    0.1 s (every read restarts that wait): each read here comes 0.15 s after
    the last one.
    """

    def count() -> int:
        return int(
            one(
                admin,
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = %s",
                [conn.thread_id()],
            )
        )

    deadline = time.monotonic() + 1.0
    sleep(0.15)
    while (found := count()) == 0 and time.monotonic() < deadline:
        sleep(0.15)
    return found


# ----------------------------------------------------------------- the cap


def test_the_cap_holds_on_the_server_under_30_workers(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any], workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=4, POOL_TIMEOUT=10)
    finished: list[int] = []
    peak = 0

    def visit() -> None:
        try:
            for _ in range(5):
                conn = pool.getconn()
                try:
                    one(conn, "SELECT SLEEP(0.02)")
                finally:
                    pool.putconn(conn)
        finally:
            finished.append(1)

    for _ in range(30):
        workers.spawn(visit)
    deadline = time.monotonic() + 20
    while len(finished) < 30 and time.monotonic() < deadline:
        peak = max(peak, len(sessions(admin, params["user"])))
        sleep(0.005)
    workers.join()
    assert not workers.errors
    assert peak == 4, f"the server saw {peak} sessions at most (MAX_CONNS=4)"
    assert pool.get_stats()["connections_num"] == 4
    pool.check_invariants()


# ------------------------------------------------------------ return states


def test_a_connection_returned_in_a_transaction_is_rolled_back(
    make_pool: PoolFactory, admin: Any
) -> None:
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS test.dgp_rows (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("DELETE FROM test.dgp_rows")
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    thread_id = conn.thread_id()
    conn.begin()
    one(conn, "INSERT INTO dgp_rows VALUES (1)")
    assert mysql_driver.DRIVER.status(conn) is Status.INTRANS
    pool.putconn(conn)
    assert one(admin, "SELECT COUNT(*) FROM test.dgp_rows") == 0
    again = pool.getconn()
    assert again.thread_id() == thread_id  # rolled back and kept, not reconnected
    assert mysql_driver.DRIVER.status(again) is Status.IDLE
    assert one(again, "SELECT @@in_transaction") == 0
    pool.putconn(again)
    assert pool.get_stats()["returns_rolled_back"] == 1


def test_a_failed_statement_with_autocommit_off_counts_as_in_a_transaction(
    make_pool: PoolFactory, admin: Any
) -> None:
    """An error packet carries no status: the pool must not trust the last OK packet's."""
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS test.dgp_rows (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("DELETE FROM test.dgp_rows")
        cur.execute("INSERT INTO test.dgp_rows VALUES (7)")
    pool = make_pool(MAX_CONNS=1, connect={"autocommit": False})
    conn = pool.getconn()
    one(conn, "ROLLBACK")  # an OK packet: no transaction, autocommit off
    assert mysql_driver.DRIVER.status(conn) is Status.IDLE
    with pytest.raises(pymysql.MySQLError):
        # Locks row 7 before failing on it: the transaction is open on the server.
        one(conn, "INSERT INTO dgp_rows SELECT id FROM dgp_rows WHERE id = 7 FOR UPDATE")
    assert open_transactions(admin, conn) == 1  # the server has it: the client must see it
    assert mysql_driver.DRIVER.status(conn) is Status.INTRANS
    pool.putconn(conn)
    assert pool.get_stats()["returns_rolled_back"] == 1
    # The row lock went with the rollback: another session takes it at once.
    with admin.cursor() as cur:
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cur.execute("BEGIN")
        cur.execute("SELECT id FROM test.dgp_rows WHERE id = 7 FOR UPDATE")
        cur.execute("ROLLBACK")


def test_a_result_set_with_autocommit_off_counts_as_in_a_transaction(
    make_pool: PoolFactory, admin: Any
) -> None:
    """PyMySQL keeps no status from a result set's end: the last OK packet's is stale.

    With autocommit off, a ``SELECT ... FOR UPDATE`` opens a transaction and
    locks a row while ``server_status`` still says what ``SET autocommit=0``
    said: the connection must be rolled back on return, not lent on with the
    lock held (the next ``SET autocommit=1`` would commit what it did).
    """
    with admin.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS test.dgp_rows (id INT PRIMARY KEY) ENGINE=InnoDB")
        cur.execute("DELETE FROM test.dgp_rows")
        cur.execute("INSERT INTO test.dgp_rows VALUES (9)")
    pool = make_pool(MAX_CONNS=1, connect={"autocommit": False})
    conn = pool.getconn()
    one(conn, "ROLLBACK")
    assert one(conn, "SELECT id FROM dgp_rows WHERE id = 9 FOR UPDATE") == 9
    assert open_transactions(admin, conn) == 1  # the server has it: the client must see it
    assert mysql_driver.DRIVER.status(conn) is Status.INTRANS
    pool.putconn(conn)
    assert pool.get_stats()["returns_rolled_back"] == 1
    with admin.cursor() as cur:  # the row lock went with the rollback
        cur.execute("SET SESSION innodb_lock_wait_timeout = 1")
        cur.execute("BEGIN")
        cur.execute("SELECT id FROM test.dgp_rows WHERE id = 9 FOR UPDATE")
        cur.execute("ROLLBACK")


def test_an_error_in_autocommit_leaves_the_connection_idle_and_reused(
    make_pool: PoolFactory,
) -> None:
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    thread_id = conn.thread_id()
    with pytest.raises(pymysql.ProgrammingError):
        one(conn, "SELECT * FROM no_such_table")
    assert mysql_driver.DRIVER.status(conn) is Status.IDLE
    pool.putconn(conn)
    again = pool.getconn()
    assert again.thread_id() == thread_id
    assert one(again, "SELECT 1") == 1
    pool.putconn(again)
    stats = pool.get_stats()
    assert stats["returns_rolled_back"] == 0 and stats["returns_bad"] == 0


def test_reset_query_runs_on_return_and_wipes_session_state(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1, RESET_QUERY="SET @owner = NULL; SET SESSION sql_mode = DEFAULT")
    conn = pool.getconn()
    default_mode = one(conn, "SELECT @@SESSION.sql_mode")
    one(conn, "SET @owner = 'first'")
    one(conn, "SET SESSION sql_mode = 'ANSI'")
    pool.putconn(conn)
    again = pool.getconn()
    assert one(again, "SELECT @owner") is None
    assert one(again, "SELECT @@SESSION.sql_mode") == default_mode
    pool.putconn(again)


# ------------------------------------------------------------------- kills


@pytest.mark.gevent_only
def test_greenlets_killed_mid_query_leave_no_statement_running_on_the_server(
    admin: Any, params: dict[str, Any], held_lock: str
) -> None:
    """24 greenlets on 5 connections, half of them timed out mid-query: nothing leaks.

    A killed greenlet's connection is closed at once (PyMySQL closes the
    socket) and its slot goes to the next greenlet, while its session runs on
    until the background ``KILL`` (from a short connection of its own) lands:
    the server briefly sees those, and the ``KILL`` connections, beside the
    pool's 5. The pool's live sessions are told apart by their thread ids.
    """
    import gevent

    opened: list[int] = []

    def connect() -> Any:
        conn = mysql_driver.connect(**{**params, "autocommit": True})
        opened.append(int(conn.thread_id()))
        return conn

    pool = ConnectionPool(connect, driver="pymysql", name="kills", options={"MAX_CONNS": 5})
    killed: list[int] = []
    peak = 0
    started = time.monotonic()

    def visit(n: int) -> None:
        conn = pool.getconn()
        try:
            if n % 2:
                thread_id = int(conn.thread_id())
                try:
                    with gevent.Timeout(0.05):
                        one(conn, "SELECT GET_LOCK(%s, 3)", [held_lock])
                except gevent.Timeout:
                    killed.append(thread_id)
            else:
                one(conn, "SELECT SLEEP(0.01)")
        finally:
            pool.putconn(conn)

    greenlets = [gevent.spawn(visit, n) for n in range(24)]
    while not all(g.dead for g in greenlets):
        live = set(sessions(admin, params["user"])) & set(opened) - set(killed)
        peak = max(peak, len(live))
        gevent.sleep(0.005)
    gevent.joinall(greenlets, raise_error=True)
    # Nothing stalls behind the kills (a KILL of a SLEEP() stalled the others for 2 s).
    assert time.monotonic() - started < 1.0 + WITHIN
    assert len(killed) == 12
    started = time.monotonic()
    wait_until(
        lambda: not set(killed) & set(sessions(admin, params["user"])),
        what="the killed greenlets' sessions to end on the server",
        timeout=WITHIN,
    )
    assert time.monotonic() - started < WITHIN
    assert peak <= 5
    stats = pool.get_stats()
    assert stats["pool_in_use"] == 0
    pool.check_invariants()
    # What is left is usable.
    conns = [pool.getconn() for _ in range(5)]
    assert [one(c, "SELECT 1") for c in conns] == [1] * 5
    for c in conns:
        pool.putconn(c)
    pool.close()


def test_a_connection_returned_while_its_query_runs_is_severed_and_its_session_killed(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any], workers: Workers, held_lock: str
) -> None:
    """Returned by another greenlet or thread mid-query: ACTIVE, so cut and KILLed."""
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    thread_id = conn.thread_id()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            one(conn, "SELECT GET_LOCK(%s, 5)", [held_lock])
        except BaseException as exc:  # the test asserts on it
            failures.append(exc)

    workers.spawn(run)
    wait_until(
        lambda: thread_id in sessions(admin, params["user"], running="SELECT GET_LOCK"),
        what="the query to run",
    )
    assert mysql_driver.DRIVER.status(conn) is Status.ACTIVE
    started = time.monotonic()
    pool.putconn(conn)
    wait_until(lambda: bool(failures), what="the running query to fail", timeout=WITHIN)
    wait_until(
        lambda: thread_id not in sessions(admin, params["user"]),
        what="the session to be killed",
        timeout=WITHIN,
    )
    assert time.monotonic() - started < WITHIN
    workers.join()
    assert isinstance(failures[0], pymysql.MySQLError)
    assert pool.get_stats()["returns_bad"] == 1
    fresh = pool.getconn()
    assert fresh.thread_id() != thread_id and one(fresh, "SELECT 1") == 1
    pool.putconn(fresh)


def test_idle_connections_killed_by_the_server_are_replaced_without_an_error(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any], workers: Workers
) -> None:
    pool = make_pool(MAX_CONNS=4)
    conns = [pool.getconn() for _ in range(4)]
    before = {c.thread_id() for c in conns}
    for c in conns:
        pool.putconn(c)
    with admin.cursor() as cur:
        for thread_id in before:
            cur.execute(f"KILL {thread_id}")
    wait_until(lambda: not sessions(admin, params["user"]), what="the kills")
    started = time.monotonic()

    def visit() -> int:
        conn = pool.getconn()
        try:
            one(conn, "SELECT SLEEP(0.05)")
            return int(conn.thread_id())
        finally:
            pool.putconn(conn)

    for _ in range(20):
        workers.spawn(visit)
    workers.join()
    assert not workers.errors
    assert time.monotonic() - started < WITHIN + 0.05 * 20 / 4
    assert not before & set(workers.results)
    assert pool.get_stats()["connections_lost"] >= 1


def test_wait_timeout_closing_idle_connections_costs_no_error(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=2, connect={"init_command": "SET SESSION wait_timeout = 1"})
    conn = pool.getconn()
    thread_id = conn.thread_id()
    pool.putconn(conn)
    sleep(2.2)
    again = pool.getconn()
    assert again.thread_id() != thread_id
    assert one(again, "SELECT 1") == 1
    pool.putconn(again)


def test_a_ping_after_idle_is_counted_and_keeps_the_connection(make_pool: PoolFactory) -> None:
    """PING_AFTER: a checkout after idle pings (COM_PING) and lends the same connection.

    A dead idle connection is found before any ping, by the zero-round-trip
    look (server KILLs and ``wait_timeout`` above); what only a ping finds,
    a silent network, is the PostgreSQL tiers' (the proxy there).
    """
    pool = make_pool(MAX_CONNS=1, PING_AFTER=0.1)
    conn = pool.getconn()
    thread_id = conn.thread_id()
    pool.putconn(conn)
    sleep(0.2)
    again = pool.getconn()
    assert again is conn and one(again, "SELECT CONNECTION_ID()") == thread_id
    pool.putconn(again)
    assert pool.get_stats()["pings"] == 1


# ------------------------------------------------------------------ errors


def test_the_pool_errors_are_pymysql_operational_errors(make_pool: PoolFactory) -> None:
    pool = make_pool(MAX_CONNS=1, POOL_TIMEOUT=0.2)
    held = pool.getconn()
    with pytest.raises(PoolTimeout) as caught:
        pool.getconn()
    assert isinstance(caught.value, pymysql.OperationalError)
    assert "MAX_CONNS=1" in str(caught.value)
    pool.putconn(held)


# -------------------------------------------------- lifetime, idle, fork


def test_idle_timeout_and_lifetime_close_sessions_on_the_server(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any]
) -> None:
    idle = make_pool(MAX_CONNS=2, IDLE_TIMEOUT=0.3)
    conn = idle.getconn()
    thread_id = conn.thread_id()
    idle.putconn(conn)
    wait_until(
        lambda: thread_id not in sessions(admin, params["user"]),
        what="the idle session to be closed",
        timeout=0.3 + 1.0,
    )
    aged = make_pool(MAX_CONNS=1, MAX_LIFETIME=0.3)
    conn = aged.getconn()
    thread_id = conn.thread_id()
    aged.putconn(conn)
    sleep(0.4)
    again = aged.getconn()
    assert again.thread_id() != thread_id
    aged.putconn(again)
    assert thread_id not in sessions(admin, params["user"])


FORK_SCRIPT = textwrap.dedent(
    """
    import gc, json, os, sys
    if sys.argv[1] == "gevent":
        from gevent import monkey
        monkey.patch_all()
    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.drivers import pymysql as mysql_driver

    params = json.loads(sys.argv[2])

    def tid(conn):
        with conn.cursor() as cur:
            cur.execute("SELECT CONNECTION_ID()")
            return cur.fetchone()[0]

    pool = ConnectionPool(lambda: mysql_driver.connect(**params), driver="pymysql",
                          options={"MAX_CONNS": 3})
    a, b = pool.getconn(), pool.getconn()
    parent = [tid(a), tid(b)]
    pool.putconn(a)                      # a idle, b in use
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        c = pool.getconn()
        out = {"pool": tid(c)}
        pool.putconn(c)
        pool.putconn(b)                  # lent before the fork: must not reach the parent's
        pool.close()
        del a, b, c, pool
        gc.collect()
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.waitpid(child, 0)
    got = json.loads(os.read(r, 4096))
    a2 = pool.getconn()
    print(json.dumps({"parent": parent, "child": got, "same_a": a2 is a,
                      "now": [tid(a2), tid(b)]}))
    """
)


@pytest.mark.parametrize("mode", ["plain", "gevent"])
def test_a_forked_child_never_uses_or_closes_the_parents_connections(
    params: dict[str, Any], mode: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, mode, json.dumps({**params, "autocommit": True})],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["child"]["pool"] not in result["parent"]
    assert result["same_a"]
    assert result["now"] == result["parent"]  # both sessions survived the child


# ------------------------------------------------------------- host budget


def test_two_pools_on_one_host_budget_never_exceed_it_on_the_server(
    admin: Any, params: dict[str, Any], workers: Workers, tmp_path: Any
) -> None:
    """HOST_MAX_CONNS on MySQL: two pools of 3 on a budget of 3; 24 workers; <= 3 sessions.

    A closed connection's slot is freed once the server closed its end (the
    pool waits for the socket's EOF): with PyMySQL's sockets too, the server
    never sees budget + 1.
    """
    from django_gevent_pool.hostbudget import HostBudget

    budget = HostBudget(f"{params['user']}@127.0.0.1:{params['port']}/test", 3, str(tmp_path))
    pools = [
        ConnectionPool(
            lambda: mysql_driver.connect(**{**params, "autocommit": True}),
            driver="pymysql",
            name=f"budget-{n}",
            options={"MAX_CONNS": 3, "POOL_TIMEOUT": 10, "MAX_LIFETIME": 0.2},
            host_budget=budget,
        )
        for n in range(2)
    ]
    finished: list[int] = []
    peak = 0

    def visit(n: int) -> None:
        try:
            pool = pools[n % 2]
            for _ in range(5):
                conn = pool.getconn()
                try:
                    one(conn, "SELECT SLEEP(0.02)")
                finally:
                    pool.putconn(conn)
        finally:
            finished.append(1)

    try:
        for n in range(24):
            workers.spawn(visit, n)
        deadline = time.monotonic() + 30
        while len(finished) < 24 and time.monotonic() < deadline:
            peak = max(peak, len(sessions(admin, params["user"])))
            sleep(0.005)
        workers.join()
        assert not workers.errors, workers.errors[:3]
        # MAX_LIFETIME 0.2 s: connections retire and reopen throughout, slots change hands.
        assert sum(p.get_stats()["connections_num"] for p in pools) > 3
        assert 1 <= peak <= 3, f"the server saw {peak} sessions (HOST_MAX_CONNS=3)"
        for pool in pools:
            pool.check_invariants()
    finally:
        for pool in pools:
            pool.close()


# ------------------------------------------------------------ session reset


def test_a_return_with_reset_wipes_the_session_and_sets_up_what_connect_did(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any]
) -> None:
    """``putconn(reset=True)``: COM_RESET_CONNECTION, then connect's setup, then RESET_QUERY.

    Everything a session can hold is made, then checked gone on the server
    (the lock from another session) on the same session (a reset, not a
    reconnect); what PyMySQL's connect set up is back (character set,
    database, ``sql_mode``, ``init_command``, autocommit).
    """
    setup: list[int] = []
    pool = make_pool(
        MAX_CONNS=1,
        RESET_QUERY="SET @dgp_after_reset = 7",
        connect={
            "charset": "utf8mb4",
            "collation": "utf8mb4_unicode_ci",
            "sql_mode": "STRICT_TRANS_TABLES",
            "init_command": "SET @dgp_init = 1",
        },
    )
    pool._after_reset = lambda conn: setup.append(conn.thread_id())
    lock = f"dgp_reset_{params['user']}"
    conn = pool.getconn()
    thread_id = conn.thread_id()
    for sql in (
        "CREATE TABLE IF NOT EXISTS dgp_reset_t (a INT)",
        "SET @v = 5, @dgp_init = 2, @dgp_after_reset = NULL",
        "SET NAMES latin1",
        "SET SESSION sql_mode = ''",
        "CREATE TEMPORARY TABLE dgp_tmp (a INT)",
        "PREPARE dgp_s FROM 'SELECT 1'",
        "USE mysql",
        "LOCK TABLES test.dgp_reset_t WRITE",
        "SET autocommit = 0",
    ):
        one(conn, sql)
    assert one(conn, "SELECT GET_LOCK(%s, 0)", [lock]) == 1
    assert one(admin, "SELECT IS_USED_LOCK(%s)", [lock]) == thread_id
    pool.putconn(conn, reset=True)

    conn = pool.getconn()
    assert conn.thread_id() == thread_id  # the same session, reset: no reconnect
    assert setup == [thread_id]  # the caller's session setup ran after the reset
    with conn.cursor() as cur:
        cur.execute(
            "SELECT @v, @dgp_init, @dgp_after_reset, @@character_set_client,"
            " @@collation_connection, @@sql_mode, DATABASE(), @@autocommit"
        )
        assert cur.fetchone() == (
            None,
            1,  # init_command ran again
            7,  # RESET_QUERY ran after the reset
            "utf8mb4",
            "utf8mb4_unicode_ci",
            "STRICT_TRANS_TABLES",
            "test",
            1,
        )
    assert conn.get_autocommit()
    for gone in ("SELECT * FROM dgp_tmp", "EXECUTE dgp_s"):
        with pytest.raises(pymysql.MySQLError):
            one(conn, gone)
    assert one(admin, "SELECT IS_USED_LOCK(%s)", [lock]) is None
    with admin.cursor() as cur:
        cur.execute("SET SESSION lock_wait_timeout = 1")
        cur.execute("INSERT INTO test.dgp_reset_t VALUES (1)")  # no table lock left
        cur.execute("DROP TABLE test.dgp_reset_t")
    pool.putconn(conn)
    pool.check_invariants()
    assert pool.get_stats()["connections_num"] == 1


def test_a_reset_that_fails_discards_the_connection(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any]
) -> None:
    """The session setup after the reset fails: the connection is closed, not lent half set up."""
    pool = make_pool(MAX_CONNS=1, connect={"init_command": "SELECT dgp_no_such_column"})
    with pytest.raises(pymysql.MySQLError):
        pool.getconn()  # connect's own init_command fails too: nothing half set up is lent
    pool = make_pool(MAX_CONNS=1)
    conn = pool.getconn()
    thread_id = conn.thread_id()
    conn.init_command = "SELECT dgp_no_such_column"  # fails after the reset
    pool.putconn(conn, reset=True)
    stats = pool.get_stats()
    assert stats["pool_size"] == 0 and stats["pool_in_use"] == 0
    wait_until(
        lambda: thread_id not in sessions(admin, params["user"]),
        what="the failed session closed on the server",
        timeout=2.0,
    )
    conn = pool.getconn()
    assert conn.thread_id() != thread_id
    pool.putconn(conn)
    pool.check_invariants()


def test_resets_on_a_silent_network_give_up_within_their_bound_under_20_workers(
    make_pool: PoolFactory, admin: Any, params: dict[str, Any], workers: Workers
) -> None:
    """20 sessions with state go back with reset=True while the network is silent.

    Each return gives up after ``RETURN_TIMEOUT`` (the watchdog cuts the
    socket; the ``KILL`` side connection is tried as for any severed session),
    the connections are discarded, not lent, and once the network is back the
    next 20 checkouts get fresh sessions without the state.
    """
    from django_gevent_pool.health import RETURN_TIMEOUT

    from .proxy import Proxy

    with Proxy(f"host={params['host']} port={params['port']}") as proxy:
        pool = make_pool(
            MAX_CONNS=20, POOL_TIMEOUT=10, connect={"host": "127.0.0.1", "port": proxy.port}
        )
        held: list[Any] = []
        took: list[float] = []
        go = [False]

        def pinned_then_returned() -> None:
            conn = pool.getconn()
            one(conn, "SET @dgp_v = 1")
            held.append(conn.thread_id())
            while not go[0]:
                sleep(0.01)
            start = time.monotonic()
            pool.putconn(conn, reset=True)
            took.append(time.monotonic() - start)

        for _ in range(20):
            workers.spawn(pinned_then_returned)
        wait_until(lambda: len(held) == 20, what="20 sessions with state")
        proxy.stall()
        go[0] = True
        workers.join()
        proxy.resume()
        assert not workers.errors
        # 20 watchdogs fire at once, each return then cuts, discards and starts
        # its KILL: a second of slack on a shared 2-core machine.
        assert len(took) == 20 and max(took) < RETURN_TIMEOUT + 2 * SLACK, took
        assert min(took) >= RETURN_TIMEOUT - 0.1, took  # the reset really waited
        stats = pool.get_stats()
        assert stats["pool_size"] == 0 and stats["pool_in_use"] == 0
        pool.check_invariants()
        fresh = [pool.getconn() for _ in range(20)]
        assert {conn.thread_id() for conn in fresh}.isdisjoint(held)
        assert [one(conn, "SELECT @dgp_v") for conn in fresh] == [None] * 20
        for conn in fresh:
            pool.putconn(conn)
    wait_until(
        lambda: not set(held) & set(sessions(admin, params["user"])),
        what="the cut sessions ended on the server",
        timeout=5.0,
    )
