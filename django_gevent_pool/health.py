"""Is a connection fit to lend, or to keep: the checks of checkout and return, each bounded.

On checkout, a look with no round trip (the transaction status and a
non-blocking look at the socket), then, when due, a ping. On return, the
rollback of a connection returned in a transaction and ``RESET_QUERY``. Every
round trip here is bounded: a watchdog cuts the connection's socket when it
gets no answer in time (:func:`within`), so a silent network never holds a
checkout or a return. Nothing here takes the pool's lock or counts anything:
each check says why a connection is unfit (an :class:`Unfit`), or None, and
the pool keeps the books.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from . import sync
from .drivers.base import Driver, Status

#: A checkout's ping ends within this many seconds (or the checkout's deadline,
#: if sooner): an empty query answers in milliseconds even from a busy server;
#: one that has not answered in 1.5 s is on a silent network or a stuck server,
#: and a new connection is the better bet. A ping never gets less than PING_MIN.
PING_TIMEOUT = 1.5
PING_MIN = 0.05
#: The round trips of a return (the rollback of a connection returned in a
#: transaction, RESET_QUERY and the session setup after it) end within this
#: many seconds, or the connection is cut and discarded: both take milliseconds
#: on a live path, and the caller (a request's teardown) must not hang.
RETURN_TIMEOUT = 2.0


class Unfit(NamedTuple):
    """Why a connection must not be lent or kept."""

    reason: str
    #: The server's side of it is gone (closed, cut, no answer): connections
    #: opened before now may be gone too, and get pinged before reuse.
    lost: bool


def look(driver: Driver, entry: Any, status: Status) -> Unfit | None:
    """The zero-round-trip look at an idle ``entry`` (``conn``, cached ``probe``) of ``status``.

    Unfit unless IDLE with nothing to read on its socket: an idle connection
    has nothing to read unless the server closed it or sent an error (an admin
    shutdown, ``pg_terminate_backend``...). The socket probe is made on first
    use and kept on the entry.
    """
    if status is Status.CLOSED:
        return Unfit("it is closed", lost=True)
    if status is not Status.IDLE:
        return Unfit(f"its transaction status is {status.value}", lost=False)
    try:
        probe = entry.probe
        if probe is None:
            probe = entry.probe = sync.socket_probe(driver.fileno(entry.conn))
        readable = probe()
    except (OSError, ValueError, driver.Error):
        readable = True
    if readable:
        return Unfit("the server closed it or sent an error while it was idle", lost=True)
    return None


def closed_while_idle(driver: Driver, conn: Any) -> bool:
    """Did the server close an idle ``conn`` (or send an error on it)? No round trip.

    The look of :func:`look` with a socket probe of its own, not the entry's:
    a checkout in another thread may take the entry and poll with that one
    meanwhile, and one poll object refuses concurrent use.
    """
    try:
        if driver.status(conn) is Status.CLOSED:
            return True
        return sync.socket_probe(driver.fileno(conn))()
    except (OSError, ValueError, driver.Error):
        return True


def ping_bound(remaining: float) -> float:
    """How long a ping may take when the checkout has ``remaining`` seconds left."""
    return max(PING_MIN, min(PING_TIMEOUT, remaining))


def ping(driver: Driver, conn: Any, bound: float) -> Unfit | None:
    """One round trip with the driver's ping, within ``bound`` seconds; None if answered.

    Past the bound the watchdog cuts the socket, so the wait ends with an
    error in a greenlet and in a plain thread alike, and the connection is
    unfit (closing it then sends nothing that could wait). A ping has no
    server-side work to cancel.
    """
    try:
        if not within(driver, bound, conn, lambda: driver.ping(conn)):
            return _silent(f"a ping within {bound:.2f} s")
    except driver.Error as exc:
        return Unfit(f"ping failed: {str(exc).strip()}", lost=True)
    return None


def roll_back(driver: Driver, conn: Any, status: Status) -> Unfit | None:
    """Roll back a connection returned in a transaction (``status``), within RETURN_TIMEOUT."""
    try:
        if not within(driver, RETURN_TIMEOUT, conn, lambda: driver.rollback(conn)):
            return _silent(f"the rollback within {RETURN_TIMEOUT} s")
    except driver.Error as exc:
        return Unfit(
            f"the rollback of a connection returned {status.value} failed: {str(exc).strip()}",
            lost=False,
        )
    return None


def reset(
    driver: Driver,
    conn: Any,
    sql: str | None,
    after_reset: Callable[[Any], None] | None,
    *,
    protocol: bool = False,
) -> Unfit | None:
    """Wipe the session, then run ``after_reset`` (the session setup), within RETURN_TIMEOUT.

    The wipe is the protocol's reset (``protocol``: ``driver.reset_session``)
    and ``RESET_QUERY`` (``sql``, when set), in that order.
    """
    what = " and ".join(
        name
        for name, used in (("the session reset", protocol), ("RESET_QUERY", sql is not None))
        if used
    )

    def reset_session() -> None:
        if protocol:
            driver.reset_session(conn)
        if sql is not None:
            driver.execute(conn, sql)
        if after_reset is not None:
            after_reset(conn)

    try:
        if not within(driver, RETURN_TIMEOUT, conn, reset_session):
            return _silent(f"{what} within {RETURN_TIMEOUT} s")
    except Exception as exc:
        return Unfit(f"{what} or the session setup after it failed: {str(exc).strip()}", lost=False)
    return None


def within(driver: Driver, seconds: float, conn: Any, call: Callable[[], None]) -> bool:
    """Run ``call``, round trips on ``conn``; False if it took ``seconds`` and ``conn`` was cut.

    A watchdog cuts ``conn``'s socket after ``seconds`` (``sync.Watchdog``: a
    hub timer under gevent, an OS thread otherwise), so ``call``'s wait ends
    with an error in a greenlet and in a plain thread alike; that error is
    swallowed and False returned. Any other exception from ``call``
    propagates. Whatever happens, the watchdog is disarmed before this
    returns or raises, and never cuts the socket later.
    """
    cut = driver.cut
    watchdog = sync.Watchdog(seconds, lambda: cut(conn))
    try:
        call()
    except Exception:
        if watchdog.disarm():
            return False
        raise
    finally:
        # Also when killed mid-call (GreenletExit, an outer gevent.Timeout:
        # BaseExceptions): the socket must never be cut once we are gone.
        was_cut = watchdog.disarm()
    # Answered just as the watchdog fired: the socket is shut all the same.
    return not was_cut


def _silent(what: str) -> Unfit:
    """A round trip got no answer in time: the network or the server is silent."""
    return Unfit(f"no answer to {what} (connection cut)", lost=True)
