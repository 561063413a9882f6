"""The Django backend: lifecycle to checkout/return, Django's own judgement and options.

Every test that talks to the server takes the ``target`` fixture
(tests/targets.py) and runs twice: on the ``default`` alias straight to the
server, and on an alias with the same settings through a real PgBouncer in
transaction mode (tests/pgbouncer.py, ``default_pool_size = 3`` below
``MAX_CONNS = 4``), set up as README.rst's "Behind PgBouncer" says.
Server-side claims name a client session by its backend pid directly and by
its client port at PgBouncer (``SHOW CLIENTS``) through it, because there the
backend may change between transactions. What cannot work through
transaction pooling is skipped there saying why, or asserted to fail the
documented way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_finished, request_started
from django.db import (
    OperationalError,
    ProgrammingError,
    close_old_connections,
    connections,
    transaction,
)
from django.test import Client

from django_gevent_pool import PoolTimeout, TooManyRequests
from django_gevent_pool.backends.base import all_stats, close_pools, get_pool
from django_gevent_pool.decorators import close_connection

from .pgbouncer import DEFAULT_POOL_SIZE, pgbouncer_transaction_fixture  # noqa: F401 - fixture
from .support import DRIVER, Workers, wait_until
from .targets import Target, target_fixture  # noqa: F401 - fixture
from .testapp.models import Item

# "__all__": the PgBouncer alias exists only while the pgbouncer-target tests run.
pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

MAX_CONNS = 4  # tests/settings.py, for both targets

#: Why a test of Django's own runner cannot go through PgBouncer (checked by hand
#: with PgBouncer 1.18: both statements fail with "is being accessed by other users").
RUNNER_REASON = (
    "manage.py test creates, clones (CREATE DATABASE ... TEMPLATE) and drops test "
    "databases, which PostgreSQL refuses while any session is connected to them; "
    "PgBouncer keeps its idle server connections to a database open after its "
    "clients leave (server_idle_timeout), so run the test runner straight to the server"
)
#: Why RESET_QUERY cannot be tested through transaction pooling (README.rst, "No RESET_QUERY").
RESET_QUERY_REASON = (
    "RESET_QUERY resets whichever server connection PgBouncer links for that one "
    "statement, not the one the session state was set on, and between checkouts the "
    "client's transactions may run on any server: the 'nothing leaks across "
    "checkouts' claim cannot hold in transaction mode (README.rst 'No RESET_QUERY'; "
    "system check W004 warns)"
)


@pytest.fixture(autouse=True)
def _return_everything() -> Iterator[None]:
    # pytest-django's setup may leave this greenlet holding a connection.
    for conn in connections.all(initialized_only=True):
        conn.close()
    yield
    for conn in connections.all(initialized_only=True):
        conn.close()


def make_wrapper(target: Target, alias: str, **options: Any) -> Any:
    """A DatabaseWrapper named ``alias`` with the target's settings and extra OPTIONS.

    Another alias name gets its own application_name, so that its sessions
    never count as the target's.
    """
    base = connections[target.alias].settings_dict
    extra: dict[str, Any] = {}
    if alias != target.alias:
        extra["application_name"] = f"{target.app_name}-{alias}"
    settings_dict = {**base, "OPTIONS": {**base["OPTIONS"], **extra, **options}}
    return type(connections[target.alias])(settings_dict, alias=alias)


def ensure_role(admin: Any) -> None:
    with admin.cursor() as cur:
        cur.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dgp_role') "
            "THEN CREATE ROLE dgp_role; END IF; END $$"
        )


def bouncer_client(target: Target, *, autocommit: bool) -> Any:
    """A plain psycopg2 client of the target's PgBouncer pool (same database and user)."""
    conn = psycopg2.connect(target.bouncer.dsn(target.dbname, application_name="dgp-raw"))
    conn.autocommit = autocommit
    return conn


# ------------------------------------------------------------ lifecycle


