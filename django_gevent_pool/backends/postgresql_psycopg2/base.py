"""``ENGINE = "django_gevent_pool.backends.postgresql_psycopg2"``: PostgreSQL on psycopg2."""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import PSYCOPG2, import_stock

_stock = import_stock("django.db.backends.postgresql.base", PSYCOPG2)
_stock_creation = import_stock("django.db.backends.postgresql.creation", PSYCOPG2)


class DatabaseCreation(PooledCreationMixin, _stock_creation.DatabaseCreation):
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostgreSQL backend (psycopg2), with connections borrowed from a pool."""

    pool_driver = PSYCOPG2
    creation_class = DatabaseCreation
