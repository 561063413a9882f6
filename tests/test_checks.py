"""System checks: each id fires on a real misconfiguration and is silent on a good one.

Settings checks need no server. The database-tagged checks (W004, E005, W005,
E008, W008, I006) talk to the test server through their own short connections; the
condition behind W002 is made real in a fresh monkey-patched subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import django
import psycopg2
import pytest
from django.core.checks import INFO, CheckMessage, run_checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db.utils import load_backend
from django.test import override_settings

from django_gevent_pool import ConnectionPool, checks
from django_gevent_pool.backends.base import close_pools, get_pool
from django_gevent_pool.devserver import django_settings
from django_gevent_pool.serverinfo import configured_databases

from .proxy import Proxy
from .support import ENGINE, is_gevent, server, wait_until

pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")


@pytest.fixture(autouse=True)
def _cooperative() -> None:
    """In gevent mode, psycopg2 is cooperative here as soon as any pool exists; make it so.

    Otherwise W002 would fire in this process depending on which test ran first.
    """
    if is_gevent():
        from django_gevent_pool.drivers.psycopg2_waiting import ensure_cooperative

        ensure_cooperative()


def alias_settings(**overrides: Any) -> dict[str, Any]:
    """A pooled alias on the test database; ``OPTIONS`` in ``overrides`` replaces the default."""
    return {
        "ENGINE": ENGINE,
        **django_settings(server()["test"]),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": 2},
        **overrides,
    }


def our_issues(
    databases: dict[str, dict[str, Any]], *, check_databases: Sequence[str] | None = None
) -> list[CheckMessage]:
    """Run this package's checks with DATABASES replaced; keep their messages.

    Only our tag: Django's own database check looks aliases up in
    ``django.db.connections``, whose settings ``override_settings`` cannot change.
    """
    with override_settings(DATABASES=databases):
        messages = run_checks(tags=[checks.TAG], databases=check_databases)
    return [m for m in messages if (m.id or "").startswith("django_gevent_pool.")]


def ids(messages: Sequence[CheckMessage]) -> list[str]:
    return sorted(m.id or "" for m in messages)


def usable_connections() -> int:
    """The server's max_connections minus the reserved slots, read independently."""
    conn = psycopg2.connect(server()["test"])
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', "
                "'superuser_reserved_connections', 'reserved_connections')"
            )
            values = dict(cur.fetchall())
    finally:
        conn.close()
    return int(
        values["max_connections"]
        - values["superuser_reserved_connections"]
        - values.get("reserved_connections", 0)
    )


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


# ------------------------------------------------------------ registration


def test_register_is_idempotent_and_the_app_registers_the_checks() -> None:
    from django.apps import apps
    from django.core.checks.registry import registry

    from django_gevent_pool.apps import DjangoGeventPoolConfig

    assert isinstance(apps.get_app_config("django_gevent_pool"), DjangoGeventPoolConfig)
    before = set(registry.registered_checks)
    checks.register()
    checks.register()
    assert set(registry.registered_checks) == before, "ready() registered them already"
    ours = {
        checks.check_pool_settings,
        checks.check_psycopg2_cooperative,
        checks.check_app_settings,
        checks.check_servers,
    }
    assert ours <= before
    assert "database" in checks.check_servers.tags  # type: ignore[attr-defined]
    assert "database" not in checks.check_pool_settings.tags  # type: ignore[attr-defined]


def test_w007_the_observability_setting_without_the_app_is_reported() -> None:
    from django.test import modify_settings

    setting = {"STATS_LOG_INTERVAL": None}
    with override_settings(DJANGO_GEVENT_POOL=setting):
        assert "django_gevent_pool.W007" not in ids(run_checks(tags=[checks.TAG]))
        with modify_settings(INSTALLED_APPS={"remove": ["django_gevent_pool"]}):
            messages = run_checks(tags=[checks.TAG])
    [w007] = [m for m in messages if m.id == "django_gevent_pool.W007"]
    assert "DJANGO_GEVENT_POOL is set but ignored" in w007.msg
    assert "INSTALLED_APPS" in (w007.hint or "")
    with modify_settings(INSTALLED_APPS={"remove": ["django_gevent_pool"]}):
        assert "django_gevent_pool.W007" not in ids(run_checks(tags=[checks.TAG]))


def test_a_good_configuration_is_silent() -> None:
    databases = {
        "default": alias_settings(),
        "tuned": alias_settings(
            ATOMIC_REQUESTS=True,
            OPTIONS={
                "MAX_CONNS": 10,
                "REUSE_CONNS": 5,
                "MIN_CONNS": 1,
                "PING_AFTER": 600,  # >= IDLE_TIMEOUT is fine with MIN_CONNS > 0
                "IDLE_TIMEOUT": 300,
                "MAX_LIFETIME": 100,  # shorter than IDLE_TIMEOUT: fine
                "LEAK_TIMEOUT": 60,  # longer than POOL_TIMEOUT: fine
                "POOL_TIMEOUT": 5,
                "RESET_QUERY": "DISCARD ALL",  # fine on a plain server
                "pool": False,
                "application_name": "dgp-good",
            },
        ),
        "stock": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "CONN_MAX_AGE": 60},
    }
    assert our_issues(databases) == []
    assert our_issues(databases, check_databases=["default", "tuned", "stock"]) == []
    with override_settings(DATABASES=databases):
        assert run_checks() == [], "every registered check, Django's too"
        call_command("check", tags=[checks.TAG], databases=["tuned"], fail_level="INFO")


