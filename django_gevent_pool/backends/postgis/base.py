"""``ENGINE = "django_gevent_pool.backends.postgis"``: PostGIS through the pool.

Follows the driver in use, as Django's PostGIS backend does: psycopg 3 when it
can be imported, else psycopg2 (or whichever Django's PostgreSQL backend
already uses in this process).
"""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import default_driver, import_stock

_driver = default_driver()
_stock = import_stock("django.contrib.gis.db.backends.postgis.base", _driver)
_stock_creation = import_stock("django.db.backends.postgresql.creation", _driver)

_base_creation = getattr(_stock.DatabaseWrapper, "creation_class", _stock_creation.DatabaseCreation)


class DatabaseCreation(PooledCreationMixin, _base_creation):  # type: ignore[misc,valid-type]
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostGIS backend (its driver), with connections borrowed from a pool."""

    pool_driver = _driver
    creation_class = DatabaseCreation
