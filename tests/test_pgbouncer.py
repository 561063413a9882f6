"""Behind a real PgBouncer in transaction mode: the backend's behaviour, end to end.

A Django alias points at a PgBouncer (tests/pgbouncer.py) that forwards to the
test server with ``default_pool_size = 3``: fewer server connections than the
alias's ``MAX_CONNS = 4`` client connections. Claims are checked on both
sides: at PgBouncer's admin console (``SHOW CLIENTS``, ``SHOW POOLS``) and on
the real server (``pg_stat_activity``, where PgBouncer's server connections
are every backend of the test database except the direct ``default`` alias's).

The backend's behaviour tests (tests/test_django.py) run through a
transaction-mode PgBouncer too (the ``target`` fixture, tests/targets.py); this
module holds what is specific to PgBouncer.
"""

from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import pytest
from django.db import (
    DataError,
    Error,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    connections,
    transaction,
)
from django.test import override_settings

from django_gevent_pool import ConnectionPool, PoolTimeout
from django_gevent_pool.backends.base import close_pools, get_pool
from django_gevent_pool.pgbouncer import detect_pool_mode

from .pgbouncer import (  # noqa: F401 - fixtures, found by pytest in this module
    DEFAULT_POOL_SIZE,
    PLAIN_USER,
    PgBouncer,
    binary_version,
    free_port,
    pgbouncer_session_fixture,
    pgbouncer_transaction_fixture,
    require_binary,
    running_pgbouncer,
)
from .proxy import Proxy
from .support import DRIVER, TEST_DB, Workers, connect, db, next_app_name, server, wait_until
from .targets import forget_alias
from .testapp.models import Item

ALIAS = "bouncer"
CURSORS_ALIAS = "bouncer_cursors"  # server-side cursors left on
SESSION_ALIAS = "bouncer_session"  # through the session-mode PgBouncer
SESSION_DB = TEST_DB  # where it goes (it needs no table)
MAX_CONNS = 4
DIRECT_APP = "dgp-django-tests"  # application_name of the direct 'default' alias

assert MAX_CONNS > DEFAULT_POOL_SIZE, "the tests need more clients than server connections"

#: The PgBouncer behind each alias, while the aliases exist.
_bouncers: dict[str, PgBouncer] = {}

#: For tests that use the database: the aliases they may use (all one database).
uses_db = pytest.mark.django_db(
    transaction=True, databases=["default", ALIAS, CURSORS_ALIAS, SESSION_ALIAS]
)


# ------------------------------------------------------------------ helpers


@dataclass
class Bouncer:
    """The Django alias routed through a PgBouncer, and what the tests look at."""

    alias: str
    app_name: str
    dbname: str  # the test database, on PgBouncer and on the server
    pgbouncer: PgBouncer

    def pool(self) -> Any:
        pool = get_pool(self.alias)
        assert pool is not None, f"no pool for {self.alias!r} yet"
        return pool

    def stats(self) -> dict[str, float]:
        return dict(self.pool().get_stats())

    def in_use(self) -> int:
        pool = get_pool(self.alias)
        return 0 if pool is None else int(pool.get_stats()["pool_in_use"])

    def our_clients(self, conn: Any = None) -> int:
        """Our alias's client connections at PgBouncer (SHOW CLIENTS)."""
        return sum(
            1
            for row in self.pgbouncer.show("CLIENTS", conn)
            if row["database"] == self.dbname and row.get("application_name") == self.app_name
        )

    def pool_row(self, conn: Any = None) -> dict[str, Any]:
        """PgBouncer's pool for (test database, user) in SHOW POOLS; zeros before it exists."""
        for row in self.pgbouncer.show("POOLS", conn):
            if row["database"] == self.dbname and row["user"] == self.pgbouncer.user:
                return row
        return {"cl_active": 0, "cl_waiting": 0, "sv_active": 0, "sv_idle": 0, "sv_used": 0}

    def server_conns(self, conn: Any = None) -> int:
        """Server connections PgBouncer holds for that pool, in any state (SHOW POOLS)."""
        row = self.pool_row(conn)
        return sum(int(v) for k, v in row.items() if k.startswith("sv_"))


def bouncer_backends(admin: Any, dbname: str) -> list[tuple[int, str, str]]:
    """(pid, state, query) of every backend PgBouncer holds on the real server."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend' "
            "AND application_name IS DISTINCT FROM %s AND pid <> pg_backend_pid()",
            [dbname, DIRECT_APP],
        )
        return list(cur.fetchall())


def terminate_bouncer_backends(admin: Any, dbname: str) -> int:
    """pg_terminate_backend every server connection PgBouncer holds; wait until gone."""
    pids = [pid for pid, _, _ in bouncer_backends(admin, dbname)]
    with admin.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM unnest(%s::int[]) AS pid", [pids])
    wait_until(
        lambda: not {pid for pid, _, _ in bouncer_backends(admin, dbname)} & set(pids),
        what="the terminated backends to go",
    )
    return len(pids)


def alias_settings(bouncer: PgBouncer, app_name: str, **overrides: Any) -> dict[str, Any]:
    """Settings of an alias routed through ``bouncer`` to the test database.

    The ``default`` alias's (already pointing at the test database) with
    PgBouncer's host and port, ``MAX_CONNS`` client connections,
    ``DISABLE_SERVER_SIDE_CURSORS`` on, and marked a test mirror of
    ``default`` (it is the same database: the test case flushes it once, as
    ``default``); ``overrides`` replace top-level keys, ``OPTIONS`` included.
    """
    base = connections.settings["default"]
    return {
        **base,
        **bouncer.django_settings(base["NAME"]),
        "CONN_MAX_AGE": 0,
        "DISABLE_SERVER_SIDE_CURSORS": True,
        "OPTIONS": {"MAX_CONNS": MAX_CONNS, "POOL_TIMEOUT": 10, "application_name": app_name},
        "TEST": {**base["TEST"], "NAME": None, "MIRROR": "default"},
        **overrides,
    }


@contextlib.contextmanager
def fresh_alias(alias: str) -> Iterator[Bouncer]:
    """``alias`` with a new pool and a new application_name, for one test."""
    settings_dict = connections.settings[alias]
    bouncer = _bouncers[alias]
    app_name = next_app_name()
    forget_alias(alias)
    connections.settings[alias] = {
        **settings_dict,
        "OPTIONS": {**settings_dict["OPTIONS"], "application_name": app_name},
    }
    try:
        yield Bouncer(alias, app_name, settings_dict["NAME"], bouncer)
    finally:
        forget_alias(alias)


def backend_pid(alias: str = ALIAS) -> int:
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def raw_client(pgbouncer: PgBouncer, dbname: str, *, autocommit: bool = True) -> Any:
    """A plain psycopg2 client of the same PgBouncer pool (same database and user)."""
    conn = psycopg2.connect(pgbouncer.dsn(dbname, application_name="dgp-raw-client"))
    conn.autocommit = autocommit
    return conn


#: libpq's transaction status values (PQTRANS_*), the same in psycopg2 and psycopg 3.
IDLE, ACTIVE, INTRANS, INERROR = 0, 1, 2, 3


def transaction_status(conn: Any) -> int:
    """The connection's transaction status as libpq's number, from either driver."""
    return int(conn.info.transaction_status)


def parse_dsn(dsn: str) -> dict[str, Any]:
    """A DSN's libpq parameters, parsed by the driver under test."""
    if DRIVER == "psycopg":
        return dict(db.conninfo.conninfo_to_dict(dsn))
    return dict(db.extensions.parse_dsn(dsn))


