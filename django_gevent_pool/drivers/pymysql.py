"""The PyMySQL driver: what the pool asks of a MySQL or MariaDB connection.

PyMySQL is pure Python: it waits through the ``socket`` module, so it yields
to gevent once gevent patched ``socket`` and needs no wait callback. What
libpq tells the psycopg drivers for free, the pool learns here from the
protocol:

- **The transaction status** is the ``SERVER_STATUS_IN_TRANS`` and
  ``SERVER_STATUS_AUTOCOMMIT`` flags of the last OK packet (no round trip).
  An error packet carries no status, and PyMySQL keeps none from the EOF
  packet that ends a result set, so a connection with autocommit off may be
  in a transaction its last status does not show (a failing first statement
  opens one; so does a ``SELECT`` or an ``INSERT ... RETURNING``): autocommit
  off after either counts as INTRANS, and gets a rollback before reuse.
- **A command in flight** is known only to the connection object, so the
  pool's connections are :class:`PooledConnection`, which marks each command
  from its first byte sent until its response is read: a connection left
  marked (its greenlet killed mid-write, or returned by another thread while
  a query runs) is ACTIVE.
- **A greenlet killed mid-query** leaves PyMySQL closing its socket at once
  (``_read_bytes`` force-closes on any exception), but the server goes on
  running the statement, holding its locks, until it next writes to the
  socket. A :class:`PooledConnection` closed with a command in flight
  therefore sends ``KILL <thread id>`` from a second, short-lived connection
  in the background (:func:`kill_in_background`, bounded by
  :data:`KILL_TIMEOUT`), and so does :meth:`PyMySQLDriver.sever`.
- **The ping** is ``COM_PING``, never reconnecting.
- **The session reset** is ``COM_RESET_CONNECTION`` (MySQL 5.7.3, MariaDB
  10.2.4): user variables, temporary tables, prepared statements, ``GET_LOCK``
  and table locks, session variables and any transaction are gone in one round
  trip; then what PyMySQL's connect set up is set up again (character set,
  ``sql_mode``, ``init_command``, the database, autocommit).

PyMySQL's error classes are taken from the package (``pymysql.Error``...),
never from ``pymysql.err``: once PyMySQL stands in for ``MySQLdb``, Django's
``from MySQLdb.converters import ...`` loads a second copy of ``pymysql.err``
(as ``MySQLdb.err``) and rebinds the package's ``err`` attribute to it, while
PyMySQL goes on raising the first copy's classes, which Django's
``Database.Error`` and the package's names are.
"""

from __future__ import annotations

import logging
from typing import Any

import pymysql
from pymysql.constants import CLIENT, SERVER_STATUS

from .. import sync
from ..errors import flavoured
from .base import Status
from .sockets import cut_fd, detach_fd, hung_up_fd

logger = logging.getLogger("django_gevent_pool")

#: The background ``KILL`` of a severed connection's session gives up after this
#: many seconds (its connect, its write and its read each): a silent network
#: swallows it, and the server ends the session at its next write anyway.
KILL_TIMEOUT = 2.0

#: The protocol's session reset (PyMySQL names no constant for it).
COM_RESET_CONNECTION = 0x1F

_IN_TRANS = SERVER_STATUS.SERVER_STATUS_IN_TRANS
_AUTOCOMMIT = SERVER_STATUS.SERVER_STATUS_AUTOCOMMIT


