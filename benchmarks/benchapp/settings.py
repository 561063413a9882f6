"""Django settings of the benchmark app; the competitor comes from ``DGPB_COMPETITOR``.

Evaluated in each gunicorn worker after the fork (no ``--preload``), so the
``application_name`` carries the worker's PID and the orchestrator can count
each worker's server connections in ``pg_stat_activity``.
"""

from __future__ import annotations

import os

from benchapp.competitors import ITEMS, database, env_settings

COMPETITOR = os.environ["DGPB_COMPETITOR"]

SECRET_KEY = "benchmarks-only-not-a-secret"
DEBUG = False  # DEBUG=True keeps every query in memory
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["benchapp"]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "benchapp.urls"
WSGI_APPLICATION = "benchapp.wsgi.application"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
SHOP_ITEMS = ITEMS

DATABASES = {"default": database(COMPETITOR, **env_settings())}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_gevent_pool": {"handlers": ["console"], "level": "WARNING"},
        "django.geventpool": {"handlers": ["console"], "level": "WARNING"},
        "psycopg.pool": {"handlers": ["console"], "level": "WARNING"},
    },
}