def fetch(conn: Any, sql: str) -> Any:
    with conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


@pytest.fixture(scope="module")
def aliases(
    django_db_setup: None, pgbouncer_transaction: PgBouncer, pgbouncer_session: PgBouncer
) -> Iterator[None]:
    """Add the PgBouncer aliases to the settings for this module, and remove them after.

    They must exist before a test case starts: Django lets a test use only the
    aliases listed in its ``databases`` (see :data:`uses_db`).
    """
    added = {
        ALIAS: (pgbouncer_transaction, {}),
        CURSORS_ALIAS: (pgbouncer_transaction, {"DISABLE_SERVER_SIDE_CURSORS": False}),
        # Another database: the session-mode PgBouncer keeps its own server
        # connections, which must not count as the transaction-mode one's.
        SESSION_ALIAS: (pgbouncer_session, {"NAME": SESSION_DB}),
    }
    for alias, (pgb, overrides) in added.items():
        connections.settings[alias] = alias_settings(pgb, next_app_name(), **overrides)
        _bouncers[alias] = pgb
    try:
        yield
    finally:
        for alias in added:
            forget_alias(alias)
            connections.settings.pop(alias, None)
            _bouncers.pop(alias, None)


@pytest.fixture
def bouncer(aliases: None) -> Iterator[Bouncer]:
    """The ``bouncer`` alias through the transaction-mode PgBouncer, with a new pool."""
    with fresh_alias(ALIAS) as b:
        yield b


@pytest.fixture
def pg_admin(bouncer: Bouncer) -> Iterator[Any]:
    """An autocommit connection to PgBouncer's admin console."""
    conn = bouncer.pgbouncer.admin()
    yield conn
    conn.close()


# --------------------------------------------------------- detect_pool_mode


def test_detect_pool_mode_reads_transaction_mode(pgbouncer_transaction: PgBouncer) -> None:
    params = pgbouncer_transaction.conn_params(TEST_DB)
    assert detect_pool_mode(params) == "transaction"


@uses_db
def test_detect_pool_mode_from_djangos_connection_params(bouncer: Bouncer) -> None:
    """What a system check passes: the alias's own get_connection_params()."""
    params = connections[ALIAS].get_connection_params()
    assert "cursor_factory" in params and "MAX_CONNS" not in params
    assert detect_pool_mode(params) == "transaction"
    backend_pid()  # a pool now exists at PgBouncer: SHOW POOLS answers
    assert detect_pool_mode(params) == "transaction"


def test_detect_pool_mode_reads_session_mode(pgbouncer_session: PgBouncer) -> None:
    assert detect_pool_mode(pgbouncer_session.conn_params(TEST_DB)) == "session"


def test_detect_pool_mode_is_none_for_the_plain_server() -> None:
    params = parse_dsn(server()["test"])
    assert detect_pool_mode(params) is None


def test_detect_pool_mode_is_none_for_a_closed_port() -> None:
    params = {"host": "127.0.0.1", "port": free_port(), "user": "postgres", "dbname": "x"}
    assert detect_pool_mode(params) is None


def test_detect_pool_mode_is_none_when_the_console_refuses_the_user(
    pgbouncer_transaction: PgBouncer,
) -> None:
    """PgBouncer answers ``FATAL: not allowed`` to users not in admin_users/stats_users."""
    params = pgbouncer_transaction.conn_params(TEST_DB, user=PLAIN_USER)
    assert detect_pool_mode(params) is None


def test_detect_pool_mode_gives_up_on_a_silent_port(pgbouncer_transaction: PgBouncer) -> None:
    """A port that accepts but never answers: None once the time budget is spent."""
    with Proxy(pgbouncer_transaction.dsn(TEST_DB)) as proxy:
        proxy.stall()
        params = {"host": "127.0.0.1", "port": proxy.port, "user": "postgres", "dbname": "x"}
        assert detect_pool_mode(params, timeout=0.5) is None
        assert proxy.accepted == 1, "it did reach the port"


def test_detect_pool_mode_follows_user_then_database_then_global_mode() -> None:
    """PgBouncer's precedence: [users] pool_mode, then [databases] pool_mode, then global."""
    binary = require_binary()
    databases = {"dgp_session_db": f"dbname={TEST_DB} pool_mode=session"}
    with running_pgbouncer("transaction", binary=binary, databases=databases) as pgb:
        # Before any client: read from SHOW DATABASES and SHOW CONFIG.
        assert detect_pool_mode(pgb.conn_params("dgp_session_db")) == "session"
        assert detect_pool_mode(pgb.conn_params(TEST_DB)) == "transaction"
        # Once pools exist: read from SHOW POOLS, same answers.
        for dbname in ("dgp_session_db", TEST_DB):
            conn = connect(pgb.dsn(dbname))
            fetch(conn, "SELECT 1")
            conn.close()
        assert detect_pool_mode(pgb.conn_params("dgp_session_db")) == "session"
        assert detect_pool_mode(pgb.conn_params(TEST_DB)) == "transaction"
    with running_pgbouncer(
        "session",
        binary=binary,
        databases={"dgp_tx_db": f"dbname={TEST_DB} pool_mode=transaction"},
        users={"postgres": "pool_mode=statement"},
    ) as pgb:
        # The user's override beats the database's and the global one.
        assert detect_pool_mode(pgb.conn_params("dgp_tx_db")) == "statement"
        assert detect_pool_mode(pgb.conn_params(TEST_DB)) == "statement"


# ------------------------------------------------------------------- the ORM


