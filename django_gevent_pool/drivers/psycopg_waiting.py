"""Making psycopg 3 cooperative under gevent, whatever the import order.

psycopg 3 does its I/O as generators that yield "wait until this socket is
readable/writable", consumed by ``psycopg.waiting.wait`` (queries) and
``psycopg.waiting.wait_conn`` (connects, cancels). It picks those functions
once, when ``psycopg.waiting`` is imported: the C ``wait_c``, which blocks the
whole process, unless gevent had already patched ``select``. Imported before
``gevent.monkey.patch_all()`` (gunicorn ``--preload``, an import in
``gunicorn.conf.py``), every query stops every greenlet. Its connections'
lock is ``threading.Lock`` as it was at import (psycopg 3.2+): an OS lock,
on which a second greenlet using the same connection blocks the hub for
ever while the first one waits for the server.

Every sync path looks both wait functions up in ``psycopg.waiting`` at call
time (``Connection.wait``, ``Connection.connect``, ``cancel_safe``), and
``Connection.__init__`` looks ``Lock`` up in ``psycopg.connection``, so
:func:`patch_psycopg` replaces those module attributes:

- :func:`green_wait` and :func:`green_wait_conn` yield to the gevent hub
  while the socket is not ready (in a thread with no hub they hand over to
  psycopg's own function: nothing else there could run meanwhile);
- :func:`connection_lock` makes ``threading.Lock()`` as it is at call time,
  gevent's lock once ``threading`` is patched;
- ``psycopg.Connection.wait`` is wrapped: psycopg only handles
  ``KeyboardInterrupt``/``SystemExit``, and leaves a connection whose wait
  was interrupted by ``GreenletExit`` or ``gevent.Timeout`` ACTIVE, with its
  query still running on the server. The wrapper cancels that query without
  blocking and breaks the connection (see :func:`patch_psycopg`).

Importing this module imports psycopg (ImportError: psycopg 3 is not
installed) but nothing of gevent: it may be imported before the
monkey-patching, and binds gevent on the first wait.
The signatures of psycopg 3.1 (``timeout`` is a polling interval, and a
per-step connect timeout), 3.2 (``interval``) and 3.3 (``interval`` and a
``timeout`` deadline raising ``psycopg.errors._WaitTimeout``) are told apart
once, when patching.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import select
import sys
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

# ImportError here: psycopg 3 is not installed (callers import this module to find out).
import psycopg
from psycopg import errors as e
from psycopg import waiting

from ..sync import hub_in_this_thread, original, patched

logger = logging.getLogger("django_gevent_pool")

# The psycopg calling conventions (see the module docstring), found by patch_psycopg().
_API_31 = "3.1"  # wait(gen, fileno, timeout=<interval>); wait_conn(gen, timeout=<per step>)
_API_INTERVAL = "3.2"  # wait(gen, fileno, interval=...); READY_NONE sent on each interval
_API_DEADLINE = "3.3"  # ... and timeout=<deadline>, raising errors._WaitTimeout
_api: str | None = None

# psycopg's own functions, as they were before patch_psycopg(): for threads with no hub.
_original_wait: Callable[..., Any] | None = None
_original_wait_conn: Callable[..., Any] | None = None

# gevent's (get_hub, Waiter, sleep), bound on the first wait, never at import time.
_gevent_api: tuple[Any, Any, Any] | None = None

_READY_R, _READY_W, _READY_RW = 1, 2, 3  # psycopg's Ready (and libev's EV_READ, EV_WRITE)
_ACTIVE = 1  # psycopg.pq.TransactionStatus.ACTIVE (libpq's PQTRANS_ACTIVE)


class _Connect:
    """A connect (or cancel) in flight here: the socket it waits on, for a fork."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd


# Connects waiting here right now: a forked child points their sockets at
# /dev/null, or it would go on with the parent's handshake.
_connecting: set[_Connect] = set()


def green_wait(
    gen: Any, fileno: int, interval: float | None = None, timeout: float | None = None
) -> Any:
    """``psycopg.waiting.wait`` yielding to the gevent hub; return what ``gen`` returns.

    Consumes ``gen``, a generator of wait states on ``fileno``. With
    psycopg 3.2+, ``READY_NONE`` is sent into it every ``interval`` seconds
    without readiness; with 3.3's ``timeout``, ``psycopg.errors._WaitTimeout``
    is raised once that many seconds have passed (psycopg turns it into its
    own errors); with 3.1, ``timeout`` is the polling interval. On each
    interval a closed descriptor raises ``psycopg.OperationalError``.
    Whatever interrupts the greenlet (``GreenletExit``, ``gevent.Timeout``)
    raises here unchanged; the wrapped ``Connection.wait`` then cancels the
    query and breaks the connection. In a thread with no gevent hub, psycopg's
    own function runs instead, blocking that thread only.
    """
    if not hub_in_this_thread() and _original_wait is not None:
        return _original_wait(gen, fileno, **_given(interval=interval, timeout=timeout))
    if _api == _API_31:
        return _consume(gen, fileno, interval=timeout, deadline=None, send_none=False)
    return _consume(
        gen,
        fileno,
        interval=interval,
        deadline=_deadline(timeout) if _api == _API_DEADLINE else None,
        send_none=True,
    )


