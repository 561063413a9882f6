"""Cancelling a running query, and cutting a connection, without ever blocking the hub.

psycopg2's ``conn.cancel()`` is libpq's ``PQcancel``: it opens a new
connection to the server, sends the cancel request and waits for the server
to close it, all blocking, *with the GIL held*. On a silent network (a NAT or
load balancer that dropped the flow, a partition) that wait never ends: the
whole process stops, every greenlet and every thread, until the kernel gives
up. So the pool never calls it. Instead:

- with libpq 17 or later (psycopg2-binary ships it), the cancel request goes
  through libpq's non-blocking cancel API (``PQcancelCreate``,
  ``PQcancelStart``, ``PQcancelPoll``), called through ctypes on the very
  libpq psycopg2 is linked with (psycopg 3 wraps the same API itself), so
  TLS, GSS and the address of the original connection are honoured. Its
  socket is waited on cooperatively (a gevent hub) or with ``poll`` (a plain
  thread), at most :data:`CANCEL_TIMEOUT` seconds, then abandoned;
- with an older libpq, ``PQcancel`` runs in a real OS thread of its own
  (ctypes releases the GIL around it); nobody waits for that thread.

Either way the request is only *started* in the caller, which goes on at
once (or after a head start of :data:`CANCEL_HEAD_START` at most, asked by
the wait callback): the rest runs in a background greenlet under a gevent
hub, else in a short-lived OS thread, and ends by itself within
:data:`CANCEL_TIMEOUT`.

:func:`.drivers.sockets.cut`, which any driver can use, shuts a
connection's socket in both directions without touching psycopg2's lock or
libpq's state: whoever waits on it (a query, a ping) gets an error at once, and
a later ``close()`` has nothing left to flush.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg2.extensions as ext

from . import sync

logger = logging.getLogger("django_gevent_pool")

#: Seconds a cancel request may take (connect, send, the server's close)
#: before it is abandoned; the query's connection is cut anyway.
CANCEL_TIMEOUT = 2.0
#: Seconds a query's interrupted caller (the wait callback) waits for its
#: cancel to be delivered before its exception goes on and psycopg2 closes
#: the connection. On a live network the cancel takes a millisecond and so
#: arrives first, which PgBouncer needs (it forwards a cancel only for a
#: client it still has); on a silent network the exception is this late.
CANCEL_HEAD_START = 0.2

# PostgresPollingStatusType
_POLLING_FAILED, _POLLING_READING, _POLLING_WRITING, _POLLING_OK = 0, 1, 2, 3
# A cancel connection needs a handful of polls (connect, TLS, send, close).
_MAX_POLLS = 64


class _LibPQ:
    """The libpq functions the cancel needs, from the library psycopg2 itself uses.

    All but ``PQcancel`` are bound through ``PyDLL``: they never block, and
    keeping the GIL while they read the connection means no other Python
    thread can close it under them. ``PQcancel`` may block: bound through
    ``CDLL``, which releases the GIL around it.
    """

    def __init__(self, path: str) -> None:
        handle = ctypes.PyDLL(path)
        self.version = int(handle.PQlibVersion())
        self.nonblocking = self.version >= 170000 and hasattr(handle, "PQcancelCreate")
        vp, i = ctypes.c_void_p, ctypes.c_int
        if self.nonblocking:
            self.create = _fn(handle.PQcancelCreate, vp, [vp])
            self.start = _fn(handle.PQcancelStart, i, [vp])
            self.poll = _fn(handle.PQcancelPoll, i, [vp])
            self.socket = _fn(handle.PQcancelSocket, i, [vp])
            self.error = _fn(handle.PQcancelErrorMessage, ctypes.c_char_p, [vp])
            self.finish = _fn(handle.PQcancelFinish, None, [vp])
        self.get_cancel = _fn(handle.PQgetCancel, vp, [vp])
        self.blocking_cancel = _fn(ctypes.CDLL(path).PQcancel, i, [vp, ctypes.c_char_p, i])
        self.free_cancel = _fn(handle.PQfreeCancel, None, [vp])


def _fn(func: Any, restype: Any, argtypes: list[Any]) -> Any:
    func.restype = restype
    func.argtypes = argtypes
    return func


_libpq: _LibPQ | None = None
_libpq_failed = False


def libpq() -> _LibPQ | None:
    """psycopg2's libpq through ctypes (bound once, on first use); None if out of reach."""
    global _libpq, _libpq_failed
    if _libpq is None and not _libpq_failed:
        try:
            import psycopg2._psycopg as extension

            # dlsym on the extension's handle finds the libpq it was linked
            # with (the wheel's own copy for psycopg2-binary), not another one.
            _libpq = _LibPQ(extension.__file__)
        except Exception:  # no ctypes, a static build...: cancels are skipped, cuts remain
            _libpq_failed = True
            logger.warning("libpq is out of reach through ctypes: queries are cut, not cancelled")
    return _libpq


def request_cancel(conn: Any, head_start: float = CANCEL_HEAD_START) -> None:
    """Ask the server to stop ``conn``'s running query; never block the hub.

    :func:`start_cancel` then :func:`finish_cancel`: the request is driven
    in a background greenlet (or OS thread, with no gevent hub) for at most
    :data:`CANCEL_TIMEOUT` seconds, and the caller waits up to
    ``head_start`` seconds for it to be delivered. Raises only what
    interrupts that wait (GreenletExit, an outer ``gevent.Timeout``).
    """
    finish_cancel(start_cancel(conn), wait=head_start)