@uses_db
def test_orm_create_read_update_delete(bouncer: Bouncer) -> None:
    item = Item.objects.using(ALIAS).create(name="one", qty=1)
    # Written on the real server: the direct alias sees it.
    assert Item.objects.using("default").get(pk=item.pk).name == "one"
    assert Item.objects.using(ALIAS).get(pk=item.pk).qty == 1
    assert Item.objects.using(ALIAS).filter(pk=item.pk).update(qty=5) == 1
    assert Item.objects.using("default").get(pk=item.pk).qty == 5
    Item.objects.using(ALIAS).filter(pk=item.pk).delete()
    assert not Item.objects.using("default").filter(pk=item.pk).exists()
    assert bouncer.our_clients() == 1, "the alias really talks to PgBouncer"
    connections[ALIAS].close()
    assert bouncer.in_use() == 0


@uses_db
def test_atomic_commits_and_rolls_back(bouncer: Bouncer) -> None:
    ran: list[str] = []
    with transaction.atomic(using=ALIAS):
        Item.objects.using(ALIAS).create(name="kept")
        with pytest.raises(ValueError), transaction.atomic(using=ALIAS):
            Item.objects.using(ALIAS).create(name="savepoint")
            raise ValueError
        transaction.on_commit(lambda: ran.append("committed"), using=ALIAS)
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), transaction.atomic(using=ALIAS):
        Item.objects.using(ALIAS).create(name="rolled back")
        raise RuntimeError
    assert list(Item.objects.using("default").values_list("name", flat=True)) == ["kept"]


@uses_db
def test_a_database_error_in_atomic_rolls_back_and_the_connection_stays_pooled(
    bouncer: Bouncer, admin: Any
) -> None:
    backend_pid()
    connections[ALIAS].close()
    before = bouncer.stats()
    with pytest.raises(DataError), transaction.atomic(using=ALIAS):
        Item.objects.using(ALIAS).create(name="doomed")
        with connections[ALIAS].cursor() as cur:
            cur.execute("SELECT 1 / 0")
    raw = connections[ALIAS].connection
    assert transaction_status(raw) == IDLE
    assert Item.objects.using(ALIAS).count() == 0, "rolled back, and the connection still works"
    connections[ALIAS].close()
    after = bouncer.stats()
    assert after["pool_in_use"] == 0 and after["pool_available"] == 1
    assert after["returns_bad"] == before["returns_bad"]
    assert after["connections_num"] == before["connections_num"], "the same one, reused"
    # Nothing was left open on the server side of PgBouncer either.
    wait_until(lambda: bouncer.pool_row()["sv_active"] == 0, what="PgBouncer to unlink the server")
    assert all(state == "idle" for _, state, _ in bouncer_backends(admin, bouncer.dbname))
    assert backend_pid() > 0 and connections[ALIAS].connection is raw


def test_a_connection_returned_inside_a_transaction_frees_its_server(
    pgbouncer_transaction: PgBouncer,
) -> None:
    """Returned INTRANS, rolled back by the pool: PgBouncer gets its server back at once."""
    pgb = pgbouncer_transaction
    app_name = next_app_name()

    def linked() -> int:
        return sum(
            int(row["sv_active"])
            for row in pgb.show("POOLS")
            if row["database"] == TEST_DB and row["user"] == pgb.user
        )

    pool = ConnectionPool(
        lambda: connect(pgb.dsn(TEST_DB, application_name=app_name)),
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": 2},
    )
    try:
        conn = pool.getconn()
        fetch(conn, "SELECT 1")  # BEGIN: PgBouncer links a server to this client
        assert transaction_status(conn) == INTRANS
        assert linked() == 1
        pool.putconn(conn)
        assert linked() == 0, "the rollback ended the transaction at PgBouncer"
        stats = pool.get_stats()
        assert stats["returns_rolled_back"] == 1 and stats["pool_available"] == 1
        with pool.connection() as again:
            assert again is conn, "kept and lent again"
            assert fetch(again, "SELECT 1") == (1,)
            again.rollback()
        pool.check_invariants()
    finally:
        pool.close()


# -------------------------------------------------------- caps at two levels


@uses_db
def test_many_workers_share_max_conns_and_pgbouncer_caps_the_server(
    bouncer: Bouncer, admin: Any, pg_admin: Any, workers: Workers
) -> None:
    jobs = 60
    seen = {"pool": 0, "clients": 0, "pool_clients": 0, "servers": 0, "backends": 0}
    done = threading.Event()

    def job(i: int) -> int:
        conn = connections[ALIAS]
        try:
            with transaction.atomic(using=ALIAS):
                Item.objects.using(ALIAS).create(name=f"w{i}")
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.005)")
            return Item.objects.using(ALIAS).filter(name=f"w{i}").count()
        finally:
            conn.close()

    def sample() -> None:
        deadline = time.monotonic() + 60
        for _ in range(20_000):
            if done.is_set() or time.monotonic() > deadline:
                return
            pool = get_pool(ALIAS)
            if pool is not None:
                seen["pool"] = max(seen["pool"], int(pool.get_stats()["pool_size"]))
            seen["clients"] = max(seen["clients"], bouncer.our_clients(pg_admin))
            row = bouncer.pool_row(pg_admin)
            clients = sum(int(v) for k, v in row.items() if k.startswith("cl_"))
            seen["pool_clients"] = max(seen["pool_clients"], clients)
            seen["servers"] = max(seen["servers"], bouncer.server_conns(pg_admin))
            seen["backends"] = max(seen["backends"], len(bouncer_backends(admin, bouncer.dbname)))
            time.sleep(0.002)

    monitor = Workers()
    monitor.spawn(sample)
    for i in range(jobs):
        workers.spawn(job, i)
    try:
        workers.join(60)
    finally:
        done.set()
        monitor.join(10)
    assert workers.errors == [] and monitor.errors == []
    assert sorted(workers.results) == [1] * jobs
    stats = bouncer.stats()
    assert stats["requests_queued"] > 0, "the workers did contend for the pool"
    assert stats["connections_num"] <= MAX_CONNS and stats["returns_bad"] == 0
    assert seen["pool"] <= MAX_CONNS
    assert 1 <= seen["clients"] <= MAX_CONNS, seen
    assert 1 <= seen["pool_clients"] <= MAX_CONNS, seen
    assert 1 <= seen["servers"] <= DEFAULT_POOL_SIZE, seen
    assert 1 <= seen["backends"] <= DEFAULT_POOL_SIZE, seen
    assert len(bouncer_backends(admin, bouncer.dbname)) <= DEFAULT_POOL_SIZE
    wait_until(lambda: bouncer.in_use() == 0, what="every worker to give its connection back")
    bouncer.pool().check_invariants()