def test_the_backend_lends_connections_of_the_engines_driver(target: Target) -> None:
    """postgresql_psycopg2 forces psycopg2 although psycopg 3 is installed; _psycopg3 forces 3."""
    import psycopg  # the test extra installs psycopg 3 on purpose
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    assert psycopg.__version__
    target.backend_pid()
    if DRIVER == "psycopg2":
        assert target.conn.Database is psycopg2
        assert not is_psycopg3
        assert isinstance(target.conn.connection, psycopg2.extensions.connection)
    else:
        assert target.conn.Database is psycopg
        assert is_psycopg3
        assert isinstance(target.conn.connection, psycopg.Connection)
    assert target.conn.pool_driver == DRIVER


def test_close_gives_the_connection_back_to_the_pool(target: Target, admin: Any) -> None:
    session = target.session()
    assert session in target.sessions(admin), "the server (or PgBouncer) sees that session"
    assert target.in_use() == 1
    raw = target.conn.connection
    target.conn.close()
    assert target.conn.connection is None
    assert target.in_use() == 0
    assert raw.closed == 0, "returned, not closed"
    assert session in target.sessions(admin), "still open on the other side"
    assert target.session() == session, "the same client session is lent again"
    assert target.conn.connection is raw


def test_request_boundaries_return_the_connection(target: Target) -> None:
    request_started.send(sender=None)
    session = target.session()
    request_finished.send(sender=None)
    assert target.conn.connection is None
    assert target.in_use() == 0
    request_started.send(sender=None)
    assert target.session() == session
    request_finished.send(sender=None)
    assert target.in_use() == 0


def test_a_non_zero_conn_max_age_still_returns_at_request_end(target: Target) -> None:
    target.conn.settings_dict["CONN_MAX_AGE"] = None  # "persistent" in stock Django
    try:
        request_started.send(sender=None)
        target.backend_pid()
        request_finished.send(sender=None)
        assert target.conn.connection is None
        assert target.in_use() == 0
    finally:
        target.conn.settings_dict["CONN_MAX_AGE"] = 0


def test_a_broken_connection_is_discarded_at_request_end(target: Target, admin: Any) -> None:
    conn = target.conn
    session = target.session()
    raw = conn.connection
    if target.via_pgbouncer:
        # A server that dies between transactions never reaches the client:
        # PgBouncer drops it and links another (test_pgbouncer.py). One that
        # dies under a transaction makes PgBouncer close the client.
        with conn.cursor() as cur:
            cur.execute("BEGIN")
    pid = target.backend_pid()
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(OperationalError):
        target.backend_pid()
    assert conn.errors_occurred
    bad_before = target.stats()["returns_bad"]
    close_old_connections()  # what request_finished does
    assert conn.connection is None
    assert raw.closed, "discarded, not pooled"
    assert target.stats()["returns_bad"] == bad_before + 1
    wait_until(lambda: session not in target.sessions(admin), what="the broken session to go")
    assert target.session() != session
    assert target.backend_pid() != pid


def test_errors_on_a_healthy_connection_keep_it(target: Target) -> None:
    session = target.session()
    bad_before = target.stats()["returns_bad"]
    with pytest.raises(ProgrammingError), target.conn.cursor() as cur:
        cur.execute("SELECT * FROM no_such_table")
    close_old_connections()
    assert target.session() == session, "is_usable() said healthy: the connection is reused"
    assert target.stats()["returns_bad"] == bad_before


def test_autocommit_left_changed_is_discarded(target: Target, admin: Any) -> None:
    session = target.session()
    transaction.set_autocommit(False, using=target.alias)
    close_old_connections()
    assert target.conn.connection is None
    wait_until(lambda: session not in target.sessions(admin), what="the discarded session to go")
    assert target.session() != session
    assert target.conn.get_autocommit()


def test_pool_errors_become_django_operational_errors(target: Target) -> None:
    wrappers = [make_wrapper(target, "tiny", MAX_CONNS=2, POOL_TIMEOUT=0.2) for _ in range(3)]
    try:
        wrappers[0].ensure_connection()
        wrappers[1].ensure_connection()
        with pytest.raises(OperationalError) as err:
            wrappers[2].ensure_connection()
        assert isinstance(err.value.__cause__, PoolTimeout)
        assert "pool 'tiny': no connection available after 0.2" in str(err.value)
        assert "(MAX_CONNS=2)" in str(err.value)
        assert "in use=2" in str(err.value)
    finally:
        for wrapper in wrappers:
            wrapper.close()
        close_pools("tiny")


