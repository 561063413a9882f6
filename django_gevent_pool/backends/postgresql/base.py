"""``ENGINE = "django_gevent_pool.backends.postgresql"``: drop-in for Django's own engine.

Picks the driver as ``django.db.backends.postgresql`` does: psycopg 3 when it
can be imported, else psycopg2 (or whichever Django's backend already uses in
this process).
"""

from __future__ import annotations

from ..base import PooledDatabaseWrapperMixin
from ..creation import PooledCreationMixin
from ..stock import default_driver, import_stock

_driver = default_driver()
_stock = import_stock("django.db.backends.postgresql.base", _driver)
_stock_creation = import_stock("django.db.backends.postgresql.creation", _driver)


class DatabaseCreation(PooledCreationMixin, _stock_creation.DatabaseCreation):
    pass


class DatabaseWrapper(PooledDatabaseWrapperMixin, _stock.DatabaseWrapper):
    """Django's PostgreSQL backend (its driver), with connections borrowed from a pool."""

    pool_driver = _driver
    creation_class = DatabaseCreation