@uses_db
def test_a_client_beyond_pgbouncers_pool_waits_there_until_a_transaction_ends(
    bouncer: Bouncer, admin: Any, workers: Workers
) -> None:
    """MAX_CONNS clients, pool_size servers: the extra transaction queues at PgBouncer."""
    inside: list[int] = []
    release = threading.Event()

    def hold() -> int:
        conn = connections[ALIAS]
        try:
            with transaction.atomic(using=ALIAS):
                pid = backend_pid()
                inside.append(pid)
                release.wait(20)
            return pid
        finally:
            conn.close()

    for _ in range(MAX_CONNS):
        workers.spawn(hold)
    try:
        wait_until(
            lambda: len(inside) == DEFAULT_POOL_SIZE and bouncer.pool_row()["cl_waiting"] >= 1,
            what="pool_size transactions in and one client waiting at PgBouncer",
        )
        # The waiting client is either a lent connection whose BEGIN waits at
        # PgBouncer, or one still being opened: Django's session setup (its first
        # query) also needs a server. Either way every slot is taken.
        stats = bouncer.stats()
        assert stats["pool_in_use"] + stats["pool_opening"] == MAX_CONNS, stats
        assert bouncer.stats()["requests_waiting"] == 0, "nobody waits in our pool"
        assert len(set(inside)) == DEFAULT_POOL_SIZE
        assert len(bouncer_backends(admin, bouncer.dbname)) <= DEFAULT_POOL_SIZE
    finally:
        release.set()
    workers.join(30)
    assert workers.errors == []
    assert len(workers.results) == MAX_CONNS
    assert set(workers.results) <= {pid for pid, _, _ in bouncer_backends(admin, bouncer.dbname)}
    wait_until(lambda: bouncer.in_use() == 0, what="the holders to give their connections back")


@uses_db
@pytest.mark.gevent_only
def test_pool_timeout_bounds_a_checkout_that_waits_at_pgbouncer(bouncer: Bouncer) -> None:
    """Every PgBouncer server busy: a new connection waits there (Django's session setup
    is its first query), and POOL_TIMEOUT, not PgBouncer's query_wait_timeout (10 s),
    bounds the checkout; the slot is given back and the pool opens again once a
    server frees.

    gevent only: an OS thread's connect cannot be interrupted (libpq's
    connect_timeout bounds it, not this wait at PgBouncer).
    """
    pgb = bouncer.pgbouncer
    app_name = next_app_name()
    base = connections.settings[ALIAS]
    settings_dict = {
        **base,
        "OPTIONS": {**base["OPTIONS"], "POOL_TIMEOUT": 0.5, "application_name": app_name},
    }
    wrapper = type(connections[ALIAS])(settings_dict, alias="bouncer_slow")
    holders = [raw_client(pgb, bouncer.dbname, autocommit=False) for _ in range(DEFAULT_POOL_SIZE)]
    try:
        for holder in holders:
            fetch(holder, "SELECT 1")  # BEGIN: each keeps a server until it ends
        assert int(bouncer.pool_row()["sv_active"]) == DEFAULT_POOL_SIZE
        started = time.monotonic()
        with pytest.raises(OperationalError) as err:
            wrapper.ensure_connection()
        elapsed = time.monotonic() - started
        assert 0.5 <= elapsed < 3, elapsed
        assert isinstance(err.value.__cause__, PoolTimeout)
        message = str(err.value)
        assert message.startswith("pool 'bouncer_slow': no connection available after"), message
        assert "connecting took longer than the checkout timeout allowed" in message
        pool = get_pool("bouncer_slow")
        assert pool is not None
        stats = pool.get_stats()
        assert stats["pool_size"] == stats["pool_opening"] == 0, "the slot came back"
        # (PgBouncer lists the abandoned client as waiting until query_wait_timeout:
        # it does not read a waiting client's socket, so it sees the close only then.)
        holders[0].rollback()  # one server free: the same pool now opens and lends
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        pool.check_invariants()
    finally:
        for holder in holders:
            holder.rollback()
            holder.close()
        wrapper.close()
        close_pools("bouncer_slow")
    # The abandoned client got a server and was dropped: nothing waits at PgBouncer.
    wait_until(lambda: int(bouncer.pool_row()["cl_waiting"]) == 0, what="no client waiting")


@uses_db
def test_session_mode_pins_a_server_per_pooled_connection(aliases: None, workers: Workers) -> None:
    """For comparison: in session mode an idle pooled connection keeps its server.

    With MAX_CONNS above PgBouncer's pool size the extra client waits for a
    server that never frees (our idle connections stay connected) until
    PgBouncer's query_wait_timeout fails it; in transaction mode (previous
    test) it proceeds as soon as a transaction ends.
    """
    with fresh_alias(SESSION_ALIAS) as b:
        inside: list[int] = []
        release = threading.Event()

        def hold() -> int:
            conn = connections[b.alias]
            try:
                with transaction.atomic(using=b.alias):
                    pid = backend_pid(b.alias)
                    inside.append(pid)
                    release.wait(20)
                return pid
            finally:
                conn.close()

        for _ in range(MAX_CONNS):
            workers.spawn(hold)
        wait_until(
            lambda: len(inside) == DEFAULT_POOL_SIZE and b.pool_row()["cl_waiting"] >= 1,
            what="pool_size sessions in and one client waiting at PgBouncer",
        )
        release.set()  # the three transactions end; their sessions (our idle connections) stay
        workers.join(30)
        assert len(workers.results) == DEFAULT_POOL_SIZE
        assert len(workers.errors) == 1 and isinstance(workers.errors[0], OperationalError)
        # PgBouncer gave up on it (libpq may report only the closed socket).
        assert "query_wait_timeout" in b.pgbouncer.log()
        wait_until(lambda: b.in_use() == 0, what="every connection back")
        stats = b.stats()
        # It failed while the pool opened it (Django's session setup is its
        # first query): the slot was given back, nothing broken was kept.
        assert stats["connections_errors"] == 1 and stats["returns_bad"] == 0
        assert stats["pool_size"] == stats["pool_available"] == DEFAULT_POOL_SIZE
        b.pool().check_invariants()


# ---------------------------------------------------------- kills and faults


@uses_db
@pytest.mark.gevent_only
def test_a_greenlet_killed_mid_query_is_cancelled_through_pgbouncer(
    bouncer: Bouncer, admin: Any
) -> None:
    import gevent

    def sleeping() -> list[tuple[int, str, str]]:
        return [
            b
            for b in bouncer_backends(admin, bouncer.dbname)
            if b[1] == "active" and "pg_sleep(30)" in b[2]
        ]

    def slow() -> None:
        with connections[ALIAS].cursor() as cur:
            cur.execute("SELECT pg_sleep(30)")

    backend_pid()
    connections[ALIAS].close()
    bad_before = bouncer.stats()["returns_bad"]
    job = gevent.spawn(slow)
    wait_until(lambda: bool(sleeping()), what="the query to run on the server")
    job.kill()
    wait_until(lambda: bouncer.in_use() == 0, what="the killed greenlet's connection to come back")
    # The cancel request went to PgBouncer, which forwarded it: the server
    # stops the query long before its 30 s (a closed socket alone would not:
    # PgBouncer would drop the server and leave the backend running).
    wait_until(lambda: not sleeping(), what="the server to stop the query", timeout=5)
    assert "sending cancel request" in bouncer.pgbouncer.log()
    stats = bouncer.stats()
    assert stats["returns_bad"] == bad_before + 1
    bouncer.pool().check_invariants()
    wait_until(
        lambda: bouncer.pool_row()["sv_active"] == 0 and bouncer.pool_row()["cl_waiting"] == 0,
        what="PgBouncer to unlink the server",
    )
    assert Item.objects.using(ALIAS).count() == 0, "the next checkout works"
    assert len(bouncer_backends(admin, bouncer.dbname)) <= DEFAULT_POOL_SIZE


