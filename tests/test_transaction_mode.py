"""POOL_MODE "transaction": a connection is held only while it works, and session state pins it.

Every claim is checked on the server: ``pg_stat_activity`` counts the
connections while greenlets (threads) wait on other I/O; ``SHOW``,
``pg_listening_channels()``, ``pg_locks``, ``pg_cursors``,
``pg_prepared_statements`` and ``pg_class`` show that the state a pinned
session made stays with it while it runs and reaches no other borrower, during
or after. Runs straight to the server (LISTEN, advisory locks and prepared
statements are refused through PgBouncer's transaction mode anyway).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import InterfaceError, OperationalError, connections, transaction
from django.db.backends.signals import connection_created
from django.test.utils import CaptureQueriesContext, override_settings

from django_gevent_pool import pinned
from django_gevent_pool.backends.base import get_pool, pool_options_for

from .support import DRIVER, Workers, is_gevent, next_app_name, sleep, wait_until
from .targets import forget_alias
from .testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases="__all__")

ALIAS = "tx"
MAX_CONNS = 4


def _settings(app_name: str, **options: Any) -> dict[str, Any]:
    base = connections.settings["default"]
    return {
        **base,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            **base["OPTIONS"],
            "MAX_CONNS": MAX_CONNS,
            "POOL_TIMEOUT": 10,
            "POOL_MODE": "transaction",
            "application_name": app_name,
            **options,
        },
        "TEST": {**base["TEST"], "NAME": None, "MIRROR": "default"},
    }


@pytest.fixture(scope="module")
def _alias_exists(django_db_setup: None) -> Iterator[None]:
    # Django lets a test case use only the aliases that exist when it starts.
    connections.settings[ALIAS] = _settings("dgp-tx-module")
    try:
        yield
    finally:
        forget_alias(ALIAS)
        connections.settings.pop(ALIAS, None)


@pytest.fixture
def tx(_alias_exists: None) -> Iterator[str]:
    """A fresh transaction-mode pool on the alias ``tx``; yields its application_name."""
    app = next_app_name()
    yield from _fresh(app)


@pytest.fixture
def tx_reset(_alias_exists: None) -> Iterator[str]:
    """Like ``tx``, with RESET_QUERY = DISCARD ALL and MAX_CONNS = 1 (one connection, reused)."""
    app = next_app_name()
    yield from _fresh(app, RESET_QUERY="DISCARD ALL", MAX_CONNS=1)


def _fresh(app: str, **options: Any) -> Iterator[str]:
    forget_alias(ALIAS)
    connections.settings[ALIAS] = _settings(app, **options)
    try:
        yield app
    finally:
        forget_alias(ALIAS)
        connections.settings[ALIAS] = _settings("dgp-tx-module")


def conn() -> Any:
    return connections[ALIAS]


def stats() -> dict[str, float]:
    pool = get_pool(ALIAS)
    assert pool is not None
    return pool.get_stats()


def one(sql: str, params: Any = None) -> Any:
    with conn().cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchone()[0]


def end_request() -> None:
    """What Django does at request end (request_finished -> close_old_connections)."""
    conn().close_if_unusable_or_obsolete()


def server_count(admin: Any, sql: str, params: Any = None) -> int:
    with admin.cursor() as cur:
        cur.execute(sql, params)
        return int(cur.fetchone()[0])


def backends(admin: Any, app: str) -> int:
    return server_count(
        admin, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
    )


def in_other_borrowers(n: int, sql: str) -> list[Any]:
    """Run ``sql`` in ``n`` concurrent workers, each its own session; their answers."""
    workers = Workers()

    def look() -> Any:
        try:
            return one(sql)
        finally:
            end_request()

    for _ in range(n):
        workers.spawn(look)
    workers.join(30)
    assert workers.errors == []
    return workers.results


# ------------------------------------------------------------ options


def test_pool_mode_is_validated_naming_alias_key_and_allowed() -> None:
    with pytest.raises(ImproperlyConfigured) as err:
        pool_options_for("main", {"POOL_MODE": "statement"})
    assert str(err.value) == (
        "DATABASES['main']: OPTIONS['POOL_MODE'] must be 'session' or 'transaction', "
        "got 'statement'"
    )
    with pytest.raises(ImproperlyConfigured, match="did you mean POOL_MODE"):
        pool_options_for("main", {"pool_mode": "transaction"})
    assert pool_options_for("main", {})[0].POOL_MODE == "session"


# ------------------------------------------------- held only while it works


def test_the_connection_goes_back_after_each_statement_and_results_stay(tx: str) -> None:
    cur = conn().cursor()
    cur.execute("SELECT generate_series(1, 5)")
    assert conn().connection is None, "given back as soon as the rows were in"
    assert stats()["pool_in_use"] == 0
    # The rows are read after the connection went back (and was lent again).
    assert one("SELECT 1") == 1
    assert cur.fetchone() == (1,)
    assert cur.fetchmany(2) == [(2,), (3,)]
    assert list(cur) == [(4,), (5,)]
    assert cur.rowcount == 5
    cur.execute("INSERT INTO testapp_item (name, qty) VALUES ('a', 0), ('b', 0)")
    assert cur.rowcount == 2
    assert cur.description is None
    cur.close()
    assert Item.objects.using(ALIAS).count() == 2
    assert stats()["requests_num"] >= 4
    end_request()
    assert stats()["sessions_num"] == 1


def test_connections_are_free_while_greenlets_wait_on_other_io(tx: str, admin: Any) -> None:
    """30 workers query, wait 0.5 s on "another service", query again: 4 connections do."""
    waiting = Workers()
    n, pause = 30, 0.5
    paused: list[int] = []

    def view(i: int) -> int:
        try:
            Item.objects.using(ALIAS).create(name=f"w{i}")
            paused.append(i)
            sleep(pause)  # an HTTP call: no connection held meanwhile
            return Item.objects.using(ALIAS).filter(name=f"w{i}").count()
        finally:
            end_request()

    start = time.monotonic()
    for i in range(n):
        waiting.spawn(view, i)
    # Once everyone is in its pause, nothing is lent and nothing queues.
    wait_until(lambda: len(paused) == n, what="every worker to reach its pause", timeout=pause)
    in_use_mid_pause = stats()["pool_in_use"]
    backends_mid_pause = backends(admin, tx)
    waiting.join(30)
    elapsed = time.monotonic() - start
    assert waiting.errors == []
    assert waiting.results == [1] * n
    assert in_use_mid_pause == 0
    assert backends_mid_pause <= MAX_CONNS
    s = stats()
    assert s["connections_num"] <= MAX_CONNS
    assert s["requests_timeouts"] == 0
    # Session mode would need n / MAX_CONNS rounds of the pause (3.75 s here).
    assert elapsed < pause + 2.0, f"took {elapsed:.2f} s"
    assert s["sessions_num"] == n
    assert s["requests_num"] >= 2 * n


def test_atomic_holds_one_connection_and_gives_it_back_after_on_commit(tx: str) -> None:
    seen: list[Any] = []
    with transaction.atomic(using=ALIAS):
        pid = one("SELECT pg_backend_pid()")
        Item.objects.using(ALIAS).create(name="a")
        with transaction.atomic(using=ALIAS):  # a savepoint, same connection
            assert one("SELECT pg_backend_pid()") == pid
        transaction.on_commit(
            lambda: seen.append((conn().connection is not None, stats()["pool_in_use"])),
            using=ALIAS,
        )
        locked = list(Item.objects.using(ALIAS).select_for_update().filter(name="a"))
        assert len(locked) == 1
        assert conn().connection is not None
        assert one("SELECT pg_backend_pid()") == pid
    # The hook ran after the commit, before the connection went back.
    assert seen == [(True, 1)]
    assert conn().connection is None
    assert stats()["pool_in_use"] == 0
    with pytest.raises(ZeroDivisionError):
        with transaction.atomic(using=ALIAS):
            Item.objects.using(ALIAS).create(name="b")
            1 / 0  # noqa: B018
    assert conn().connection is None
    assert sorted(Item.objects.using(ALIAS).values_list("name", flat=True)) == ["a"]


def test_a_begin_sent_by_hand_keeps_the_connection_until_it_ends(tx: str) -> None:
    with conn().cursor() as cur:
        cur.execute("BEGIN")
        pid = one("SELECT pg_backend_pid()")
        cur.execute("INSERT INTO testapp_item (name, qty) VALUES ('h', 0)")
        assert conn().connection is not None
        assert one("SELECT pg_backend_pid()") == pid
        cur.execute("COMMIT")
    assert conn().connection is None
    assert Item.objects.using(ALIAS).filter(name="h").count() == 1


def test_connection_created_fires_per_request_and_per_new_connection_never_per_statement(
    tx: str,
) -> None:
    """As with Django: at each connect(); and when a statement gets a connection no one greeted."""
    fired: list[int] = []

    def created(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == ALIAS:
            with connection.cursor() as cur:  # setup: neither pins nor gives back
                cur.execute("SET application_name = %s", [tx])
                cur.execute("SELECT pg_backend_pid()")
                fired.append(cur.fetchone()[0])

    connection_created.connect(created)
    try:
        for _ in range(3):  # three requests of ten statements
            for _ in range(10):
                one("SELECT 1")
            end_request()
        assert len(fired) == 3 and len(set(fired)) == 1 == stats()["connections_num"]
        # A second physical connection, first met by a statement (not by connect()),
        # is greeted once too: per-connection setup reaches every connection.
        assert one("SELECT 1") == 1
        holder = Workers()
        release: list[bool] = []

        def hold_one() -> None:
            with pinned(ALIAS):
                one("SELECT 1")
                wait_until(lambda: bool(release), what="the release")

        holder.spawn(hold_one)
        wait_until(lambda: stats()["pool_in_use"] == 1, what="the holder's connection")
        pids = {one("SELECT pg_backend_pid()") for _ in range(5)}
        release.append(True)
        holder.join(10)
        assert holder.errors == []
    finally:
        connection_created.disconnect(created)
    assert stats()["connections_num"] == 2
    assert len(set(fired)) == 2, "each physical connection was set up"
    assert pids <= set(fired)
    assert stats()["pins_set"] == 0, "receivers' statements are setup: no pin"
    assert stats()["pins_explicit"] == 1


def test_debug_queries_and_capture_work_across_returns(tx: str) -> None:
    with CaptureQueriesContext(conn()) as captured:
        Item.objects.using(ALIAS).create(name="q")
        assert Item.objects.using(ALIAS).filter(name="q").count() == 1
    assert len(captured.captured_queries) == 2
    assert "INSERT" in captured.captured_queries[0]["sql"]


def test_a_temporary_connection_between_statements_keeps_the_session(tx: str) -> None:
    """Django's temporary_connection() (pg_version, features) must not end the request's session."""
    cur = conn().cursor()
    cur.execute("SELECT 1")
    assert conn().connection is None
    with conn().temporary_connection() as temp:
        temp.execute("SHOW server_version_num")
        assert int(temp.fetchone()[0]) >= 100000
    cur.execute("SELECT 2")  # the same session: the cursor still works
    assert cur.fetchone() == (2,)
    assert stats()["sessions_num"] == 1


def test_cursors_opened_inside_a_statement_do_not_give_its_connection_back(tx: str) -> None:
    """An execute wrapper's query runs inside the statement: its close returns nothing."""
    inner: list[Any] = []

    def wrapper(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        if "generate_series" in sql:  # the outer statement only (this wraps the inner too)
            with conn().cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                inner.append(cur.fetchone()[0])
        return execute(sql, params, many, context)

    with conn().execute_wrapper(wrapper):
        with CaptureQueriesContext(conn()):
            cur = conn().cursor()
            cur.execute("SELECT pg_backend_pid(), generate_series(1, 3)")
            rows = cur.fetchall()
    assert [r[1] for r in rows] == [1, 2, 3]
    assert inner == [rows[0][0]], "the inner query ran on the statement's connection"
    assert conn().connection is None


def test_a_time_zone_setting_changed_between_or_inside_transactions(tx: str) -> None:
    """override_settings(TIME_ZONE) reaches the next statement, and never another borrower."""
    import django.test.signals  # noqa: F401 - Django's receivers for setting_changed

    def zone() -> str:
        return str(one("SELECT current_setting('TimeZone')"))

    with override_settings(USE_TZ=False, TIME_ZONE="UTC"):
        assert zone() == "UTC"
        with override_settings(TIME_ZONE="Asia/Tokyo"):  # between statements
            assert zone() == "Asia/Tokyo"
        assert zone() == "UTC"
        end_request()
        assert zone() == "UTC"
        tokyo = override_settings(TIME_ZONE="Asia/Tokyo")
        with transaction.atomic(using=ALIAS):
            pid = one("SELECT pg_backend_pid()")
            tokyo.enable()  # set on the connection the transaction holds: it pins
        try:
            assert conn().connection is not None
            assert zone() == "Asia/Tokyo"
        finally:
            tokyo.disable()
        assert zone() == "UTC"
        end_request()
        assert stats()["pins_set"] >= 1
        # The zone set by hand reached nobody: its connection was closed.
        assert in_other_borrowers(MAX_CONNS, "SELECT current_setting('TimeZone')") == [
            "UTC"
        ] * MAX_CONNS
        assert pid not in in_other_borrowers(MAX_CONNS, "SELECT pg_backend_pid()")


def test_a_cursor_kept_past_the_request_fails_loudly(tx: str) -> None:
    cur = conn().cursor()
    cur.execute("SELECT 1")
    end_request()
    with pytest.raises(InterfaceError, match="cursor already closed"):
        cur.execute("SELECT 2")
    assert one("SELECT 3") == 3  # the next session is fine


def test_set_autocommit_false_holds_until_it_is_set_back(tx: str) -> None:
    transaction.set_autocommit(False, using=ALIAS)
    pid = one("SELECT pg_backend_pid()")
    Item.objects.using(ALIAS).create(name="m")
    assert one("SELECT pg_backend_pid()") == pid
    assert conn().connection is not None
    transaction.commit(using=ALIAS)
    assert conn().connection is not None, "still not in autocommit"
    transaction.set_autocommit(True, using=ALIAS)
    assert conn().connection is None
    assert Item.objects.using(ALIAS).filter(name="m").count() == 1


def test_a_shared_wrapper_keeps_its_connection_until_sharing_ends(tx: str) -> None:
    wrapper = conn()
    wrapper.inc_thread_sharing()
    try:
        pid = one("SELECT pg_backend_pid()")
        seen = []
        worker = Workers()
        worker.spawn(lambda: seen.append(_pid_through(wrapper)))
        worker.join(10)
        assert worker.errors == []
        assert seen == [pid], "another thread used the same connection"
        assert wrapper.connection is not None
    finally:
        wrapper.dec_thread_sharing()
    one("SELECT 1")
    assert wrapper.connection is None


def _pid_through(wrapper: Any) -> int:
    with wrapper.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def test_closing_twice_and_cursors_closed_twice_change_nothing(tx: str) -> None:
    cur = conn().cursor()
    cur.execute("SELECT 1")
    cur.close()
    cur.close()
    with pytest.raises(InterfaceError, match="cursor already closed"):
        cur.execute("SELECT 2")  # closed by its owner: never runs again
    named = conn().chunked_cursor()
    named.execute("SELECT generate_series(1, 3)")
    assert conn().connection is not None
    named.close()
    named.close()
    assert conn().connection is None
    assert conn()._pool_cursor_pins == 0
    conn().close()
    conn().close()
    assert one("SELECT 2") == 2
    assert conn().connection is None
    assert stats()["pool_in_use"] == 0


# ------------------------------------------------------------ pins


def test_set_pins_until_the_request_ends_then_the_connection_is_discarded(
    tx: str, admin: Any
) -> None:
    with conn().cursor() as cur:
        cur.execute("SET statement_timeout = '4321ms'")
    pid = one("SELECT pg_backend_pid()")
    assert conn().connection is not None, "pinned: kept with its session"
    assert one("SHOW statement_timeout") == "4321ms", "not lost under its owner"
    # Concurrent borrowers get other connections, which never saw the SET.
    assert in_other_borrowers(3, "SHOW statement_timeout") == ["0"] * 3
    assert stats()["pins_set"] == 1
    end_request()
    # No RESET_QUERY: nothing can wipe it, so the connection is closed.
    wait_until(
        lambda: (
            server_count(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]) == 0
        ),
        what="the pinned connection to be closed",
    )
    assert in_other_borrowers(MAX_CONNS, "SHOW statement_timeout") == ["0"] * MAX_CONNS


