"""The seam between the pool and a database driver: what the pool asks of a connection.

The pool core (:mod:`django_gevent_pool.pool`) never imports a driver. It
holds a :class:`Driver` and asks it, about a connection, only what this
protocol names: its state without a round trip, its socket, a ping, a
rollback, a statement in autocommit, how to stop it mid-query, how to close
it, and how to let go of it in a forked child. One module per driver
implements it; nothing there knows about slots, waiters or Django.

Written for libpq drivers first (psycopg2, psycopg 3), but nothing here
assumes libpq: a driver with no libpq (PyMySQL) reads its state from what
the server last said (the in-transaction flag of the last OK packet), pings
with its protocol's ping, and stops a query from a second connection.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from ..errors import Flavour


class Status(enum.Enum):
    """A connection's state as the client last saw it (no round trip)."""

    IDLE = "IDLE"  # connected, no transaction, no query running: reusable as is
    INTRANS = "INTRANS"  # idle inside a transaction block: roll back before reuse
    INERROR = "INERROR"  # inside a failed transaction block: roll back before reuse
    ACTIVE = "ACTIVE"  # a query is running on it (another greenlet or thread holds it)
    UNKNOWN = "UNKNOWN"  # the client lost track (a broken protocol state): discard
    CLOSED = "CLOSED"  # closed by the client, or found closed


class Driver(Protocol):
    """What the pool needs from a driver, about one of its connections.

    None of these may wait on the network except :meth:`ping`,
    :meth:`rollback` and :meth:`execute`, which the pool bounds with a
    watchdog that calls :meth:`cut`. Each is called outside the pool's lock.
    """

    #: The driver's name, as users know it: ``"psycopg2"``, ``"psycopg"``.
    name: str
    #: The driver's base error class: what a failed round trip raises.
    Error: type[Exception]
    #: The pool's errors as subclasses of this driver's ``OperationalError``.
    errors: Flavour
    #: True if :meth:`reset_session` wipes a session (the protocol has a reset).
    resets_sessions: bool

    def status(self, conn: Any) -> Status:
        """The connection's state, from the client's memory only. Never raises."""

    def fileno(self, conn: Any) -> int:
        """The connection's socket descriptor; raises if it has none (closed)."""

    def ping(self, conn: Any) -> None:
        """One round trip that proves the server answers; raises ``Error`` if not.

        Leaves the connection as it found it (autocommit, no transaction).
        """

    def rollback(self, conn: Any) -> None:
        """Roll back the open transaction; raises ``Error`` if that fails."""

    def execute(self, conn: Any, sql: str) -> None:
        """Run ``sql`` outside any transaction (``RESET_QUERY``); raises on failure."""

    def reset_session(self, conn: Any) -> None:
        """Wipe the session's state with the protocol's own reset; raises on failure.

        Afterwards the session is as the driver's connect left it (character
        set, database, autocommit): what the application set up on top (its
        session setup) is the caller's to run again. Only when
        :attr:`resets_sessions`; otherwise ``NotImplementedError``.
        """

    def cut(self, conn: Any) -> None:
        """Shut the connection's socket without taking the driver's lock; never raises.

        Whoever waits on the connection wakes with an error at once, and a
        later :meth:`close` sends nothing that could wait.
        """

    def sever(self, conn: Any) -> None:
        """Stop a connection mid-query, never waiting: cancel on the server, then cut.

        The cancel is delivered in the background, bounded; never raises.
        """

    def close(self, conn: Any) -> None:
        """Close the connection; may raise (the pool closes quietly)."""

    def detach(self, conn: Any) -> None:
        """In a forked child: make the inherited connection's socket go nowhere.

        Whatever the child does with the object afterwards (close, garbage
        collection) must not reach the parent's session. Never raises.
        """

    def ensure_cooperative(self) -> bool:
        """Make the driver yield to gevent if gevent patched ``socket``; return the result."""

    def is_cooperative(self) -> bool:
        """True when the driver's waits go through the gevent hub."""