class PooledConnection(pymysql.connections.Connection):  # type: ignore[misc]
    """A PyMySQL connection that knows when a command is in flight, and cleans up after it.

    ``_dgp_busy`` is set when a command is sent and cleared once its response
    (an OK packet, a result set, an error packet) has been read. A connection
    closed with it set, by PyMySQL itself (the reading greenlet was killed,
    the socket was cut) or by the pool, has its server session killed in the
    background: the statement would otherwise run on, unseen.

    Also: ``fileno()`` (the pool watches the socket), and multi-statement
    strings allowed (``CLIENT.MULTI_STATEMENTS``), as mysqlclient allows them
    by default: Django's MySQL backend joins its session setup with ``"; "``.
    """

    _dgp_busy = False
    _dgp_killed = False
    _dgp_cut = False  # the pool shut the socket (a watchdog): the server may run on
    # An error packet or a result set (no status kept) came after the last
    # status: with autocommit off, a transaction may be open.
    _dgp_unsure = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["client_flag"] = kwargs.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS
        super().__init__(*args, **kwargs)

    def fileno(self) -> int:
        return _fileno(self)

    def _execute_command(self, command: int, sql: Any) -> None:
        if self._sock is not None:  # else PyMySQL raises: nothing goes out
            self._dgp_busy = True
        super()._execute_command(command, sql)

    def _read_ok_packet(self) -> Any:
        try:
            ok = super()._read_ok_packet()
        except Exception:
            self._dgp_read(failed=True)
            raise
        self._dgp_read()
        return ok

    def _read_query_result(self, unbuffered: bool = False) -> int:
        try:
            rows: int = super()._read_query_result(unbuffered=unbuffered)
        except Exception:
            self._dgp_read(failed=True)
            raise
        self._dgp_read()
        result = self._result
        if result is not None and result.server_status is None:
            # A result set: its EOF packet's status is not kept, server_status
            # is still the last OK packet's (say, SET autocommit=0's).
            self._dgp_unsure = True
        return rows

    def set_character_set(self, charset: str, collation: str | None = None) -> None:
        try:
            super().set_character_set(charset, collation)
        except Exception:
            self._dgp_read(failed=True)
            raise
        self._dgp_read()

    def _dgp_read(self, *, failed: bool = False) -> None:
        """A response was read to its end (or ``failed``): is a command still in flight?

        Not after an error packet (it ends the response: the protocol is in
        step) nor after a failed socket (PyMySQL closed it); still while an
        unbuffered result has rows unread. What interrupts a read without an
        ``Exception`` (GreenletExit, ``gevent.Timeout``) never gets here: the
        mark stays, PyMySQL closes the socket, and :meth:`_force_close` ends
        the server's session (unless the server hung up first).
        """
        self._dgp_unsure = failed
        result = self._result
        if failed or result is None or not result.unbuffered_active:
            self._dgp_busy = False

    def _force_close(self) -> None:
        busy, self._dgp_busy = self._dgp_busy, False
        # Not when the server closed the session itself (it was killed, or
        # wait_timeout ended it): PyMySQL read the end of the stream. A socket
        # the pool shut reads as ended too, while the server runs on.
        sock = self._sock
        alive = busy and sock is not None and (self._dgp_cut or not hung_up_fd(sock.fileno()))
        super()._force_close()
        if alive:
            self._dgp_kill()

    def _dgp_kill(self) -> None:
        """``KILL`` this connection's server session from another connection, in the background."""
        if self._dgp_killed:
            return
        self._dgp_killed = True
        kill_in_background(self)


def _fileno(conn: Any) -> int:
    """The socket descriptor of a PyMySQL connection (plain ones have no ``fileno()``)."""
    sock = conn._sock
    if sock is None:
        raise pymysql.InterfaceError(0, "the connection is closed")
    return int(sock.fileno())


def _side_params(conn: Any) -> dict[str, Any]:
    """What a second connection to ``conn``'s server, as ``conn``'s user, needs."""
    params: dict[str, Any] = {
        "host": conn.host,
        "port": conn.port,
        "user": conn.user,
        "password": conn.password,
        "unix_socket": conn.unix_socket,
        "connect_timeout": KILL_TIMEOUT,
        "read_timeout": KILL_TIMEOUT,
        "write_timeout": KILL_TIMEOUT,
    }
    if not getattr(conn, "ssl", False):
        params["ssl_disabled"] = True
    elif getattr(conn, "_ssl_required", True) and getattr(conn, "ctx", None) is not None:
        params["ssl"] = conn.ctx  # TLS as conn required it (else PyMySQL's "preferred")
    if getattr(conn, "bind_address", None):
        params["bind_address"] = conn.bind_address
    return params


def kill_in_background(conn: Any) -> None:
    """End ``conn``'s server session (``KILL <thread id>``) from a new connection; never raises.

    Runs in a background greenlet (a gevent hub here) or OS thread, within
    :data:`KILL_TIMEOUT` per step, and nobody waits for it. An ``Unknown thread
    id`` answer means the session had already ended: fine.
    """
    try:
        thread_id = int(conn.thread_id())
        params = _side_params(conn)
    except Exception:  # never connected: no session to end
        return

    def kill() -> None:
        try:
            side = pymysql.connections.Connection(**params)
        except Exception:
            logger.debug("could not connect to kill session %d", thread_id, exc_info=True)
            return
        try:
            with side.cursor() as cursor:
                cursor.execute(f"KILL {thread_id:d}")
        except pymysql.MySQLError as exc:
            logger.debug("KILL %d: %s", thread_id, exc)
        except Exception:
            logger.debug("could not kill session %d", thread_id, exc_info=True)
        finally:
            try:
                side.close()
            except Exception:  # best effort: it is going away either way
                pass

    try:
        sync.in_background(kill)
    except Exception:  # no thread, no greenlet: the server ends it at its next write
        logger.debug("could not start killing session %d", thread_id, exc_info=True)