def test_max_waiting_fails_at_once_as_a_django_operational_error(
    target: Target, workers: Workers
) -> None:
    """MAX_WAITING through Django: the waiter beyond the bound fails at once, the one
    within it gets the connection as soon as it comes back."""
    bounded = {"MAX_CONNS": 1, "MAX_WAITING": 1, "POOL_TIMEOUT": 5}
    holder = make_wrapper(target, "bounded", **bounded)
    extra = make_wrapper(target, "bounded", **bounded)

    def wait_for_it() -> int:
        waiter = make_wrapper(target, "bounded", **bounded)
        try:
            return target.session(waiter)
        finally:
            waiter.close()

    def waiting() -> int:
        pool = get_pool("bounded")
        return 0 if pool is None else int(pool.get_stats()["requests_waiting"])

    try:
        held = target.session(holder)
        workers.spawn(wait_for_it)
        wait_until(lambda: waiting() == 1, what="a checkout to wait")
        started = time.monotonic()
        with pytest.raises(OperationalError) as err:
            extra.ensure_connection()
        assert time.monotonic() - started < 1.0, "failed at once, not after POOL_TIMEOUT"
        assert isinstance(err.value.__cause__, TooManyRequests)
        assert "pool 'bounded': 1 checkouts already waiting (MAX_WAITING=1)" in str(err.value)
        holder.close()
        workers.join(10)
        assert workers.errors == []
        assert workers.results == [held], "the waiter got the same session, handed over"
        stats = get_pool("bounded").get_stats()  # type: ignore[union-attr]
        assert stats["requests_too_many"] == 1 and stats["requests_timeouts"] == 0
        assert stats["connections_num"] == 1
    finally:
        holder.close()
        extra.close()
        close_pools("bounded")


# ------------------------------------------------------ Django semantics


def test_atomic_commits_rolls_back_and_runs_on_commit(target: Target) -> None:
    alias = target.alias
    ran: list[str] = []
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="kept")
        transaction.on_commit(lambda: ran.append("committed"), using=alias)
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="rolled back")
        transaction.on_commit(lambda: ran.append("never"), using=alias)
        raise RuntimeError
    assert ran == ["committed"]
    # Read straight from the server: committed there, not just in a session.
    assert list(Item.objects.using("default").values_list("name", flat=True)) == ["kept"]


def test_savepoints_roll_back_only_the_inner_block(target: Target) -> None:
    alias = target.alias
    with transaction.atomic(using=alias):
        Item.objects.using(alias).create(name="outer")
        with pytest.raises(ValueError), transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="inner")
            raise ValueError
        Item.objects.using(alias).create(name="after")
    names = Item.objects.using("default").values_list("name", flat=True)
    assert sorted(names) == ["after", "outer"]


def test_close_inside_atomic_hands_back_and_refuses_reuse(target: Target) -> None:
    alias = target.alias
    with pytest.raises(Exception, match="Cannot open a new connection in an atomic block"):
        with transaction.atomic(using=alias):
            Item.objects.using(alias).create(name="x")
            target.conn.close()
            assert target.in_use() == 0, "the connection went back (rolled back by the pool)"
            Item.objects.using(alias).count()
    assert Item.objects.using(alias).count() == 0
    assert Item.objects.using("default").count() == 0


