"""Django system checks for the aliases served by django-gevent-pool.

Only aliases whose ENGINE is one of this package's are looked at. Settings
checks run with every ``manage.py check`` (and before most commands); the
server checks need the network, are tagged ``database``, and look only at the
aliases Django passes in ``databases`` (``manage.py check --database ALIAS``,
``migrate``, the test runner; from Django 6.1 also every alias when a tag
selects them, as ``manage.py check --tag django_gevent_pool`` does: Django
passes all aliases when none is named).

===========================  =================================================================
id                           condition
===========================  =================================================================
django_gevent_pool.E001      OPTIONS refused by the pool's validation
django_gevent_pool.W001      CONN_MAX_AGE is not 0 (ignored: the pool keeps connections)
django_gevent_pool.I001      CONN_HEALTH_CHECKS is True (no effect: the pool checks checkouts)
django_gevent_pool.W002      gevent patched socket, psycopg2 or psycopg 3 does not yield to it
django_gevent_pool.W003      settings that defeat each other in this pool (see ``_conflicts``)
django_gevent_pool.W004      RESET_QUERY, assume_role or server-side cursors behind
                             PgBouncer in transaction (or statement) mode (database)
django_gevent_pool.E005      MAX_CONNS per process above the server's usable connections
                             (database)
django_gevent_pool.W005      MAX_CONNS per process above half of them, or above all of them
                             when the server listens on another port than the one
                             configured (a pooler or port forward in between) (database)
django_gevent_pool.I006      the server could not be asked, so E005/W005 were not checked
                             (database; information only, see ``check_servers``)
django_gevent_pool.W007      DJANGO_GEVENT_POOL is set but the app is not installed
django_gevent_pool.E008      the host budgets (HOST_MAX_CONNS) on one server above its usable
                             connections (database)
django_gevent_pool.W008      the same sum above half of them (several hosts can exhaust the
                             server), or above all of them when the server listens on another
                             port than the one configured (database)
django_gevent_pool.E009      aliases sharing one host budget (same server, database and user)
                             configure different HOST_MAX_CONNS or HOST_LOCK_DIR
django_gevent_pool.W010      gevent patched socket and an alias uses Django's MySQL backend
                             on mysqlclient, which blocks the hub
===========================  =================================================================

On MySQL (``django_gevent_pool.backends.mysql``) E005/W005, E008/W008 and
I006 compare with the server's ``@@max_connections``, and E009 applies as on
PostgreSQL (W004 is PgBouncer's).

An alias with a host budget (``HOST_MAX_CONNS``) is left out of E005/W005:
its processes on one host open at most HOST_MAX_CONNS together, whatever
their number, so E008/W008 compare the budgets instead. Aliases sharing one
budget (same server, database and user) count once.

E003 is not used: the pool's option validation already refuses every
combination that cannot work (MIN_CONNS above REUSE_CONNS, REUSE_CONNS above
MAX_CONNS, Django's own pool); what remains is W003.

Aliases found to be behind PgBouncer skip E005/W005 (and E008/W008) whatever its pool mode:
in session mode every client connection this pool keeps pins a server
connection, so MAX_CONNS summed over all processes must fit PgBouncer's
``default_pool_size``, but nothing here checks that (the number of processes
is not known to a check). An alias whose pool mode cannot be detected (the
console refuses the user) is treated as a direct connection: E005/W005 compare
its MAX_CONNS with the max_connections of the server behind PgBouncer (W005
rather than E005 when that server listens on another port than the
configured one, as it does behind a PgBouncer on its own port).

When the checks run: they are registered by the app's ``ready()`` and, as a
side effect, when the backend module (``django_gevent_pool.backends.base``)
is first imported. Without ``"django_gevent_pool"`` in INSTALLED_APPS that
import happens during ``django.setup()`` only when ``DATABASES["default"]``
uses one of this package's ENGINEs and an installed app defines a model
without ``Meta.db_table`` (Django shortens its table name with
``connection.ops.max_name_length()``, which loads the default alias's
backend). Otherwise ``manage.py check`` runs none of these checks and says
nothing about them, even with ``--database`` (Django's database check loads
the backend only after it has listed the checks to run). Installing the app
is the reliable way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg2
import psycopg2.extensions
from django.core import checks
from django.core.checks import CheckMessage, Error, Info, Tags, Warning
from django.core.exceptions import ImproperlyConfigured

from . import sync
from .drivers.psycopg2_waiting import is_psycopg2_cooperative
from .hostbudget import budget_key_of
from .options import PoolOptions
from .serverinfo import (
    ServerLimits,
    ServerUnreachable,
    alias_pool_options,
    brief_connection,
    configured_databases,
    configured_port,
    connection_params,
    is_mysql_engine,
    mysql_connection_params,
    mysql_server_label,
    pool_mode,
    pooled_databases,
    server_label,
    server_limits,
    server_port,
)

#: The tag of every check here: ``manage.py check --tag django_gevent_pool``.
TAG = "django_gevent_pool"
#: What the server checks' own connections are called in pg_stat_activity.
CHECK_APPLICATION_NAME = "django_gevent_pool check"
#: Seconds a server check may spend on one server.
SERVER_TIMEOUT = 5.0

_registered = False


def register() -> None:
    """Register the checks with Django's check framework. Idempotent.

    Called by the app's ``AppConfig.ready()`` and when the backend module is
    first imported. Without the app in INSTALLED_APPS, the checks run only if
    something imported the backend before Django listed the checks to run
    (see the module docstring).
    """
    global _registered
    if _registered:
        return
    _registered = True
    checks.register(check_pool_settings, TAG)
    checks.register(check_psycopg2_cooperative, TAG)
    checks.register(check_mysqlclient, TAG)
    checks.register(check_app_settings, TAG)
    checks.register(check_servers, Tags.database, TAG)


def _id(code: str) -> str:
    return f"django_gevent_pool.{code}"


# ------------------------------------------------------------------ settings


def check_pool_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E001, W001, I001 and W003 for every pooled alias; no I/O."""
    issues: list[CheckMessage] = []
    for alias, settings_dict in pooled_databases().items():
        try:
            options = alias_pool_options(alias, settings_dict)
        except ImproperlyConfigured as exc:
            issues.append(
                Error(
                    str(exc),
                    hint=(
                        f"Fix DATABASES[{alias!r}]['OPTIONS']: every connection attempt on this "
                        "alias raises ImproperlyConfigured until then. Pool options are "
                        "upper case (MAX_CONNS, REUSE_CONNS, MIN_CONNS, POOL_TIMEOUT, "
                        "MAX_WAITING, MAX_LIFETIME, IDLE_TIMEOUT, PING_AFTER, LEAK_TIMEOUT, "
                        "RESET_QUERY, POOL_MODE, HOST_MAX_CONNS, HOST_LOCK_DIR); lower-case keys "
                        "go to libpq."
                    ),
                    id=_id("E001"),
                )
            )
            continue
        issues.extend(_django_settings(alias, settings_dict))
        issues.extend(_conflicts(alias, settings_dict, options))
    issues.extend(_budget_disagreements(pooled_databases()))
    return issues


