"""``manage.py pool_connections``: the server's view of the app's connections.

Pooled connections are really borrowed from an alias's pool (with a unique
application_name), one of them held in ``pg_sleep`` by a concurrent worker,
and the command's JSON and human output are checked against what the server
itself reports.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError
from django.db.utils import load_backend
from django.test import override_settings
from psycopg2.extensions import parse_dsn

from django_gevent_pool import hostbudget
from django_gevent_pool.backends.base import close_pools
from django_gevent_pool.devserver import django_settings
from django_gevent_pool.management.commands.pool_connections import APPLICATION_NAME
from django_gevent_pool.serverinfo import configured_databases, connection_params

from .proxy import Proxy
from .support import ENGINE, Workers, connect, server, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


def alias_settings(app_name: str, max_conns: int) -> dict[str, Any]:
    return {
        "ENGINE": ENGINE,
        **django_settings(server()["test"]),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": max_conns, "POOL_TIMEOUT": 5, "application_name": app_name},
    }


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("pool_connections", *args, stdout=out)
    return out.getvalue()


def server_limits(admin: Any) -> tuple[int, int]:
    """(max_connections, usable) as the server reports them."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', "
            "'superuser_reserved_connections', 'reserved_connections')"
        )
        values = dict(cur.fetchall())
    reserved = values["superuser_reserved_connections"] + values.get("reserved_connections", 0)
    return values["max_connections"], values["max_connections"] - reserved


def pids_of(admin: Any, app_name: str) -> set[int]:
    with admin.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app_name])
        return {int(row[0]) for row in cur.fetchall()}


def active_sleeps(admin: Any, app_name: str) -> int:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            [app_name],
        )
        return int(cur.fetchone()[0])


@contextmanager
def pooled_alias(
    django_db_blocker: Any, app_name: str, *, max_conns: int, held: int, sleeping: bool
) -> Iterator[Any]:
    """DATABASES = {default, counted}; ``held`` connections borrowed from 'counted's pool.

    With ``sleeping``, one more is borrowed by a concurrent worker and kept
    busy in ``pg_sleep`` until the block ends (then cancelled on the server).
    """
    databases = {
        "default": alias_settings("dgp-command-default", 2),
        "counted": alias_settings(app_name, max_conns),
    }
    workers = Workers()
    with override_settings(DATABASES=databases), django_db_blocker.unblock():
        settings_dict = configured_databases()["counted"]
        backend = load_backend(ENGINE)
        wrappers = [backend.DatabaseWrapper(settings_dict, "counted") for _ in range(held)]
        admin = psycopg2.connect(server()["test"])
        admin.autocommit = True

        def sleep_on_the_server() -> str:
            wrapper = backend.DatabaseWrapper(settings_dict, "counted")
            try:
                with wrapper.cursor() as cur:
                    cur.execute("SELECT pg_sleep(30)")
            except DatabaseError:
                return "cancelled"
            finally:
                wrapper.close()
            return "slept"

        try:
            for wrapper in wrappers:
                wrapper.ensure_connection()
            if sleeping:
                workers.spawn(sleep_on_the_server)
                wait_until(lambda: active_sleeps(admin, app_name) == 1, what="the query to run")
            yield admin
        finally:
            with admin.cursor() as cur:
                cur.execute(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND state = 'active'",
                    [app_name],
                )
            workers.join(30)
            for wrapper in wrappers:
                wrapper.close()
            close_pools("counted")
            admin.close()
    assert workers.errors == []
    if sleeping:
        assert workers.results == ["cancelled"]


