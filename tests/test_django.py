"""The Django backend: lifecycle to checkout/return, Django's own judgement and options."""

from __future__ import annotations

import os
import subprocess
import sys
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
    connection,
    connections,
    transaction,
)
from django.test import Client

from django_gevent_pool import PoolTimeout
from django_gevent_pool.backends.base import all_stats, get_pool
from django_gevent_pool.decorators import close_connection

from .support import Workers, wait_until
from .testapp.models import Item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


def backend_pid(conn: Any = connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return int(cur.fetchone()[0])


def in_use(alias: str = "default") -> int:
    pool = get_pool(alias)
    return 0 if pool is None else int(pool.get_stats()["pool_in_use"])


@pytest.fixture(autouse=True)
def _return_everything() -> Iterator[None]:
    # pytest-django's setup may leave this greenlet holding a connection.
    for conn in connections.all(initialized_only=True):
        conn.close()
    yield
    for conn in connections.all(initialized_only=True):
        conn.close()


def make_wrapper(alias: str, **options: Any) -> Any:
    """A DatabaseWrapper for ``alias`` with default's settings and extra OPTIONS."""
    base = connections["default"].settings_dict
    settings_dict = {**base, "OPTIONS": {**base["OPTIONS"], **options}}
    return type(connections["default"])(settings_dict, alias=alias)


# ------------------------------------------------------------ lifecycle


def test_the_backend_uses_psycopg2_even_with_psycopg3_installed() -> None:
    import psycopg  # the test extra installs psycopg 3 on purpose
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    assert psycopg.__version__
    assert connection.Database is psycopg2
    assert not is_psycopg3
    backend_pid()
    assert isinstance(connection.connection, psycopg2.extensions.connection)


def test_close_gives_the_connection_back_to_the_pool() -> None:
    pid = backend_pid()
    assert in_use() == 1
    raw = connection.connection
    connection.close()
    assert connection.connection is None
    assert in_use() == 0
    assert raw.closed == 0, "returned, not closed"
    assert backend_pid() == pid, "the same server connection is lent again"


def test_request_boundaries_return_the_connection() -> None:
    request_started.send(sender=None)
    pid = backend_pid()
    request_finished.send(sender=None)
    assert connection.connection is None
    assert in_use() == 0
    request_started.send(sender=None)
    assert backend_pid() == pid
    request_finished.send(sender=None)


def test_a_non_zero_conn_max_age_still_returns_at_request_end() -> None:
    connection.settings_dict["CONN_MAX_AGE"] = None  # "persistent" in stock Django
    try:
        request_started.send(sender=None)
        backend_pid()
        request_finished.send(sender=None)
        assert connection.connection is None
        assert in_use() == 0
    finally:
        connection.settings_dict["CONN_MAX_AGE"] = 0


def test_a_broken_connection_is_discarded_at_request_end(admin: Any) -> None:
    pid = backend_pid()
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(OperationalError):
        backend_pid()
    assert connection.errors_occurred
    bad_before = get_pool("default").get_stats()["returns_bad"]  # type: ignore[union-attr]
    close_old_connections()  # what request_finished does
    assert connection.connection is None
    assert get_pool("default").get_stats()["returns_bad"] == bad_before + 1  # type: ignore[union-attr]
    assert backend_pid() != pid


def test_errors_on_a_healthy_connection_keep_it() -> None:
    pid = backend_pid()
    with pytest.raises(ProgrammingError), connection.cursor() as cur:
        cur.execute("SELECT * FROM no_such_table")
    close_old_connections()
    assert backend_pid() == pid, "is_usable() said healthy: the connection is reused"


def test_autocommit_left_changed_is_discarded() -> None:
    pid = backend_pid()
    transaction.set_autocommit(False)
    close_old_connections()
    assert connection.connection is None
    assert backend_pid() != pid
    assert connection.get_autocommit()


def test_pool_errors_become_django_operational_errors() -> None:
    wrappers = [make_wrapper("tiny", MAX_CONNS=2, POOL_TIMEOUT=0.2) for _ in range(3)]
    try:
        wrappers[0].ensure_connection()
        wrappers[1].ensure_connection()
        with pytest.raises(OperationalError) as err:
            wrappers[2].ensure_connection()
        assert isinstance(err.value.__cause__, PoolTimeout)
        assert "pool 'tiny': no connection available after 0.2" in str(err.value)
        assert "(MAX_CONNS=2)" in str(err.value)
    finally:
        for wrapper in wrappers:
            wrapper.close()


# ------------------------------------------------------ Django semantics


def test_atomic_commits_rolls_back_and_runs_on_commit() -> None:
    ran: list[str] = []
    with transaction.atomic():
        Item.objects.create(name="kept")
        transaction.on_commit(lambda: ran.append("committed"))
        assert ran == []
    assert ran == ["committed"]
    with pytest.raises(RuntimeError), transaction.atomic():
        Item.objects.create(name="rolled back")
        transaction.on_commit(lambda: ran.append("never"))
        raise RuntimeError
    assert ran == ["committed"]
    assert list(Item.objects.values_list("name", flat=True)) == ["kept"]


def test_savepoints_roll_back_only_the_inner_block() -> None:
    with transaction.atomic():
        Item.objects.create(name="outer")
        with pytest.raises(ValueError), transaction.atomic():
            Item.objects.create(name="inner")
            raise ValueError
        Item.objects.create(name="after")
    assert sorted(Item.objects.values_list("name", flat=True)) == ["after", "outer"]


def test_close_inside_atomic_hands_back_and_refuses_reuse() -> None:
    with pytest.raises(Exception, match="Cannot open a new connection in an atomic block"):
        with transaction.atomic():
            Item.objects.create(name="x")
            connection.close()
            assert in_use() == 0, "the connection went back (rolled back by the pool)"
            Item.objects.count()
    assert Item.objects.count() == 0


def test_server_side_cursors_iterate_in_chunks() -> None:
    Item.objects.bulk_create(Item(name=f"i{i}") for i in range(25))
    names = [item.name for item in Item.objects.order_by("id").iterator(chunk_size=4)]
    assert names == [f"i{i}" for i in range(25)]
    with transaction.atomic():
        assert sum(1 for _ in Item.objects.iterator(chunk_size=3)) == 25


def test_atomic_requests_roll_back_a_failed_view() -> None:
    connection.settings_dict["ATOMIC_REQUESTS"] = True
    try:
        client = Client(raise_request_exception=False)
        assert client.get("/create/").json() == {"in_atomic_block": True}
        assert client.get("/create/?fail=1").status_code == 500
    finally:
        connection.settings_dict["ATOMIC_REQUESTS"] = False
    assert Item.objects.count() == 1


def test_isolation_level_assume_role_and_time_zone_are_set_up(admin: Any) -> None:
    with admin.cursor() as cur:
        cur.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dgp_role') "
            "THEN CREATE ROLE dgp_role; END IF; END $$"
        )
    wrapper = make_wrapper(
        "custom",
        isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
        assume_role="dgp_role",
    )
    try:
        for _ in range(2):  # a fresh physical connection, then the same one reused
            wrapper.set_autocommit(False)  # isolation applies to transactions
            with wrapper.cursor() as cur:
                cur.execute(
                    "SELECT current_setting('transaction_isolation'), current_user, "
                    "current_setting('TimeZone')"
                )
                isolation, user, tz = cur.fetchone()
            wrapper.rollback()
            wrapper.set_autocommit(True)
            assert (isolation, user, tz) == ("serializable", "dgp_role", "UTC")
            assert wrapper.isolation_level == psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
            wrapper.close()
        assert get_pool("custom").get_stats()["connections_num"] == 1  # type: ignore[union-attr]
    finally:
        wrapper.close()


