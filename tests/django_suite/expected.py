"""Tests of Django's own suite that fail through our engine, on purpose, and why.

``run.py`` fails on any failure or error of Django's suite not listed here, and
on any deviation listed here that no longer fails. ``drivers`` says with which
driver's engine it fails (``postgresql_psycopg2``, ``postgresql_psycopg3``;
``pymysql``: ``mysql``, whose deviations are listed apart, in ``_MYSQL``),
``stock_too`` whether Django's stock backend on the same driver (psycopg2 with
the same gevent wait callback in gevent mode; psycopg 3 with its own
gevent-friendly wait; Django's MySQL backend on PyMySQL installed as
``MySQLdb``) fails it too in this environment; ``run.py --backend both``
checks that claim. ``pool_modes`` says with which of our ``POOL_MODE``
values it fails (``run.py --pool-mode``; both unless said). Only deviations
that are ours need a reason about us.
A deviation that depends on what is installed (``psycopg_pool``) says so in
its condition.

Not listed because not run: in gevent mode, Django's async tests (``async def``
test methods, every ``*_async`` one among them) are left out by ``runner.py``:
the async ORM fails under gevent's monkey-patching with the stock backend too
(``SynchronousOnlyOperation``), on either driver, which ``run.py
--include-async --backend both`` shows (psycopg 3: the same 57 tests of
handlers, basic and sessions_tests fail with both backends).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

BOTH = frozenset({"gevent", "threads"})
GEVENT = frozenset({"gevent"})
THREADS = frozenset({"threads"})
#: Drivers (``run.py --driver``): psycopg2, psycopg 3, or both (the PostgreSQL ones).
ALL_DRIVERS = frozenset({"psycopg2", "psycopg"})
PSYCOPG2 = frozenset({"psycopg2"})
PSYCOPG3 = frozenset({"psycopg"})
#: MySQL (``run.py --driver pymysql``): our ``mysql`` engine.
PYMYSQL = frozenset({"pymysql"})
#: Our engine's OPTIONS["POOL_MODE"] (``run.py --pool-mode``): both, or transaction only.
ANY_POOL_MODE = frozenset({"session", "transaction"})
SESSION = frozenset({"session"})
TRANSACTION = frozenset({"transaction"})

#: Django's native pool (OPTIONS["pool"]) needs psycopg_pool (``psycopg[pool]``),
#: which our test extra does not install.
HAS_PSYCOPG_POOL = importlib.util.find_spec("psycopg_pool") is not None


@dataclass(frozen=True)
class Deviation:
    """One test of Django's suite expected to fail, in which modes, with which drivers, and why.

    ``stock_too`` is about the stock backend on the same driver. ``pool_modes``
    says with which of our engine's ``POOL_MODE`` values it fails.
    """

    test: str  # the unittest id: app.module.Class.test_method
    modes: frozenset[str]
    stock_too: bool
    reason: str
    drivers: frozenset[str] = ALL_DRIVERS
    pool_modes: frozenset[str] = ANY_POOL_MODE


_HEALTH_CHECKS = (
    "A pooled connection goes back to the pool at every request end "
    "(close_if_unusable_or_obsolete), whatever CONN_MAX_AGE says: the pool, not "
    "the greenlet that served a request, keeps connections alive (README.rst, "
    "Options: CONN_MAX_AGE and CONN_HEALTH_CHECKS). These tests expect the "
    "wrapper to keep one persistent connection across simulated requests, and "
    "CONN_HEALTH_CHECKS to check it at the next request's first query; here the "
    "next request borrows again, and the pool's checkout check (local on every "
    "checkout, a real ping after PING_AFTER idle seconds) does that job."
)

# POOL_MODE "transaction": what its design changes for Django's tests.
_BETWEEN_STATEMENTS = (
    "POOL_MODE 'transaction' gives the physical connection back to the pool after each "
    "statement outside atomic() in autocommit, and after the outermost atomic(); "
    "`connection.connection` is None until the next statement takes one again "
    "(README.rst, POOL_MODE). "
)
_TRANSACTION_MODE: list[Deviation] = [
    Deviation(
        "backends.base.test_base.ConnectionHealthChecksTests.test_health_checks_enabled",
        BOTH,
        stock_too=False,
        drivers=ALL_DRIVERS | PYMYSQL,
        pool_modes=TRANSACTION,
        reason=_BETWEEN_STATEMENTS
        + "The test keeps `connection.connection` after a query (None) as the old "
        "connection and asserts that a failed health check gave a new one "
        "(`assertIsNot(new, old)`): None is None. There is no persistent connection "
        "to health-check at the next request either: its first statement goes through "
        "connect(), later ones borrow a connection the pool's checkout check passed. "
        "(test_health_checks_disabled and test_health_checks_enabled_errors_occurred "
        "pass here only because they compare None with None.)",
    ),
    Deviation(
        "backends.base.test_base.ConnectionHealthChecksTests."
        "test_set_autocommit_health_checks_enabled",
        BOTH,
        stock_too=False,
        drivers=ALL_DRIVERS | PYMYSQL,
        pool_modes=TRANSACTION,
        reason=_BETWEEN_STATEMENTS
        + "The test's set_autocommit(True), which ends its simulated outermost atomic "
        "block, gives the connection back, so `connection.connection` is None where the "
        "test expects the very connection object used inside the block.",
    ),
    Deviation(
        "test_utils.tests.AssertNumQueriesUponConnectionTests."
        "test_ignores_connection_configuration_queries",
        BOTH,
        stock_too=False,
        drivers=ALL_DRIVERS | PYMYSQL,
        pool_modes=TRANSACTION,
        reason=_BETWEEN_STATEMENTS
        + "The test patches ensure_connection() to run a 'configuration' query whenever "
        "`connection.connection is None` (taken as: a connection is being opened), and "
        "expects assertNumQueries(1), whose entry connects first, not to count it. Here "
        "the connection is None again before every statement, so the query runs at the "
        "counted statement too; and the query, a statement of its own, gives the "
        "connection back before Django's _cursor() makes its cursor (which then takes "
        "one again). Setup queries of connection_created receivers run inside connect() "
        "holding the connection, as the test means.",
    ),
]

# MySQL (MariaDB 10.11 here), our engine on PyMySQL; the stock backend runs on
# PyMySQL too. In POOL_MODE "transaction", _TRANSACTION_MODE's three apply too.
_NO_TZ_TABLES = (
    "Environment, not ours: the server's time zone tables (mysql.time_zone_name...) "
    "are empty here (no mysql_tzinfo_to_sql run), so CONVERT_TZ() to a named zone "
    "returns NULL; Django's has_zoneinfo_database feature does not guard these "
    "tests. The stock backend fails them the same way."
)
_MYSQL: list[Deviation] = [
    *(
        Deviation(
            f"backends.base.test_base.ConnectionHealthChecksTests.{name}",
            BOTH,
            stock_too=False,
            reason=_HEALTH_CHECKS,
            drivers=PYMYSQL,
            pool_modes=SESSION,
        )
        for name in (
            "test_health_checks_disabled",
            "test_health_checks_enabled",
            "test_health_checks_enabled_errors_occurred",
            "test_set_autocommit_health_checks_enabled",
        )
    ),
    Deviation(
        "backends.mysql.test_schema.SchemaEditorTests.test_quote_value",
        BOTH,
        stock_too=True,
        drivers=PYMYSQL,
        reason=(
            "Driver, not ours: quote_value() escapes with the driver's escape(), and "
            "the test expects mysqlclient's result for bytes (b\"'bytes'\"); PyMySQL "
            "gives the hex literal \"X'6279746573'\". The stock backend on PyMySQL "
            "fails it the same way."
        ),
    ),
    Deviation(
        "backends.mysql.tests.IsolationLevelTests.test_auto_is_null_auto_config",
        BOTH,
        stock_too=False,
        drivers=PYMYSQL,
        reason=(
            "Django's MySQL session setup (SET SQL_AUTO_IS_NULL = 0, the isolation "
            "level) runs once, when the pool opens the physical connection; "
            "init_connection_state() on a borrowed connection runs only Django's "
            "version check (backends/base.py). The test calls init_connection_state() "
            "and reads the last query of connection.queries, expecting that SET: no "
            "query was logged (IndexError)."
        ),
    ),
    Deviation(
        "backends.mysql.tests.IsolationLevelTests.test_isolation_level_validation",
        BOTH,
        stock_too=False,
        drivers=PYMYSQL,
        reason=(
            "An invalid OPTIONS['isolation_level'] is refused with ImproperlyConfigured, "
            "as Django does, but by our settings check, before any pool is made, with "
            "its message on one line and prefixed with the alias and key "
            "(\"DATABASES['default']['OPTIONS']['isolation_level']: Invalid transaction "
            "isolation level 'xxx' specified. Use one of ...\"); the test looks for "
            "Django's two-line message."
        ),
    ),
    *(
        Deviation(
            f"db_functions.datetime.test_extract_trunc.DateFunctionWithTimeZoneTests.{name}",
            BOTH,
            stock_too=True,
            drivers=PYMYSQL,
                reason=_NO_TZ_TABLES,
        )
        for name in (
            "test_extract_func_explicit_timezone_priority",
            "test_extract_func_with_timezone",
            "test_extract_func_with_timezone_minus_no_offset",
            "test_trunc_func_with_timezone",
            "test_trunc_none",
            "test_trunc_timezone_applied_before_truncation",
        )
    ),
    Deviation(
        "timezones.tests.NewDatabaseTests.test_query_convert_timezones",
        BOTH,
        stock_too=True,
        drivers=PYMYSQL,
        reason=_NO_TZ_TABLES,
    ),
]

EXPECTED: list[Deviation] = [
    *(
        Deviation(
            f"backends.base.test_base.ConnectionHealthChecksTests.{name}",
            BOTH,
            stock_too=False,
            reason=_HEALTH_CHECKS,
            pool_modes=SESSION,  # transaction mode: see _TRANSACTION_MODE below
        )
        for name in (
            "test_health_checks_disabled",
            "test_health_checks_enabled",
            "test_health_checks_enabled_errors_occurred",
            "test_set_autocommit_health_checks_enabled",
        )
    ),
    Deviation(
        "backends.postgresql.tests.Tests.test_connect_pool_setting_ignored_for_psycopg2",
        BOTH,
        drivers=PSYCOPG2,  # skipped by Django on psycopg 3
        stock_too=False,
        reason=(
            "OPTIONS['pool'] = True is refused with ImproperlyConfigured, as Django does, "
            "but with our message (the alias, 'django-gevent-pool is the pool here: remove "
            "the key or set it to False') instead of Django's 'Database pooling requires "
            "psycopg >= 3', whose fix (install psycopg 3) is the wrong one with this backend."
        ),
    ),
    Deviation(
        "backends.postgresql.tests.Tests.test_copy_to_expert_cursors",
        GEVENT,
        drivers=PSYCOPG2,  # psycopg 3's COPY waits like any query: it passes
        stock_too=True,
        reason=(
            "psycopg2 refuses COPY while a gevent wait callback is installed (the stock "
            "backend fails it too, with psycogreen's callback). Ours raises CopyBlocksTheHub "
            "saying to run the COPY inside django_gevent_pool.blocking_copy(), which lifts "
            "the callback and blocks the hub for the COPY's duration; lifting it silently "
            "would stall every greenlet of a serving process unannounced."
        ),
    ),
    # psycopg 3 only: Django's native pool. These tests put OPTIONS["pool"] (True
    # or a dict of psycopg_pool arguments) on a copy of the default alias.
    *(
        Deviation(
            f"backends.postgresql.tests.Tests.{name}",
            BOTH,
            drivers=PSYCOPG3,
            stock_too=not HAS_PSYCOPG_POOL,
            reason=(
                "They connect with OPTIONS['pool'] set, asking for Django's own psycopg_pool "
                "pool: ours refuses it at connect time (check_settings) with "
                "ImproperlyConfigured naming the alias and saying that django-gevent-pool is "
                "the pool here (remove the key or set it to False); two pools in series "
                "would each cap the other. Without psycopg_pool installed (our test extra "
                "has none) they fail with the stock backend too, on "
                "`from psycopg_pool import PoolTimeout` / 'Error loading psycopg_pool module'."
            ),
        )
        for name in ("test_connect_pool", "test_connect_pool_with_timezone")
    ),
    *(
        Deviation(
            f"backends.postgresql.tests.Tests.{name}",
            BOTH,
            drivers=PSYCOPG3,
            stock_too=True,
            reason=(
                "Environment, not ours: they read Django's `pool` property (a psycopg_pool "
                "ConnectionPool made from OPTIONS['pool'], never opened nor used by ours), "
                "which raises 'Error loading psycopg_pool module' without psycopg_pool, with "
                "the stock backend too. With psycopg_pool installed both backends pass them."
            ),
        )
        for name in ("test_connect_pool_set_to_true", "test_pooling_health_checks")
        if not HAS_PSYCOPG_POOL
    ),
    *_TRANSACTION_MODE,
    *_MYSQL,
]