# ---------------------------------------------------------------- settings


def test_e001_invalid_options_become_a_check_error() -> None:
    issues = our_issues(
        {
            "default": alias_settings(),
            "zero": alias_settings(OPTIONS={"MAX_CONNS": 0}),
            "native": alias_settings(OPTIONS={"pool": True}),
            "foreign": alias_settings(OPTIONS={"max_size": 10}),
            "isolation": alias_settings(OPTIONS={"isolation_level": -1}),
        }
    )
    assert ids(issues) == ["django_gevent_pool.E001"] * 4
    assert (
        "DATABASES['isolation']['OPTIONS']['isolation_level']: Invalid transaction isolation "
        "level -1 specified. Use one of the psycopg.IsolationLevel values."
    ) in {m.msg for m in issues}
    messages = {m.msg for m in issues}
    assert "DATABASES['zero']: OPTIONS['MAX_CONNS'] must be an integer >= 1, got 0" in messages
    assert any(m.startswith("DATABASES['native']: OPTIONS['pool'] = True") for m in messages)
    assert any("DATABASES['foreign']" in m and "did you mean MAX_CONNS" in m for m in messages)
    assert all(m.hint and "OPTIONS" in m.hint for m in issues)
    with override_settings(DATABASES={"default": alias_settings(OPTIONS={"MAX_CONNS": 0})}):
        with pytest.raises(SystemCheckError, match=r"django_gevent_pool\.E001"):
            call_command("check")


def test_e001_hint_names_the_host_budget_options() -> None:
    issues = our_issues(
        {
            "default": alias_settings(),
            "budget": alias_settings(OPTIONS={"HOST_MAX_CONNS": 0}),
            "lockdir": alias_settings(OPTIONS={"HOST_MAX_CONNS": 4, "HOST_LOCK_DIR": "locks"}),
        }
    )
    assert ids(issues) == ["django_gevent_pool.E001"] * 2
    messages = {m.msg for m in issues}
    assert any("DATABASES['budget']" in m and "HOST_MAX_CONNS" in m for m in messages)
    assert any("DATABASES['lockdir']" in m and "HOST_LOCK_DIR" in m for m in messages)
    for issue in issues:
        assert "HOST_MAX_CONNS, HOST_LOCK_DIR" in (issue.hint or "")


def test_e009_aliases_sharing_a_host_budget_must_agree_on_it() -> None:
    issues = our_issues(
        {
            "default": alias_settings(OPTIONS={"HOST_MAX_CONNS": 4}),
            "replica": alias_settings(OPTIONS={"HOST_MAX_CONNS": 6}),
            "agrees": alias_settings(OPTIONS={"HOST_MAX_CONNS": 4}),
        }
    )
    assert ids(issues) == ["django_gevent_pool.E009"]
    (issue,) = issues
    assert "DATABASES['default']: HOST_MAX_CONNS = 4" in issue.msg
    assert "DATABASES['replica']: HOST_MAX_CONNS = 6" in issue.msg
    assert "the second to connect fails with ImproperlyConfigured" in issue.msg
    # Aliases that agree, or that are on budgets of their own, are silent.
    assert (
        our_issues(
            {
                "default": alias_settings(OPTIONS={"HOST_MAX_CONNS": 4}),
                "agrees": alias_settings(OPTIONS={"HOST_MAX_CONNS": 4}),
                "other_user": alias_settings(USER="nobody", OPTIONS={"HOST_MAX_CONNS": 9}),
            }
        )
        == []
    )


