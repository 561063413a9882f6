"""``ENGINE = "django_gevent_pool.backends.postgresql_psycopg2"``: PostgreSQL through the pool."""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import import_with_psycopg2

_stock = import_with_psycopg2("django.db.backends.postgresql.base")
_stock_creation = import_with_psycopg2("django.db.backends.postgresql.creation")


class DatabaseCreation(PooledCreationMixin, _stock_creation.DatabaseCreation):
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostgreSQL backend (psycopg2), with connections borrowed from a pool."""

    creation_class = DatabaseCreation