def test_json_counts_the_pooled_connections_by_state(django_db_blocker: Any, app_name: str) -> None:
    with pooled_alias(django_db_blocker, app_name, max_conns=6, held=3, sleeping=True) as admin:
        report = json.loads(run("--database", "counted", "--json", "--workers", "3"))
        expected_pids = pids_of(admin, app_name)
        with admin.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            admin_pid = int(cur.fetchone()[0])
        max_connections, usable = server_limits(admin)

    alias = report["aliases"]["counted"]
    assert alias["application_name"] == app_name
    assert alias["connections"] == 4
    assert alias["by_state"] == {"active": 1, "idle": 3}
    assert (alias["max_conns"], alias["workers"], alias["expected_max_per_host"]) == (6, 3, 18)
    assert sum(c["connections"] for c in alias["by_client"].values()) == 4
    assert not any(c["over"] for c in alias["by_client"].values())

    (srv,) = report["servers"]
    assert srv["aliases"] == ["counted"]
    assert (srv["max_connections"], srv["usable_connections"]) == (max_connections, usable)
    assert srv["this_app"] == 4
    assert srv["in_use"] == srv["this_app"] + srv["other_clients"]
    ours = [g for g in srv["groups"] if g["alias"] == "counted"]
    assert {g["state"]: g["count"] for g in ours} == {"active": 1, "idle": 3}
    assert {pid for g in ours for pid in g["pids"]} == expected_pids
    assert all(g["oldest_backend_start"] and g["longest_in_state_seconds"] >= 0 for g in ours)

    # Its own connection is left out; other clients (this test's admin) are shown.
    (own,) = srv["excluded_pids"]
    every_pid = [pid for g in srv["groups"] for pid in g["pids"]]
    assert own not in every_pid
    assert not any(g["application_name"] == APPLICATION_NAME and own in g["pids"] for g in ours)
    assert admin_pid in every_pid
    admin_group = next(g for g in srv["groups"] if admin_pid in g["pids"])
    assert admin_group["this_app"] is False
    assert srv["other_clients"] >= 1
    assert report["verdict"] == srv["verdict"]
    assert report["unreachable"] == {}


def test_human_output_ends_with_the_verdict(django_db_blocker: Any, app_name: str) -> None:
    with pooled_alias(django_db_blocker, app_name, max_conns=6, held=2, sleeping=False) as admin:
        text = run("--database", "counted", "--workers", "3")
        no_workers = run("--database", "counted")
        _, usable = server_limits(admin)
    last = text.rstrip("\n").splitlines()[-1]
    assert re.fullmatch(
        rf"server: \d+ of {usable} usable connections in use; "
        r"this app: 2 \(cap 6 per process x 3 workers = 18\)(; the server is nearly full)?",
        last,
    ), last
    assert "this command's own connection, pid " in text
    assert app_name in text
    assert (
        no_workers.rstrip("\n")
        .splitlines()[-1]
        .endswith("this app: 2 (cap 6 per process; --workers N gives the expected total)")
    )


def test_more_than_the_cap_from_one_host_is_flagged(django_db_blocker: Any, app_name: str) -> None:
    """Another process with the same database, user and application_name counts too."""
    with pooled_alias(django_db_blocker, app_name, max_conns=2, held=2, sleeping=False):
        other_process = connect(server()["test"], application_name=app_name)
        try:
            report = json.loads(run("--database", "counted", "--json", "--workers", "1"))
        finally:
            other_process.close()
    alias = report["aliases"]["counted"]
    assert alias["connections"] == 3
    assert [c["over"] for c in alias["by_client"].values()] == [True]
    assert "OVER THE CAP: counted from " in report["verdict"]
    assert ": 3 > 2 (more processes than --workers" in report["verdict"]


BUDGETS_HEADER = "  host budgets (HOST_MAX_CONNS), as the lock files on this host show them:"


@pytest.fixture
def fresh_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's host budgets start afresh (a budget made by another test stays there)."""
    if not hostbudget.OFD_LOCKS:
        pytest.skip("a second holder in this process needs open-file-description locks")
    monkeypatch.setattr(hostbudget, "_BUDGETS", {})


