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
on the same driver, in the same run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Seconds the ``/sleep/`` view holds its connection on the server.
SLEEP_SECONDS = 0.05

#: Items seeded with primary keys 1..ITEMS (``/item/<pk>/`` and ``/tx/`` pick from them).
ITEMS = 1000

#: The database every competitor works in (created by the orchestrator).
DBNAME = "dgp_bench"

#: ``application_name`` prefix of every benchmark connection: ``dgpb-<key>-<pid>``.
APPNAME_PREFIX = "dgpb"

#: Our pool on psycopg 3 (the ``postgresql_psycopg3`` engine).
OURS_PSYCOPG3 = "ours-psycopg3"

#: Our engine per competitor that is ours.
OUR_ENGINES = {
    "ours": "django_gevent_pool.backends.postgresql_psycopg2",
    OURS_PSYCOPG3: "django_gevent_pool.backends.postgresql_psycopg3",
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
    driver: str  # "psycopg2" or "psycopg"
    hide_psycopg: bool
    pgbouncer: bool = False
    capped_by_gunicorn: bool = False
    raw_app: bool = False
    ours: bool = False
    in_micro: bool = False
    notes: str = ""


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
)

BY_KEY: dict[str, Competitor] = {c.key: c for c in COMPETITORS}

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
) -> dict[str, Any]:
    """The ``DATABASES["default"]`` entry of competitor ``key`` (Django-served ones only)."""
    common: dict[str, Any] = {
        "NAME": DBNAME,
        "USER": user,
        "PASSWORD": password,
        "HOST": host,
        "PORT": port,
    }
    name = appname(key)
    if key == "stock-age0":
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
    if key == "django-queue":
        return {
            **common,
            "ENGINE": "benchapp.queuebackend",
            "CONN_MAX_AGE": 0,
            "OPTIONS": {"application_name": name},
        }
    if key in OUR_ENGINES:
        return {
            **common,
            "ENGINE": OUR_ENGINES[key],
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max_conns,
                "POOL_TIMEOUT": pool_timeout,
                "application_name": name,
            },
        }
    raise ValueError(f"competitor {key!r} is not served by Django")


def make_psycopg2_cooperative(key: str) -> None:
    """Install a gevent wait callback in psycopg2, the way each competitor's users do.

    psycogreen's for the stock backend, PgBouncer, the raw app and
    django-db-geventpool (whose README asks for it); our own for ours. psycopg 3
    competitors need none: Django's native pool gets psycopg's own
    gevent-friendly wait (picked when ``psycopg`` is imported after the
    monkey-patching, as in a gunicorn gevent worker without ``--preload``), and
    ours on psycopg 3 installs its own when its pool is made.
    """
    competitor = BY_KEY.get(key)
    if competitor is not None and competitor.driver == "psycopg":
        return
    if key in ("ours", MICRO_BARE):
        import django_gevent_pool

        django_gevent_pool.patch_psycopg2()
        return
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()


def env_settings() -> dict[str, Any]:
    """Server and sizing parameters handed down by the orchestrator (``DGPB_*``)."""
    return {
        "host": os.environ.get("DGPB_HOST", "127.0.0.1"),
        "port": os.environ.get("DGPB_PORT", "5432"),
        "user": os.environ.get("DGPB_USER", "postgres"),
        "password": os.environ.get("DGPB_PASSWORD", ""),
        "max_conns": int(os.environ.get("DGPB_MAX_CONNS", "20")),
    }