def test_with_reset_query_a_pinned_connection_is_reset_and_reused(tx_reset: str) -> None:
    created: list[int] = []

    def on_created(sender: Any, connection: Any, **kwargs: Any) -> None:
        if connection.alias == ALIAS:
            created.append(1)

    connection_created.connect(on_created)
    try:
        pid = one("SELECT pg_backend_pid()")
        one("SELECT set_config('statement_timeout', '1234ms', false)")
        one("SELECT pg_advisory_lock(7)")
        with conn().cursor() as cur:
            cur.execute("CREATE TEMP TABLE scratch (a int)")
            cur.execute("PREPARE two AS SELECT 2")
            cur.execute("LISTEN dgp_channel")
        assert one("EXECUTE two") == 2
        assert one("SELECT pg_backend_pid()") == pid
        end_request()
        s = stats()
        assert (s["pins_set"], s["pins_advisory_lock"], s["pins_temp_table"]) == (1, 1, 1)
        assert (s["pins_prepare"], s["pins_listen"]) == (1, 1)
        # The one connection (MAX_CONNS = 1) is the same, and clean.
        assert one("SELECT pg_backend_pid()") == pid
        assert one("SHOW statement_timeout") == "0"
        assert one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0
        assert one("SELECT count(*) FROM pg_prepared_statements") == 0
        assert one("SELECT count(*) FROM pg_listening_channels()") == 0
        assert one("SELECT to_regclass('pg_temp.scratch') IS NULL") is True
        # The reset wiped what connection_created set up: it fires again.
        assert len(created) == 2
    finally:
        connection_created.disconnect(on_created)