def _budget_disagreements(pooled: Mapping[str, dict[str, Any]]) -> list[CheckMessage]:
    """E009: aliases of one host budget that configure it differently (their pools would
    refuse to start, the second one at its first connection)."""
    by_key: dict[str, list[tuple[str, int, str | None]]] = {}
    for alias, options, params, _label in _valid_pooled(pooled):
        if options.HOST_MAX_CONNS is None:
            continue
        key = budget_key_of(params)
        by_key.setdefault(key, []).append((alias, options.HOST_MAX_CONNS, options.HOST_LOCK_DIR))
    issues: list[CheckMessage] = []
    for key, members in by_key.items():
        if len({(size, lock_dir) for _, size, lock_dir in members}) < 2:
            continue
        described = ", ".join(
            f"DATABASES[{alias!r}]: HOST_MAX_CONNS = {size}, HOST_LOCK_DIR = {lock_dir!r}"
            for alias, size, lock_dir in members
        )
        issues.append(
            Error(
                f"aliases sharing the host budget of {key} configure it differently "
                f"({described}): the second to connect fails with ImproperlyConfigured.",
                hint=(
                    "Aliases on the same server, database and user share one budget per "
                    "host: give them the same OPTIONS['HOST_MAX_CONNS'] and "
                    "OPTIONS['HOST_LOCK_DIR']."
                ),
                id=_id("E009"),
            )
        )
    return issues