def test_iterator_outside_and_inside_atomic(target: Target) -> None:
    """Direct: a WITH HOLD server-side cursor, fetched in chunks. Through PgBouncer
    (DISABLE_SERVER_SIDE_CURSORS, as README.rst says): rows in one go, so another
    client taking the server between two chunks changes nothing."""
    alias = target.alias
    Item.objects.using(alias).bulk_create(Item(name=f"i{i:02}") for i in range(25))
    bad_before = target.stats()["returns_bad"]
    expected = [f"i{i:02}" for i in range(25)]
    iterator = Item.objects.using(alias).order_by("id").iterator(chunk_size=4)
    names = [next(iterator).name for _ in range(4)]
    if target.via_pgbouncer:
        other = bouncer_client(target, autocommit=False)
        try:
            other.cursor().execute("SELECT 1")  # BEGIN: it keeps the server it gets
            names += [item.name for item in iterator]
        finally:
            other.rollback()
            other.close()
    else:
        with target.conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_cursors WHERE name LIKE '\\_django\\_curs\\_%' "
                "AND is_holdable"
            )
            assert cur.fetchone()[0] == 1, "a WITH HOLD cursor on the server"
        names += [item.name for item in iterator]
    assert names == expected
    with transaction.atomic(using=alias):
        assert sum(1 for _ in Item.objects.using(alias).iterator(chunk_size=3)) == 25
    target.conn.close()
    assert target.stats()["returns_bad"] == bad_before


def test_atomic_requests_roll_back_a_failed_view(target: Target) -> None:
    target.conn.settings_dict["ATOMIC_REQUESTS"] = True
    try:
        client = Client(raise_request_exception=False)
        ok = client.get("/create/", {"using": target.alias})
        assert ok.json() == {"in_atomic_block": True}
        assert client.get("/create/", {"using": target.alias, "fail": "1"}).status_code == 500
    finally:
        target.conn.settings_dict["ATOMIC_REQUESTS"] = False
    assert Item.objects.using("default").count() == 1


def test_isolation_level_and_time_zone_are_set_on_every_transaction(
    target: Target, admin: Any
) -> None:
    """Both drivers send the isolation level with each BEGIN: it holds on a fresh and on
    a reused connection, leaves no session default behind, and through PgBouncer holds
    whatever default another client left on the server it gets."""
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    serializable = IsolationLevel.SERIALIZABLE
    wrapper = make_wrapper(target, "custom", isolation_level=serializable)
    query = (
        "SELECT current_setting('transaction_isolation'), current_setting('TimeZone'), "
        "current_setting('default_transaction_isolation'), pg_backend_pid()"
    )

    def in_a_transaction() -> tuple[str, str, str, int]:
        wrapper.set_autocommit(False)  # isolation applies to transactions
        try:
            with wrapper.cursor() as cur:
                cur.execute(query)
                isolation, tz, default, pid = cur.fetchone()
        finally:
            wrapper.rollback()
            wrapper.set_autocommit(True)
        return isolation, tz, default, int(pid)

    try:
        for _ in range(2):  # a fresh physical connection, then the same one reused
            isolation, tz, default, pid = in_a_transaction()
            assert (isolation, tz) == ("serializable", "UTC")
            assert default == "read committed", "no session default was set"
            assert wrapper.isolation_level == serializable
            if target.via_pgbouncer:
                # The next transaction on that server is another client's: it runs
                # at the server's default (PgBouncer lends its last used server first).
                other = bouncer_client(target, autocommit=False)
                try:
                    with other.cursor() as cur:
                        cur.execute(query)
                        row = cur.fetchone()
                finally:
                    other.rollback()
                    other.close()
                assert row[3] == pid, "the other client ran on the same server"
                assert row[0] == "read committed"
            wrapper.close()
        assert get_pool("custom").get_stats()["connections_num"] == 1  # type: ignore[union-attr]
        if target.via_pgbouncer:
            # Another client leaves a session default on the server we get next.
            other = bouncer_client(target, autocommit=True)
            try:
                with other.cursor() as cur:
                    cur.execute(
                        "SET default_transaction_isolation = 'repeatable read'; "
                        "SELECT pg_backend_pid()"
                    )
                    (polluted,) = cur.fetchone()
                isolation, _, default, pid = in_a_transaction()
            finally:
                other.close()
            assert pid == polluted, "we got that server"
            assert isolation == "serializable", "sent with BEGIN, whatever the default"
            if DRIVER == "psycopg2":
                # psycopg2 also sends SET default_transaction_isolation TO DEFAULT (its
                # own transaction at PgBouncer) each time autocommit goes off: it reset
                # the other client's default on that shared server.
                assert default == "read committed"
            else:
                # psycopg 3 only says BEGIN ISOLATION LEVEL ...: the other client's
                # session default stays on the server.
                assert default == "repeatable read"
    finally:
        wrapper.close()
        close_pools("custom")
        if target.via_pgbouncer:
            reconnect_servers(target)