def green_wait_conn(gen: Any, interval: float | None = None, timeout: float | None = None) -> Any:
    """``psycopg.waiting.wait_conn`` yielding to the gevent hub; return what ``gen`` returns.

    Like :func:`green_wait`, for a generator that yields ``(fileno, state)``
    (a connect, a cancel request): its descriptor may change on the way.
    With 3.3, ``timeout`` is the connect's deadline (``_WaitTimeout``, which
    psycopg reports as ``ConnectionTimeout``); with 3.1, ``timeout`` bounds
    each step and raises ``psycopg.errors.ConnectionTimeout`` itself. While
    it waits, the connect's socket is known to :func:`detach_connects_after_fork`.
    """
    if not hub_in_this_thread() and _original_wait_conn is not None:
        return _original_wait_conn(gen, **_given(interval=interval, timeout=timeout))
    if _api == _API_31:
        # timeout: no readiness within that many seconds at any step fails the attempt.
        return _consume(gen, None, interval=None, deadline=None, send_none=False, step=timeout)
    return _consume(
        gen,
        None,
        interval=interval,
        deadline=_deadline(timeout) if _api == _API_DEADLINE else None,
        send_none=True,
    )


def _given(**kwargs: float | None) -> dict[str, float]:
    """The keyword arguments a caller actually passed (psycopg's defaults for the rest)."""
    return {name: value for name, value in kwargs.items() if value is not None}


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else monotonic() + timeout


def _consume(
    gen: Any,
    fileno: int | None,
    *,
    interval: float | None,
    deadline: float | None,
    send_none: bool,
    step: float | None = None,
) -> Any:
    """Drive ``gen`` to its end, waiting in the hub; ``fileno=None``: it yields its own fds."""
    connect: _Connect | None = None
    try:
        if fileno is None:
            fd, state = next(gen)
            connect = _Connect(fd)
            _connecting.add(connect)
        else:
            fd, state = fileno, next(gen)
        if interval is not None and interval < 0:
            interval = 0.0
        if step is not None and step <= 0:
            step = None  # psycopg 3.1: zero or None waits indefinitely
        while True:
            wait_for = step if step is not None else interval
            if deadline is not None:
                remaining = max(0.0, deadline - monotonic())
                wait_for = remaining if wait_for is None else min(wait_for, remaining)
            if wait_for is None or wait_for > 0:
                ready = _wait_fd(fd, state, wait_for)
            else:
                # An interval of 0 (3.2's notifies(timeout=0): look once, READY_NONE
                # if nothing is there) or a deadline reached: no waiting.
                ready = _ready_now(fd, state)
                if not ready and (deadline is None or monotonic() < deadline):
                    _yield_to_hub()  # a caller polling in a loop still lets the others run
            if not ready:
                if step is not None:
                    raise e.ConnectionTimeout("connection timeout expired")
                _check_fd_open(fd)
            if ready or send_none:
                if connect is not None:
                    fd, state = gen.send(ready)
                    connect.fd = fd
                else:
                    state = gen.send(ready)
            # After resuming the generator, as psycopg does: data already there
            # is processed, and a timeout of 0 polls once.
            if deadline is not None and monotonic() >= deadline:
                raise e._WaitTimeout("wait timeout expired")
    except StopIteration as ex:
        return ex.value
    finally:
        if connect is not None:
            _connecting.discard(connect)


def _wait_fd(fd: int, state: int, timeout: float | None) -> int:
    """Wait in the hub until ``fd`` is ready for ``state``; its Ready, 0 after ``timeout``."""
    if not state & _READY_RW:
        raise e.InternalError(f"bad poll status: {state}")
    get_hub, waiter_cls, _sleep = _gevent_api or _bind_gevent()
    hub = get_hub()
    waiter = waiter_cls(hub)
    io = hub.loop.io(fd, state & _READY_RW)
    timer = None
    try:
        # pass_events: the loop's callback gets the events that fired (1 read,
        # 2 write: psycopg's Ready values), so a read-or-write wait knows which.
        io.start(waiter.switch, pass_events=True)
        if timeout is not None:
            timer = hub.loop.timer(timeout)
            # update=True: from the real time now, not the loop's cached time.
            timer.start(waiter.switch, 0, update=True)
        # GreenletExit or an outer gevent.Timeout raise here, watchers closed all
        # the same; a late second callback only stores its value in the Waiter.
        events = waiter.get()
    finally:
        io.close()
        if timer is not None:
            timer.close()
    if not isinstance(events, int):
        raise RuntimeError(f"unexpected switch into a psycopg wait: {events!r}")
    return events & _READY_RW


