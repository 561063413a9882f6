"""Database drivers behind one narrow interface (:class:`~.base.Driver`).

A driver module is imported only when a pool uses it: psycopg 3 users need
not have psycopg2's driver loaded, and the other way round.
"""

from __future__ import annotations

import importlib

from .base import Driver, Status

#: Driver name -> the module holding its ``DRIVER``.
MODULES = {
    "psycopg2": "django_gevent_pool.drivers.psycopg2",
    "psycopg": "django_gevent_pool.drivers.psycopg",
    "pymysql": "django_gevent_pool.drivers.pymysql",
}


def get_driver(name: str) -> Driver:
    """The driver called ``name`` (``"psycopg2"``, ``"psycopg"``, ``"pymysql"``); ValueError if not.

    Raises ``ImportError`` if the driver's package is not installed.
    """
    try:
        module = MODULES[name]
    except KeyError:
        raise ValueError(f"unknown driver {name!r}; known: {', '.join(MODULES)}") from None
    driver: Driver = importlib.import_module(module).DRIVER
    return driver


__all__ = ["MODULES", "Driver", "Status", "get_driver"]