def reconnect_servers(target: Target) -> None:
    """Have PgBouncer close its server connections to the test database once released,
    so session state a test left on one of them reaches no later test."""
    conn = target.bouncer.admin()
    try:
        conn.cursor().execute(f"RECONNECT {target.dbname}")
    finally:
        conn.close()
    wait_until(
        lambda: all(not row["close_needed"] for row in target.bouncer.servers(target.dbname)),
        what="PgBouncer to close the servers it was told to",
    )


psycopg3_only = pytest.mark.skipif(DRIVER != "psycopg", reason="psycopg 3's options")


@psycopg3_only
def test_psycopg3_options_are_set_up_once_per_physical_connection(target: Target) -> None:
    """server_side_binding and prepare_threshold hold on a fresh and on a reused connection."""
    if target.via_pgbouncer:
        pytest.skip("prepared statements behind PgBouncer: tests/test_pgbouncer.py")
    wrapper = make_wrapper(target, "binding", server_side_binding=True, prepare_threshold=0)
    query = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s"
    try:
        pids = set()
        for round_ in range(2):  # a fresh physical connection, then the same one reused
            with wrapper.cursor() as cur:
                assert type(cur.cursor).__name__ == "ServerBindingCursor"
                cur.execute("SELECT pg_backend_pid(), %s::int + 1", [round_])
                pid, value = cur.fetchone()
                assert value == round_ + 1
                pids.add(pid)
                cur.execute(query, ["SELECT pg_backend_pid()%"])
                # prepare_threshold=0: prepared at its first run, and still there
                # (the same session) when the connection is lent again.
                assert cur.fetchone()[0] == 1
            wrapper.close()
        assert len(pids) == 1, "the same physical connection"
        assert get_pool("binding").get_stats()["connections_num"] == 1  # type: ignore[union-attr]
    finally:
        wrapper.close()
        close_pools("binding")
    # Django's default for psycopg 3 (prepare_threshold=None): nothing is prepared.
    plain = make_wrapper(target, "unprepared")
    try:
        for _ in range(3):
            with plain.cursor() as cur:
                cur.execute("SELECT pg_backend_pid(), %s::int", [1])
                cur.execute("SELECT count(*) FROM pg_prepared_statements")
                assert cur.fetchone()[0] == 0
            plain.close()
    finally:
        plain.close()
        close_pools("unprepared")


def test_assume_role_is_set_up_and_behind_pgbouncer_leaks(target: Target, admin: Any) -> None:
    """Direct: the role is set up on a fresh connection and kept on reuse. Through
    PgBouncer (README.rst, "No session state"): SET ROLE stays on the server it ran on,
    where the next client of PgBouncer inherits it."""
    ensure_role(admin)
    wrapper = make_wrapper(target, "role", assume_role="dgp_role")
    try:
        if not target.via_pgbouncer:
            for _ in range(2):  # a fresh physical connection, then the same one reused
                with wrapper.cursor() as cur:
                    cur.execute("SELECT current_user")
                    assert cur.fetchone()[0] == "dgp_role"
                wrapper.close()
            assert get_pool("role").get_stats()["connections_num"] == 1  # type: ignore[union-attr]
            return
        wrapper.ensure_connection()  # Django's session setup ran SET ROLE, then let go
        wrapper.close()
        other = bouncer_client(target, autocommit=True)
        try:
            with other.cursor() as cur:
                cur.execute("SELECT current_user, session_user")
                assert cur.fetchone() == ("dgp_role", target.bouncer.user), "inherited"
        finally:
            other.close()
    finally:
        wrapper.close()
        close_pools("role")
        if target.via_pgbouncer:
            reconnect_servers(target)