def test_json_fields_decode_as_with_the_stock_backend() -> None:
    with connection.cursor() as cur:
        cur.execute("""SELECT '{"a": [1, 2]}'::jsonb""")
        value = cur.fetchone()[0]
    # Django registers a dummy loads for jsonb on psycopg2: values arrive as text.
    assert value == '{"a": [1, 2]}'


# ------------------------------------------------------------- settings


def test_bad_options_fail_naming_alias_key_and_allowed() -> None:
    with pytest.raises(ImproperlyConfigured) as err:
        make_wrapper("misconfigured", MAX_CONNS=0)
    assert str(err.value) == (
        "DATABASES['misconfigured']: OPTIONS['MAX_CONNS'] must be an integer >= 1, got 0"
    )
    with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['pool'\] = True"):
        make_wrapper("misconfigured", pool=True)
    with pytest.raises(ImproperlyConfigured, match="did you mean MAX_CONNS"):
        make_wrapper("misconfigured", max_size=10)


def test_unknown_lower_case_keys_go_to_libpq() -> None:
    wrapper = make_wrapper("libpq", options="-c statement_timeout=1234")
    try:
        with wrapper.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "1234ms"
    finally:
        wrapper.close()


def test_one_pool_per_alias_that_follows_its_settings() -> None:
    backend_pid()
    connection.close()
    pool = get_pool("default")
    other = make_wrapper("default")  # same settings, another wrapper: same pool
    other.ensure_connection()
    assert get_pool("default") is pool
    other.close()
    changed = make_wrapper("default", MAX_CONNS=3)
    changed.ensure_connection()
    replaced = get_pool("default")
    assert replaced is not pool and replaced.max_conns == 3  # type: ignore[union-attr]
    assert pool.closed  # type: ignore[union-attr]
    changed.close()
    connection.ensure_connection()  # back to the suite's settings: a new pool again
    assert get_pool("default").max_conns == 4  # type: ignore[union-attr]
    assert set(all_stats()) >= {"default"}


