"""``django_gevent_pool.backends.mysql``: Django's MySQL backend on PyMySQL, pooled.

Each test runs Django in a child process of its own (``settings.configure``
with one MySQL alias; the suite's own Django is configured for PostgreSQL),
greenlets under gevent's monkey-patching or OS threads without it, against
the real server as a user of the test's own, whose sessions the parent
counts in ``information_schema.PROCESSLIST`` while the child runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from .mysql_support import admin, one, only_in_mysql_runs, params, root_params, sessions
from .support import sleep

__all__ = ["admin", "params", "root_params"]  # fixtures

pytest.importorskip("pymysql")
only_in_mysql_runs()

PRELUDE = textwrap.dedent(
    """
    import json, sys
    mode, params = sys.argv[1], json.loads(sys.argv[2])
    if mode == "gevent":
        from gevent import monkey
        monkey.patch_all()
    import threading
    from django.conf import settings
    options = {"MAX_CONNS": 4, "POOL_TIMEOUT": 10, **json.loads(sys.argv[3])}
    settings.configure(
        DATABASES={"default": {
            "ENGINE": "django_gevent_pool.backends.mysql",
            "NAME": params["database"], "USER": params["user"], "PASSWORD": params["password"],
            "HOST": params["host"], "PORT": str(params["port"]), "OPTIONS": options,
        }},
        INSTALLED_APPS=["django_gevent_pool"],
        USE_TZ=True,
    )
    import django
    django.setup()
    from django.db import connection, connections, transaction
    from django_gevent_pool.backends.base import get_pool

    def spawn_all(func, n):
        if mode == "gevent":
            import gevent
            gevent.joinall([gevent.spawn(func, i) for i in range(n)], raise_error=True)
        else:
            threads = [threading.Thread(target=func, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    """
)

SERVE = PRELUDE + textwrap.dedent(
    """
    from django_gevent_pool.backends.mysql.base import _stock as stock
    reads = []
    real = stock.DatabaseWrapper.mysql_server_data.func
    stock.DatabaseWrapper.mysql_server_data.func = lambda self: reads.append(1) or real(self)

    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS dgp_visits (n INT) ENGINE=InnoDB")
        cur.execute("DELETE FROM dgp_visits")
    connection.close()
    seen = []

    def visit(i):
        with connection.cursor() as cur:
            cur.execute("SELECT SLEEP(0.02)")
            cur.execute("SELECT CONNECTION_ID(), @@SESSION.sql_auto_is_null")
            seen.append(cur.fetchone())
        assert connection.mysql_is_mariadb in (True, False)  # a server fact, per wrapper
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute("INSERT INTO dgp_visits VALUES (%s)", [i])
        if mode != "gevent" or i % 2:
            connection.close()  # the others end holding it: the greenlet-end return

    spawn_all(visit, 40)
    if mode == "gevent":
        import gevent
        gevent.sleep(0.2)  # the greenlet-end returns run in greenlets of their own
    with connection.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM dgp_visits")
        rows = cur.fetchone()[0]
    connection.close()
    stats = get_pool().get_stats()
    print(json.dumps({
        "sessions": sorted({s[0] for s in seen}), "auto_is_null": sorted({s[1] for s in seen}),
        "rows": rows, "in_use": stats["pool_in_use"], "opened": stats["connections_num"],
        "server_data_reads": len(reads),
        "driver": type(connections["default"].Database).__name__,
    }))
    """
)


def run_child(
    script: str, mode: str, params: dict[str, Any], options: Any = None, extra: Any = None
) -> Any:
    """``script`` in a child: ``sys.argv[1:]`` are the mode, then JSON of the rest."""
    args = [mode, json.dumps(params), json.dumps(options or {}), json.dumps(extra)]
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(child: Any, timeout: float = 60) -> dict[str, Any]:
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def result_and_peak(child: Any, admin: Any, user: str) -> tuple[dict[str, Any], int]:
    """The child's result, and the most sessions of ``user`` the server had while it ran."""
    peak = 0
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        peak = max(peak, len(sessions(admin, user)))
        sleep(0.005)
    return result(child), peak


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_40_requests_share_4_connections_with_one_server_look_per_pool(
    admin: Any, params: dict[str, Any], mode: str
) -> None:
    got, peak = result_and_peak(run_child(SERVE, mode, params), admin, params["user"])
    assert got["rows"] == 40
    assert 1 <= peak <= 4, f"the server saw {peak} sessions of the app (MAX_CONNS=4)"
    assert len(got["sessions"]) <= 4 and got["opened"] <= 4
    assert got["in_use"] == 0  # closed or ended greenlets: every connection came back
    assert got["auto_is_null"] == [0]  # Django's session setup ran on each connection
    # Django's server look (version, sql_mode...) once for the pool, not per request.
    assert got["server_data_reads"] == 1


TEST_DB = PRELUDE + textwrap.dedent(
    """
    from django.test.utils import setup_databases, teardown_databases
    old = setup_databases(verbosity=0, interactive=False)
    name = connection.settings_dict["NAME"]

    def visit(i):
        with connection.cursor() as cur:
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone()[0] == name
        connection.close()

    spawn_all(visit, 10)
    teardown_databases(old, verbosity=0)
    print(json.dumps({"test_db": name}))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_the_test_runner_creates_and_drops_its_database_through_the_pool(
    admin: Any, params: dict[str, Any], mode: str
) -> None:
    got = result(run_child(TEST_DB, mode, params))
    assert got["test_db"] == "test_test"
    assert (
        one(
            admin,
            "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
            [got["test_db"]],
        )
        == 0
    )
    assert not sessions(admin, params["user"])


MISCONFIGURED = PRELUDE + textwrap.dedent(
    """
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import call_command
    try:
        connection.ensure_connection()
    except ImproperlyConfigured as exc:
        print(json.dumps({"error": str(exc)}))
    else:
        print(json.dumps({"error": None}))
    """
)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            {"POOL_MODE": "statement"},
            ["DATABASES['default']", "POOL_MODE", "'session'", "'transaction'"],
        ),
        ({"isolation_level": "chaos"}, ["DATABASES['default']", "isolation_level", "'chaos'"]),
        ({"MAX_CONNS": 0}, ["DATABASES['default']", "MAX_CONNS"]),
    ],
)
def test_misconfiguration_fails_at_connect_naming_alias_and_key(
    params: dict[str, Any], options: dict[str, Any], words: list[str]
) -> None:
    got = result(run_child(MISCONFIGURED, "threads", params, options))
    assert got["error"] is not None
    for word in words:
        assert word in got["error"], got["error"]


STOCK_CHECK = textwrap.dedent(
    """
    import json, sys
    from gevent import monkey
    monkey.patch_all()
    from django.conf import settings
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.mysql", "NAME": "test"}},
        INSTALLED_APPS=["django_gevent_pool"],
    )
    import django
    django.setup()
    from django.core import checks
    print(json.dumps([m.id for m in checks.run_checks(tags=["django_gevent_pool"])]))
    """
)


def test_the_system_check_says_mysqlclient_blocks_the_hub() -> None:
    out = subprocess.run(
        [sys.executable, "-c", STOCK_CHECK], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "django_gevent_pool.W010" in json.loads(out.stdout.strip().splitlines()[-1])


CHECKS = textwrap.dedent(
    """
    import json, sys
    params, aliases = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    from django.conf import settings
    def alias(port, options):
        return {
            "ENGINE": "django_gevent_pool.backends.mysql", "NAME": params["database"],
            "USER": params["user"], "PASSWORD": params["password"], "HOST": params["host"],
            "PORT": str(port), "OPTIONS": options,
        }
    settings.configure(
        DATABASES={name: alias(port, options) for name, (port, options) in aliases.items()},
        INSTALLED_APPS=["django_gevent_pool"],
    )
    import django
    django.setup()
    from django.core import checks
    found = checks.run_checks(tags=["django_gevent_pool"], databases=list(aliases))
    print(json.dumps([[m.id, m.msg, m.hint or ""] for m in found]))
    """
)


def run_checks(params: dict[str, Any], aliases: dict[str, Any]) -> list[list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", CHECKS, json.dumps(params), json.dumps(aliases)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    found: list[list[str]] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_the_server_checks_compare_with_the_mysql_servers_max_connections(
    admin: Any, params: dict[str, Any]
) -> None:
    limit = int(one(admin, "SELECT @@max_connections"))
    port = params["port"]
    over = run_checks(params, {"default": [port, {"MAX_CONNS": limit + 1}]})
    assert [m[0] for m in over] == ["django_gevent_pool.E005"], over
    assert f"the {limit} connections the server at" in over[0][1]
    assert "ProxySQL" in over[0][2] and "PgBouncer" not in over[0][2]
    half = run_checks(params, {"default": [port, {"MAX_CONNS": limit // 2 + 1}]})
    assert [m[0] for m in half] == ["django_gevent_pool.W005"], half
    fine = run_checks(params, {"default": [port, {"MAX_CONNS": 10}]})
    assert fine == []
    budget = run_checks(params, {"default": [port, {"HOST_MAX_CONNS": limit + 1}]})
    assert [m[0] for m in budget] == ["django_gevent_pool.E008"], budget
    # Two aliases on one server add up: each alone fits, together they do not.
    both = run_checks(
        params,
        {
            "default": [port, {"MAX_CONNS": limit // 2}],
            "other": [port, {"MAX_CONNS": limit // 2 + 2}],
        },
    )
    assert [m[0] for m in both] == ["django_gevent_pool.E005"], both
    nobody = run_checks(params, {"default": [1, {"MAX_CONNS": 10}]})
    assert [m[0] for m in nobody] == ["django_gevent_pool.I006"], nobody


TIMEOUT = PRELUDE + textwrap.dedent(
    """
    import django.db
    from django_gevent_pool import PoolTimeout
    # Nothing imports PyMySQL or the driver before Django loads the engine, as in an app.

    held = threading.Event()
    release = threading.Event()

    def hold(i):
        if i == 0:
            connection.ensure_connection()
            held.set()
            release.wait(10) if mode == "threads" else __import__("gevent").sleep(1.0)
            connection.close()
            return
        held.wait(10)
        try:
            connection.ensure_connection()
            outcome["error"] = None
        except Exception as exc:
            outcome["error"] = type(exc).__module__ + "." + type(exc).__name__
            outcome["cause"] = type(exc.__cause__).__name__
            outcome["pool_timeout"] = isinstance(exc.__cause__, PoolTimeout)
        finally:
            release.set()
            connection.close()

    outcome = {}
    spawn_all(hold, 2)
    import pymysql
    from django_gevent_pool.backends.mysql.base import _stock
    from django_gevent_pool.drivers.pymysql import DRIVER
    outcome["driver_error_is_pymysqls"] = DRIVER.Error is pymysql.Error
    outcome["timeout_is_databases"] = issubclass(
        DRIVER.errors.PoolTimeout, _stock.Database.OperationalError
    )
    print(json.dumps(outcome))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_a_checkout_timeout_is_djangos_operational_error_through_the_engine(
    params: dict[str, Any], mode: str
) -> None:
    """With PyMySQL as MySQLdb, Django loads a second copy of ``pymysql.err``: the pool
    must use the classes PyMySQL raises and Django wraps, not the copy's."""
    got = result(run_child(TIMEOUT, mode, params, {"MAX_CONNS": 1, "POOL_TIMEOUT": 0.3}))
    assert got["driver_error_is_pymysqls"] and got["timeout_is_databases"], got
    assert got["error"] == "django.db.utils.OperationalError", got
    assert got["cause"] == "PoolTimeout" and got["pool_timeout"], got


KEPT_CURSOR = PRELUDE + textwrap.dedent(
    """
    from django.db import ProgrammingError, InterfaceError
    cursor = connection.cursor()
    cursor.execute("SELECT CONNECTION_ID()")
    first = cursor.fetchone()[0]
    connection.close()  # back to the pool; the cursor is kept
    # Someone else borrows the same connection.
    with connection.cursor() as other:
        other.execute("SET @owner = 'the next borrower'")
        other.execute("SELECT CONNECTION_ID()")
        second = other.fetchone()[0]
        try:
            cursor.execute("SELECT @owner")
            leaked = cursor.fetchone()[0]
        except (ProgrammingError, InterfaceError) as exc:
            leaked = None
            error = type(exc).__name__ + ": " + str(exc)
    connection.close()
    print(json.dumps({"same": first == second, "leaked": leaked, "error": error}))
    """
)


def test_a_cursor_kept_past_the_return_fails_instead_of_reaching_the_next_borrower(
    params: dict[str, Any],
) -> None:
    got = result(run_child(KEPT_CURSOR, "gevent", params, {"MAX_CONNS": 1}))
    assert got["same"], "the next borrower got the same connection"
    assert got["leaked"] is None, got
    assert "closed" in got["error"].lower(), got


COMMAND = PRELUDE + textwrap.dedent(
    """
    import io
    from django.core.management import call_command
    holding, release = threading.Event(), threading.Event()
    held = []

    def hold(i):
        connection.ensure_connection()
        held.append(i)
        if len(held) == 3:
            holding.set()
        if mode == "gevent":
            import gevent
            while not release.is_set():
                gevent.sleep(0.01)
        else:
            release.wait(10)
        connection.close()

    def look(i):
        if i < 3:
            return hold(i)
        holding.wait(10)
        out = io.StringIO()
        call_command("pool_connections", "--json", "--workers", "2", stdout=out)
        report["json"] = json.loads(out.getvalue())
        out = io.StringIO()
        call_command("pool_connections", stdout=out)
        report["text"] = out.getvalue()
        release.set()

    report = {}
    spawn_all(look, 4)
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_pool_connections_reads_the_mysql_servers_processlist(
    admin: Any, params: dict[str, Any], mode: str
) -> None:
    got = result(run_child(COMMAND, mode, params, {"MAX_CONNS": 4}))
    report, text = got["json"], got["text"]
    alias = report["aliases"]["default"]
    assert alias["connections"] == 3 and alias["user"] == params["user"], alias
    assert alias["expected_max_per_host"] == 8  # 2 workers x MAX_CONNS 4
    (server,) = report["servers"]
    assert server["kind"] == "mysql"
    assert server["max_connections"] == int(one(admin, "SELECT @@max_connections"))
    assert server["this_app"] == 3
    # The command's own session is left out of every count.
    assert not set(server["excluded_pids"]) & {
        pid for group in server["groups"] if group["this_app"] for pid in group["pids"]
    }
    assert "as information_schema.PROCESSLIST shows it" in text