def test_the_host_budget_and_its_use_on_this_host(
    django_db_blocker: Any, app_name: str, fresh_budgets: None, tmp_path: Path
) -> None:
    """2 slots held by this process's pool, 1 by another holder of the host: 3/3 in use."""
    budgeted = alias_settings(app_name, 2)
    budgeted["OPTIONS"].update(HOST_MAX_CONNS=3, HOST_LOCK_DIR=str(tmp_path))
    databases = {"default": alias_settings("dgp-command-default", 2), "budgeted": budgeted}
    with override_settings(DATABASES=databases), django_db_blocker.unblock():
        settings_dict = configured_databases()["budgeted"]
        backend = load_backend(ENGINE)
        wrappers = [backend.DatabaseWrapper(settings_dict, "budgeted") for _ in range(2)]
        try:
            for wrapper in wrappers:
                wrapper.ensure_connection()
            (budget,) = hostbudget._BUDGETS.values()
            # Its own open file description: its slot is another process's to us.
            other = hostbudget.HostBudget(budget.key, budget.size, budget.directory)
            assert other.take() is not None
            report = json.loads(run("--database", "budgeted", "--json", "--workers", "4"))
            text = run("--database", "budgeted", "--workers", "4")
        finally:
            for wrapper in wrappers:
                wrapper.close()
            close_pools("budgeted")

    info = report["host_budgets"]["budgeted"]
    assert info == {
        "key": budget.key,
        "host_max_conns": 3,
        "lock_file": budget.path,
        "in_use": 3,
        "held_by_this_process": 2,
        "error": None,
    }
    alias = report["aliases"]["budgeted"]
    assert (alias["max_conns"], alias["host_max_conns"]) == (2, 3)
    assert alias["expected_max_per_host"] == 3, "min(4 workers x 2, the budget of 3)"
    assert alias["host_budget"] == info
    assert alias["connections"] == 2
    assert (
        "this app: 2 (cap 2 per process x 4 workers = 8, host budget 3, 3/3 in use on this host)"
    ) in report["verdict"]
    lines = text.splitlines()
    header = lines.index(BUDGETS_HEADER)
    assert lines[header + 1].split() == [
        "ALIAS",
        "HOST_MAX_CONNS",
        "IN",
        "USE",
        "ON",
        "THIS",
        "HOST",
        "HELD",
        "BY",
        "THIS",
        "PROCESS",
    ]
    assert lines[header + 2].split() == ["budgeted", "3", "3/3", "2", "FULL"]
    assert any("min(4 x 2, host budget 3) = 3" in line for line in lines)


def test_a_host_budget_that_disagrees_with_the_hosts_is_reported_not_fatal(
    app_name: str, fresh_budgets: None, tmp_path: Path
) -> None:
    budgeted = alias_settings(app_name, 2)
    budgeted["OPTIONS"].update(HOST_MAX_CONNS=3, HOST_LOCK_DIR=str(tmp_path))
    databases = {"default": alias_settings("dgp-command-default", 2), "budgeted": budgeted}
    with override_settings(DATABASES=databases):
        params = connection_params(
            "budgeted", configured_databases()["budgeted"], application_name=APPLICATION_NAME
        )
        key = hostbudget.budget_key(
            params.get("host"), params.get("port"), params.get("dbname"), params.get("user")
        )
        # Another process of the host shares the budget with HOST_MAX_CONNS = 5.
        other = hostbudget.HostBudget(key, 5, str(tmp_path))
        # It holds slot 3, beyond this alias's budget of 3: counted all the same.
        assert sorted(other.take() or 0 for _ in range(5)) == [0, 1, 2, 3, 4]
        for slot in (0, 1, 2, 4):
            other.give(slot)
        report = json.loads(run("--database", "budgeted", "--json"))
        text = run("--database", "budgeted")
    info = report["host_budgets"]["budgeted"]
    # Only looked at: the command did not join the budget, so it was not refused.
    assert info["in_use"] == 1 and info["held_by_this_process"] == 0
    assert info["error"] == ("the processes using this budget configured HOST_MAX_CONNS = 5, not 3")
    assert report["unreachable"] == {}, "the server was still looked at"
    lines = text.splitlines()
    header = lines.index(BUDGETS_HEADER)
    row = lines[header + 2]
    assert row.split()[:5] == ["budgeted", "3", "1/3", "0", "MISMATCH:"]
    # And a process that joins with 5 now is not refused because of the command.
    assert hostbudget.HostBudget(key, 5, str(tmp_path)).take() is not None