def start_cancel(conn: Any, timeout: float = CANCEL_TIMEOUT) -> Callable[[], None] | None:
    """Set up a cancel request for ``conn``'s running query; return what sends it.

    Does nothing (returns None) unless a query runs on ``conn`` (transaction
    status ACTIVE). Nothing here waits: libpq copies the address the
    connection uses (no name lookup) and only starts a non-blocking connect
    to it; the GIL is held throughout, so ``conn`` may be cut or closed as
    soon as this returns: the request has its own connection. The returned
    callable drives it to its end, at most ``timeout`` seconds from now:
    past that, or on any error, it is abandoned with a debug log (a silent
    network swallows it). Never raises.

    ``conn`` is a psycopg2 connection, or a psycopg 3 one (its own
    ``PGcancelConn``, libpq 17+; with an older libpq its cancel could hold
    the GIL, so none is sent and the caller's cut has to do). Anything else
    (a test double) gets its own ``cancel()`` called here.
    """
    try:
        if conn.closed or conn.info.transaction_status != ext.TRANSACTION_STATUS_ACTIVE:
            return None
        ptr = getattr(conn, "pgconn_ptr", None)
        if ptr is not None:
            return _psycopg2_cancel(ptr, timeout)
        pgconn = getattr(conn, "pgconn", None)
        if pgconn is not None:
            return _psycopg3_cancel(pgconn, timeout)
        conn.cancel()  # neither: whatever cancel its driver has
    except Exception:  # best effort: the connection is abandoned anyway
        logger.debug("could not start a cancel request", exc_info=True)
    return None


def _psycopg2_cancel(ptr: int, timeout: float) -> Callable[[], None] | None:
    """libpq's non-blocking cancel through ctypes, on psycopg2's own libpq."""
    lib = libpq()
    if lib is None:
        return None
    if not lib.nonblocking:
        return _blocking_cancel(lib, ptr)
    cancel_conn = lib.create(ptr)
    if not cancel_conn:
        return None
    if not lib.start(cancel_conn):
        logger.debug("cancel request not started: %s", _error(lib, cancel_conn))
        lib.finish(cancel_conn)
        return None
    deadline = time.monotonic() + timeout
    return lambda: _drive(
        lambda: int(lib.poll(cancel_conn)),
        lambda: int(lib.socket(cancel_conn)),
        lambda: _error(lib, cancel_conn),
        lambda: lib.finish(cancel_conn),
        deadline,
    )


def _psycopg3_cancel(pgconn: Any, timeout: float) -> Callable[[], None] | None:
    """psycopg 3's own non-blocking cancel connection (libpq 17+), or nothing."""
    from psycopg import pq

    if pq.version() < 170000:
        logger.debug("libpq %s has no non-blocking cancel: the query is cut only", pq.version())
        return None
    cancel_conn = pgconn.cancel_conn()
    try:
        cancel_conn.start()
    except Exception:
        cancel_conn.finish()
        raise
    deadline = time.monotonic() + timeout
    return lambda: _drive(
        lambda: int(cancel_conn.poll()),
        lambda: int(cancel_conn.socket),
        lambda: str(cancel_conn.get_error_message()),
        cancel_conn.finish,
        deadline,
    )


def finish_cancel(send: Callable[[], None] | None, *, wait: float = 0.0) -> None:
    """Run what :func:`start_cancel` returned; wait up to ``wait`` s for it to end.

    In a new greenlet under a gevent hub (the wait yields to it), else in a
    new OS thread (a thread returning many running connections in a row
    must not wait for each cancel in turn); either way it ends by itself
    within its bound. GreenletExit or an outer ``gevent.Timeout`` raise
    through the wait; the cancel goes on regardless.
    """
    if send is None:
        return
    done = sync.in_background(send)
    if wait > 0:
        done.wait(wait)


def _drive(
    poll: Callable[[], int],
    socket: Callable[[], int],
    error: Callable[[], str],
    finish: Callable[[], None],
    deadline: float,
) -> None:
    """Poll a started cancel connection to its end or ``deadline``, then free it."""
    try:
        for _ in range(_MAX_POLLS):
            state = poll()
            if state == _POLLING_OK:
                return
            if state not in (_POLLING_READING, _POLLING_WRITING):
                logger.debug("cancel request failed: %s", error())
                return
            remaining = deadline - time.monotonic()
            fd = socket()
            if (
                remaining <= 0
                or fd < 0
                or not sync.wait_fd(fd, write=state == _POLLING_WRITING, timeout=remaining)
            ):
                logger.debug("cancel request abandoned: no answer within its %s s", CANCEL_TIMEOUT)
                return
    except Exception:  # best effort, in the background: nobody to tell
        logger.debug("cancel request failed", exc_info=True)
    finally:
        # Whatever ends the loop, a GreenletExit too (the hub shutting down):
        # the cancel connection is freed. Finishing closes its socket and
        # sends nothing: it never blocks.
        finish()


def _blocking_cancel(lib: _LibPQ, ptr: int) -> Callable[[], None] | None:
    """libpq < 17: ``PQcancel``, to run in a detached OS thread (ctypes drops the GIL)."""
    cancel = lib.get_cancel(ptr)
    if not cancel:
        return None

    def run() -> None:
        errbuf = ctypes.create_string_buffer(256)
        try:
            if not lib.blocking_cancel(cancel, errbuf, 256):
                logger.debug("cancel request failed: %s", errbuf.value.decode(errors="replace"))
        finally:
            lib.free_cancel(cancel)

    # Nobody waits for this thread: it ends when the network answers or the
    # kernel gives up on it (keepalives, tcp_user_timeout).
    return lambda: sync.original("_thread", "start_new_thread")(run, ())


def _error(lib: _LibPQ, cancel_conn: int) -> str:
    message = lib.error(cancel_conn)
    return message.decode(errors="replace").strip() if message else "unknown error"