def test_listen_pins_and_notifications_reach_their_listener_only(tx: str) -> None:
    with conn().cursor() as cur:
        cur.execute("LISTEN dgp_jobs")
    assert one("SELECT count(*) FROM pg_listening_channels()") == 1
    assert in_other_borrowers(3, "SELECT count(*) FROM pg_listening_channels()") == [0] * 3
    # From another borrower (the test database is not the admin's).
    in_other_borrowers(1, "SELECT pg_notify('dgp_jobs', 'hello') IS NULL")
    raw = conn().connection
    assert raw is not None
    if DRIVER == "psycopg2":

        def arrived() -> bool:
            raw.poll()
            return bool(raw.notifies)

        wait_until(arrived, what="the notification")
        assert raw.notifies[0].payload == "hello"
    else:
        payloads = [n.payload for n in raw.notifies(timeout=5, stop_after=1)]
        assert payloads == ["hello"]
    end_request()
    assert (
        in_other_borrowers(MAX_CONNS, "SELECT count(*) FROM pg_listening_channels()")
        == [0] * MAX_CONNS
    )


def test_session_advisory_lock_stays_with_its_owner_and_is_released(tx: str, admin: Any) -> None:
    lock = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242"
    assert one("SELECT pg_try_advisory_lock(4242)") is True
    pid = one("SELECT pg_backend_pid()")
    for _ in range(5):
        assert one("SELECT pg_backend_pid()") == pid
    assert server_count(admin, lock + " AND pid = %s AND granted", [pid]) == 1
    # Others, on other connections, cannot take it.
    assert in_other_borrowers(3, "SELECT pg_try_advisory_lock(4242)") == [False] * 3
    end_request()
    wait_until(lambda: server_count(admin, lock) == 0, what="the advisory lock to go")
    with conn().cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(4242)")  # a transaction's lock: no pin
    assert conn().connection is None
    # The owner's, and the three others' tries (a try pins whether or not it wins).
    assert stats()["pins_advisory_lock"] == 4
    end_request()