def test_json_fields_decode_as_with_the_stock_backend(target: Target) -> None:
    with target.conn.cursor() as cur:
        cur.execute("""SELECT '{"a": [1, 2]}'::jsonb""")
        value = cur.fetchone()[0]
    # Django registers a dummy loads for jsonb on psycopg2: values arrive as text.
    assert value == '{"a": [1, 2]}'


# ------------------------------------------------------------- settings


def test_bad_options_fail_naming_alias_key_and_allowed() -> None:
    base = connections["default"].settings_dict

    def wrapper(**options: Any) -> Any:
        settings_dict = {**base, "OPTIONS": {**base["OPTIONS"], **options}}
        return type(connections["default"])(settings_dict, alias="misconfigured")

    # Refused at the latest when the alias first connects (check_settings()).
    with pytest.raises(ImproperlyConfigured) as err:
        wrapper(MAX_CONNS=0).ensure_connection()
    assert str(err.value) == (
        "DATABASES['misconfigured']: OPTIONS['MAX_CONNS'] must be an integer >= 1, got 0"
    )
    with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['pool'\] = True"):
        wrapper(pool=True).ensure_connection()
    with pytest.raises(ImproperlyConfigured, match="did you mean MAX_CONNS"):
        wrapper(max_size=10).ensure_connection()
    assert get_pool("misconfigured") is None


def test_unknown_lower_case_keys_go_to_libpq(target: Target) -> None:
    """Direct: libpq's ``options`` reaches the server. PgBouncer refuses it as a startup
    parameter (README.rst, "Startup parameters"): the error reaches the caller."""
    wrapper = make_wrapper(target, "libpq", options="-c statement_timeout=1234")
    try:
        if target.via_pgbouncer:
            with pytest.raises(OperationalError, match="unsupported startup parameter: options"):
                wrapper.ensure_connection()
            stats = get_pool("libpq").get_stats()  # type: ignore[union-attr]
            assert stats["connections_errors"] == 1 and stats["pool_size"] == 0
            return
        with wrapper.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "1234ms"
    finally:
        wrapper.close()
        close_pools("libpq")


def test_one_pool_per_alias_that_follows_its_settings(target: Target) -> None:
    alias = target.alias
    target.backend_pid()
    target.conn.close()
    pool = get_pool(alias)
    other = make_wrapper(target, alias)  # same settings, another wrapper: same pool
    other.ensure_connection()
    assert get_pool(alias) is pool
    other.close()
    changed = make_wrapper(target, alias, MAX_CONNS=3)
    changed.ensure_connection()
    replaced = get_pool(alias)
    assert replaced is not pool and replaced.max_conns == 3  # type: ignore[union-attr]
    assert pool.closed  # type: ignore[union-attr]
    changed.close()
    target.conn.ensure_connection()  # back to the suite's settings: a new pool again
    assert get_pool(alias).max_conns == MAX_CONNS  # type: ignore[union-attr]
    assert set(all_stats()) >= {alias}