@uses_db
def test_backends_terminated_while_idle_cost_nothing(bouncer: Bouncer, admin: Any) -> None:
    """PgBouncer drops its dead idle servers; our idle client connections stay good."""
    before_pid = backend_pid()
    raw = connections[ALIAS].connection
    connections[ALIAS].close()
    assert terminate_bouncer_backends(admin, bouncer.dbname) >= 1
    outcomes = []
    for _ in range(10):
        try:
            outcomes.append(backend_pid())
        except OperationalError:
            outcomes.append(None)  # PgBouncer linked us to a server it had not yet seen die
        connections[ALIAS].close_if_unusable_or_obsolete()
    assert outcomes[-1] is not None and outcomes[-1] != before_pid
    first_ok = next(i for i, o in enumerate(outcomes) if o is not None)
    assert all(o is not None for o in outcomes[first_ok:]), f"it recovers for good: {outcomes}"
    stats = bouncer.stats()
    if None not in outcomes:
        # The usual case: nothing at all reached us, the same client connection carries on.
        assert stats["returns_bad"] == 0 and stats["connections_num"] == 1
        backend_pid()
        assert connections[ALIAS].connection is raw
    bouncer.pool().check_invariants()


@uses_db
def test_a_backend_terminated_inside_a_transaction_fails_cleanly_then_recovers(
    bouncer: Bouncer, admin: Any
) -> None:
    """PgBouncer closes a client whose server died under it: the error reaches the
    caller, Django's atomic drops the connection, the pool discards it."""
    backend_pid()
    connections[ALIAS].close()
    bad_before = bouncer.stats()["returns_bad"]
    with pytest.raises(OperationalError), transaction.atomic(using=ALIAS):
        pid = backend_pid()
        broken = connections[ALIAS].connection
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_until(
            lambda: pid not in {p for p, _, _ in bouncer_backends(admin, bouncer.dbname)},
            what="the backend to go",
        )
        Item.objects.using(ALIAS).create(name="lost")
    connections[ALIAS].close_if_unusable_or_obsolete()  # what request_finished does
    assert connections[ALIAS].connection is None
    assert broken.closed
    stats = bouncer.stats()
    assert stats["returns_bad"] == bad_before + 1 and stats["pool_in_use"] == 0
    for _ in range(2 * MAX_CONNS):
        assert backend_pid() != pid
        assert connections[ALIAS].connection is not broken
        connections[ALIAS].close()
    assert not Item.objects.using("default").filter(name="lost").exists()
    bouncer.pool().check_invariants()


@uses_db
def test_backends_terminated_under_load_never_hand_out_a_broken_connection(
    bouncer: Bouncer, admin: Any, workers: Workers
) -> None:
    """Kill PgBouncer's server connections three times while 20 workers query.

    A request may fail, with a django.db error only; the client connection
    PgBouncer closed because of it is discarded and never lent again.
    """
    # (request number, connection used, error, connection broken by it)
    log: list[tuple[int, Any, BaseException | None, bool]] = []
    lock = threading.Lock()

    def request() -> None:
        conn = connections[ALIAS]
        error: BaseException | None = None
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(0.01)")
        except (OperationalError, InterfaceError) as exc:  # clean failures only
            error = exc
        raw = conn.connection
        broken = error is not None and raw is not None and raw.closed != 0
        with lock:
            log.append((len(log), raw, error, broken))
        conn.close_if_unusable_or_obsolete()  # the request ends

    def client(rounds: int) -> None:
        for _ in range(rounds):
            request()

    for _ in range(20):
        workers.spawn(client, 15)

    def in_flight() -> bool:
        return any(
            state == "active" and "pg_sleep" in query
            for _, state, query in bouncer_backends(admin, bouncer.dbname)
        )

    for _ in range(3):
        target = len(log) + 20
        wait_until(lambda: len(log) >= target, what="requests to go on")  # noqa: B023
        # Kill while a request runs on a server (a slower driver leaves the
        # servers idle at PgBouncer more of the time: a kill could miss them all).
        wait_until(in_flight, what="a request running on a server")
        terminate_bouncer_backends(admin, bouncer.dbname)
    workers.join(60)
    assert workers.errors == [], "no other error, and no request hung"
    assert len(log) == 20 * 15
    assert any(broken for *_, broken in log), "the kills did hit requests in flight"
    broken_at: dict[int, int] = {}
    for index, raw, _, broken in log:
        assert raw is None or id(raw) not in broken_at, (
            f"the connection broken at request {broken_at[id(raw)]} was lent again at {index}"
        )
        if broken:
            broken_at[id(raw)] = index
    stats = bouncer.stats()
    assert stats["returns_bad"] >= len(broken_at)
    # Recovered: every request now succeeds.
    wait_until(lambda: bouncer.in_use() == 0, what="every connection back")
    for _ in range(10):
        assert backend_pid() > 0
        connections[ALIAS].close()
    bouncer.pool().check_invariants()
    assert len(bouncer_backends(admin, bouncer.dbname)) <= DEFAULT_POOL_SIZE


# --------------------------------------------------------- cursors, time zones


def _iterate_while_another_client_takes_the_server(b: Bouncer) -> list[str]:
    """Iterate in chunks of 3; after the first chunk a plain client holds the server
    that served it (PgBouncer hands out its most recently used server first)."""
    other = raw_client(b.pgbouncer, b.dbname, autocommit=False)
    try:
        names = []
        iterator = Item.objects.using(b.alias).order_by("id").iterator(chunk_size=3)
        names += [next(iterator).name for _ in range(3)]
        fetch(other, "SELECT 1")  # BEGIN: it keeps that server until it ends
        names += [item.name for item in iterator]
        return names
    finally:
        other.rollback()
        other.close()


