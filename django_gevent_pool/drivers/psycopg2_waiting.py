"""Making psycopg2 cooperative under gevent.

psycopg2 talks to libpq in C, so gevent's socket patching does not reach it: a
query blocks the whole process unless psycopg2 is given a *wait callback* that
polls the connection and yields to the gevent hub while the socket is not
ready. This module installs one (the same algorithm as psycogreen's), either
explicitly with :func:`patch_psycopg2` or automatically, when a pool is used in
a process where gevent has patched ``socket``.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import psycopg2
import psycopg2.extensions

from ..cancel import request_cancel
from ..sync import patched
from .sockets import detach

logger = logging.getLogger("django_gevent_pool")

# gevent's (wait_read, wait_write), bound on the first wait, never at import time.
_gevent_waits: tuple[Any, Any] | None = None

# Connections in the middle of their connect (waiting here): a forked child
# points their sockets at /dev/null, or it would read the parent's handshake.
_connecting: weakref.WeakSet[Any] = weakref.WeakSet()
_STATUS_SETUP = psycopg2.extensions.STATUS_SETUP


def gevent_wait_callback(conn: Any, timeout: float | None = None) -> None:
    """psycopg2 wait callback: poll ``conn``, yielding to the gevent hub until done.

    Raises whatever the wait raises: ``gevent.Timeout`` or ``GreenletExit`` in
    a killed greenlet, after which psycopg2 abandons the query and closes the
    connection. The running query is cancelled on the server first, in the
    background (bounded by ``cancel.CANCEL_TIMEOUT``); the exception goes on
    once the cancel is delivered, or ``cancel.CANCEL_HEAD_START`` (0.2 s)
    later at most, whatever the network does.
    """
    global _gevent_waits
    if _gevent_waits is None:  # imported once, on first use: this runs for every query
        from gevent.socket import wait_read as _read
        from gevent.socket import wait_write as _write

        _gevent_waits = (_read, _write)
    wait_read, wait_write = _gevent_waits
    poll = conn.poll
    fileno = conn.fileno
    connecting = conn.status == _STATUS_SETUP  # one C attribute read per wait
    if connecting:
        _connecting.add(conn)
    try:
        while True:
            state = poll()
            if state == psycopg2.extensions.POLL_OK:
                return
            if state == psycopg2.extensions.POLL_READ:
                wait_read(fileno(), timeout=timeout)
            elif state == psycopg2.extensions.POLL_WRITE:
                wait_write(fileno(), timeout=timeout)
            else:
                raise psycopg2.OperationalError(f"bad result from poll: {state!r}")
    except psycopg2.Error:
        # The connection itself failed (the server went away, its socket was
        # cut by the pool's watchdog or by a return while running): psycopg2
        # reports it; the pool has sent any cancel that was due.
        raise
    except BaseException:
        # Killed (GreenletExit) or timed out (gevent.Timeout) in the middle of a
        # query: psycopg2 closes the connection when we raise, but the server
        # would go on running the query for nobody. Cancel it, never blocking:
        # psycopg2's own cancel() would stop the whole process, with the GIL,
        # for as long as a silent network stays silent. The request runs in a
        # background greenlet, bounded (see cancel.py); the caller's exception
        # goes on once it is delivered, or after CANCEL_HEAD_START at most.
        request_cancel(conn)
        raise
    finally:
        if connecting:
            _connecting.discard(conn)


def _detach_connects_after_fork() -> None:
    """In a forked child: connects the parent had in flight go nowhere from now on."""
    for conn in list(_connecting):
        detach(conn)
    _connecting.clear()


os.register_at_fork(after_in_child=_detach_connects_after_fork)


def _is_green(callback: Any) -> bool:
    if callback is None:
        return False
    if callback is gevent_wait_callback:
        return True
    # psycogreen's own callback is just as good.
    return getattr(callback, "__module__", "").startswith("psycogreen")


def is_psycopg2_cooperative() -> bool:
    """True when psycopg2 has a gevent wait callback installed (ours or psycogreen's)."""
    return _is_green(psycopg2.extensions.get_wait_callback())


def patch_psycopg2() -> None:
    """Make psycopg2 yield to gevent while it waits on the network. Idempotent.

    Call it in gunicorn's ``post_fork`` or at the top of a monkey-patched script
    if you want it explicit; pools also call :func:`ensure_cooperative` on their
    own. A wait callback set by someone else (not ours, not psycogreen's) is
    replaced, with a warning.
    """
    current = psycopg2.extensions.get_wait_callback()
    if _is_green(current):
        return
    if current is not None:
        logger.warning("replacing psycopg2 wait callback %r with the gevent one", current)
    psycopg2.extensions.set_wait_callback(gevent_wait_callback)


def ensure_cooperative() -> bool:
    """Patch psycopg2 if gevent has patched sockets and nobody else did; return the result.

    Leaves an unpatched process alone: there, a wait callback would only add
    overhead to OS-thread users.
    """
    if patched("socket") and not is_psycopg2_cooperative():
        patch_psycopg2()
        logger.debug("psycopg2 made cooperative: gevent has patched socket")
    return is_psycopg2_cooperative()
