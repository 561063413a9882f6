"""The Django app: add ``"django_gevent_pool"`` to INSTALLED_APPS for its checks and commands."""

from __future__ import annotations

from django.apps import AppConfig


class DjangoGeventPoolConfig(AppConfig):
    """Registers the system checks, provides ``manage.py pool_connections``, and applies
    the optional ``DJANGO_GEVENT_POOL`` setting (periodic stats log, Prometheus)."""

    name = "django_gevent_pool"
    verbose_name = "django-gevent-pool"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        from . import checks
        from .observability import configure_from_settings

        checks.register()
        configure_from_settings()