def connect(**params: Any) -> PooledConnection:
    """A new :class:`PooledConnection` (the arguments of ``pymysql.connect``)."""
    return PooledConnection(**params)


class PyMySQLDriver:
    """:class:`~django_gevent_pool.drivers.base.Driver` for PyMySQL connections.

    Written for :class:`PooledConnection`; a plain PyMySQL connection works
    too, but its commands in flight go unseen (a connection returned while
    another thread runs a query on it looks IDLE).
    """

    name = "pymysql"
    Error = pymysql.Error
    errors = flavoured(pymysql.OperationalError, pymysql.ProgrammingError)

    def status(self, conn: Any) -> Status:
        try:
            if conn._sock is None:
                return Status.CLOSED
            if getattr(conn, "_dgp_busy", False):  # only PooledConnection knows
                return Status.ACTIVE
            result = conn._result
            if result is not None and (result.unbuffered_active or result.has_next):
                # Rows or result sets not read yet: the next command would
                # read them first, or get out of step.
                return Status.UNKNOWN
            flags = conn.server_status or 0
            if flags & _IN_TRANS:
                return Status.INTRANS
            if not flags & _AUTOCOMMIT and getattr(conn, "_dgp_unsure", True):
                # Autocommit off and an error or a result set since the last
                # status: a transaction may be open unseen (a plain PyMySQL
                # connection cannot tell: assume one).
                return Status.INTRANS
            return Status.IDLE
        except Exception:  # a broken object: not reusable
            return Status.UNKNOWN

    def fileno(self, conn: Any) -> int:
        return _fileno(conn)

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def execute(self, conn: Any, sql: str) -> None:
        autocommit = conn.get_autocommit()
        if not autocommit:
            conn.autocommit(True)
        with conn.cursor() as cursor:
            cursor.execute(sql)
            while cursor.nextset():
                pass
        if not autocommit:
            conn.autocommit(False)

    resets_sessions = True

    def reset_session(self, conn: Any) -> None:
        conn._execute_command(COM_RESET_CONNECTION, b"")
        conn._read_ok_packet()
        # As PyMySQL's connect() leaves a session: the reset took the session
        # back to the server's defaults, but kept the database a USE chose.
        conn.set_character_set(conn.charset, conn.collation)
        if conn.db:
            conn.select_db(conn.db)
        for sql in (
            None if conn.sql_mode is None else f"SET sql_mode={conn.escape(conn.sql_mode)}",
            conn.init_command,
        ):
            if sql is not None:
                with conn.cursor() as cursor:
                    cursor.execute(sql)
        if conn.autocommit_mode is not None:
            conn.autocommit(conn.autocommit_mode)

    def cut(self, conn: Any) -> None:
        if isinstance(conn, PooledConnection):
            conn._dgp_cut = True
        try:
            fd = _fileno(conn)
        except Exception:  # no socket left: nothing to shut
            return
        cut_fd(fd)

    def sever(self, conn: Any) -> None:
        if isinstance(conn, PooledConnection):
            conn._dgp_kill()
        else:
            kill_in_background(conn)
        self.cut(conn)

    def close(self, conn: Any) -> None:
        if conn._sock is None:
            conn._closed = True  # PyMySQL refuses to close twice; gone is gone
            return
        if self.status(conn) is Status.ACTIVE:
            # COM_QUIT behind a command in flight would be read as its rest.
            self.sever(conn)
            conn._force_close()
            return
        conn.close()

    def detach(self, conn: Any) -> None:
        if isinstance(conn, PooledConnection):
            conn._dgp_busy = False  # the child must not KILL the parent's session
            conn._dgp_killed = True
        try:
            fd = _fileno(conn)
        except Exception:  # closed already: nothing shared
            return
        detach_fd(fd)

    def ensure_cooperative(self) -> bool:
        return self.is_cooperative()

    def is_cooperative(self) -> bool:
        # Pure Python: its waits are the socket module's, gevent's once patched.
        return sync.patched("socket")


DRIVER = PyMySQLDriver()