def _bind_gevent() -> tuple[Any, Any, Any]:
    """gevent's (get_hub, Waiter, sleep), imported on the first wait, never at import time."""
    global _gevent_api
    from gevent import sleep
    from gevent.hub import Waiter, get_hub

    _gevent_api = (get_hub, Waiter, sleep)
    return _gevent_api


def _yield_to_hub() -> None:
    (_gevent_api or _bind_gevent())[2](0)


def _ready_now(fd: int, state: int) -> int:
    """``fd``'s Ready for ``state`` at this instant: one original ``poll(0)``, never a switch."""
    poller = original("select", "poll")()
    mask = (select.POLLIN if state & _READY_R else 0) | (select.POLLOUT if state & _READY_W else 0)
    poller.register(fd, mask)
    ready = 0
    for _fd, events in poller.poll(0):
        if events & select.POLLIN:
            ready |= _READY_R
        if events & select.POLLOUT:
            ready |= _READY_W
    return ready


def _check_fd_open(fd: int) -> None:
    """Raise ``psycopg.OperationalError`` if ``fd`` was closed under the wait."""
    try:
        os.fstat(fd)
    except OSError as ex:
        raise e.OperationalError("connection socket closed") from ex


def connection_lock() -> Any:
    """A new lock for a psycopg connection: ``threading.Lock()`` as it is now.

    Gevent's lock once ``threading`` is patched (a second greenlet using the
    connection waits in the hub), an OS lock otherwise. Bound to
    ``psycopg.connection.Lock`` by :func:`patch_psycopg`: connections made
    before keep the lock they have.
    """
    return threading.Lock()


