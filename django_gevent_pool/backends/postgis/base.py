"""``ENGINE = "django_gevent_pool.backends.postgis"``: PostGIS through the pool."""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import import_with_psycopg2

_stock = import_with_psycopg2("django.contrib.gis.db.backends.postgis.base")
_stock_creation = import_with_psycopg2("django.db.backends.postgresql.creation")

_base_creation = getattr(_stock.DatabaseWrapper, "creation_class", _stock_creation.DatabaseCreation)


class DatabaseCreation(PooledCreationMixin, _base_creation):  # type: ignore[misc,valid-type]
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostGIS backend (psycopg2), with connections borrowed from a pool."""

    creation_class = DatabaseCreation
