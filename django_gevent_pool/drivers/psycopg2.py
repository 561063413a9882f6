"""The psycopg2 driver: what the pool asks of a psycopg2 connection.

Cooperative waiting is psycopg2's wait callback (:mod:`.psycopg2_waiting`);
cancelling and cutting go through libpq without psycopg2's connection lock
(:mod:`django_gevent_pool.cancel`).
"""

from __future__ import annotations

from typing import Any

import psycopg2

from ..errors import flavoured
from . import psycopg2_waiting
from .base import Status
from .libpq import STATUS, LibpqDriver


class Psycopg2Driver(LibpqDriver):
    """:class:`~django_gevent_pool.drivers.base.Driver` for psycopg2 connections."""

    name = "psycopg2"
    Error = psycopg2.Error
    errors = flavoured(psycopg2.OperationalError, psycopg2.ProgrammingError)

    def status(self, conn: Any) -> Status:
        try:
            if conn.closed:
                return Status.CLOSED
            return STATUS.get(conn.get_transaction_status(), Status.UNKNOWN)
        except Exception:  # a broken object: not reusable
            return Status.UNKNOWN

    def fileno(self, conn: Any) -> int:
        return int(conn.fileno())

    def ping(self, conn: Any) -> None:
        autocommit = conn.autocommit
        try:
            if not autocommit:
                conn.autocommit = True  # local: no BEGIN for the ping
            with conn.cursor() as cur:
                cur.execute(";")
        except psycopg2.ProgrammingError:
            # "can't execute an empty query" comes after the server's
            # EmptyQueryResponse: the round trip happened, the server is there.
            pass
        finally:
            if not conn.closed and not autocommit:
                conn.autocommit = False

    def execute(self, conn: Any, sql: str) -> None:
        autocommit = conn.autocommit
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
        conn.autocommit = autocommit

    def ensure_cooperative(self) -> bool:
        return psycopg2_waiting.ensure_cooperative()

    def is_cooperative(self) -> bool:
        return psycopg2_waiting.is_psycopg2_cooperative()


DRIVER = Psycopg2Driver()