def test_transaction_mode_gives_back_between_statements_here_too(target: Target) -> None:
    """POOL_MODE "transaction" on each target: PgBouncer's own transaction pooling included.

    Statements and transactions of several workers give their connections back
    between them; rows written in one statement are read by the next on
    another connection; a rolled back transaction leaves nothing; the pool
    ends with nothing lent.
    """
    alias = "txmode"
    workers = Workers()

    def job(i: int) -> list[Any]:
        wrapper = make_wrapper(target, alias, POOL_MODE="transaction")
        try:
            with wrapper.cursor() as cur:
                cur.execute("INSERT INTO testapp_item (name, qty) VALUES (%s, %s)", [f"t{i}", i])
            held_after_statement = wrapper.connection is not None
            wrapper.set_autocommit(False)  # what atomic() does on the outermost block
            with wrapper.cursor() as cur:
                cur.execute("UPDATE testapp_item SET qty = qty + 1 WHERE name = %s", [f"t{i}"])
            wrapper.rollback()
            wrapper.set_autocommit(True)
            assert wrapper.connection is None
            with wrapper.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("UPDATE testapp_item SET qty = qty + 1 WHERE name = %s", [f"t{i}"])
                held_in_transaction = wrapper.connection is not None
                cur.execute("COMMIT")
                cur.execute("SELECT qty FROM testapp_item WHERE name = %s", [f"t{i}"])
                qty = cur.fetchone()[0]
            return [held_after_statement, held_in_transaction, qty, wrapper.connection is None]
        finally:
            wrapper.close()

    try:
        for i in range(12):
            workers.spawn(job, i)
        workers.join(30)
        assert workers.errors == []
        assert sorted(workers.results, key=lambda r: r[2]) == [
            [False, True, i + 1, True] for i in range(12)
        ]
        pool = get_pool(alias)
        assert pool is not None
        assert pool.get_stats()["pool_in_use"] == 0
        assert pool.get_stats()["requests_num"] > pool.get_stats()["sessions_num"]
    finally:
        close_pools(alias)


def test_aliases_have_separate_pools(target: Target) -> None:
    target.backend_pid()
    target.backend_pid(connections["other"])
    assert get_pool("other") is not get_pool(target.alias)
    assert get_pool("other").max_conns == 2  # type: ignore[union-attr]
    assert get_pool(target.alias).max_conns == MAX_CONNS  # type: ignore[union-attr]


# ------------------------------------------------ greenlets and threads


def test_workers_share_the_pool_and_the_decorator_returns(
    target: Target, admin: Any, workers: Workers
) -> None:
    alias = target.alias

    @close_connection
    def task(i: int) -> int:
        Item.objects.using(alias).create(name=f"t{i}")
        return Item.objects.using(alias).filter(name=f"t{i}").count()

    for i in range(40):
        workers.spawn(task, i)
    workers.join(60)
    assert workers.errors == []
    assert workers.results == [1] * 40
    wait_until(lambda: target.in_use() == 0, what="every worker to give its connection back")
    assert target.stats()["connections_num"] <= MAX_CONNS
    assert 1 <= len(target.sessions(admin)) <= MAX_CONNS
    if target.via_pgbouncer:
        assert 1 <= len(target.server_backends(admin)) <= DEFAULT_POOL_SIZE


# ------------------------------------------------------------ test runner


def test_manage_py_test_creates_clones_and_drops_the_test_database(
    target: Target, tmp_path: Any
) -> None:
    """Django's runner: nothing is "being accessed by other users" at clone or drop."""
    if target.via_pgbouncer:
        pytest.skip(RUNNER_REASON)
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "test",
            "tests.testapp.runner_tests",
            "--parallel",
            "2",
            "--noinput",
            "-v",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert "Cloning test database" in log
    assert "Destroying test database" in log
    assert "being accessed by other users" not in log
    assert "OK" in log


# ------------------------------------------------------- greenlet end


@pytest.mark.gevent_only
def test_a_greenlet_that_ends_gives_its_connection_back(target: Target) -> None:
    """No request_finished, no close_old_connections, no decorator."""
    import gevent

    def job(i: int) -> int:
        return Item.objects.using(target.alias).filter(name=f"x{i}").count()

    jobs = [gevent.spawn(job, i) for i in range(30)]
    gevent.joinall(jobs, raise_error=True)
    wait_until(lambda: target.in_use() == 0, what="ended greenlets to give their connections back")
    stats = target.stats()
    assert stats["connections_num"] <= MAX_CONNS
    assert stats["returns_bad"] == 0


