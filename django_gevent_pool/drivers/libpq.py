"""What the two libpq drivers (psycopg2, psycopg 3) share under the Driver protocol.

Both wrap a libpq connection: its transaction status codes are libpq's
(``PQTRANS_*``), a running query is cancelled through libpq's cancel API and
cut at the socket, never through the driver's connection lock
(:mod:`django_gevent_pool.cancel`), and a forked child detaches the socket.
Each driver module subclasses :class:`LibpqDriver` with what differs: how the
status and the socket are read, the ping, ``RESET_QUERY``, cooperative waits.
"""

from __future__ import annotations

from typing import Any

from .. import cancel
from .base import Status
from .sockets import cut, detach

#: libpq's PQTRANS_* codes, as both drivers report them.
STATUS = {
    0: Status.IDLE,
    1: Status.ACTIVE,
    2: Status.INTRANS,
    3: Status.INERROR,
    4: Status.UNKNOWN,
}


class LibpqDriver:
    """The part of :class:`~django_gevent_pool.drivers.base.Driver` libpq drivers share."""

    #: PostgreSQL's protocol has no session reset: ``DISCARD ALL`` is SQL
    #: (``RESET_QUERY``).
    resets_sessions = False

    def reset_session(self, conn: Any) -> None:
        raise NotImplementedError("PostgreSQL has no protocol-level session reset")

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def cut(self, conn: Any) -> None:
        cut(conn)

    def sever(self, conn: Any) -> None:
        send = cancel.start_cancel(conn)
        cut(conn)
        cancel.finish_cancel(send)

    def close(self, conn: Any) -> None:
        conn.close()

    def detach(self, conn: Any) -> None:
        detach(conn)