@uses_db
def test_iterator_works_with_disable_server_side_cursors(bouncer: Bouncer) -> None:
    Item.objects.using(ALIAS).bulk_create(Item(name=f"i{i:02}") for i in range(25))
    expected = [f"i{i:02}" for i in range(25)]
    assert _iterate_while_another_client_takes_the_server(bouncer) == expected
    with transaction.atomic(using=ALIAS):
        names = [i.name for i in Item.objects.using(ALIAS).order_by("id").iterator(chunk_size=4)]
    assert names == expected
    connections[ALIAS].close()
    assert bouncer.stats()["returns_bad"] == 0


@uses_db
def test_server_side_cursors_break_without_the_setting(aliases: None) -> None:
    """Why DISABLE_SERVER_SIDE_CURSORS: a WITH HOLD cursor stays on one server."""
    Item.objects.using("default").bulk_create(Item(name=f"i{i:02}") for i in range(25))
    with fresh_alias(CURSORS_ALIAS) as b:
        # The FETCH fails (a django.db error); closing the cursor in Django's
        # cursor_iter then fails too, and that one escapes as the driver's own.
        with pytest.raises((Error, db.Error), match="does not exist"):
            _iterate_while_another_client_takes_the_server(b)
        connections[b.alias].close_if_unusable_or_obsolete()
        assert Item.objects.using(b.alias).count() == 25, "the connection itself is fine"
        connections[b.alias].close()
        assert b.stats()["returns_bad"] == 0


def _time_zone_on_a_shared_server(b: Bouncer, zone: str) -> tuple[str, datetime.datetime]:
    """A plain client sets ``zone`` on the server our alias uses next; what does the alias see?

    Returns the alias's session TimeZone and a fixed instant as it reads it.
    """
    backend_pid(b.alias)
    connections[b.alias].close()
    opened = b.stats()["connections_num"]
    other = raw_client(b.pgbouncer, b.dbname)
    try:
        (other_pid,) = fetch(other, f"SET TIME ZONE '{zone}'; SELECT pg_backend_pid()")
        with connections[b.alias].cursor() as cur:
            cur.execute(
                "SELECT pg_backend_pid(), current_setting('TimeZone'), "
                "'2024-06-01 00:00:00+00'::timestamptz"
            )
            pid, tz, instant = cur.fetchone()
        assert pid == other_pid, "the alias ran on the server the other client changed"
        assert fetch(other, "SELECT current_setting('TimeZone')") == (zone,), (
            "and the other client keeps its own setting"
        )
    finally:
        other.close()
    assert b.stats()["connections_num"] == opened, "no new connection, no new session setup"
    connections[b.alias].close()
    return tz, instant


@uses_db
def test_use_tz_session_setup_survives_pgbouncer_switching_servers(bouncer: Bouncer) -> None:
    tz, instant = _time_zone_on_a_shared_server(bouncer, "America/New_York")
    assert tz == "UTC"
    assert instant == datetime.datetime(2024, 6, 1, tzinfo=datetime.timezone.utc)
    assert instant.utcoffset() == datetime.timedelta(0)


@uses_db
def test_time_zone_without_use_tz_survives_pgbouncer_switching_servers(
    bouncer: Bouncer,
) -> None:
    with override_settings(USE_TZ=False, TIME_ZONE="Asia/Tokyo"):
        tz, instant = _time_zone_on_a_shared_server(bouncer, "America/New_York")
        connections[ALIAS].close()
    assert tz == "Asia/Tokyo"
    # Naive and in TIME_ZONE, as Django reads timestamps without USE_TZ.
    assert instant == datetime.datetime(2024, 6, 1, 9, 0) and instant.tzinfo is None


def test_session_state_leaks_between_clients_in_transaction_mode_only(
    pgbouncer_transaction: PgBouncer, pgbouncer_session: PgBouncer
) -> None:
    """Why no SET, RESET_QUERY or other session state behind transaction pooling:
    a plain SET stays on the server and the next client there sees it."""
    seen = {}
    for pgb in (pgbouncer_transaction, pgbouncer_session):
        setter = raw_client(pgb, TEST_DB)
        reader = raw_client(pgb, TEST_DB, autocommit=False)
        try:
            fetch(setter, "SET dgp.marker = 'leaked'; SELECT 1")
            (seen[pgb.pool_mode],) = fetch(reader, "SELECT current_setting('dgp.marker', true)")
        finally:
            reader.rollback()
            reader.close()
            setter.close()
    assert seen["transaction"] == "leaked"
    assert seen["session"] in (None, "")


# ------------------------------------------------------------- system check


@pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")
def test_check_w004_names_what_breaks_in_transaction_mode(
    pgbouncer_transaction: PgBouncer, pgbouncer_session: PgBouncer
) -> None:
    """W004 fires for each setting that cannot work through a transaction-mode PgBouncer.

    A correctly set alias is silent, and so is the same bad alias on a
    session-mode PgBouncer; E005/W005 are skipped behind PgBouncer (MAX_CONNS
    far above the server's max_connections says nothing there).
    """
    from django.core.checks import run_checks
    from django.test import override_settings

    from django_gevent_pool import checks

    base = connections.settings["default"]

    def through(bouncer: PgBouncer, **overrides: Any) -> dict[str, Any]:
        return {**base, **bouncer.django_settings(base["NAME"]), "CONN_MAX_AGE": 0, **overrides}

    bad = {
        "DISABLE_SERVER_SIDE_CURSORS": False,
        "OPTIONS": {"MAX_CONNS": 500, "RESET_QUERY": "DISCARD ALL", "assume_role": "postgres"},
    }
    good = {"DISABLE_SERVER_SIDE_CURSORS": True, "OPTIONS": {"MAX_CONNS": 500}}
    databases = {
        "default": base,
        "bad": through(pgbouncer_transaction, **bad),
        "good": through(pgbouncer_transaction, **good),
        "session": through(pgbouncer_session, **bad),
    }
    with override_settings(DATABASES=databases):
        messages = run_checks(tags=[checks.TAG], databases=["bad", "good", "session"])
    # W002 (process-wide, about psycopg2's wait callback) is not this test's business.
    ours = [m for m in messages if m.id != "django_gevent_pool.W002"]
    assert sorted(m.id or "" for m in ours) == ["django_gevent_pool.W004"] * 3, ours
    texts = " ".join(m.msg for m in ours)
    assert all(m.msg.startswith("DATABASES['bad']") for m in ours)
    assert "RESET_QUERY" in texts and "assume_role" in texts
    assert "DISABLE_SERVER_SIDE_CURSORS" in texts and "transaction mode" in texts


# ------------------------------------------- prepared statements (psycopg 3)