def test_aliases_have_separate_pools() -> None:
    backend_pid(connections["other"])
    assert get_pool("other") is not get_pool("default")
    assert get_pool("other").max_conns == 2  # type: ignore[union-attr]


# ------------------------------------------------ greenlets and threads


def test_workers_share_the_pool_and_the_decorator_returns(workers: Workers) -> None:
    @close_connection
    def task(i: int) -> int:
        Item.objects.create(name=f"t{i}")
        return Item.objects.filter(name=f"t{i}").count()

    for i in range(40):
        workers.spawn(task, i)
    workers.join(60)
    assert workers.errors == []
    assert workers.results == [1] * 40
    wait_until(lambda: in_use() == 0, what="every worker to give its connection back")
    assert get_pool("default").get_stats()["connections_num"] <= 4  # type: ignore[union-attr]


# ------------------------------------------------------------ test runner


def test_manage_py_test_creates_clones_and_drops_the_test_database(tmp_path: Any) -> None:
    """Django's runner: nothing is "being accessed by other users" at clone or drop."""
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


def _server_backends(admin: Any, app_name: str = "dgp-django-tests") -> list[tuple[str, str]]:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT state, query FROM pg_stat_activity WHERE application_name = %s", [app_name]
        )
        return list(cur.fetchall())


@pytest.mark.gevent_only
def test_a_greenlet_that_ends_gives_its_connection_back() -> None:
    """No request_finished, no close_old_connections, no decorator."""
    import gevent

    def job(i: int) -> int:
        return Item.objects.filter(name=f"x{i}").count()

    jobs = [gevent.spawn(job, i) for i in range(30)]
    gevent.joinall(jobs, raise_error=True)
    wait_until(lambda: in_use() == 0, what="ended greenlets to give their connections back")
    stats = get_pool("default").get_stats()  # type: ignore[union-attr]
    assert stats["connections_num"] <= 4
    assert stats["returns_bad"] == 0


@pytest.mark.gevent_only
def test_a_greenlet_killed_mid_query_cancels_it_and_discards_the_connection(
    admin: Any,
) -> None:
    import gevent

    def slow() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(30)")

    job = gevent.spawn(slow)
    wait_until(
        lambda: any(
            state == "active" and "pg_sleep(30)" in q for state, q in _server_backends(admin)
        ),
        what="the query to run on the server",
    )
    bad_before = get_pool("default").get_stats()["returns_bad"]  # type: ignore[union-attr]
    job.kill()
    wait_until(lambda: in_use() == 0, what="the killed greenlet's connection to come back")
    wait_until(
        lambda: not any("pg_sleep(30)" in q and s == "active" for s, q in _server_backends(admin)),
        what="the server to stop the query",
        timeout=5,
    )
    assert get_pool("default").get_stats()["returns_bad"] == bad_before + 1  # type: ignore[union-attr]
    assert Item.objects.count() == 0, "the pool still lends working connections"


@pytest.mark.gevent_only
def test_after_thousands_of_kills_the_pool_still_serves_max_conns_at_once() -> None:
    import gevent
    from gevent.event import Event

    def borrow_and_query() -> None:
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.001)")

    for i in range(3000):
        job = gevent.spawn(borrow_and_query)
        gevent.sleep(0 if i % 2 else 0.0005)  # kill before, during and after the checkout
        job.kill()
    wait_until(lambda: in_use() == 0, what="every killed greenlet's connection")
    all_in = Event()
    holding: list[int] = []

    def hold() -> int:
        pid = backend_pid()
        holding.append(pid)
        if len(holding) == 4:
            all_in.set()
        all_in.wait(10)
        return pid

    holders = [gevent.spawn(hold) for _ in range(4)]
    gevent.joinall(holders, timeout=20, raise_error=True)
    assert all_in.is_set(), "four greenlets could not hold a connection each at once"
    assert len({h.value for h in holders}) == 4
    get_pool("default").check_invariants()  # type: ignore[union-attr]


def test_drain_pools_for_worker_exit() -> None:
    from django_gevent_pool.backends.base import drain_pools

    backend_pid()
    pool = get_pool("default")
    assert drain_pools(timeout=0.2) is False, "this greenlet still holds a connection"
    connection.close()
    assert pool is not None and pool.get_stats()["pool_size"] == 0
    assert get_pool("default") is None
    assert Item.objects.count() == 0, "the next use makes a new pool"
    assert get_pool("default") is not pool
    connection.close()
    assert drain_pools(timeout=5) is True


def test_reset_query_runs_django_session_setup_again(admin: Any) -> None:
    with admin.cursor() as cur:
        cur.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'dgp_role') "
            "THEN CREATE ROLE dgp_role; END IF; END $$"
        )
    wrapper = make_wrapper("resetting", assume_role="dgp_role", RESET_QUERY="DISCARD ALL")
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
