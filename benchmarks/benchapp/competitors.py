"""The competitors: what each one is, and the ``DATABASES`` entry that makes it.

Imported by the orchestrator (``benchmarks/run.py``), by the Django settings of
the benchmark app and by ``benchmarks/micro.py``; no Django import here, so the
orchestrator can use it without setting Django up.

Every competitor is served by its own gunicorn (or, for ``micro``, runs in its
own process), so the driver choice -- psycopg2 or psycopg 3, which Django makes
once per process -- is made per competitor: ``hide_psycopg`` ones run with
``benchmarks/psycopg2_only`` on ``PYTHONPATH``, whose ``sitecustomize`` makes
``import psycopg`` fail, so Django's stock backend binds to psycopg2.

Ours runs twice: on psycopg2 (``ours``, beside django-db-geventpool and the
psycopg2 stock backend) and on psycopg 3 (``ours-psycopg3``, beside Django's
native pool, which needs psycopg 3): each pool is measured against the others
on the same driver, in the same run. A third time on psycopg2 with
``POOL_MODE = "transaction"`` (``ours-transaction``): the connection goes
back to the pool after each statement outside ``atomic()``. Its reference is
``raw-per-query``: the same Django app whose ``/wait/`` view takes a raw
connection only for each of its two queries.

On MySQL (the ``mysql`` scenario, ``MYSQL_CONFIGS``) ours runs in both modes
(``mysql-ours``, ``mysql-ours-transaction``) beside Django's stock MySQL
backend and django-mysql-geventpool, all on PyMySQL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Seconds the ``/sleep/`` view holds its connection on the server.
SLEEP_SECONDS = 0.05

#: Seconds the ``/wait/`` view waits between its two queries, off the database
#: (a cooperative sleep standing for a call to another service: HTTP, an LLM).
WAIT_SECONDS = 0.05

#: The views every competitor is measured on, in order (the path is ``/<view>/``).
VIEWS = ("item", "sleep", "tx", "wait")

#: Seconds the ``/skewed/`` view holds its connection on the server (``pg_sleep``).
SKEW_HOLD_SECONDS = 0.05

#: Items seeded with primary keys 1..ITEMS (``/item/<pk>/`` and ``/tx/`` pick from them).
ITEMS = 1000

#: The database every competitor works in (created by the orchestrator).
DBNAME = "dgp_bench"

#: ``application_name`` prefix of every benchmark connection: ``dgpb-<key>-<pid>``.
APPNAME_PREFIX = "dgpb"

#: Our pool on psycopg 3 (the ``postgresql_psycopg3`` engine).
OURS_PSYCOPG3 = "ours-psycopg3"

#: Our pool on psycopg2 in transaction mode (``POOL_MODE = "transaction"``).
OURS_TRANSACTION = "ours-transaction"

#: The reference of transaction mode: Django serving ``/wait/`` with a raw
#: connection taken for each query only (``benchapp/views.py``: ``wait_raw``).
RAW_PER_QUERY = "raw-per-query"

#: django-pg-real-pool: another pool that gives the connection back per statement.
PG_REAL_POOL = "pg-real-pool"

#: The ORM reference of transaction mode: the bare queue given back per statement.
QUEUE_PER_STATEMENT = "queue-per-statement"

#: Our engine per competitor that is ours.
OUR_ENGINES = {
    "ours": "django_gevent_pool.backends.postgresql_psycopg2",
    OURS_PSYCOPG3: "django_gevent_pool.backends.postgresql_psycopg3",
    OURS_TRANSACTION: "django_gevent_pool.backends.postgresql_psycopg2",
}

#: Our MySQL engine in transaction mode (the ``mysql`` scenario's, on PyMySQL).
MYSQL_OURS_TRANSACTION = "mysql-ours-transaction"

#: OPTIONS of ours beyond MAX_CONNS, REUSE_CONNS and POOL_TIMEOUT, per competitor
#: (on PostgreSQL and on MySQL).
OUR_EXTRA_OPTIONS: dict[str, dict[str, Any]] = {
    OURS_TRANSACTION: {"POOL_MODE": "transaction"},
    MYSQL_OURS_TRANSACTION: {"POOL_MODE": "transaction"},
}


@dataclass(frozen=True)
class Competitor:
    """One way of serving the same views.

    ``key`` names it in files and environment variables; ``label`` in tables.
    ``driver`` is the module Django (or the raw app) must end up using.
    ``capped_by_gunicorn``: the backend has no connection cap of its own, so
    gunicorn's ``worker_connections`` is set to MAX_CONNS to keep the server
    within ``workers x MAX_CONNS`` connections, and wrk opens only that many
    client connections (more would wait in the listen queue for ever, as
    keep-alive connections never free a worker slot).
    """

    key: str
    label: str
    driver: str  # "psycopg2" or "psycopg" (or "pymysql": the mysql scenario)
    hide_psycopg: bool
    pgbouncer: bool = False
    capped_by_gunicorn: bool = False
    raw_app: bool = False
    ours: bool = False
    in_micro: bool = False
    notes: str = ""
    views: tuple[str, ...] = VIEWS  # the views it serves; the others are skipped for it

    def serves(self, view: str) -> bool:
        """True when this competitor is measured on ``view``."""
        return view in self.views


COMPETITORS: tuple[Competitor, ...] = (
    Competitor(
        "raw",
        "raw psycopg2 (limit)",
        "psycopg2",
        hide_psycopg=True,
        raw_app=True,
        in_micro=True,
        notes="no Django, no pool: MAX_CONNS connections held open in a gevent Queue per worker",
    ),
    Competitor(
        "stock-age0",
        "Django stock, CONN_MAX_AGE=0",
        "psycopg2",
        hide_psycopg=True,
        capped_by_gunicorn=True,
        notes="a new server connection per request",
    ),
    Competitor(
        "stock-age60",
        "Django stock, CONN_MAX_AGE=60",
        "psycopg2",
        hide_psycopg=True,
        capped_by_gunicorn=True,
        notes="persistent: one connection per greenlet (= per keep-alive client)",
    ),
    Competitor(
        "geventpool",
        "django-db-geventpool 4.0.8",
        "psycopg2",
        hide_psycopg=True,
        in_micro=True,
        notes="SELECT 1 on every checkout",
    ),
    Competitor(
        "django-pool",
        "Django native pool (psycopg 3)",
        "psycopg",
        hide_psycopg=False,
        in_micro=True,
        notes="psycopg_pool, min_size=max_size=MAX_CONNS",
    ),
    Competitor(
        "pgbouncer",
        "PgBouncer (transaction) + stock",
        "psycopg2",
        hide_psycopg=True,
        pgbouncer=True,
        notes="pool_size = workers x MAX_CONNS; Django CONN_MAX_AGE=60 to PgBouncer",
    ),
    Competitor(
        PG_REAL_POOL,
        "django-pg-real-pool 1.1.0",
        "psycopg",
        hide_psycopg=False,
        notes=(
            "Django's native pool (psycopg 3 + psycopg_pool, min_size=max_size=MAX_CONNS) that"
            " gives the connection back after each cursor outside atomic() (Django's own"
            " connect() and close() per statement) and after each transaction; no pinning"
        ),
    ),
    Competitor(
        "django-queue",
        "Django on a bare queue (no pool)",
        "psycopg2",
        hide_psycopg=True,
        in_micro=True,
        notes=(
            "Django's backend taking connections from a plain gevent Queue (benchapp/queuebackend):"
            " Django's own connect/close work around a checkout that costs next to nothing"
        ),
    ),
    Competitor(
        "ours",
        "django-gevent-pool (ours, psycopg2)",
        "psycopg2",
        hide_psycopg=False,
        ours=True,
        in_micro=True,
        notes="installed from the working tree; postgresql_psycopg2 engine",
    ),
    Competitor(
        OURS_PSYCOPG3,
        "django-gevent-pool (ours, psycopg 3)",
        "psycopg",
        hide_psycopg=False,
        ours=True,
        in_micro=True,
        notes=(
            "installed from the working tree; postgresql_psycopg3 engine, the same OPTIONS as"
            " ours on psycopg2; to compare with Django's native pool on the same driver"
        ),
    ),
    Competitor(
        OURS_TRANSACTION,
        "django-gevent-pool (ours, transaction mode)",
        "psycopg2",
        hide_psycopg=False,
        ours=True,
        in_micro=True,
        notes=(
            'the same as ours on psycopg2 plus POOL_MODE="transaction": the connection goes'
            " back to the pool after each statement outside atomic(), and after each"
            " outermost atomic()"
        ),
    ),
    Competitor(
        QUEUE_PER_STATEMENT,
        "Django ORM + bare conn. per statement (ref.)",
        "psycopg2",
        hide_psycopg=True,
        notes=(
            "the wait view only: the same ORM view on Django's backend taking a connection from"
            " MAX_CONNS in a plain gevent Queue for each statement (benchapp/queueperstatement:"
            " the bare queue plus django-pg-real-pool's give-back mixin): no pool logic, no"
            " pinning; what a connection per statement costs Django alone"
        ),
        views=("wait",),
    ),
    Competitor(
        RAW_PER_QUERY,
        "Django + raw conn. per query (reference)",
        "psycopg2",
        hide_psycopg=True,
        notes=(
            "the wait view only: the same Django app, each of its two queries on a psycopg2"
            " connection taken for that query alone from MAX_CONNS in a plain gevent Queue"
            " (no pool logic), same SQL as the ORM's; the best transaction mode can do"
        ),
        views=("wait",),
    ),
)

BY_KEY: dict[str, Competitor] = {c.key: c for c in COMPETITORS}

#: The two configurations of ours compared by the ``skewed`` scenario (not HTTP
#: competitors: served only by that scenario, with its own worker count).
SKEW_STATIC = "skew-static"
SKEW_HOST = "skew-host"
SKEW_CONFIGS: dict[str, Competitor] = {
    SKEW_STATIC: Competitor(
        SKEW_STATIC,
        "static split (MAX_CONNS = budget / workers)",
        "psycopg2",
        hide_psycopg=False,
        ours=True,
        notes="ours on psycopg2, each worker its fixed share of the budget, no HOST_MAX_CONNS",
    ),
    SKEW_HOST: Competitor(
        SKEW_HOST,
        "host budget (HOST_MAX_CONNS = budget)",
        "psycopg2",
        hide_psycopg=False,
        ours=True,
        notes="ours on psycopg2, HOST_MAX_CONNS = MAX_CONNS = the budget, one lock directory",
    ),
}

#: The competitors of the ``mysql`` scenario (``benchkit/mysqlbench.py``): the
#: primary-key and wait views served from MySQL/MariaDB, each as a MySQL user of
#: its own (``MYSQL_USERS``: MySQL has no application_name, its sessions are
#: counted by user in ``information_schema.PROCESSLIST``). Not HTTP competitors
#: of the PostgreSQL scenarios: served only by that scenario.
MYSQL_OURS = "mysql-ours"
MYSQL_STOCK_AGE0 = "mysql-stock-age0"
MYSQL_STOCK_AGE60 = "mysql-stock-age60"
MYSQL_GEVENTPOOL = "mysql-geventpool"
#: The views of the ``mysql`` scenario, in order: the same ORM views as on PostgreSQL.
MYSQL_VIEWS = ("item", "wait")
MYSQL_CONFIGS: dict[str, Competitor] = {
    MYSQL_OURS: Competitor(
        MYSQL_OURS,
        "django-gevent-pool (ours, MySQL engine)",
        "pymysql",
        hide_psycopg=False,
        ours=True,
        notes=(
            "installed from the working tree; django_gevent_pool.backends.mysql (Django's MySQL"
            " backend on PyMySQL, which the engine installs as MySQLdb itself),"
            " MAX_CONNS = REUSE_CONNS, POOL_TIMEOUT 10"
        ),
        views=MYSQL_VIEWS,
    ),
    MYSQL_OURS_TRANSACTION: Competitor(
        MYSQL_OURS_TRANSACTION,
        "django-gevent-pool (ours, MySQL, transaction mode)",
        "pymysql",
        hide_psycopg=False,
        ours=True,
        notes=(
            'the same as ours on MySQL plus POOL_MODE="transaction": the connection goes back'
            " to the pool after each statement outside atomic() and after each outermost"
            " atomic(); refused (the run stops) if, after one ORM statement in autocommit,"
            " its pool still has a connection lent"
        ),
        views=MYSQL_VIEWS,
    ),
    MYSQL_STOCK_AGE0: Competitor(
        MYSQL_STOCK_AGE0,
        "Django stock MySQL, CONN_MAX_AGE=0",
        "pymysql",
        hide_psycopg=False,
        capped_by_gunicorn=True,
        notes="PyMySQL installed as MySQLdb in the worker; a new server connection per request",
        views=MYSQL_VIEWS,
    ),
    MYSQL_STOCK_AGE60: Competitor(
        MYSQL_STOCK_AGE60,
        "Django stock MySQL, CONN_MAX_AGE=60",
        "pymysql",
        hide_psycopg=False,
        capped_by_gunicorn=True,
        notes=(
            "PyMySQL installed as MySQLdb in the worker; persistent: one connection per"
            " greenlet (= per keep-alive client)"
        ),
        views=MYSQL_VIEWS,
    ),
    MYSQL_GEVENTPOOL: Competitor(
        MYSQL_GEVENTPOOL,
        "django-mysql-geventpool 0.2.5",
        "pymysql",
        hide_psycopg=False,
        notes=(
            "PyMySQL installed as MySQLdb in the worker; OPTIONS MAX_CONNS; a gevent Queue"
            " with no checkout timeout, ping() on every checkout"
        ),
        views=MYSQL_VIEWS,
    ),
}
#: The MySQL user each competitor of the ``mysql`` scenario connects as.
MYSQL_USERS: dict[str, str] = {
    MYSQL_OURS: "dgpb_ours",
    MYSQL_OURS_TRANSACTION: "dgpb_ours_tx",
    MYSQL_STOCK_AGE0: "dgpb_age0",
    MYSQL_STOCK_AGE60: "dgpb_age60",
    MYSQL_GEVENTPOOL: "dgpb_dmg",
}
#: Their password (loopback only; the users are dropped at the end of the scenario).
MYSQL_PASSWORD = "dgpb-bench"

#: Micro-only variant: our pool without Django (``ConnectionPool.getconn``/``putconn``).
MICRO_BARE = "ours-bare"


def appname(key: str, pid: int | None = None) -> str:
    """The ``application_name`` a process of competitor ``key`` connects with."""
    return f"{APPNAME_PREFIX}-{key}-{os.getpid() if pid is None else pid}"


def database(
    key: str,
    *,
    host: str,
    port: str,
    user: str,
    password: str,
    max_conns: int,
    pool_timeout: float = 10.0,
    host_max_conns: int | None = None,
    host_lock_dir: str | None = None,
) -> dict[str, Any]:
    """The ``DATABASES["default"]`` entry of competitor ``key`` (Django-served ones only).

    ``host_max_conns`` and ``host_lock_dir`` go to ours as ``HOST_MAX_CONNS``
    and ``HOST_LOCK_DIR`` when set (the ``skewed`` scenario's host budget).
    """
    common: dict[str, Any] = {
        "NAME": DBNAME,
        "USER": user,
        "PASSWORD": password,
        "HOST": host,
        "PORT": port,
    }
    name = appname(key)
    if key in ("stock-age0", RAW_PER_QUERY):
        # The reference's views never use Django's connection (only /info/ does).
        return {
            **common,
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": name},
        }
    if key in ("stock-age60", "pgbouncer"):
        return {
            **common,
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 60,
            "OPTIONS": {"application_name": name},
        }
    if key == "geventpool":
        return {
            **common,
            "ENGINE": "django_db_geventpool.backends.postgresql_psycopg2",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max_conns,
                "application_name": name,
            },
        }
    if key == "django-pool":
        return {
            **common,
            "ENGINE": "django.db.backends.postgresql",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "pool": {"min_size": max_conns, "max_size": max_conns, "timeout": pool_timeout},
                "application_name": name,
            },
        }
    if key == PG_REAL_POOL:
        return {
            **common,
            "ENGINE": "django_pg_real_pool",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "pool": {"min_size": max_conns, "max_size": max_conns, "timeout": pool_timeout},
                "application_name": name,
            },
        }
    if key == QUEUE_PER_STATEMENT:
        return {
            **common,
            "ENGINE": "benchapp.queueperstatement",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": name},
        }
    if key == "django-queue":
        return {
            **common,
            "ENGINE": "benchapp.queuebackend",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": name},
        }
    if key in OUR_ENGINES or key in SKEW_CONFIGS:
        host: dict[str, Any] = {}
        if host_max_conns is not None:
            host = {"HOST_MAX_CONNS": host_max_conns, "HOST_LOCK_DIR": host_lock_dir}
        return {
            **common,
            "ENGINE": OUR_ENGINES.get(key, OUR_ENGINES["ours"]),
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max_conns,
                "POOL_TIMEOUT": pool_timeout,
                **OUR_EXTRA_OPTIONS.get(key, {}),
                **host,
                "application_name": name,
            },
        }
    if key in MYSQL_CONFIGS:
        return mysql_database(key, common, max_conns, pool_timeout)
    raise ValueError(f"competitor {key!r} is not served by Django")


def mysql_database(
    key: str, common: dict[str, Any], max_conns: int, pool_timeout: float
) -> dict[str, Any]:
    """The ``DATABASES["default"]`` entry of a competitor of the ``mysql`` scenario."""
    if MYSQL_CONFIGS[key].ours:
        return {
            **common,
            "ENGINE": "django_gevent_pool.backends.mysql",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max_conns,
                "POOL_TIMEOUT": pool_timeout,
                **OUR_EXTRA_OPTIONS.get(key, {}),
            },
        }
    if key == MYSQL_GEVENTPOOL:
        return {
            **common,
            "ENGINE": "django_mysql_geventpool.backends.mysql",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"MAX_CONNS": max_conns},
        }
    return {
        **common,
        "ENGINE": "django.db.backends.mysql",
        "CONN_MAX_AGE": 60 if key == MYSQL_STOCK_AGE60 else 0,
        "OPTIONS": {},
    }


def make_psycopg2_cooperative(key: str) -> None:
    """Install a gevent wait callback in psycopg2, the way each competitor's users do.

    psycogreen's for the stock backend, PgBouncer, the raw app and
    django-db-geventpool (whose README asks for it); our own for ours. psycopg 3
    competitors need none: Django's native pool gets psycopg's own
    gevent-friendly wait (picked when ``psycopg`` is imported after the
    monkey-patching, as in a gunicorn gevent worker without ``--preload``), and
    ours on psycopg 3 installs its own when its pool is made. The ``mysql``
    scenario's competitors other than ours get PyMySQL installed as ``MySQLdb``.
    """
    if key in MYSQL_CONFIGS:
        if not MYSQL_CONFIGS[key].ours:
            # What a gevent user of the stock backend (or of django-mysql-geventpool) must
            # do: mysqlclient's C waits would block the hub. Ours does it in its engine.
            import pymysql

            pymysql.install_as_MySQLdb()
        return
    competitor = BY_KEY.get(key) or SKEW_CONFIGS.get(key)
    if competitor is not None and competitor.driver == "psycopg":
        return
    if key == MICRO_BARE or (competitor is not None and competitor.ours):
        import django_gevent_pool

        django_gevent_pool.patch_psycopg2()
        return
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def unavailable(key: str) -> str | None:
    """Why competitor ``key`` cannot run with the working tree's package, or None if it can.

    Ours with an option the installed package does not know yet (``POOL_MODE``
    before it exists) is refused at its first connection with
    ``ImproperlyConfigured``: the orchestrator asks here first and skips it
    with this message instead of failing the whole run.
    """
    extra = OUR_EXTRA_OPTIONS.get(key)
    if not extra:
        return None
    from django_gevent_pool import PoolConfigError, PoolOptions

    try:
        PoolOptions.from_mapping({"MAX_CONNS": 1, **extra}, name=f"{key} (DATABASES['default'])")
    except PoolConfigError as exc:
        return f"this django_gevent_pool refuses {extra}: {exc}"
    return None


def env_settings() -> dict[str, Any]:
    """Server and sizing parameters handed down by the orchestrator (``DGPB_*``).

    ``DGPB_POOL_TIMEOUT``, ``DGPB_HOST_MAX_CONNS`` and ``DGPB_HOST_LOCK_DIR``
    are set by the ``skewed`` scenario only.
    """
    host_max = os.environ.get("DGPB_HOST_MAX_CONNS")
    return {
        "host": os.environ.get("DGPB_HOST", "127.0.0.1"),
        "port": os.environ.get("DGPB_PORT", "5432"),
        "user": os.environ.get("DGPB_USER", "postgres"),
        "password": os.environ.get("DGPB_PASSWORD", ""),
        "max_conns": int(os.environ.get("DGPB_MAX_CONNS", "20")),
        "pool_timeout": float(os.environ.get("DGPB_POOL_TIMEOUT", "10")),
        "host_max_conns": int(host_max) if host_max else None,
        "host_lock_dir": os.environ.get("DGPB_HOST_LOCK_DIR") or None,
    }
