"""Settings for Django's own test suite (its ``tests/runtests.py --settings``).

Both aliases Django's suite uses, ``default`` and ``other``, go through our
engine for the driver ``DGP_DJANGO_DRIVER`` names (``psycopg2``, the default:
``postgresql_psycopg2``; ``psycopg``: ``postgresql_psycopg3``; ``pymysql``:
``mysql``), or through Django's stock backend on that same driver when
``DGP_DJANGO_BACKEND=stock`` (the reference run that tells our deviations from
failures the stock backend has too; ``child.py`` binds it to the driver).
On PostgreSQL they point at the server the rest of our suite uses
(``devserver.server_dsn()``); on MySQL at ``$DGP_MYSQL`` (``host:port``,
127.0.0.1:3306 by default; user root, no password; the database ``test``).
``DGP_DJANGO_POOL_MODE`` (``session``, the default, or ``transaction``) is our
engine's ``POOL_MODE`` on both aliases; the stock backend has no such option
and never gets it, and our MySQL engine refuses ``transaction``.
Everything else is what Django's own ``tests/test_sqlite.py`` sets.
"""

from __future__ import annotations

import os
from typing import Any

BACKEND = os.environ.get("DGP_DJANGO_BACKEND", "ours")
if BACKEND not in ("ours", "stock"):
    raise RuntimeError(f"DGP_DJANGO_BACKEND must be 'ours' or 'stock', got {BACKEND!r}")
#: Our engine per driver.
ENGINES = {
    "psycopg2": "django_gevent_pool.backends.postgresql_psycopg2",
    "psycopg": "django_gevent_pool.backends.postgresql_psycopg3",
    "pymysql": "django_gevent_pool.backends.mysql",
}
#: Django's stock backend per driver (``child.py`` binds it to the driver).
STOCK_ENGINES = {
    "psycopg2": "django.db.backends.postgresql",
    "psycopg": "django.db.backends.postgresql",
    "pymysql": "django.db.backends.mysql",
}
DRIVER = os.environ.get("DGP_DJANGO_DRIVER", "psycopg2")
if DRIVER not in ENGINES:
    raise RuntimeError(f"DGP_DJANGO_DRIVER must be one of {', '.join(ENGINES)}, got {DRIVER!r}")

#: Our engine's OPTIONS["POOL_MODE"] (run.py --pool-mode); session is the option's default.
POOL_MODE = os.environ.get("DGP_DJANGO_POOL_MODE", "session")
if POOL_MODE not in ("session", "transaction"):
    raise RuntimeError(
        f"DGP_DJANGO_POOL_MODE must be 'session' or 'transaction', got {POOL_MODE!r}"
    )

_pid = os.getpid()


def _server() -> dict[str, Any]:
    """NAME, USER, PASSWORD, HOST and PORT of the server for DRIVER."""
    if DRIVER == "pymysql":
        host, _, port = os.environ.get("DGP_MYSQL", "127.0.0.1:3306").rpartition(":")
        return {
            "NAME": "test",
            "USER": "root",
            "PASSWORD": "",
            "HOST": host or "127.0.0.1",
            "PORT": port,
        }
    from django_gevent_pool.devserver import django_settings, server_dsn

    return django_settings(server_dsn()[0])


_SERVER = _server()


def _alias(name: str) -> dict[str, Any]:
    if BACKEND == "stock":
        engine = STOCK_ENGINES[DRIVER]
        options: dict[str, Any] = {}
    else:
        engine = ENGINES[DRIVER]
        # Room for the suite's threads (ThreadTests, select_for_update...) to
        # hold a connection each; a checkout that waits this long is a bug.
        options = {"MAX_CONNS": 10, "POOL_TIMEOUT": 10}
        if POOL_MODE != "session":
            options["POOL_MODE"] = POOL_MODE
    return {
        "ENGINE": engine,
        **_SERVER,
        "OPTIONS": options,
        # Django's suite creates (and drops) these; one pair per run.
        "TEST": {"NAME": f"test_dgp_django_{name}_{_pid}"},
    }


DATABASES = {"default": _alias("default"), "other": _alias("other")}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False

# Records every result for run.py, and leaves out what cannot run in this mode.
TEST_RUNNER = "tests.django_suite.runner.RecordingRunner"