psycopg_only = pytest.mark.skipif(
    DRIVER != "psycopg",
    reason="prepared statements from OPTIONS['prepare_threshold'] are psycopg 3's: "
    "psycopg2 never prepares at the protocol level",
)
#: A parametrized query: psycopg 3 prepares it (server-side binding) by its text and types.
QUERY = "SELECT %s::int + 1, pg_backend_pid()"
QUERY_ON_SERVER = "SELECT $1::int + 1, pg_backend_pid()"  # its text in pg_prepared_statements
#: PgBouncer tracks protocol-level prepared statements from 1.21 (max_prepared_statements > 0)
#: and the DEALLOCATE ALL / DISCARD ALL psycopg 3 sends from 1.22.
TRACKING_SINCE = (1, 21, 0)
DEALLOCATE_ALL_SINCE = (1, 22, 0)
#: For the tests straight to the server (no PgBouncer alias needed).
direct_db = pytest.mark.django_db(transaction=True, databases=["default"])


def wrapper_for(settings_dict: dict[str, Any], alias: str, **options: Any) -> Any:
    """A new DatabaseWrapper (another borrower) for ``alias``, with ``options`` in OPTIONS."""
    merged = {**settings_dict, "OPTIONS": {**settings_dict["OPTIONS"], **options}}
    return type(connections["default"])(merged, alias=alias)


def run_query(wrapper: Any, value: int) -> tuple[int, int]:
    """QUERY through Django's cursor: (value + 1, backend pid)."""
    with wrapper.cursor() as cur:
        cur.execute(QUERY, [value])
        result, pid = cur.fetchone()
        return int(result), int(pid)


def statements(wrapper: Any) -> dict[str, tuple[str, int]]:
    """The session's prepared statements: name -> (text, times executed).

    Asked with ``prepare=False``: the look itself is never prepared.
    """
    rows = wrapper.connection.execute(
        "SELECT name, statement, generic_plans + custom_plans FROM pg_prepared_statements",
        prepare=False,
    ).fetchall()
    return {str(name): (str(text), int(runs)) for name, text, runs in rows}


def query_statements(wrapper: Any) -> dict[str, int]:
    """The session's prepared statements of QUERY: name -> times executed."""
    return {
        name: runs for name, (text, runs) in statements(wrapper).items() if text == QUERY_ON_SERVER
    }


@psycopg_only
@direct_db
@pytest.mark.parametrize(
    ("options", "prepared_at"),
    [
        ({}, None),
        ({"prepare_threshold": 0}, None),
        ({"prepare_threshold": 0, "server_side_binding": True}, 1),
        ({"prepare_threshold": 5, "server_side_binding": True}, 6),
    ],
    ids=["django-default", "threshold-0-client-binding", "threshold-0", "threshold-5"],
)
def test_psycopg_prepares_only_with_server_side_binding_and_a_threshold(
    options: dict[str, Any], prepared_at: int | None
) -> None:
    """Django's psycopg 3 backend passes ``prepare_threshold=None`` unless OPTIONS sets it,
    and its default cursor binds on the client, which never prepares: a statement is
    prepared only with ``server_side_binding`` too, at execution ``threshold + 1``."""
    alias = "prep_threshold"
    wrapper = wrapper_for(connections.settings["default"], alias, MAX_CONNS=1, **options)
    try:
        seen_at = None
        for run in range(1, 9):
            assert run_query(wrapper, run)[0] == run + 1
            if seen_at is None and query_statements(wrapper):
                seen_at = run
        assert seen_at == prepared_at
        if prepared_at is not None:
            (runs,) = query_statements(wrapper).values()
            assert runs == 8 - prepared_at + 1, "every execution since used it"
    finally:
        wrapper.close()
        close_pools(alias)


@psycopg_only
@direct_db
def test_a_statement_prepared_by_one_borrower_serves_the_next_until_a_rollback(
    workers: Workers,
) -> None:
    """The session outlives the borrower: the next one executes the same prepared
    statement (psycopg's cache lives on the connection). A connection returned inside a
    transaction is rolled back by the pool, and psycopg's rollback deallocates them all."""
    alias = "prep_reuse"
    settings_dict = connections.settings["default"]
    options = {"MAX_CONNS": 1, "prepare_threshold": 0, "server_side_binding": True}
    first = wrapper_for(settings_dict, alias, **options)
    try:
        assert run_query(first, 1)[0] == 2
        raw = first.connection
        ((name, runs),) = query_statements(first).items()
        assert runs == 1
        first.close()

        def second_borrower() -> tuple[Any, dict[str, int]]:
            wrapper = wrapper_for(settings_dict, alias, **options)
            try:
                assert run_query(wrapper, 2)[0] == 3
                return wrapper.connection, query_statements(wrapper)
            finally:
                wrapper.close()

        workers.spawn(second_borrower)
        workers.join(10)
        assert workers.errors == []
        ((conn, seen),) = workers.results
        assert conn is raw, "the same pooled connection"
        assert seen == {name: 2}, "the first borrower's statement, executed again"

        third = wrapper_for(settings_dict, alias, **options)
        third.ensure_connection()
        third.connection.execute("BEGIN", prepare=False)
        assert run_query(third, 3)[0] == 4
        assert query_statements(third) == {name: 3}
        third.close()  # returned INTRANS: the pool rolls back
        pool = get_pool(alias)
        assert pool is not None and pool.get_stats()["returns_rolled_back"] == 1

        fourth = wrapper_for(settings_dict, alias, **options)
        fourth.ensure_connection()
        assert fourth.connection is raw
        assert statements(fourth) == {}, "psycopg's rollback deallocated every statement"
        assert run_query(fourth, 4)[0] == 5
        ((again, runs),) = query_statements(fourth).items()
        assert again != name and runs == 1, "prepared afresh, under a new name"
        fourth.close()
        stats = pool.get_stats()
        assert stats["connections_num"] == 1 and stats["returns_bad"] == 0
    finally:
        first.close()
        close_pools(alias)


@psycopg_only
@direct_db
@pytest.mark.parametrize("threshold", [0, 5])
@pytest.mark.parametrize("reset", ["DISCARD ALL", "RESET ALL; DEALLOCATE ALL"])
def test_reset_query_discard_all_drops_prepared_statements_and_psycopg_copes(
    threshold: int, reset: str
) -> None:
    """``RESET_QUERY: "DISCARD ALL"`` drops the session's prepared statements on every
    return; the next borrower's identical query is prepared again, never sent to a
    statement the server no longer has (psycopg itself notices DISCARD ALL only the
    first time it meets that text, so the pool tells it every time). The reset is
    never prepared itself (threshold 0 would refuse one of several statements)."""
    alias = f"prep_discard_{threshold}"
    options = {
        "MAX_CONNS": 1,
        "RESET_QUERY": reset,
        "prepare_threshold": threshold,
        "server_side_binding": True,
    }
    settings_dict = connections.settings["default"]
    wrappers = []
    try:
        idle = wrapper_for(settings_dict, alias, **options)
        wrappers.append(idle)
        idle.ensure_connection()  # a borrower that prepares nothing
        raw = idle.connection
        idle.close()
        names = []
        for borrower in range(3):
            wrapper = wrapper_for(settings_dict, alias, **options)
            wrappers.append(wrapper)
            wrapper.ensure_connection()
            assert wrapper.connection is raw
            assert query_statements(wrapper) == {}, "DISCARD ALL dropped it"
            pids = set()
            for run in range(threshold + 1):
                value, pid = run_query(wrapper, borrower * 10 + run)
                assert value == borrower * 10 + run + 1
                pids.add(pid)
            assert len(pids) == 1
            ((name, runs),) = query_statements(wrapper).items()
            assert runs == 1, "prepared at its last execution"
            names.append(name)
            wrapper.close()
        assert len(set(names)) == 3, "a new statement each time"
        pool = get_pool(alias)
        assert pool is not None
        stats = pool.get_stats()
        assert stats["connections_num"] == 1 and stats["returns_bad"] == 0, stats
    finally:
        for wrapper in wrappers:
            wrapper.close()
        close_pools(alias)