def _django_settings(alias: str, settings_dict: Mapping[str, Any]) -> list[CheckMessage]:
    """W001 (CONN_MAX_AGE) and I001 (CONN_HEALTH_CHECKS)."""
    issues: list[CheckMessage] = []
    max_age = settings_dict.get("CONN_MAX_AGE", 0)
    if max_age is None or max_age != 0:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: CONN_MAX_AGE = {max_age!r} is ignored: with "
                "django-gevent-pool every connection goes back to the pool at the end of "
                "each request, and the pool, not Django, keeps connections open.",
                hint=(
                    "Set CONN_MAX_AGE to 0. Bound how long a connection lives with "
                    "OPTIONS['MAX_LIFETIME'] and how long it may stay idle with "
                    "OPTIONS['IDLE_TIMEOUT']."
                ),
                id=_id("W001"),
            )
        )
    if settings_dict.get("CONN_HEALTH_CHECKS") is True:
        issues.append(
            Info(
                f"DATABASES[{alias!r}]: CONN_HEALTH_CHECKS = True has no effect: each request "
                "borrows a connection afresh, and the pool checks every connection it lends "
                "(a local check each time, a real round trip after PING_AFTER seconds idle).",
                hint=(
                    "Remove CONN_HEALTH_CHECKS (or set it to False); tune OPTIONS['PING_AFTER'] "
                    "instead."
                ),
                id=_id("I001"),
            )
        )
    return issues


def _conflicts(
    alias: str, settings_dict: Mapping[str, Any], options: PoolOptions
) -> list[CheckMessage]:
    """W003: settings that validation accepts but that defeat each other in this pool.

    - ``PING_AFTER >= IDLE_TIMEOUT`` with ``MIN_CONNS = 0``: a connection idle
      that long is closed (at the next return or housekeeping round) before a
      checkout would ping it, so PING_AFTER never takes effect. With
      ``MIN_CONNS > 0`` the connections kept open do reach it.
    - ``AUTOCOMMIT = False``: a connection used without an explicit commit or
      rollback goes back to the pool inside a transaction; the pool rolls it
      back (uncommitted work is lost, as when stock Django closes it) and logs
      a warning on every such return.
    - ``POOL_MODE = "transaction"`` with ``ATOMIC_REQUESTS = True`` or
      ``AUTOCOMMIT = False``: every statement runs inside a transaction, so
      nothing goes back before the request ends (session mode, plus the cost
      of watching for pins).
    """
    issues: list[CheckMessage] = []
    if options.POOL_MODE == "transaction":
        for key, value in (("ATOMIC_REQUESTS", True), ("AUTOCOMMIT", False)):
            if settings_dict.get(key, not value) is value:
                issues.append(
                    Warning(
                        f"DATABASES[{alias!r}]: OPTIONS['POOL_MODE'] = 'transaction' with "
                        f"{key} = {value}: every statement runs inside a transaction, so no "
                        "connection goes back before the request ends; transaction mode "
                        "gives nothing here.",
                        hint=(
                            f"Set {key} = {not value} and wrap the views that need it in "
                            "transaction.atomic(), or keep POOL_MODE = 'session'."
                        ),
                        id=_id("W003"),
                    )
                )
    ping, idle = options.PING_AFTER, options.IDLE_TIMEOUT
    if ping is not None and idle is not None and options.MIN_CONNS == 0 and ping >= idle:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: OPTIONS['PING_AFTER'] ({ping:g} s) is not below "
                f"OPTIONS['IDLE_TIMEOUT'] ({idle:g} s) with MIN_CONNS = 0: idle connections are "
                "closed before they are idle long enough to be pinged, so PING_AFTER never "
                "takes effect.",
                hint=(
                    "Set PING_AFTER below IDLE_TIMEOUT (the default is 5 s), or set MIN_CONNS "
                    "to keep some connections open past IDLE_TIMEOUT (those get pinged)."
                ),
                id=_id("W003"),
            )
        )
    if settings_dict.get("AUTOCOMMIT", True) is False:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: AUTOCOMMIT = False: a connection used without an "
                "explicit commit or rollback goes back to the pool inside a transaction; the "
                "pool rolls it back (its uncommitted work is lost) and logs a warning on "
                "every such return.",
                hint=(
                    "Keep AUTOCOMMIT = True and use transaction.atomic() or ATOMIC_REQUESTS; "
                    "or end every transaction yourself (transaction.commit() / rollback()) "
                    "before the connection is given back."
                ),
                id=_id("W003"),
            )
        )
    return issues


# ------------------------------------------------------------------- gevent


