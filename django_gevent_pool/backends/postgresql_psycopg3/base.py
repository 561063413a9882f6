"""``ENGINE = "django_gevent_pool.backends.postgresql_psycopg3"``: PostgreSQL on psycopg 3.

django-db-geventpool's name for its psycopg 3 engine: a settings block written
for it works after changing only the ENGINE prefix.
"""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import PSYCOPG, import_stock

_stock = import_stock("django.db.backends.postgresql.base", PSYCOPG)
_stock_creation = import_stock("django.db.backends.postgresql.creation", PSYCOPG)


class DatabaseCreation(PooledCreationMixin, _stock_creation.DatabaseCreation):
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostgreSQL backend (psycopg 3), with connections borrowed from a pool."""

    pool_driver = PSYCOPG
    creation_class = DatabaseCreation
