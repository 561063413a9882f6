"""The psycopg 3 driver: what the pool asks of a ``psycopg.Connection``.

Cooperative waiting replaces psycopg's wait functions (:mod:`.psycopg_waiting`);
cancelling goes through psycopg's own non-blocking cancel connection and
cutting through the socket, never through the connection's lock
(:mod:`django_gevent_pool.cancel`).

Unlike psycopg2, psycopg 3 leaves a connection whose wait was interrupted
(``GreenletExit``, ``gevent.Timeout``) ACTIVE, with the query still running on
the server: the pool's return path severs such a connection (cancel, then
cut), and :mod:`.psycopg_waiting` does it at the interruption itself.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq

from .. import cancel
from ..errors import flavoured
from .base import Status
from .sockets import detach

_TS = pq.TransactionStatus
_STATUS = {
    _TS.IDLE: Status.IDLE,
    _TS.ACTIVE: Status.ACTIVE,
    _TS.INTRANS: Status.INTRANS,
    _TS.INERROR: Status.INERROR,
    _TS.UNKNOWN: Status.UNKNOWN,
}


class PsycopgDriver:
    """:class:`~django_gevent_pool.drivers.base.Driver` for psycopg 3 connections."""

    name = "psycopg"
    Error = psycopg.Error
    errors = flavoured(psycopg.OperationalError, psycopg.ProgrammingError)

    def status(self, conn: Any) -> Status:
        try:
            if conn.closed:
                return Status.CLOSED
            # The libpq attribute: no lock, no round trip.
            return _STATUS.get(conn.pgconn.transaction_status, Status.UNKNOWN)
        except Exception:  # a broken object: not reusable
            return Status.UNKNOWN

    def fileno(self, conn: Any) -> int:
        return int(conn.pgconn.socket)

    def ping(self, conn: Any) -> None:
        autocommit = conn.autocommit
        try:
            if not autocommit:
                conn.autocommit = True  # local (no transaction is open): no BEGIN
            # The empty query: the server answers EmptyQueryResponse, no error.
            conn.execute(";")
        finally:
            if not conn.closed and not autocommit:
                conn.autocommit = False

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def execute(self, conn: Any, sql: str) -> None:
        autocommit = conn.autocommit
        conn.autocommit = True
        conn.execute(sql)
        conn.autocommit = autocommit

    def cut(self, conn: Any) -> None:
        cancel.cut(conn)

    def sever(self, conn: Any) -> None:
        send = cancel.start_cancel(conn)
        cancel.cut(conn)
        cancel.finish_cancel(send)

    def close(self, conn: Any) -> None:
        conn.close()

    def detach(self, conn: Any) -> None:
        detach(conn)

    def ensure_cooperative(self) -> bool:
        from .psycopg_waiting import ensure_psycopg_cooperative

        return ensure_psycopg_cooperative()

    def is_cooperative(self) -> bool:
        from .psycopg_waiting import is_psycopg_cooperative

        return is_psycopg_cooperative()


DRIVER = PsycopgDriver()
