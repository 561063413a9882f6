"""Django settings for the test suite: one pooled alias and one second alias."""

from __future__ import annotations

import os

from django_gevent_pool.devserver import django_settings

from .support import ENGINE, server

_dsn = server()["test"]

DATABASES = {
    "default": {
        "ENGINE": ENGINE,
        **django_settings(_dsn),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": 4, "POOL_TIMEOUT": 5, "application_name": "dgp-django-tests"},
        "TEST": {"NAME": f"test_dgp_{os.getpid()}"},
    },
    "other": {
        "ENGINE": ENGINE,
        **django_settings(_dsn),
        "CONN_MAX_AGE": 0,
        "OPTIONS": {"MAX_CONNS": 2, "pool": False, "application_name": "dgp-django-other"},
        "TEST": {"NAME": f"test_dgp_other_{os.getpid()}"},
    },
}

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_gevent_pool",
    "tests.testapp",
]
SECRET_KEY = "tests"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "tests.testapp.urls"
ALLOWED_HOSTS = ["*"]
MIDDLEWARE: list[str] = []