def test_e001_manage_py_check_reports_instead_of_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "e001_settings.py").write_text(
        textwrap.dedent(
            """
            from tests.settings import *  # noqa: F403

            DATABASES = {
                **DATABASES,
                "bad": {**DATABASES["default"], "OPTIONS": {"MAX_CONNS": 0}},
            }
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "e001_settings",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
    }
    out = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "(django_gevent_pool.E001) DATABASES['bad']: OPTIONS['MAX_CONNS']" in out.stderr
    assert "Traceback" not in out.stderr


def manage_py_check(
    tmp_path: Path, settings_code: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``python -m django check ARGS`` in a fresh process, with ``settings_code`` as settings."""
    (tmp_path / "check_settings.py").write_text(textwrap.dedent(settings_code))
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "check_settings",
        "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
    }
    return subprocess.run(
        [sys.executable, "-m", "django", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("args", [(), ("--database", "default")])
def test_e001_on_the_default_alias_is_reported_too(tmp_path: Path, args: tuple[str, ...]) -> None:
    """contrib.auth's models build the default alias's wrapper in django.setup(): no raise there."""
    out = manage_py_check(
        tmp_path,
        """
        from tests.settings import *  # noqa: F403

        INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth"]
        DATABASES = {
            "default": {**DATABASES["default"], "OPTIONS": {"MAX_CONNS": 0}},
        }
        """,
        *args,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        "(django_gevent_pool.E001) DATABASES['default']: OPTIONS['MAX_CONNS'] must be an "
        "integer >= 1, got 0"
    ) in out.stderr
    assert "Traceback" not in out.stderr


def test_e001_the_wrapper_raises_when_it_connects_not_when_it_is_made(
    django_db_blocker: Any,
) -> None:
    """E001's text is what the alias raises at its first connection; making a wrapper is silent."""
    settings_dict = {
        **configured_databases()["default"],
        "OPTIONS": {"MAX_CONNS": 0},
    }
    wrapper = load_backend(ENGINE).DatabaseWrapper(settings_dict, "e001")
    [e001] = our_issues(
        {"default": alias_settings(), "e001": alias_settings(OPTIONS={"MAX_CONNS": 0})}
    )
    with django_db_blocker.unblock():
        with pytest.raises(ImproperlyConfigured) as err:
            wrapper.ensure_connection()
    assert str(err.value) == e001.msg
    assert wrapper.connection is None
    assert get_pool("e001") is None


def test_a_connect_with_unchanged_settings_does_not_validate_again(
    django_db_blocker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-request fast path: a new wrapper per greenlet, OPTIONS validated once per pool."""
    from django_gevent_pool.options import PoolOptions

    calls: list[str] = []
    validate = PoolOptions.from_mapping.__func__  # type: ignore[attr-defined]

    def counted(cls: type[PoolOptions], options: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("name", ""))
        return validate(cls, options, **kwargs)

    monkeypatch.setattr(PoolOptions, "from_mapping", classmethod(counted))
    settings_dict = {**configured_databases()["default"], "OPTIONS": {"MAX_CONNS": 2}}
    backend = load_backend(ENGINE)
    with django_db_blocker.unblock():
        try:
            for _ in range(3):
                wrapper = backend.DatabaseWrapper(settings_dict, "fast")
                with wrapper.cursor() as cur:
                    cur.execute("SELECT 1")
                wrapper.close()
            assert calls, "the first connect validated OPTIONS"
            first = len(calls)
            for _ in range(3):
                wrapper = backend.DatabaseWrapper(settings_dict, "fast")
                with wrapper.cursor() as cur:
                    cur.execute("SELECT 1")
                wrapper.close()
            assert len(calls) == first, calls
            changed = backend.DatabaseWrapper(
                {**settings_dict, "OPTIONS": {"MAX_CONNS": 0}}, "fast"
            )
            with pytest.raises(ImproperlyConfigured, match=r"DATABASES\['fast'\]"):
                changed.ensure_connection()
        finally:
            close_pools("fast")


# Without the app, the checks exist only if the backend was imported before Django
# listed the checks to run: see the "System checks" section of README.rst.
NO_APP_SETTINGS = """
from tests.settings import DATABASES as _D

INSTALLED_APPS = {apps}
DATABASES = {{
    "default": {default},
    "pooled": {{**_D["default"], "CONN_MAX_AGE": 60, "TEST": {{}}}},
}}
SECRET_KEY = "checks"
USE_TZ = True
"""


@pytest.mark.parametrize(
    ("apps", "default", "args", "reported"),
    [
        # A model without Meta.db_table loads the default alias's backend in django.setup().
        (["django.contrib.contenttypes", "django.contrib.auth"], "pooled", (), True),
        # ContentType names its table: contenttypes alone loads no backend.
        (["django.contrib.contenttypes"], "pooled", (), False),
        # No models: nothing loads the backend, no check of ours runs.
        ([], "pooled", (), False),
        # --database loads the backend only after Django listed the checks to run.
        ([], "pooled", ("--database", "default"), False),
        # The pooled alias is not default: models load the stock backend only.
        (["django.contrib.contenttypes", "django.contrib.auth"], "stock", (), False),
    ],
    ids=[
        "auth-default-pooled",
        "only-named-tables",
        "no-models",
        "no-models-database",
        "default-not-pooled",
    ],
)
def test_without_the_app_the_checks_run_only_if_the_backend_was_loaded(
    tmp_path: Path, apps: list[str], default: str, args: tuple[str, ...], reported: bool
) -> None:
    default_dict = (
        '{**_D["default"], "CONN_MAX_AGE": 60, "TEST": {}}'
        if default == "pooled"
        else '{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}'
    )
    out = manage_py_check(
        tmp_path, NO_APP_SETTINGS.format(apps=repr(apps), default=default_dict), *args
    )
    assert out.returncode == 0, out.stdout + out.stderr
    printed = out.stdout + out.stderr  # warnings go to stdout, errors to stderr
    w001 = [line for line in printed.splitlines() if "(django_gevent_pool.W001)" in line]
    if reported:
        assert len(w001) == 2, printed  # default and pooled
        assert all("CONN_MAX_AGE = 60 is ignored" in line for line in w001)
    else:
        assert w001 == [], printed
        assert "System check identified no issues" in out.stdout


def test_w001_conn_max_age_is_ignored_by_the_pool() -> None:
    issues = our_issues(
        {
            "default": alias_settings(),
            "minute": alias_settings(CONN_MAX_AGE=60),
            "forever": alias_settings(CONN_MAX_AGE=None),
        }
    )
    assert ids(issues) == ["django_gevent_pool.W001"] * 2
    assert {m.msg.split(":")[0] for m in issues} == {
        "DATABASES['minute']",
        "DATABASES['forever']",
    }
    assert all("CONN_MAX_AGE" in m.msg and "MAX_LIFETIME" in (m.hint or "") for m in issues)


def test_i001_conn_health_checks_has_no_effect() -> None:
    issues = our_issues(
        {
            "default": alias_settings(CONN_HEALTH_CHECKS=False),
            "checked": alias_settings(CONN_HEALTH_CHECKS=True),
        }
    )
    assert ids(issues) == ["django_gevent_pool.I001"]
    assert issues[0].level == INFO
    assert issues[0].msg.startswith("DATABASES['checked']: CONN_HEALTH_CHECKS = True")


def test_w003_ping_after_not_below_idle_timeout_never_pings() -> None:
    issues = our_issues(
        {
            "default": alias_settings(OPTIONS={"PING_AFTER": 600}),  # IDLE_TIMEOUT 600
            "shorter": alias_settings(OPTIONS={"PING_AFTER": 30, "IDLE_TIMEOUT": 10}),
            "kept": alias_settings(OPTIONS={"PING_AFTER": 30, "IDLE_TIMEOUT": 10, "MIN_CONNS": 1}),
            "no_idle_timeout": alias_settings(OPTIONS={"PING_AFTER": 30, "IDLE_TIMEOUT": None}),
            "never_ping": alias_settings(OPTIONS={"PING_AFTER": None, "IDLE_TIMEOUT": 10}),
        }
    )
    assert ids(issues) == ["django_gevent_pool.W003"] * 2
    assert {m.msg.split(":")[0] for m in issues} == {"DATABASES['default']", "DATABASES['shorter']"}
    assert all("PING_AFTER" in m.msg and "IDLE_TIMEOUT" in m.msg for m in issues)


def test_w003_transaction_mode_under_atomic_requests_or_without_autocommit() -> None:
    tx = {"POOL_MODE": "transaction"}
    issues = our_issues(
        {
            "default": alias_settings(OPTIONS=tx, ATOMIC_REQUESTS=True),
            "fine": alias_settings(OPTIONS=tx),
            "session": alias_settings(ATOMIC_REQUESTS=True),
        }
    )
    assert ids(issues) == ["django_gevent_pool.W003"]
    assert issues[0].msg.startswith(
        "DATABASES['default']: OPTIONS['POOL_MODE'] = 'transaction' with ATOMIC_REQUESTS = True"
    )
    issues = our_issues({"default": alias_settings(OPTIONS=tx, AUTOCOMMIT=False)})
    assert ids(issues) == ["django_gevent_pool.W003"] * 2
    assert any("'transaction' with AUTOCOMMIT = False" in m.msg for m in issues)


@pytest.mark.parametrize("min_conns", [0, 1])
def test_w003_premise_idle_connections_close_before_ping_after(dsn: str, min_conns: int) -> None:
    """What W003 says, on a real pool: with MIN_CONNS=0 no ping happens, with 1 it does."""
    now = [0.0]
    pool = ConnectionPool(
        lambda: psycopg2.connect(dsn),
        options={"IDLE_TIMEOUT": 10, "PING_AFTER": 20, "MIN_CONNS": min_conns},
        clock=lambda: now[0],
        background=False,
    )
    try:
        pool.putconn(pool.getconn())
        now[0] += 20  # idle for PING_AFTER, which is past IDLE_TIMEOUT
        pool.maintain()
        pool.putconn(pool.getconn())
        stats = pool.get_stats()
        if min_conns == 0:
            assert (stats["pings"], stats["connections_num"]) == (0, 2), "closed, never pinged"
        else:
            assert (stats["pings"], stats["connections_num"]) == (1, 1), "kept, then pinged"
    finally:
        pool.close()


def test_w003_autocommit_false_comes_back_in_a_transaction(django_db_blocker: Any) -> None:
    databases = {"default": alias_settings(), "manual": alias_settings(AUTOCOMMIT=False)}
    issues = our_issues(databases)
    assert ids(issues) == ["django_gevent_pool.W003"]
    assert issues[0].msg.startswith("DATABASES['manual']: AUTOCOMMIT = False")
    # The premise, for real: a read without commit is rolled back by the pool on return.
    with override_settings(DATABASES=databases), django_db_blocker.unblock():
        settings_dict = configured_databases()["manual"]
        wrapper = load_backend(ENGINE).DatabaseWrapper(settings_dict, "manual")
        try:
            with wrapper.cursor() as cur:
                cur.execute("SELECT 1")
            wrapper.close()
            pool = get_pool("manual")
            assert pool is not None
            assert pool.get_stats()["returns_rolled_back"] == 1
        finally:
            wrapper.close()
            close_pools("manual")


# ------------------------------------------------------------------ gevent

W002_SCRIPT = textwrap.dedent(
    """
    import os, sys
    case = sys.argv[1]
    if case != "unpatched":
        from gevent import monkey
        monkey.patch_all()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    django.setup()
    import psycopg2.extensions
    if case == "patched":
        import django_gevent_pool
        django_gevent_pool.patch_psycopg2()
    elif case == "foreign":
        from psycopg2.extras import wait_select
        psycopg2.extensions.set_wait_callback(wait_select)
    from django.core.checks import run_checks
    for message in run_checks():
        print(message.id, message.msg, sep="|")
    """
)


@pytest.mark.parametrize(
    ("case", "fires", "detail"),
    [
        ("no callback", True, "psycopg2 has no wait callback"),
        ("foreign", True, "psycopg2.extras.wait_select is not a known gevent one"),
        ("patched", False, ""),
        ("unpatched", False, ""),
    ],
)
def test_w002_gevent_patched_but_psycopg2_not_cooperative(
    case: str, fires: bool, detail: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", W002_SCRIPT, case],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert out.returncode == 0, out.stderr
    found = [line for line in out.stdout.splitlines() if line.startswith("django_gevent_pool.")]
    if fires:
        assert len(found) == 1 and found[0].startswith("django_gevent_pool.W002|"), out.stdout
        assert detail in found[0]
    else:
        assert found == [], out.stdout


W002_PSYCOPG3_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import psycopg  # before gevent patches: psycopg picks its C wait (gunicorn --preload)
    from gevent import monkey
    monkey.patch_all()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    django.setup()
    import django_gevent_pool
    django_gevent_pool.patch_psycopg2()  # only psycopg 3's state is under test
    if sys.argv[1] == "patched":
        django_gevent_pool.patch_drivers()
    from django.core.checks import run_checks
    for message in run_checks():
        print(message.id, message.msg, sep="|")
    """
)


@pytest.mark.parametrize(("case", "fires"), [("imported first", True), ("patched", False)])
def test_w002_psycopg3_imported_before_gevent_patched(case: str, fires: bool) -> None:
    out = subprocess.run(
        [sys.executable, "-c", W002_PSYCOPG3_SCRIPT, case],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd(), "DGP_TEST_DRIVER": "psycopg"},
    )
    assert out.returncode == 0, out.stderr
    found = [line for line in out.stdout.splitlines() if line.startswith("django_gevent_pool.")]
    if fires:
        assert len(found) == 1 and found[0].startswith("django_gevent_pool.W002|"), out.stdout
        assert "psycopg 3 was imported before and still waits in C" in found[0]
    else:
        assert found == [], out.stdout


# ---------------------------------------------------------------- database


def test_database_checks_run_only_for_the_databases_given() -> None:
    databases = {"default": alias_settings(), "big": alias_settings(OPTIONS={"MAX_CONNS": 200})}
    with override_settings(DATABASES=databases):
        assert checks.check_servers(databases=None) == [], "None: use no connection"
    assert our_issues(databases, check_databases=[]) == []
    stock = {**databases, "stock": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    assert our_issues(stock, check_databases=["stock"]) == []
    assert ids(our_issues(databases, check_databases=["big"])) == ["django_gevent_pool.E005"]


def test_which_aliases_a_check_without_database_gets_is_djangos_choice() -> None:
    """Django 6.1's ``check`` gives a check selected by tag every alias; before, none.

    Without a tag nor ``--database`` no version runs the server checks: plain
    ``manage.py check`` never needs a server. (``django.db.connections`` keeps
    the suite's own aliases, ``default`` and ``other``, under override_settings:
    ``default`` is the one with MAX_CONNS 200 here.)
    """
    databases = {"default": alias_settings(OPTIONS={"MAX_CONNS": 200})}
    with override_settings(DATABASES=databases):
        call_command("check")
        if django.VERSION >= (6, 1):
            with pytest.raises(SystemCheckError, match=r"django_gevent_pool\.E005"):
                call_command("check", tags=[checks.TAG])
        else:
            call_command("check", tags=[checks.TAG])


def test_e005_max_conns_above_what_the_server_accepts() -> None:
    usable = usable_connections()
    issues = our_issues(
        {"default": alias_settings(OPTIONS={"MAX_CONNS": 200})}, check_databases=["default"]
    )
    assert ids(issues) == ["django_gevent_pool.E005"]
    msg = issues[0].msg
    assert msg.startswith("DATABASES['default']: OPTIONS['MAX_CONNS'] = 200 per process")
    assert f"the {usable} connections the server at" in msg
    assert "one process alone" in msg
    assert "PgBouncer" in (issues[0].hint or "")
    with override_settings(DATABASES={"default": alias_settings(OPTIONS={"MAX_CONNS": 200})}):
        with pytest.raises(SystemCheckError, match=r"django_gevent_pool\.E005"):
            call_command("check", tags=[checks.TAG], databases=["default"])


def test_w005_more_than_half_of_the_server_per_process() -> None:
    usable = usable_connections()
    half = usable // 2
    fires = our_issues(
        {"default": alias_settings(OPTIONS={"MAX_CONNS": half + 1})}, check_databases=["default"]
    )
    assert ids(fires) == ["django_gevent_pool.W005"]
    assert "2 processes" in fires[0].msg
    assert f"2 workers x {half + 1} = {2 * (half + 1)}" in (fires[0].hint or "")
    silent = our_issues(
        {"default": alias_settings(OPTIONS={"MAX_CONNS": half})}, check_databases=["default"]
    )
    assert silent == []


def test_w005_counts_every_pooled_alias_on_the_same_server() -> None:
    quarter = usable_connections() // 4 + 1  # each alone is fine, both together are not
    databases = {
        "default": alias_settings(OPTIONS={"MAX_CONNS": quarter}),
        "second": alias_settings(OPTIONS={"MAX_CONNS": quarter}),
    }
    issues = our_issues(databases, check_databases=["default", "second"])
    assert ids(issues) == ["django_gevent_pool.W005"], "one message per server"
    assert f"add up to {2 * quarter} per process" in issues[0].msg
    assert "DATABASES['default']" in issues[0].msg and "DATABASES['second']" in issues[0].msg
    alone = our_issues({"default": databases["default"]}, check_databases=["default"])
    assert alone == []


def budgeted(host_max: int, **overrides: Any) -> dict[str, Any]:
    """An alias with a host budget of ``host_max`` (MAX_CONNS 2 per process)."""
    return alias_settings(OPTIONS={"MAX_CONNS": 2, "HOST_MAX_CONNS": host_max}, **overrides)


def test_e008_a_host_budget_above_what_the_server_accepts() -> None:
    usable = usable_connections()
    issues = our_issues({"default": budgeted(usable + 1)}, check_databases=["default"])
    assert ids(issues) == ["django_gevent_pool.E008"]
    msg = issues[0].msg
    assert msg.startswith(
        f"DATABASES['default']: OPTIONS['HOST_MAX_CONNS'] = {usable + 1} per host is more than "
        f"the {usable} connections the server at "
    ), msg
    assert msg.endswith("one host alone can exhaust the server.")
    assert "a budget across hosts stays PgBouncer's job" in (issues[0].hint or "")
    fits = our_issues({"default": budgeted(usable // 2)}, check_databases=["default"])
    assert fits == []
    with override_settings(DATABASES={"default": budgeted(usable + 1)}):
        with pytest.raises(SystemCheckError, match=r"django_gevent_pool\.E008"):
            call_command("check", tags=[checks.TAG], databases=["default"])


def test_w008_a_host_budget_above_half_of_the_server_says_hosts_share_it() -> None:
    usable = usable_connections()
    half = usable // 2
    fires = our_issues({"default": budgeted(half + 1)}, check_databases=["default"])
    assert ids(fires) == ["django_gevent_pool.W008"]
    assert "2 hosts (or containers) sharing the server can exhaust it" in fires[0].msg
    hint = fires[0].hint or ""
    assert f"2 hosts x {half + 1} = {2 * (half + 1)} is too many" in hint
    assert "Several hosts may share the server" in hint
    assert "a budget across hosts stays PgBouncer's job" in hint


def test_a_budget_replaces_the_per_process_max_conns_checks() -> None:
    """MAX_CONNS x processes is not what a host opens when a budget bounds them all."""
    usable = usable_connections()
    half = usable // 2
    alone = alias_settings(OPTIONS={"MAX_CONNS": half + 1, "HOST_MAX_CONNS": half + 1})
    assert ids(our_issues({"default": alone}, check_databases=["default"])) == [
        "django_gevent_pool.W008"
    ], "not W005 too"
    huge = alias_settings(OPTIONS={"MAX_CONNS": 200, "HOST_MAX_CONNS": 200})
    assert ids(our_issues({"default": huge}, check_databases=["default"])) == [
        "django_gevent_pool.E008"
    ], "not E005 too"
    # Two aliases of quarter + 1 each add up to W005 per process (see above),
    # unless one of them has a budget: then neither sum is over half.
    quarter = usable // 4 + 1
    databases = {
        "default": alias_settings(OPTIONS={"MAX_CONNS": quarter}),
        "second": alias_settings(OPTIONS={"MAX_CONNS": quarter, "HOST_MAX_CONNS": quarter}),
    }
    assert our_issues(databases, check_databases=["default", "second"]) == []


def test_aliases_sharing_one_budget_count_once_other_budgets_add_up() -> None:
    usable = usable_connections()
    half = usable // 2
    shared = {"default": budgeted(half), "replica": budgeted(half)}  # same user, db, server
    assert our_issues(shared, check_databases=["default", "replica"]) == []
    quarter = usable // 4 + 1  # each alone fits, the two budgets together do not
    two = {"default": budgeted(quarter), "admin_db": budgeted(quarter, NAME="postgres")}
    issues = our_issues(two, check_databases=["default", "admin_db"])
    assert ids(issues) == ["django_gevent_pool.W008"], "one message per server"
    assert (
        "DATABASES['default'], DATABASES['admin_db']: the host budgets "
        f"(OPTIONS['HOST_MAX_CONNS']) add up to {2 * quarter} per host "
        f"(default: {quarter}, admin_db: {quarter})"
    ) in issues[0].msg
    three = {**shared, "admin_db": budgeted(usable - half + 1, NAME="postgres")}
    issues = our_issues(three, check_databases=["replica"])
    assert ids(issues) == ["django_gevent_pool.E008"]
    assert f"add up to {usable + 1} per host (default+replica: {half}, admin_db:" in (issues[0].msg)


def test_e008_through_something_in_between_is_only_a_warning() -> None:
    with Proxy(server()["test"]) as proxy:
        through = budgeted(200, HOST="127.0.0.1", PORT=str(proxy.port))
        issues = our_issues({"default": through}, check_databases=["default"])
    assert ids(issues) == ["django_gevent_pool.W008"]
    assert "one host alone can exhaust the server (unless what answers at" in issues[0].msg


def test_i006_names_host_max_conns_for_an_alias_with_a_budget() -> None:
    dead = budgeted(10, HOST="127.0.0.1", PORT=str(closed_port()))
    issues = our_issues({"default": alias_settings(), "dead": dead}, check_databases=["dead"])
    assert ids(issues) == ["django_gevent_pool.I006"]
    assert issues[0].msg.startswith(
        "DATABASES['dead']: OPTIONS['HOST_MAX_CONNS'] not compared with the server's "
        "max_connections: cannot reach the server"
    )


def test_i006_unreachable_server_is_information_not_a_warning() -> None:
    databases = {
        "default": alias_settings(),
        "dead": alias_settings(HOST="127.0.0.1", PORT=str(closed_port())),
    }
    issues = our_issues(databases, check_databases=["default", "dead"])
    assert ids(issues) == ["django_gevent_pool.I006"]
    assert issues[0].level == INFO
    assert issues[0].msg.startswith(
        "DATABASES['dead']: OPTIONS['MAX_CONNS'] not compared with the server's "
        "max_connections: cannot reach the server (127.0.0.1:"
    )
    assert "Connection refused" in issues[0].msg, "libpq's reason is given"
    assert "--database dead" in (issues[0].hint or "")
    with override_settings(DATABASES=databases):
        call_command("check", tags=[checks.TAG], databases=["dead"], fail_level="WARNING")
        with pytest.raises(SystemCheckError, match=r"django_gevent_pool\.I006"):
            call_command("check", tags=[checks.TAG], databases=["dead"], fail_level="INFO")


#: What a Docker build has: the app's settings and no database server.
BUILD_SETTINGS = """
from tests.settings import *  # noqa: F403

INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.staticfiles"]  # noqa: F405
STATIC_URL = "/static/"
STATIC_ROOT = {static_root!r}
DATABASES = {{
    "default": {{**DATABASES["default"], "HOST": "127.0.0.1", "PORT": "{port}"}},  # noqa: F405
}}
"""


@pytest.mark.parametrize(
    ("command", "i006"),
    [
        (["check", "--fail-level", "WARNING"], False),
        (["collectstatic", "--noinput"], False),
        # Django 6.1 runs the server checks for every alias when a tag selects them.
        (["check", "--tag", checks.TAG, "--fail-level", "WARNING"], django.VERSION >= (6, 1)),
        (["check", "--database", "default", "--fail-level", "WARNING"], True),
    ],
    ids=["check", "collectstatic", "check-tag", "check-database"],
)
def test_a_build_step_without_a_server_neither_fails_nor_warns(
    tmp_path: Path, command: list[str], i006: bool
) -> None:
    settings_code = BUILD_SETTINGS.format(static_root=str(tmp_path / "static"), port=closed_port())
    (tmp_path / "build_settings.py").write_text(settings_code)
    out = subprocess.run(
        [sys.executable, "-m", "django", *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "build_settings",
            "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
        },
    )
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed
    assert "Traceback" not in printed
    ours = [line for line in printed.splitlines() if "(django_gevent_pool." in line]
    if i006:
        assert len(ours) == 1 and "(django_gevent_pool.I006) DATABASES['default']" in ours[0]
    else:
        assert ours == [], printed


def test_w004_is_silent_on_a_plain_server() -> None:
    """RESET_QUERY and server-side cursors are fine when no PgBouncer is in between."""
    databases = {
        "default": alias_settings(
            DISABLE_SERVER_SIDE_CURSORS=False, OPTIONS={"RESET_QUERY": "DISCARD ALL"}
        )
    }
    assert our_issues(databases, check_databases=["default"]) == []


def test_server_checks_leave_no_connection_and_no_pool(admin: Any) -> None:
    databases = {"default": alias_settings(), "big": alias_settings(OPTIONS={"MAX_CONNS": 200})}
    assert get_pool("big") is None
    assert ids(our_issues(databases, check_databases=["big"])) == ["django_gevent_pool.E005"]
    assert get_pool("big") is None, "no pool was created"

    def lingering() -> int:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                [checks.CHECK_APPLICATION_NAME],
            )
            return int(cur.fetchone()[0])

    # The backend of a closed connection goes away asynchronously, within moments.
    wait_until(lambda: lingering() == 0, what="the check's own connection to end", timeout=5)


def test_e005_through_something_in_between_is_only_a_warning() -> None:
    """A port that is not the server's own (a pooler, a forward) may not be the server's limit."""
    with Proxy(server()["test"]) as proxy:
        through = alias_settings(HOST="127.0.0.1", PORT=str(proxy.port), OPTIONS={"MAX_CONNS": 200})
        issues = our_issues({"default": through}, check_databases=["default"])
    assert ids(issues) == ["django_gevent_pool.W005"]
    assert "one process alone can exhaust the server" in issues[0].msg
    assert "the server itself listens on " in issues[0].msg
    assert "stats_users" in (issues[0].hint or "")


def test_i006_a_silent_server_is_given_up_on_in_seconds() -> None:
    with Proxy(server()["test"]) as proxy:
        proxy.stall()
        databases = {
            "default": alias_settings(HOST="127.0.0.1", PORT=str(proxy.port)),
        }
        started = time.monotonic()
        issues = our_issues(databases, check_databases=["default"])
        elapsed = time.monotonic() - started
        proxy.resume()
    assert ids(issues) == ["django_gevent_pool.I006"]
    # Our deadline under a gevent hub; libpq's connect_timeout in a plain thread.
    assert "no answer within" in issues[0].msg or "timeout expired" in issues[0].msg
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_behind_pgbouncer_whose_console_refuses_the_user_only_w005_is_possible() -> None:
    """Mode unknown: no W004 whatever the settings; MAX_CONNS is compared with the server behind.

    PgBouncer's console answers only admin_users and stats_users; the alias's
    user is neither (its PgBouncer database logs in to the server as the
    test's user). The server behind it listens on another port than
    PgBouncer's, so exceeding its max_connections is W005 (not E005), with a
    hint to add the user to stats_users.
    """
    from .pgbouncer import PLAIN_USER, require_binary, running_pgbouncer

    require_binary()
    base = alias_settings()
    forced = {"dgp_forced": f"dbname={base['NAME']} user={base['USER'] or 'postgres'}"}
    with running_pgbouncer("transaction", databases=forced) as bouncer:
        through = {
            **base,
            **bouncer.django_settings("dgp_forced"),
            "USER": PLAIN_USER,
            "PASSWORD": "",
            "DISABLE_SERVER_SIDE_CURSORS": False,  # W004 in transaction mode, if it were known
            "OPTIONS": {"MAX_CONNS": 200, "RESET_QUERY": "DISCARD ALL"},
        }
        issues = our_issues({"default": through}, check_databases=["default"])
    assert ids(issues) == ["django_gevent_pool.W005"], [m.msg for m in issues]
    assert f"the server itself listens on port {bouncer.upstream_port}" in issues[0].msg
    assert "stats_users" in (issues[0].hint or "")


@pytest.mark.parametrize("isolation_level", [None, -1])
def test_check_in_a_process_that_has_not_loaded_the_backend_keeps_it_on_psycopg2(
    tmp_path: Path, isolation_level: int | None
) -> None:
    """Only the app installed: the checks validate OPTIONS before the backend is imported.

    With psycopg 3 installed too (the test extra installs it), validating
    isolation_level through a plain import of Django's psycopg_any bound
    Django's PostgreSQL backend to psycopg 3, and the backend then refused to load.
    """
    options = {"MAX_CONNS": 2}
    if isolation_level is not None:
        options["isolation_level"] = isolation_level
    out = manage_py_check(
        tmp_path,
        f"""
        from tests.settings import DATABASES as _TEST_DATABASES

        SECRET_KEY = "check"
        INSTALLED_APPS = ["django_gevent_pool"]
        DATABASES = {{"default": {{**_TEST_DATABASES["default"], "OPTIONS": {options!r}}}}}
        """,
        "--database",
        "default",
    )
    assert "Traceback" not in out.stderr, out.stderr
    assert "already loaded with psycopg 3" not in out.stdout + out.stderr
    if isolation_level is None:
        assert out.returncode == 0, out.stdout + out.stderr
        # migrate too: its checks run first, then it connects through the backend.
        migrated = subprocess.run(
            [sys.executable, "-m", "django", "migrate", "--database", "default"],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "DJANGO_SETTINGS_MODULE": "check_settings",
                "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
            },
        )
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    else:
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Invalid transaction isolation level -1" in out.stderr
