"""The Django app: add ``"django_gevent_pool"`` to INSTALLED_APPS for its checks and commands."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoGeventPoolConfig(AppConfig):
    """Registers the system checks and provides ``manage.py pool_connections``."""

    name = "django_gevent_pool"
    verbose_name = "django-gevent-pool"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from . import checks

        checks.register()