@pytest.mark.gevent_only
def test_a_greenlet_killed_mid_query_cancels_it_and_discards_the_connection(
    target: Target, admin: Any
) -> None:
    import gevent

    def sleeping() -> bool:
        return any(
            state == "active" and "pg_sleep(30)" in query
            for _, state, query in target.server_backends(admin)
        )

    def slow() -> None:
        with target.conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(30)")

    target.backend_pid()
    target.conn.close()
    cancels = target.bouncer.log().count("sending cancel request") if target.via_pgbouncer else 0
    job = gevent.spawn(slow)
    wait_until(sleeping, what="the query to run on the server")
    bad_before = target.stats()["returns_bad"]
    job.kill()
    wait_until(lambda: target.in_use() == 0, what="the killed greenlet's connection to come back")
    # Stopped long before its 30 s: the cancel reached the server (through
    # PgBouncer, which forwards it; a closed socket alone would leave it running).
    wait_until(lambda: not sleeping(), what="the server to stop the query", timeout=5)
    if target.via_pgbouncer:
        assert target.bouncer.log().count("sending cancel request") > cancels
    assert target.stats()["returns_bad"] == bad_before + 1
    assert Item.objects.using(target.alias).count() == 0, "the pool still lends working ones"
    target.pool().check_invariants()


@pytest.mark.gevent_only
def test_after_thousands_of_kills_the_pool_still_serves_max_conns_at_once(
    target: Target, admin: Any
) -> None:
    import gevent
    from gevent.event import Event

    def borrow_and_query() -> None:
        with target.conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.001)")

    for i in range(3000):
        job = gevent.spawn(borrow_and_query)
        gevent.sleep(0 if i % 2 else 0.0005)  # kill before, during and after the checkout
        job.kill()
    wait_until(lambda: target.in_use() == 0, what="every killed greenlet's connection")
    all_in = Event()
    holding: list[int] = []
    seen: list[set[int]] = []

    def hold() -> int:
        session = target.session()
        holding.append(session)
        if len(holding) == MAX_CONNS:
            seen.append(target.sessions(admin))
            all_in.set()
        all_in.wait(10)
        return session

    holders = [gevent.spawn(hold) for _ in range(MAX_CONNS)]
    gevent.joinall(holders, timeout=20, raise_error=True)
    assert all_in.is_set(), "four greenlets could not hold a connection each at once"
    sessions = {h.value for h in holders}
    assert len(sessions) == MAX_CONNS
    assert sessions <= seen[0], "all four open at once on the other side"
    target.pool().check_invariants()


def test_drain_pools_for_worker_exit(target: Target, admin: Any) -> None:
    from django_gevent_pool.backends.base import drain_pools

    session = target.session()
    pool = get_pool(target.alias)
    assert drain_pools(timeout=0.2) is False, "this greenlet still holds a connection"
    target.conn.close()
    assert pool is not None and pool.get_stats()["pool_size"] == 0
    assert get_pool(target.alias) is None
    # The session really ended on the other side.
    wait_until(lambda: not target.sessions(admin), what="the drained sessions to end")
    assert Item.objects.using(target.alias).count() == 0, "the next use makes a new pool"
    assert get_pool(target.alias) is not pool
    assert target.session() != session
    target.conn.close()
    assert drain_pools(timeout=5) is True
    wait_until(lambda: not target.sessions(admin), what="the drained sessions to end")


def test_reset_query_runs_django_session_setup_again(target: Target, admin: Any) -> None:
    if target.via_pgbouncer:
        pytest.skip(RESET_QUERY_REASON)
    ensure_role(admin)
    wrapper = make_wrapper(target, "resetting", assume_role="dgp_role", RESET_QUERY="DISCARD ALL")
    try:
        for round_ in range(2):
            with wrapper.cursor() as cur:
                cur.execute(
                    "SELECT current_user, current_setting('TimeZone'), "
                    "current_setting('dgp.marker', true)"
                )
                user, tz, marker = cur.fetchone()
                cur.execute("SET dgp.marker = 'set'")
            assert (user, tz) == ("dgp_role", "UTC"), "DISCARD ALL reset them; set up again"
            assert marker in (None, ""), f"round {round_}: session state leaked across checkouts"
            wrapper.close()
        assert get_pool("resetting").get_stats()["connections_num"] == 1  # type: ignore[union-attr]
    finally:
        wrapper.close()
        close_pools("resetting")