def test_named_cursors_pin_until_closed(tx: str, admin: Any) -> None:
    Item.objects.using(ALIAS).bulk_create(Item(name=f"i{i:02}") for i in range(10))
    iterator = Item.objects.using(ALIAS).order_by("id").iterator(chunk_size=3)
    names = [next(iterator).name for _ in range(3)]
    pid = one("SELECT pg_backend_pid()")
    assert conn().connection is not None
    assert server_count(admin, "SELECT count(*) FROM pg_cursors WHERE is_holdable") == 0, (
        "pg_cursors shows only the caller's own cursors"
    )
    assert one("SELECT count(*) FROM pg_cursors WHERE is_holdable") == 1
    names += [item.name for item in iterator]
    assert names == [f"i{i:02}" for i in range(10)]
    assert one("SELECT pg_backend_pid()") == pid
    # Closed: no pin is left, the connection goes back after a statement again.
    assert conn().connection is None
    assert stats()["pins_cursor"] == 1
    assert in_other_borrowers(MAX_CONNS, "SELECT count(*) FROM pg_cursors") == [0] * MAX_CONNS


# PL/pgSQL is a library of every server (auto_explain is not in every build):
# its settings exist in a session once it is loaded, and DISCARD ALL keeps them.
LOADED = "SELECT current_setting('plpgsql.variable_conflict', true) IS NOT NULL"