@contextlib.contextmanager
def prepared_alias(pgb: PgBouncer, threshold: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """An alias through ``pgb`` with psycopg 3 prepared statements; its pool closed after."""
    alias = f"prep_bouncer_{threshold}"
    settings_dict = alias_settings(pgb, next_app_name())
    settings_dict["OPTIONS"] = {
        **settings_dict["OPTIONS"],
        "prepare_threshold": threshold,
        "server_side_binding": True,
    }
    try:
        yield alias, settings_dict
    finally:
        close_pools(alias)


def _bouncer_settings(tracking: bool) -> dict[str, str]:
    version = binary_version(require_binary())
    if tracking:
        if version < DEALLOCATE_ALL_SINCE:
            pytest.skip(
                f"PgBouncer {'.'.join(map(str, version))} cannot track prepared statements "
                "with psycopg 3: max_prepared_statements needs 1.21, and the DEALLOCATE ALL "
                "psycopg sends after a rollback 1.22"
            )
        return {"max_prepared_statements": "100"}
    # 1.24 turns tracking on by default (200): off explicitly where the setting exists.
    return {"max_prepared_statements": "0"} if version >= TRACKING_SINCE else {}


@psycopg_only
@uses_db
@pytest.mark.parametrize("threshold", [0, 5])
def test_prepared_statements_break_through_pgbouncer_transaction_mode_without_tracking(
    aliases: None, threshold: int
) -> None:
    """Without ``max_prepared_statements``, PgBouncer forwards psycopg's statement
    names (``_pg3_0``...) as they are: every client connection numbers its own from 0,
    and each transaction may run on another server. A second pooled connection finds
    the first one's ``_pg3_0`` already on its server; a connection whose next
    transaction lands on another server finds none there."""
    settings = _bouncer_settings(tracking=False)
    with running_pgbouncer("transaction", settings=settings) as pgb:
        with prepared_alias(pgb, threshold) as (alias, settings_dict):
            first = wrapper_for(settings_dict, alias)
            second = wrapper_for(settings_dict, alias)
            other = None
            try:
                for run in range(threshold + 1):  # PgBouncer lends the same server each time
                    assert run_query(first, run)[0] == run + 1
                ours = query_statements(first)
                assert len(ours) == 1, "prepared on the server, under psycopg's own name"
                (name,) = ours
                assert name.startswith("_pg3_")
                # Django's session setup sets the time zone with a parameter: with
                # threshold 0 that statement is prepared too, when the zone differs.
                setup_prepared = threshold == 0 and any(
                    "set_config" in text for text, _ in statements(first).values()
                )
                # psycopg numbers a connection's statements from _pg3_0: the first one's.
                first_name = min(statements(first), key=lambda name: int(name.split("_")[-1]))
                if setup_prepared:
                    # The second connection's own session setup collides: it never opens.
                    with pytest.raises(ProgrammingError, match=_already(first_name)):
                        second.ensure_connection()
                    pool = get_pool(alias)
                    assert pool is not None and pool.get_stats()["connections_errors"] == 1
                else:
                    for run in range(threshold):
                        assert run_query(second, run)[0] == run + 1
                    with pytest.raises(ProgrammingError, match=_already(first_name)):
                        run_query(second, threshold)
                # A plain client takes the server that has the statement (PgBouncer lends
                # the server used last): the first connection's next run goes elsewhere.
                other = raw_client(pgb, settings_dict["NAME"], autocommit=False)
                fetch(other, "SELECT 1")
                with pytest.raises(ProgrammingError, match=f'prepared statement "{name}" does not'):
                    run_query(first, 99)
            finally:
                if other is not None:
                    other.rollback()
                    other.close()
                first.close()
                second.close()


def _already(name: str) -> str:
    return f'prepared statement "{name}" already exists'


@psycopg_only
@uses_db
@pytest.mark.parametrize("threshold", [0, 5])
def test_prepared_statements_work_through_pgbouncer_transaction_mode_with_tracking(
    aliases: None, threshold: int
) -> None:
    """With ``max_prepared_statements`` (PgBouncer 1.22+), PgBouncer renames each
    statement (``PGBOUNCER_n``) and prepares it on whichever server runs it: the same
    steps as without tracking all succeed, a rollback's DEALLOCATE ALL included."""
    settings = _bouncer_settings(tracking=True)
    with running_pgbouncer("transaction", settings=settings) as pgb:
        with prepared_alias(pgb, threshold) as (alias, settings_dict):
            first = wrapper_for(settings_dict, alias)
            second = wrapper_for(settings_dict, alias)
            other = None
            try:
                for run in range(threshold + 1):
                    assert run_query(first, run)[0] == run + 1
                for run in range(threshold + 1):
                    assert run_query(second, run)[0] == run + 1
                assert not any(name.startswith("_pg3_") for name in statements(first)), (
                    "psycopg's names never reach the server"
                )
                other = raw_client(pgb, settings_dict["NAME"], autocommit=False)
                fetch(other, "SELECT 1")
                for run in range(3):
                    assert run_query(first, run)[0] == run + 1
                first.connection.execute("BEGIN", prepare=False)
                assert run_query(first, 7)[0] == 8
                first.close()  # INTRANS: rolled back, psycopg sends DEALLOCATE ALL
                assert run_query(second, 8)[0] == 9
                again = wrapper_for(settings_dict, alias)
                assert run_query(again, 9)[0] == 10
                again.close()
                pool = get_pool(alias)
                assert pool is not None
                stats = pool.get_stats()
                assert stats["returns_bad"] == 0 and stats["connections_errors"] == 0, stats
            finally:
                if other is not None:
                    other.rollback()
                    other.close()
                first.close()
                second.close()
