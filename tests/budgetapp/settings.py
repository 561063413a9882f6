"""Settings of the host-budget test project: one pooled alias with ``HOST_MAX_CONNS``.

From the environment:

- ``DGP_HB_DSN``: the server and database (libpq DSN).
- ``DGP_HB_ENGINE``: our engine for the driver under test.
- ``DGP_HB_HOST_MAX``: ``HOST_MAX_CONNS``; ``DGP_HB_MAX_CONNS``: ``MAX_CONNS``
  (unset: the pool's default, which is ``HOST_MAX_CONNS``).
- ``DGP_HB_LOCK_DIR``: ``HOST_LOCK_DIR``, one per test.
- ``DGP_HB_APPNAME``: the ``application_name`` the server sees (a gunicorn
  worker sets its own in ``post_fork``).
- ``DGP_HB_POOL_TIMEOUT``: ``POOL_TIMEOUT`` (default 20 s).
- ``DGP_HB_BUSY_FILE``: where the test writes the pid of the one worker whose
  ``/work/`` view uses the database.
"""

from __future__ import annotations

import os
from typing import Any

from django_gevent_pool.devserver import django_settings

OPTIONS: dict[str, Any] = {
    "HOST_MAX_CONNS": int(os.environ["DGP_HB_HOST_MAX"]),
    "HOST_LOCK_DIR": os.environ["DGP_HB_LOCK_DIR"],
    "POOL_TIMEOUT": float(os.environ.get("DGP_HB_POOL_TIMEOUT", "20")),
    "application_name": os.environ["DGP_HB_APPNAME"],
}
if os.environ.get("DGP_HB_MAX_CONNS"):
    OPTIONS["MAX_CONNS"] = int(os.environ["DGP_HB_MAX_CONNS"])

DATABASES = {
    "default": {
        "ENGINE": os.environ["DGP_HB_ENGINE"],
        **django_settings(os.environ["DGP_HB_DSN"]),
        "CONN_MAX_AGE": 0,
        "OPTIONS": OPTIONS,
    }
}

BUSY_FILE = os.environ.get("DGP_HB_BUSY_FILE", "")

INSTALLED_APPS = ["django_gevent_pool", "tests.budgetapp"]
SECRET_KEY = "host-budget-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
ROOT_URLCONF = "tests.budgetapp.urls"
WSGI_APPLICATION = "tests.budgetapp.wsgi.application"
MIDDLEWARE: list[str] = []
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_gevent_pool": {"handlers": ["console"], "level": "WARNING", "propagate": False}
    },
}