def test_declare_with_hold_pins_and_the_reset_closes_it(tx_reset: str) -> None:
    with conn().cursor() as cur:
        cur.execute("DECLARE held CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
        cur.execute("FETCH 2 FROM held")
        assert cur.fetchall() == [(1,), (2,)]
    pid = one("SELECT pg_backend_pid()")
    assert one("SELECT count(*) FROM pg_cursors WHERE name = 'held'") == 1
    end_request()
    assert one("SELECT pg_backend_pid()") == pid, "reset and reused (MAX_CONNS = 1)"
    assert one("SELECT count(*) FROM pg_cursors") == 0
    assert stats()["pins_cursor"] == 1


def test_load_pins_and_its_connection_is_closed_even_with_reset_query(tx_reset: str) -> None:
    """DISCARD ALL cannot unload a library: a LOADed session is never reused."""
    assert one(LOADED) is False
    with conn().cursor() as cur:
        cur.execute("LOAD 'plpgsql'")
    pid = one("SELECT pg_backend_pid()")
    assert one(LOADED) is True
    end_request()
    assert one("SELECT pg_backend_pid()") != pid
    assert one(LOADED) is False
    assert stats()["pins_load"] == 1


def test_pinned_keeps_the_connection_for_what_detection_cannot_see(tx: str, admin: Any) -> None:
    with pinned(ALIAS) as wrapper:
        raw = wrapper.connection
        with raw.cursor() as cur:  # the driver's own cursor: no text is seen
            cur.execute("SET work_mem = '7MB'")
        pid = one("SELECT pg_backend_pid()")
        assert one("SHOW work_mem") == "7MB"
        assert wrapper.connection is raw
        assert one("SELECT pg_backend_pid()") == pid
    # The block ended: the connection went back closed (no RESET_QUERY).
    assert conn().connection is None
    assert stats()["pins_explicit"] == 1
    wait_until(
        lambda: (
            server_count(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]) == 0
        ),
        what="the pinned connection to be closed",
    )
    assert in_other_borrowers(MAX_CONNS, "SHOW work_mem") == ["4MB"] * MAX_CONNS