def check_psycopg2_cooperative(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W002: gevent patched ``socket`` but psycopg2 (or psycopg 3) does not yield to it.

    Looks at the process the checks run in: it fires only where gevent's
    monkey-patching already ran (a script or command that patches before
    ``django.setup()``, a check run inside a gunicorn gevent worker), never in
    a plain ``manage.py check``, which gevent does not patch.
    """
    if not sync.patched("socket") or not pooled_databases():
        return []
    messages = _psycopg3_not_cooperative()
    if is_psycopg2_cooperative():
        return messages
    callback = psycopg2.extensions.get_wait_callback()
    if callback is None:
        msg = (
            "gevent has monkey-patched socket in this process, but psycopg2 has no wait "
            "callback: until a pool is created (it installs one), a query from other code "
            "(a non-pooled psycopg2 alias, raw psycopg2) blocks every greenlet of the process "
            "while it waits on the server."
        )
    else:
        msg = (
            "gevent has monkey-patched socket in this process, but psycopg2's wait callback "
            f"{_describe(callback)} is not a known gevent one (neither django_gevent_pool's "
            "nor psycogreen's): a pool replaces it when created; until then a query from other "
            "code (a non-pooled psycopg2 alias, raw psycopg2) may block every greenlet of the "
            "process while it waits on the server."
        )
    return [
        Warning(
            msg,
            hint=(
                "Call django_gevent_pool.patch_psycopg2() right after gevent's "
                "monkey.patch_all(); under gunicorn, in the post_fork hook (see "
                "examples/gunicorn.conf.py)."
            ),
            id=_id("W002"),
        ),
        *messages,
    ]


def _psycopg3_not_cooperative() -> list[CheckMessage]:
    """W002 for psycopg 3: imported, gevent patched socket, its waits are not gevent's."""
    if "psycopg" not in sys.modules or sys.modules["psycopg"] is None:
        return []  # not in use: nothing can block on it
    from .drivers.psycopg_waiting import is_psycopg_cooperative

    if is_psycopg_cooperative():
        return []
    return [
        Warning(
            "gevent has monkey-patched socket in this process, but psycopg 3 was imported "
            "before and still waits in C: until a pool is created (it replaces psycopg's "
            "wait functions), a psycopg 3 query from other code (a non-pooled alias, raw "
            "psycopg) blocks every greenlet of the process while it waits on the server.",
            hint=(
                "Call django_gevent_pool.patch_drivers() right after gevent's "
                "monkey.patch_all(); under gunicorn, in the post_fork hook (see "
                "examples/gunicorn.conf.py)."
            ),
            id=_id("W002"),
        )
    ]


def check_mysqlclient(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W010: gevent patched ``socket``, and an alias uses Django's MySQL backend on mysqlclient.

    mysqlclient is C: it waits on the server in ``libmysqlclient``, where
    gevent cannot switch, so each query blocks every greenlet of the process.
    Fires only where gevent's monkey-patching already ran (as W002).
    """
    if not sync.patched("socket"):
        return []
    mysqldb = sys.modules.get("MySQLdb")
    if mysqldb is not None and getattr(mysqldb, "__name__", "") == "pymysql":
        return []  # PyMySQL stands in for MySQLdb: pure Python, cooperative
    stock = [
        alias
        for alias, settings_dict in configured_databases().items()
        if str(settings_dict.get("ENGINE", "")).rstrip(".") == "django.db.backends.mysql"
    ]
    return [
        Warning(
            f"DATABASES[{alias!r}] uses Django's MySQL backend, whose driver (mysqlclient) "
            "waits on the server in C: gevent has monkey-patched socket in this process, but "
            "every query of this alias blocks every greenlet until the server answers.",
            hint=(
                "Use ENGINE 'django_gevent_pool.backends.mysql' (PyMySQL, pooled and "
                "cooperative; pip install 'django-gevent-pool[mysql]')."
            ),
            id=_id("W010"),
        )
        for alias in stock
    ]


def _describe(callback: Any) -> str:
    module = getattr(callback, "__module__", None) or "?"
    name = getattr(callback, "__qualname__", None) or repr(callback)
    return f"{module}.{name}"


# ------------------------------------------------------------------ servers


def check_app_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W007: ``DJANGO_GEVENT_POOL`` is set but nothing reads it (the app is not installed)."""
    from django.apps import apps
    from django.conf import settings

    if not hasattr(settings, "DJANGO_GEVENT_POOL") or apps.is_installed("django_gevent_pool"):
        return []
    return [
        Warning(
            "settings.DJANGO_GEVENT_POOL is set but ignored: it is applied by the "
            "django_gevent_pool app when Django starts, and the app is not in INSTALLED_APPS.",
            hint=(
                'Add "django_gevent_pool" to INSTALLED_APPS, or call '
                "django_gevent_pool.observability.configure_from_settings() yourself."
            ),
            id=_id("W007"),
        )
    ]


def check_servers(
    app_configs: Any = None, databases: Iterable[str] | None = None, **kwargs: Any
) -> list[CheckMessage]:
    """W004, E005, W005, E008, W008 and I006 for the pooled aliases in ``databases``.

    Needs the network.

    Each server is asked once, through a short-lived plain connection (never
    the pool). Aliases found to be behind PgBouncer, in any pool mode, are not
    compared with the server's max_connections: PgBouncer, not MAX_CONNS,
    decides how many server connections they use (in session mode the sizing
    rule against ``default_pool_size`` is left unchecked; see the module
    docstring).

    A server that cannot be asked (nothing answers, no answer within
    ``SERVER_TIMEOUT``, or the connection is refused) gets I006, an ``Info``:
    never a warning or an error. A build step (``manage.py check`` in a Docker
    build, with no database) must neither fail nor fill its log with warnings
    for a server it cannot have, and Django 6.1 hands every alias to a check
    selected by tag. Whether the server is reachable is not this check's
    subject: the app's first query fails with the driver's own error.
    """
    if not databases:
        return []
    everything = pooled_databases()
    asked = [alias for alias in dict.fromkeys(databases) if alias in everything]
    if not asked:
        return []
    # Both kinds of server: their labels (host:port) never meet.
    per_process = _max_conns_by_server(everything)
    budgets = _budgets_by_server(everything)
    mysql = [a for a in asked if is_mysql_engine(everything[a].get("ENGINE"))]
    issues = _mysql_server_issues(everything, mysql, per_process, budgets)
    pooled = {alias: sd for alias, sd in everything.items() if alias not in mysql}
    wanted = [alias for alias in asked if alias not in mysql]
    if not wanted:
        return issues
    # label -> the first alias, its params and the option compared for it
    servers: dict[str, tuple[str, dict[str, Any], str]] = {}
    for alias in wanted:
        settings_dict = pooled[alias]
        try:
            options = alias_pool_options(alias, settings_dict)
            params = connection_params(
                alias, settings_dict, application_name=CHECK_APPLICATION_NAME
            )
        except (ImproperlyConfigured, ImportError):
            continue  # E001 (or Django's own settings errors) already say what is wrong
        mode = pool_mode(params)
        if mode in ("transaction", "statement"):
            issues.extend(_pgbouncer_issues(alias, settings_dict, options, mode, params))
        if mode is None:
            option = "MAX_CONNS" if options.HOST_MAX_CONNS is None else "HOST_MAX_CONNS"
            servers.setdefault(server_label(params), (alias, params, option))
    for label, (alias, params, option) in servers.items():
        try:
            with brief_connection(params, timeout=SERVER_TIMEOUT) as conn:
                limits = server_limits(conn)
                listening = server_port(conn)
                via_tcp = not str(conn.info.host or "/").startswith("/")
        except (ServerUnreachable, psycopg2.Error) as exc:
            issues.append(_unreachable(alias, option, exc))
            continue
        # Something sits in between when the server listens on another port than
        # the one we reached, or sees a Unix-socket client where we came over TCP.
        configured = configured_port(params)
        proxied_to = None
        if listening is not None and configured is not None and listening != configured:
            proxied_to = f"port {listening}"
        elif listening is None and via_tcp:
            proxied_to = "a Unix socket"
        issues.extend(_capacity_issues(label, per_process.get(label, {}), limits, proxied_to))
        issues.extend(_budget_issues(label, budgets.get(label, {}), limits, proxied_to))
    return issues


def _unreachable(alias: str, option: str, exc: BaseException) -> CheckMessage:
    """I006: ``alias``'s server could not be asked, so ``option`` was not compared."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return Info(
        f"DATABASES[{alias!r}]: OPTIONS[{option!r}] not compared with the "
        f"server's max_connections: cannot reach the server ({reason}).",
        hint=(
            "Nothing to do where no server can be reached (a build step). "
            f"Elsewhere, check HOST and PORT of DATABASES[{alias!r}] and that "
            f"the server is up, then run manage.py check --database {alias} again."
        ),
        id=_id("I006"),
    )


def _mysql_server_issues(
    pooled: Mapping[str, dict[str, Any]],
    wanted: list[str],
    per_process: Mapping[str, dict[str, int]],
    budgets: Mapping[str, dict[tuple[str, ...], int]],
) -> list[CheckMessage]:
    """E005/W005, E008/W008 and I006 for the MySQL aliases in ``wanted``.

    The server's ``@@max_connections``, read once per server through a short
    PyMySQL connection as the alias's user (a ``SUPER`` or ``CONNECTION
    ADMIN`` user gets one more, which the app must not count on).
    """
    servers: dict[str, tuple[str, dict[str, Any], str]] = {}
    for alias, options, params, label in _valid_pooled({a: pooled[a] for a in wanted}):
        option = "MAX_CONNS" if options.HOST_MAX_CONNS is None else "HOST_MAX_CONNS"
        servers.setdefault(label, (alias, params, option))
    issues: list[CheckMessage] = []
    for label, (alias, params, option) in servers.items():
        import pymysql

        try:
            conn = pymysql.connect(**params)
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT @@max_connections")
                    max_connections = int(cursor.fetchone()[0])
            finally:
                conn.close()
        except pymysql.MySQLError as exc:
            issues.append(_unreachable(alias, option, exc))
            continue
        limits = ServerLimits(max_connections=max_connections, superuser_reserved_connections=0)
        issues.extend(
            _capacity_issues(label, per_process.get(label, {}), limits, server_kind="mysql")
        )
        issues.extend(_budget_issues(label, budgets.get(label, {}), limits, server_kind="mysql"))
    return issues


def _valid_pooled(
    pooled: Mapping[str, dict[str, Any]],
) -> Iterable[tuple[str, PoolOptions, dict[str, Any], str]]:
    """Every valid pooled alias: its options, check connection parameters and server label.

    The parameters are the driver's: libpq's for PostgreSQL, PyMySQL's for MySQL.
    """
    for alias, settings_dict in pooled.items():
        try:
            options = alias_pool_options(alias, settings_dict)
            if is_mysql_engine(settings_dict.get("ENGINE")):
                params = mysql_connection_params(alias, settings_dict, timeout=SERVER_TIMEOUT)
                label = mysql_server_label(params)
            else:
                params = connection_params(
                    alias, settings_dict, application_name=CHECK_APPLICATION_NAME
                )
                label = server_label(params)
        except (ImproperlyConfigured, ImportError):
            continue
        yield alias, options, params, label


def _max_conns_by_server(pooled: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Server label -> {alias: MAX_CONNS} of every valid pooled alias (a process opens them all).

    Aliases with a host budget are left out: the budget, not MAX_CONNS per
    process, bounds what a host opens (see :func:`_budgets_by_server`).
    """
    result: dict[str, dict[str, int]] = {}
    for alias, options, _params, label in _valid_pooled(pooled):
        if options.HOST_MAX_CONNS is None:
            result.setdefault(label, {})[alias] = options.MAX_CONNS
    return result


def _budgets_by_server(
    pooled: Mapping[str, dict[str, Any]],
) -> dict[str, dict[tuple[str, ...], int]]:
    """Server label -> {aliases sharing one host budget: HOST_MAX_CONNS}.

    Aliases with the same user, database and server share one budget and
    count once (with the largest HOST_MAX_CONNS among them: the pools refuse
    to start when they disagree).
    """
    by_key: dict[tuple[str, str], tuple[list[str], int]] = {}
    for alias, options, params, label in _valid_pooled(pooled):
        if options.HOST_MAX_CONNS is None:
            continue
        key = budget_key_of(params)
        aliases, size = by_key.get((label, key), ([], 0))
        by_key[(label, key)] = ([*aliases, alias], max(size, options.HOST_MAX_CONNS))
    result: dict[str, dict[tuple[str, ...], int]] = {}
    for (label, _key), (aliases, size) in by_key.items():
        result.setdefault(label, {})[tuple(aliases)] = size
    return result


def _server_phrases(label: str, limits: ServerLimits, proxied_to: str | None) -> tuple[str, str]:
    """What E005/W005 and E008/W008 say of the server, and of what may sit in between."""
    reserved = f" - {limits.reserved} reserved" if limits.reserved else ""
    server = (
        f"the {limits.usable} connections the server at {label} accepts (max_connections "
        f"{limits.max_connections}{reserved})"
    )
    between = (
        ""
        if proxied_to is None
        else f" (unless what answers at {label} is a connection pooler such as PgBouncer: the "
        f"server itself listens on {proxied_to})"
    )
    return server, between


#: What E005/W005 and E008/W008 suggest putting in front of the server, per kind of server.
_POOLERS = {
    "postgresql": ("PgBouncer in transaction mode", "PgBouncer's job"),
    "mysql": ("a connection multiplexer such as ProxySQL", "a proxy's job (ProxySQL)"),
}


def _capacity_issues(
    label: str,
    max_conns: Mapping[str, int],
    limits: ServerLimits,
    proxied_to: str | None = None,
    server_kind: str = "postgresql",
) -> list[CheckMessage]:
    """E005 / W005 for the pooled aliases of one server.

    ``proxied_to`` says where the server itself listens (``port 5432``, ``a
    Unix socket``) when that is not what the check reached: something sits in
    between (a connection pooler not detected as PgBouncer, or a port
    forward), so exceeding the server's limit is only a warning (W005), never
    an error that would stop
    ``migrate`` or the test runner.
    """
    total = sum(max_conns.values())
    usable = limits.usable
    if not max_conns or 2 * total <= usable:
        return []
    if len(max_conns) == 1:
        ((alias, n),) = max_conns.items()
        who = f"DATABASES[{alias!r}]: OPTIONS['MAX_CONNS'] = {n} per process is"
    else:
        names = ", ".join(f"DATABASES[{alias!r}]" for alias in max_conns)
        parts = ", ".join(f"{alias}: {n}" for alias, n in max_conns.items())
        who = f"{names}: OPTIONS['MAX_CONNS'] add up to {total} per process ({parts}),"
    server, between = _server_phrases(label, limits, proxied_to)
    if total > usable and proxied_to is not None:
        fit = max(1, usable // 4)
        return [
            Warning(
                f"{who} more than {server}: one process alone can exhaust the server{between}.",
                hint=(
                    f"If the app reaches the server directly, keep workers x MAX_CONNS below "
                    f"{usable} (e.g. 4 workers x {fit} = {4 * fit}). Behind PgBouncer, add "
                    "this check's user to its stats_users so the pool mode can be detected."
                ),
                id=_id("W005"),
            )
        ]
    if total > usable:
        fit = max(1, usable // 4)
        return [
            Error(
                f"{who} more than {server}: one process alone can exhaust the server.",
                hint=(
                    f"Every process (gunicorn or Celery worker, script) opens up to MAX_CONNS: "
                    f"keep workers x MAX_CONNS below {usable} (e.g. 4 workers x {fit} = "
                    f"{4 * fit}), or put {_POOLERS[server_kind][0]} in front of the server."
                ),
                id=_id("E005"),
            )
        ]
    processes = -(-usable // total)  # ceil: this many processes reach the limit
    fit = max(1, usable // 4)
    return [
        Warning(
            f"{who} more than half of {server}: {processes} processes (gunicorn or Celery "
            f"workers, scripts) can exhaust it{between}.",
            hint=(
                f"Keep workers x MAX_CONNS below {usable}: {processes} workers x {total} = "
                f"{processes * total} is too many, 4 workers x {fit} = {4 * fit} fits. Lower "
                f"MAX_CONNS, or put {_POOLERS[server_kind][0]} in front of the server."
            ),
            id=_id("W005"),
        )
    ]


def _budget_issues(
    label: str,
    budgets: Mapping[tuple[str, ...], int],
    limits: ServerLimits,
    proxied_to: str | None = None,
    server_kind: str = "postgresql",
) -> list[CheckMessage]:
    """E008 / W008 for the host budgets of one server.

    A budget bounds the connections of one host; what several hosts open
    together is not bounded by anything here. So the sum of the budgets is an
    error above the server's usable connections (one host alone can exhaust
    it), and a warning above half of them (two hosts can). Through something
    in between (``proxied_to``, as for E005) the error is only a warning.
    """
    total = sum(budgets.values())
    usable = limits.usable
    if not budgets or 2 * total <= usable:
        return []
    if len(budgets) == 1:
        ((aliases, n),) = budgets.items()
        names = ", ".join(f"DATABASES[{alias!r}]" for alias in aliases)
        shared = " (one budget, shared)" if len(aliases) > 1 else ""
        who = f"{names}: OPTIONS['HOST_MAX_CONNS'] = {n} per host{shared} is"
    else:
        names = ", ".join(f"DATABASES[{alias!r}]" for aliases in budgets for alias in aliases)
        parts = ", ".join(f"{'+'.join(aliases)}: {n}" for aliases, n in budgets.items())
        who = (
            f"{names}: the host budgets (OPTIONS['HOST_MAX_CONNS']) add up to {total} per "
            f"host ({parts}),"
        )
    server, between = _server_phrases(label, limits, proxied_to)
    pooler, job = _POOLERS[server_kind]
    across = (
        "A host budget bounds the processes of one host only (one container, with its own "
        f"lock directory, is a host of its own); a budget across hosts stays {job}: "
        f"put {pooler} in front of the server."
    )
    if total > usable:
        fit = max(1, usable // 2)
        message = f"{who} more than {server}: one host alone can exhaust the server{between}."
        hint = (
            f"Lower HOST_MAX_CONNS so that hosts x HOST_MAX_CONNS stays below {usable} "
            f"(e.g. 2 hosts x {fit} = {2 * fit}). {across}"
        )
        if proxied_to is not None:
            return [Warning(message, hint=hint, id=_id("W008"))]
        return [Error(message, hint=hint, id=_id("E008"))]
    hosts = -(-usable // total)  # ceil: this many hosts reach the limit
    fit = max(1, usable // 4)
    return [
        Warning(
            f"{who} more than half of {server}: {hosts} hosts (or containers) sharing the "
            f"server can exhaust it{between}.",
            hint=(
                f"Several hosts may share the server, each with a budget of its own: keep "
                f"hosts x HOST_MAX_CONNS below {usable} ({hosts} hosts x {total} = "
                f"{hosts * total} is too many, 4 hosts x {fit} = {4 * fit} fits). {across}"
            ),
            id=_id("W008"),
        )
    ]


def _pgbouncer_issues(
    alias: str,
    settings_dict: Mapping[str, Any],
    options: PoolOptions,
    mode: str,
    params: Mapping[str, Any],
) -> list[CheckMessage]:
    """W004: what breaks behind PgBouncer in transaction or statement mode."""
    label = server_label(params)
    issues: list[CheckMessage] = []
    if options.RESET_QUERY is not None:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: OPTIONS['RESET_QUERY'] = {options.RESET_QUERY!r} on "
                f"PgBouncer in {mode} mode at {label}: between transactions no server session "
                "is this connection's, so the reset runs on whichever server connection "
                "PgBouncer picks, costs a round trip on every return and can discard state "
                "PgBouncer keeps there.",
                hint=(
                    f"Remove RESET_QUERY from DATABASES[{alias!r}]['OPTIONS']; in "
                    f"{mode} mode, do not rely on session state between transactions."
                ),
                id=_id("W004"),
            )
        )
    role = (settings_dict.get("OPTIONS") or {}).get("assume_role")
    if role:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: OPTIONS['assume_role'] = {role!r} on PgBouncer in "
                f"{mode} mode at {label}: Django runs SET ROLE once per connection, but the "
                "role stays on one server connection, which PgBouncer then lends to other "
                "clients, while this connection's later transactions may run elsewhere "
                "without it.",
                hint=(
                    f"Remove assume_role from DATABASES[{alias!r}]['OPTIONS'] and connect as "
                    "that role (USER), or give this alias a direct connection or a PgBouncer "
                    "database in session mode."
                ),
                id=_id("W004"),
            )
        )
    if settings_dict.get("DISABLE_SERVER_SIDE_CURSORS") is not True:
        issues.append(
            Warning(
                f"DATABASES[{alias!r}]: DISABLE_SERVER_SIDE_CURSORS is not True on PgBouncer "
                f"in {mode} mode at {label}: QuerySet.iterator() outside atomic() opens a "
                "server-side cursor that the next FETCH may not find on the server connection "
                "PgBouncer picks for it.",
                hint=(
                    f"Set DATABASES[{alias!r}]['DISABLE_SERVER_SIDE_CURSORS'] = True (a "
                    "top-level key, not an OPTIONS key)."
                ),
                id=_id("W004"),
            )
        )
    return issues
