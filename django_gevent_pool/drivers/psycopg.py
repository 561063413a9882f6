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

from ..errors import flavoured
from .base import Status
from .libpq import STATUS, LibpqDriver


class PsycopgDriver(LibpqDriver):
    """:class:`~django_gevent_pool.drivers.base.Driver` for psycopg 3 connections."""

    name = "psycopg"
    Error = psycopg.Error
    errors = flavoured(psycopg.OperationalError, psycopg.ProgrammingError)

    def status(self, conn: Any) -> Status:
        try:
            if conn.closed:
                return Status.CLOSED
            # The libpq attribute: no lock, no round trip.
            return STATUS.get(int(conn.pgconn.transaction_status), Status.UNKNOWN)
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

    def execute(self, conn: Any, sql: str) -> None:
        autocommit = conn.autocommit
        conn.autocommit = True
        # Never prepared: a reset runs once per return, and may hold several statements.
        cursor = conn.execute(sql, prepare=False)
        conn.autocommit = autocommit
        _forget_dropped_statements(conn, cursor)

    def ensure_cooperative(self) -> bool:
        from .psycopg_waiting import ensure_psycopg_cooperative

        return ensure_psycopg_cooperative()

    def is_cooperative(self) -> bool:
        from .psycopg_waiting import is_psycopg_cooperative

        return is_psycopg_cooperative()


#: Command tags after which the session has no prepared statement left.
_DROPS_STATEMENTS = frozenset({"DISCARD ALL", "DEALLOCATE ALL"})


def _forget_dropped_statements(conn: Any, cursor: Any) -> None:
    """After ``DISCARD ALL`` or ``DEALLOCATE ALL``, make psycopg forget its prepared statements.

    psycopg clears its cache on these only the first time it meets their text
    (it checks new cache entries only): from a connection's second RESET_QUERY
    on, it would bind statements the server dropped (``prepared statement
    "_pg3_0" does not exist``) for every later borrower. Sends nothing.
    """
    tags = [cursor.statusmessage]
    while cursor.nextset():
        tags.append(cursor.statusmessage)
    if _DROPS_STATEMENTS.isdisjoint(tags):
        return
    prepared = conn._prepared  # psycopg's PrepareManager: private, there since 3.0
    if prepared.clear():  # forgets every statement, and queues a DEALLOCATE ALL...
        for queue in ("_to_flush", "_maint_commands"):  # ...not needed (3.2+, 3.1)
            getattr(prepared, queue, []).clear()


DRIVER = PsycopgDriver()