def test_pinned_in_session_mode_only_makes_sure_of_a_connection() -> None:
    with pinned() as wrapper:
        assert wrapper.connection is not None
    assert wrapper.connection is not None
    wrapper.close()


# ------------------------------------------------------- interruptions


@pytest.mark.gevent_only
def test_a_statement_killed_at_every_point_leaves_the_pool_whole(tx: str) -> None:
    """Timeouts land in the checkout, the query, the buffering and the return."""
    import gevent

    done = []

    def statement(i: int) -> None:
        try:
            with gevent.Timeout(0.001 * (i % 7), False):
                with conn().cursor() as cur:
                    cur.execute("SELECT pg_sleep(0.005), generate_series(1, 200)")
                    cur.fetchall()
            with gevent.Timeout(0.002, False):
                with transaction.atomic(using=ALIAS):
                    one("SELECT pg_sleep(0.004)")
            done.append(one("SELECT 1"))
        finally:
            end_request()

    jobs = [gevent.spawn(statement, i) for i in range(40)]
    for job in jobs[::5]:
        gevent.sleep(0.001)
        job.kill(block=False)
    gevent.joinall(jobs, timeout=30)
    assert all(job.dead for job in jobs)
    wait_until(lambda: stats()["pool_in_use"] == 0, what="every connection to come back")
    s = stats()
    assert s["pool_size"] <= MAX_CONNS
    assert one("SELECT 1") == 1
    assert done, "some statements ran to the end"


def test_a_lost_connection_is_replaced_at_the_next_statement(tx: str, admin: Any) -> None:
    assert one("SELECT 1") == 1
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            [tx],
        )
    wait_until(lambda: backends(admin, tx) == 0, what="the backend to go")
    # The idle connection is found dead at checkout: the statement gets another.
    assert one("SELECT 2") == 2
    assert stats()["connections_lost"] >= 1