def test_a_host_budget_nobody_used_yet_reads_as_empty(
    app_name: str, fresh_budgets: None, tmp_path: Path
) -> None:
    budgeted = alias_settings(app_name, 2)
    budgeted["OPTIONS"].update(HOST_MAX_CONNS=3, HOST_LOCK_DIR=str(tmp_path / "none"))
    databases = {"default": alias_settings("dgp-command-default", 2), "budgeted": budgeted}
    with override_settings(DATABASES=databases):
        report = json.loads(run("--database", "budgeted", "--json"))
    info = report["host_budgets"]["budgeted"]
    assert (info["in_use"], info["held_by_this_process"], info["error"]) == (0, 0, None)
    assert not (tmp_path / "none").exists(), "looking created nothing"


def test_only_pooled_aliases_are_accepted() -> None:
    databases = {
        "default": alias_settings("dgp-command-default", 2),
        "stock": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    }
    with override_settings(DATABASES=databases):
        with pytest.raises(CommandError, match=r"DATABASES\['stock'\] does not use"):
            run("--database", "stock")
        with pytest.raises(CommandError, match="DATABASES has no alias 'nope'"):
            run("--database", "nope")
        with pytest.raises(CommandError, match="--workers must be at least 1"):
            run("--workers", "0")


def test_an_unreachable_alias_exits_non_zero_naming_it(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    (tmp_path / "dead_settings.py").write_text(
        textwrap.dedent(
            f"""
            from tests.settings import *  # noqa: F403

            DATABASES = {{
                **DATABASES,
                "dead": {{**DATABASES["default"], "HOST": "127.0.0.1", "PORT": "{port}"}},
            }}
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "dead_settings",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
    }
    for extra in ([], ["--json"]):
        out = subprocess.run(
            [sys.executable, "-m", "django", "pool_connections", "--database", "dead", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert out.returncode != 0, out.stdout
        assert "cannot reach the database of DATABASES['dead']" in out.stderr
        assert f"127.0.0.1:{port}" in out.stderr
        assert "Traceback" not in out.stderr
        if extra:
            assert list(json.loads(out.stdout)["unreachable"]) == ["dead"]


def test_aliases_reaching_one_server_at_two_addresses_share_one_view(app_name: str) -> None:
    """Directly and through a loopback proxy: one server, one verdict, both looks excluded."""
    if (parse_dsn(server()["test"]).get("host") or "/").startswith("/"):
        pytest.skip("the test server is reached over a Unix socket")
    with Proxy(server()["test"]) as proxy:
        databases = {
            "default": alias_settings("dgp-command-default", 2),
            "direct": alias_settings(app_name, 3),
            "proxied": {
                **alias_settings(f"{app_name}-p", 5),
                "HOST": "127.0.0.1",
                "PORT": str(proxy.port),
            },
        }
        with override_settings(DATABASES=databases):
            report = json.loads(run("--database", "direct", "--database", "proxied", "--json"))
            text = run("--database", "direct", "--database", "proxied", "--workers", "2")
    (srv,) = report["servers"]
    assert srv["aliases"] == ["direct", "proxied"]
    assert srv["server"].endswith(f"(also reached at 127.0.0.1:{proxy.port})")
    assert len(set(srv["excluded_pids"])) == 2
    every_pid = {pid for g in srv["groups"] for pid in g["pids"]}
    assert not every_pid & set(srv["excluded_pids"])
    assert "\n" not in report["verdict"]
    assert (
        text.rstrip("\n")
        .splitlines()[-1]
        .endswith(
            "this app: 0 (direct: 0, cap 3 per process x 2 workers = 6; "
            "proxied: 0, cap 5 per process x 2 workers = 10)"
        )
    )
