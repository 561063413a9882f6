"""Test-database creation that lets go of pooled connections before DROP and clone.

PostgreSQL refuses ``DROP DATABASE`` and ``CREATE DATABASE ... TEMPLATE`` while
anyone is connected ("is being accessed by other users"); idle pooled
connections count. The pools connected to that database are closed first.
"""

from __future__ import annotations

from typing import Any

from .base import registry


class PooledCreationMixin:
    """Mix in front of a backend's ``DatabaseCreation``."""

    connection: Any

    #: Django 6.1: the connection method ``destroy_test_db()`` closes the connection
    #: with, which Django's own creation tests mock on a shallow copy of the default
    #: connection. Ours is ``close``: it gives the connection back to the pool, and a
    #: copy shares the original's checkout, so a real ``close()`` on the copy would
    #: hand the original's connection back behind its back (its own return then fails).
    destroy_test_db_connection_close_method = "close"

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> Any:
        registry.close(dbname=test_database_name)
        return super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> Any:
        registry.close(dbname=self.connection.settings_dict["NAME"])
        return super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]