def test_an_exhausted_pool_fails_a_statement_with_the_pool_error(tx: str) -> None:
    holders = Workers()
    release = []

    def hold() -> None:
        with pinned(ALIAS):
            one("SELECT 1")
            wait_until(lambda: bool(release), what="the release", timeout=20)

    for _ in range(MAX_CONNS):
        holders.spawn(hold)
    wait_until(
        lambda: (p := get_pool(ALIAS)) is not None and p.get_stats()["pool_in_use"] == MAX_CONNS,
        what="every connection pinned",
    )
    pool = get_pool(ALIAS)
    assert pool is not None
    pool.timeout = 0.2
    try:
        with pytest.raises(OperationalError, match=r"no connection available after 0\.20 s"):
            one("SELECT 1")
    finally:
        release.append(True)
        holders.join(20)
    assert holders.errors == []
    assert one("SELECT 1") == 1


def test_server_timing_and_prometheus_count_checkouts_time_held_and_pins(tx: str) -> None:
    from django_gevent_pool import timing

    with timing.tally_waits() as tally:
        one("SELECT 1")
        one("SELECT 2")
        with conn().cursor() as cur:
            cur.execute("SET lock_timeout = '1s'")
        end_request()
    assert tally.checkouts == 3
    assert tally.pins == 1
    assert tally.held > 0
    pytest.importorskip("prometheus_client")
    from django_gevent_pool.prometheus import PoolCollector

    pool = get_pool(ALIAS)
    assert pool is not None
    families = {f.name: f for f in PoolCollector(lambda: {ALIAS: pool}).collect()}
    pins = {s.labels["reason"]: s.value for s in families["django_gevent_pool_pins"].samples}
    assert pins["set"] == 1 and pins["listen"] == 0
    sessions = families["django_gevent_pool_sessions"].samples
    assert [s.value for s in sessions if s.name.endswith("_total")] == [1]


@pytest.mark.skipif(not is_gevent(), reason="greenlet-local wrappers")
def test_greenlet_ending_pinned_gives_the_connection_back_discarded(tx: str) -> None:
    import gevent

    def job() -> int:
        with conn().cursor() as cur:
            cur.execute("SET statement_timeout = '99ms'")
        return int(one("SELECT pg_backend_pid()"))

    pid = gevent.spawn(job).get(timeout=10)
    wait_until(lambda: stats()["pool_in_use"] == 0, what="the ended greenlet's connection")
    assert one("SHOW statement_timeout") == "0"
    assert one("SELECT pg_backend_pid()") != pid


# ------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ('SELECT "a"."id" FROM "testapp_item" "a" WHERE "a"."id" = %s LIMIT 21', None),
        ('UPDATE "testapp_item" SET "name" = %s WHERE "id" = %s', None),
        ("SET search_path TO tenant", "set"),
        (" -- a comment\n/* another */ RESET ALL", "set"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "set"),
        ("set local statement_timeout = 1", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("SET CONSTRAINTS ALL DEFERRED", None),
        ("SELECT set_config('a.b', 'c', false)", "set"),
        ("SELECT set_config('a.b', 'c', true)", None),
        ("LISTEN jobs", "listen"),
        ("UNLISTEN *", "listen"),
        ("NOTIFY jobs", None),
        ("SELECT pg_advisory_lock(1)", "advisory_lock"),
        ("select pg_try_advisory_lock_shared(1)", "advisory_lock"),
        ("SELECT pg_advisory_xact_lock(1)", None),
        ("CREATE TEMP TABLE t (a int)", "temp_table"),
        ("create local temporary table t (a int)", "temp_table"),
        ("SELECT * INTO TEMP t FROM x", "temp_table"),
        ("CREATE TABLE t (a int)", None),
        ("SELECT temperature FROM weather", None),
        ("PREPARE p AS SELECT 1", "prepare"),
        ("PREPARE TRANSACTION 'x'", None),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor"),
        ("DECLARE c CURSOR FOR SELECT 1", None),
        ("LOAD 'auto_explain'", "load"),
        ("SELECT 1; SET search_path TO x", "set"),
        (b"SET x = 1", "set"),
        ('SAVEPOINT "s1"', None),
    ],
)
def test_pin_reasons_from_the_statement_text(sql: Any, reason: str | None) -> None:
    from django_gevent_pool.pinning import pin_reason

    assert pin_reason(sql) == reason
    assert pin_reason(sql) == reason  # remembered