def _wrap_connection_wait(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def wait(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, gen, *args, **kwargs)
        except (Exception, KeyboardInterrupt, SystemExit):
            raise  # psycopg's errors, and the interruptions psycopg handles itself
        except BaseException:
            # GreenletExit, gevent.Timeout: psycopg leaves the query running and
            # the connection ACTIVE. Cancel it and break the connection, then the
            # caller's exception goes on unchanged.
            try:
                _sever(self)
            except Exception:  # never in place of the caller's exception
                logger.warning("could not sever an interrupted psycopg query", exc_info=True)
            raise

    wait.__dgp_original__ = original  # type: ignore[attr-defined]
    return wait


def _sever(conn: Any) -> None:
    """Cancel ``conn``'s running query without blocking, then cut and close its socket.

    Does nothing unless a query runs (transaction status ACTIVE). The cancel
    request is started at once and driven in the background (bounded by
    ``cancel.CANCEL_TIMEOUT``); the caller waits for its delivery at most
    ``cancel.CANCEL_HEAD_START`` seconds (PgBouncer forwards a cancel only
    for a client still connected). Then the socket is shut and libpq's
    connection finished: a later use raises ``psycopg.OperationalError`` ("the
    connection is closed"), and the server ends the backend. Raises only what
    interrupts the head start (a second kill), after the cut all the same.
    """
    try:
        if conn.closed or conn.pgconn.transaction_status != _ACTIVE:
            return
    except Exception:  # a broken object: nothing to cancel
        return
    from .. import cancel
    from . import sockets

    send = cancel.start_cancel(conn)  # never raises; None if it could not start
    try:
        cancel.finish_cancel(send, wait=cancel.CANCEL_HEAD_START)
    finally:
        sockets.cut(conn)
        try:
            # The socket is shut: the Terminate message goes nowhere, nothing waits.
            conn.pgconn.finish()
        except Exception:  # best effort: the cut already broke it
            logger.debug("could not finish an interrupted psycopg connection", exc_info=True)
        logger.debug("interrupted psycopg query cancelled and its connection closed")


def _detect_api() -> str:
    """Which calling convention the installed psycopg's wait functions follow."""
    params = inspect.signature(waiting.wait_selector).parameters
    if "interval" not in params:
        return _API_31
    if "timeout" in params:
        return _API_DEADLINE
    return _API_INTERVAL


def _is_psycopg_own(func: Any) -> bool:
    return str(getattr(func, "__module__", "") or "").startswith("psycopg")


def patch_psycopg() -> None:
    """Make psycopg 3 yield to gevent while it waits on the network. Idempotent.

    Replaces ``psycopg.waiting.wait`` / ``wait_conn`` with :func:`green_wait`
    / :func:`green_wait_conn`, ``psycopg.connection.Lock`` (3.2+) with
    :func:`connection_lock`, and wraps ``psycopg.Connection.wait`` so that a
    greenlet interrupted mid-query cancels it and breaks its connection. A
    wait function set by someone else (not psycopg's own) is replaced, with a
    warning. Safe to call before ``monkey.patch_all()``: everything gevent is
    looked up when used, and threads with no hub keep psycopg's own waits.
    """
    global _api, _original_wait, _original_wait_conn
    if _api is None:
        _api = _detect_api()
    current = waiting.wait
    if current is not green_wait:
        if not _is_psycopg_own(current):
            logger.warning("replacing psycopg wait function %r with the gevent one", current)
        _original_wait = current  # set before installing: green_wait hands over to it
        waiting.wait = green_wait
    current = waiting.wait_conn
    if current is not green_wait_conn:
        if not _is_psycopg_own(current):
            logger.warning("replacing psycopg wait_conn function %r with the gevent one", current)
        _original_wait_conn = current
        waiting.wait_conn = green_wait_conn
    # Bound at import: 3.2's `from threading import Lock`, 3.3's `from ._acompat
    # import Lock`, both in psycopg/connection.py, which Connection.__init__ calls.
    # 3.1 calls threading.Lock() there: nothing to rebind.
    connection = sys.modules.get("psycopg.connection")
    if connection is not None and hasattr(connection, "Lock"):
        connection.Lock = connection_lock
    if not hasattr(psycopg.Connection.wait, "__dgp_original__"):
        psycopg.Connection.wait = _wrap_connection_wait(psycopg.Connection.wait)


def _from_gevent(obj: Any) -> bool:
    return str(getattr(obj, "__module__", "") or "").startswith("gevent")


def is_psycopg_cooperative() -> bool:
    """True when psycopg 3 waits and locks cooperatively under gevent.

    Either :func:`patch_psycopg` ran, or psycopg was imported after gevent
    patched ``select``, ``selectors`` and ``threading``: it then chose its
    Python wait functions, whose ``select.poll`` and ``DefaultSelector`` are
    gevent's, and gevent's lock.
    """
    if waiting.wait is green_wait and waiting.wait_conn is green_wait_conn:
        return True
    python_waits = {
        getattr(waiting, name, None) for name in ("wait_poll", "wait_select", "wait_selector")
    }
    waits = (
        patched("select")
        and waiting.wait in python_waits
        and _is_psycopg_own(waiting.wait_conn)
        and _from_gevent(getattr(waiting, "DefaultSelector", None))
    )
    lock = getattr(sys.modules.get("psycopg.connection"), "Lock", None)
    return bool(waits) and (lock is None or lock is connection_lock or _from_gevent(lock))


def is_psycopg_patched() -> bool:
    """True when :func:`patch_psycopg` installed its waits (and the interruption handling)."""
    return (
        waiting.wait is green_wait
        and waiting.wait_conn is green_wait_conn
        and hasattr(psycopg.Connection.wait, "__dgp_original__")
    )


def ensure_psycopg_cooperative() -> bool:
    """Patch psycopg 3 if gevent has patched sockets; return :func:`is_psycopg_cooperative`.

    Patches even when psycopg chose gevent-aware waits by itself: only the
    patch cancels the query of an interrupted greenlet. Leaves a process
    gevent has not patched alone (nothing imported, nothing changed; False
    unless :func:`patch_psycopg` was called explicitly): there psycopg's C
    wait is right for OS threads.
    """
    if not patched("socket"):
        return is_psycopg_patched()
    if not is_psycopg_patched():
        patch_psycopg()
        logger.debug("psycopg made cooperative: gevent has patched socket")
    return is_psycopg_cooperative()


def detach_connects_after_fork() -> None:
    """In a forked child: sockets of connects the parent had in flight go to /dev/null.

    Whatever the child does with them afterwards (its copy of the waiting
    greenlet resuming, garbage collection) reads and writes nothing the
    parent's connect depends on. Registered with ``os.register_at_fork``;
    idempotent, never raises for a descriptor already gone.
    """
    connects = list(_connecting)
    _connecting.clear()
    if not connects:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for connect in connects:
            try:
                os.dup2(devnull, connect.fd)
            except OSError:  # closed meanwhile: nothing shared
                pass
    finally:
        os.close(devnull)


os.register_at_fork(after_in_child=detach_connects_after_fork)

__all__ = [
    "connection_lock",
    "detach_connects_after_fork",
    "ensure_psycopg_cooperative",
    "green_wait",
    "green_wait_conn",
    "is_psycopg_cooperative",
    "is_psycopg_patched",
    "patch_psycopg",
]
