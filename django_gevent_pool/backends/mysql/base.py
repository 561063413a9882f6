"""``ENGINE = "django_gevent_pool.backends.mysql"``: MySQL and MariaDB on PyMySQL, pooled.

Django's MySQL backend speaks to ``MySQLdb`` (mysqlclient), a C driver whose
waits block the gevent hub. This engine hands it PyMySQL instead, installed as
``MySQLdb`` before Django's backend is imported (PyMySQL 1.1.3 and later
report a mysqlclient version Django 5.2-6.1 accept): pure Python, so it waits
through the ``socket`` module, gevent's once patched. Its connections are
:class:`~django_gevent_pool.drivers.pymysql.PooledConnection`, whose commands
in flight the pool can see (``drivers/pymysql.py``).

Everything else is the PostgreSQL engines' pool: the same OPTIONS, cap,
errors, stats, checks and command. ``POOL_MODE = "transaction"`` reads MySQL's
statements for session state (``pinning``'s ``mysql`` dialect: user
variables, ``GET_LOCK``, ``LOCK TABLES``...), and a pinned connection goes back
wiped by ``COM_RESET_CONNECTION`` with Django's session setup run again after
it, ``RESET_QUERY`` or not.

The server facts Django's MySQL backend asks once per wrapper
(``mysql_server_data``: version, ``sql_mode``...; under gevent a wrapper per
request greenlet, so a query per request) are read once per pool here.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

from django.core.exceptions import ImproperlyConfigured

try:
    import pymysql
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImproperlyConfigured(
        "django_gevent_pool.backends.mysql needs PyMySQL: pip install 'django-gevent-pool[mysql]'"
    ) from exc

_loaded = sys.modules.get("django.db.backends.mysql.base")
if _loaded is not None and getattr(_loaded, "Database", pymysql) is not pymysql:
    raise ImproperlyConfigured(
        "django_gevent_pool.backends.mysql lends PyMySQL connections, but Django's MySQL "
        "backend was already imported with mysqlclient in this process (another alias on "
        "'django.db.backends.mysql'?); mysqlclient blocks the gevent hub: use this engine "
        "for every MySQL alias"
    )
pymysql.install_as_MySQLdb()

from django.db.backends.mysql import base as _stock  # noqa: E402 - after MySQLdb is PyMySQL
from django.db.backends.mysql import creation as _stock_creation  # noqa: E402

from ...drivers.pymysql import PooledConnection  # noqa: E402
from ...pool import ConnectionPool  # noqa: E402
from ..base import PooledDatabaseWrapperMixin, get_pool  # noqa: E402
from ..creation import PooledCreationMixin  # noqa: E402

#: Pool -> Django's ``mysql_server_data`` read on one of its connections (gone with the pool).
_server_data: weakref.WeakKeyDictionary[ConnectionPool, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_server_data_lock = threading.Lock()


class DatabaseCreation(PooledCreationMixin, _stock_creation.DatabaseCreation):
    pass


class _PyMySQLWrapper(_stock.DatabaseWrapper):  # type: ignore[misc]
    """Django's MySQL wrapper, opening :class:`PooledConnection` instead of ``MySQLdb.connect``."""

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        connection = PooledConnection(**conn_params)
        if connection.encoders.get(bytes) is bytes:  # as Django's own does
            connection.encoders.pop(bytes)
        return connection

    def is_usable(self) -> bool:
        # After _close() the connection is the pool's and `connection` is None
        # (Django's own keeps the closed object, whose ping() fails): not usable,
        # as Django's PostgreSQL backend answers for None, rather than an
        # AttributeError from None.ping().
        if self.connection is None:
            return False
        return bool(super().is_usable())


class DatabaseWrapper(PooledDatabaseWrapperMixin, _PyMySQLWrapper):
    """Django's MySQL backend on PyMySQL, with connections borrowed from a pool."""

    pool_driver = "pymysql"
    pool_dialect = "mysql"
    creation_class = DatabaseCreation

    @property
    def mysql_server_data(self) -> dict[str, Any]:  # type: ignore[override]
        """Django's server facts, read once per pool (and once per wrapper without one)."""
        cached = self.__dict__.get("_dgp_server_data")
        if cached is not None:
            return cached
        pool = self._pool or self._pool_home or get_pool(self.alias)
        if pool is not None and pool.closed:
            pool = None
        if pool is not None:
            with _server_data_lock:  # critical section: a dict read
                data = _server_data.get(pool)
            if data is not None:
                self.__dict__["_dgp_server_data"] = data
                return data
        data = _stock.DatabaseWrapper.mysql_server_data.func(self)
        self.__dict__["_dgp_server_data"] = data
        if pool is not None:
            with _server_data_lock:  # critical section: a dict write
                _server_data[pool] = data
        return data
