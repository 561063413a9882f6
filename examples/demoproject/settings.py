"""Settings of the demo project: one PostgreSQL alias served by django-gevent-pool.

Everything that changes between runs comes from the environment, so the same
project serves ``make demo``, ``examples/script.py`` and the benchmarks:

- ``DGP_DSN``: the server, as a libpq DSN (default: 127.0.0.1:5432, user
  postgres). Only its host, port, user and password are used here.
- ``DGP_DBNAME``: the database (default ``dgp_demo``).
- ``DGP_MAX_CONNS``: MAX_CONNS and REUSE_CONNS of the pool (default 10).
- ``DGP_APPNAME``: the ``application_name`` the server sees (default
  ``dgp-demo``), which lets a test count this pool's connections in
  ``pg_stat_activity``.
- ``DGP_POOL_MODE``: ``session`` (the default) or ``transaction``.
- ``DGP_HOST_MAX_CONNS``: one budget for every process of the host (off by
  default); MAX_CONNS then defaults to it.
- ``DGP_DB=mysql``: MySQL or MariaDB instead (``make demo DB=mysql``), on
  ``$DGP_MYSQL`` (``host:port``, default 127.0.0.1:3306) as ``DGP_DB_USER`` /
  ``DGP_DB_PASSWORD`` (default ``dgp_demo`` / ``dgp-demo``, the user the demo
  creates); MySQL has no ``application_name``: the demo counts that user's
  sessions.
"""

from __future__ import annotations

import os

from django_gevent_pool.devserver import LOCAL_DSN, django_settings

SECRET_KEY = os.environ.get("DGP_SECRET_KEY", "demo-only-not-a-secret")
DEBUG = False  # DEBUG=True would also keep every query in memory: never under load
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    # The system checks, `manage.py pool_connections`, and DJANGO_GEVENT_POOL below.
    "django_gevent_pool",
    "demoproject.shop",
]

#: How many items `manage.py seed` creates and `/tx/` picks from (primary keys 1..N).
SHOP_ITEMS = int(os.environ.get("DGP_ITEMS", "1000"))
MIDDLEWARE = [
    # First, so it counts the checkouts of the middleware below it too.
    "django_gevent_pool.observability.ServerTimingMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
ROOT_URLCONF = "demoproject.urls"
WSGI_APPLICATION = "demoproject.wsgi.application"

HOST_MAX_CONNS = (
    int(os.environ["DGP_HOST_MAX_CONNS"]) if "DGP_HOST_MAX_CONNS" in os.environ else None
)
MAX_CONNS = int(os.environ.get("DGP_MAX_CONNS", HOST_MAX_CONNS or 10))

DATABASES = {
    "default": {
        # Django's own engine name with our prefix: psycopg 3 when installed, else
        # psycopg2 (..._psycopg2 and ..._psycopg3 force one).
        "ENGINE": os.environ.get("DGP_ENGINE", "django_gevent_pool.backends.postgresql"),
        # NAME, USER, PASSWORD, HOST and PORT, parsed from the DSN.
        **django_settings(
            os.environ.get("DGP_DSN") or LOCAL_DSN, os.environ.get("DGP_DBNAME", "dgp_demo")
        ),
        # The pool keeps connections alive, not Django: 0 is what you want with it.
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            # Never more than MAX_CONNS server connections per process, however
            # many greenlets ask; REUSE_CONNS of them are kept open between requests.
            "MAX_CONNS": MAX_CONNS,
            "REUSE_CONNS": MAX_CONNS,
            # A request waits at most this many seconds for a connection, then
            # fails with django.db.OperationalError instead of hanging.
            "POOL_TIMEOUT": 10,
            # "transaction": a request holds a connection only while a statement
            # or an atomic() block runs, not while it waits on anything else.
            "POOL_MODE": os.environ.get("DGP_POOL_MODE", "session"),
            # One budget for the web workers, Celery workers and commands of
            # this host (same server, database and user); None: per process only.
            "HOST_MAX_CONNS": HOST_MAX_CONNS,
            # Anything lower case goes to libpq untouched.
            "application_name": os.environ.get("DGP_APPNAME", "dgp-demo"),
        },
    }
}

if os.environ.get("DGP_DB") == "mysql":
    _host, _, _port = os.environ.get("DGP_MYSQL", "127.0.0.1:3306").rpartition(":")
    DATABASES["default"] = {
        "ENGINE": "django_gevent_pool.backends.mysql",
        "NAME": os.environ.get("DGP_DBNAME", "dgp_demo"),
        "USER": os.environ.get("DGP_DB_USER", "dgp_demo"),
        "PASSWORD": os.environ.get("DGP_DB_PASSWORD", "dgp-demo"),
        "HOST": _host or "127.0.0.1",
        "PORT": _port,
        "CONN_MAX_AGE": 0,
        "OPTIONS": {
            "MAX_CONNS": MAX_CONNS,
            "REUSE_CONNS": MAX_CONNS,
            "POOL_TIMEOUT": 10,
            "POOL_MODE": os.environ.get("DGP_POOL_MODE", "session"),
            "HOST_MAX_CONNS": HOST_MAX_CONNS,
        },
    }

DJANGO_GEVENT_POOL = {
    # One INFO line per pool every N seconds on the django_gevent_pool.stats logger.
    "STATS_LOG_INTERVAL": float(os.environ["DGP_STATS_LOG"])
    if "DGP_STATS_LOG" in os.environ
    else None,
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "[%(levelname)s] %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # The pool logs discards and rollbacks at WARNING: worth seeing (once: not
    # again through the root logger, which Celery and gunicorn also print).
    "loggers": {
        "django_gevent_pool": {"handlers": ["console"], "level": "WARNING", "propagate": False},
        # The periodic stats lines (DGP_STATS_LOG) are INFO.
        "django_gevent_pool.stats": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
