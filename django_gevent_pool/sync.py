"""The only place that chooses between gevent and OS-thread primitives.

Nothing here is bound at import time: a module imported before
``gevent.monkey.patch_all()`` would otherwise keep whichever primitive it saw
first. The choices are made when a pool is built (its lock) or when a caller
has to wait (its wake-up signal), from what is true at that moment.

- The pool's lock is always a real OS lock. Its critical sections are a few
  attribute updates with no I/O and no gevent call, so no greenlet can switch
  while holding it and an OS lock is both correct and cheapest, in greenlets,
  in threads and in both at once.
- A caller that must wait for a connection blocks on a one-shot signal. In a
  thread that runs a gevent hub it is a ``gevent.hub.Waiter`` with one timer:
  the waiting greenlet switches to the hub, and ``set`` (from this thread or
  any other) schedules the switch back. Elsewhere it is an OS lock.
- Work that must not hold up its caller (a cancel request) runs in a new
  greenlet under a hub, else in a new OS thread (:func:`in_background`); a
  bound on a blocking call is a hub timer, else an OS thread
  (:class:`Watchdog`); waiting on a descriptor yields to the hub, else
  polls (:func:`wait_fd`). Each is decided when it is called.
"""

from __future__ import annotations

import select
import sys
from collections.abc import Callable
from typing import Any, Protocol

from greenlet import getcurrent as _getcurrent


class Signal(Protocol):
    """A one-shot wake-up: ``wait`` returns True once ``set`` has been called."""

    def wait(self, timeout: float | None) -> bool: ...

    def set(self) -> None: ...


def original(module: str, name: str) -> Any:
    """``module.name`` as it was before gevent's monkey-patching, if any."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched(module):
        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


def _get_ident() -> int:
    """The OS thread's id (``threading.get_ident`` is per greenlet once patched)."""
    global _real_get_ident
    if _real_get_ident is None:
        # The builtin itself, whether or not gevent patched _thread: safe to keep.
        _real_get_ident = original("_thread", "get_ident")
    return _real_get_ident()


_real_get_ident: Callable[[], int] | None = None


def allocate_lock() -> Any:
    """A real OS lock (``_thread.LockType``), even when ``threading`` is patched."""
    return original("_thread", "allocate_lock")()


def hub_in_this_thread() -> bool:
    """True when the current thread runs (or has created) a gevent hub.

    Without a hub no greenlet of this thread can be waiting for anything, so
    blocking the whole thread is correct; with one, waiting must yield to it.
    """
    hub_local = sys.modules.get("gevent._hub_local")
    return hub_local is not None and hub_local.get_hub_if_exists() is not None


# The longest single OS lock wait: a day, far below threading.TIMEOUT_MAX.
_LONGEST_OS_WAIT = 86400.0


class _ThreadSignal:
    __slots__ = ("_lock",)

    def __init__(self, allocate: Callable[[], Any]) -> None:
        self._lock = allocate()
        self._lock.acquire()

    def wait(self, timeout: float | None) -> bool:
        if timeout is None:
            return bool(self._lock.acquire())
        # An OS lock refuses timeouts past the platform's time_t ("wait for
        # ever" as POOL_TIMEOUT=1e10): wait in bounded pieces instead.
        remaining = max(timeout, 0.0)
        while remaining > _LONGEST_OS_WAIT:
            if self._lock.acquire(True, _LONGEST_OS_WAIT):
                return True
            remaining -= _LONGEST_OS_WAIT
        return bool(self._lock.acquire(True, remaining))

    def set(self) -> None:
        self._lock.release()


class _GreenSignal:
    """A greenlet's one-shot wake-up: a ``Waiter`` of its hub, and a timer while it waits.

    Cheaper than a ``Semaphore`` and a ``Timeout`` per wait (a checkout on a
    busy pool waits every time). Both the timer and ``set`` only *schedule* a
    call of ``Waiter.switch`` in the hub; whichever runs second finds nobody
    waiting and just stores its value, so a late wake-up can never resume the
    greenlet in the middle of something else. ``set`` may come from another
    OS thread: the switch is then scheduled through the loop's thread-safe
    queue.
    """

    __slots__ = ("_loop", "_thread", "_waiter")

    def __init__(self) -> None:
        global _gevent_hub_api
        if _gevent_hub_api is None:  # bound on first use, never at import time
            from gevent.hub import Waiter, get_hub

            _gevent_hub_api = (Waiter, get_hub)
        waiter_cls, get_hub = _gevent_hub_api
        hub = get_hub()
        self._waiter = waiter_cls(hub)
        self._loop = hub.loop
        self._thread = _get_ident()

    def wait(self, timeout: float | None) -> bool:
        timer = None
        if timeout is not None:
            timer = self._loop.timer(max(timeout, 0.0))
            # update=True: from the real time now, not the loop's cached time (as
            # gevent.Timeout does), or the timer could fire before the deadline.
            timer.start(self._waiter.switch, False, update=True)
        try:
            # Returns at once if set() already ran; GreenletExit or an outer
            # gevent.Timeout raise here, and the timer is stopped all the same.
            return bool(self._waiter.get())
        finally:
            if timer is not None:
                timer.close()

    def set(self) -> None:
        if _get_ident() == self._thread:
            self._loop.run_callback(self._waiter.switch, True)
        else:
            self._loop.run_callback_threadsafe(self._waiter.switch, True)


# gevent's (Waiter, get_hub): a wait on a busy pool happens on nearly every checkout.
_gevent_hub_api: tuple[Any, Any] | None = None


def new_signal() -> Signal:
    """A signal suited to the calling thread (see the module docstring)."""
    if hub_in_this_thread():
        return _GreenSignal()
    return _ThreadSignal(original("_thread", "allocate_lock"))


def socket_probe(fd: int) -> Callable[[], bool]:
    """A function telling, without blocking or yielding, if descriptor ``fd`` is readable.

    Uses the original ``select.poll`` (gevent's patching removes it), so each
    look is one system call and never a switch to the hub. The poll object is
    made and registered once, here: a pool keeps one probe per connection.
    An invalid descriptor reads as readable (``POLLNVAL``).
    """
    poll_cls = original("select", "poll") if hasattr(select, "poll") or patched("select") else None
    if poll_cls is not None:
        poller = poll_cls()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        poll = poller.poll

        def readable() -> bool:
            return bool(poll(0))

        return readable
    select_fn = original("select", "select")

    def readable_select() -> bool:
        return bool(select_fn([fd], [], [], 0)[0])

    return readable_select


def patched(module: str) -> bool:
    """True when gevent has monkey-patched ``module`` (never imports gevent)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched(module))


def on_greenlet_exit(callback: Callable[[], None]) -> Callable[[], None] | None:
    """Run ``callback`` in a new greenlet when the current greenlet ends.

    It fires however the greenlet ends: returning, raising, or killed by
    ``gevent.kill`` or a ``gevent.Timeout``. Returns a function that cancels
    it, or None when the caller is not running in a ``gevent.Greenlet`` (an OS
    thread, the main greenlet), where there is no end to watch.
    """
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return None
    current = gevent.getcurrent()
    if not isinstance(current, gevent.Greenlet):
        return None

    def fire(_ended: Any) -> None:
        # Called in the hub, which must never block: do the work elsewhere.
        gevent.spawn_raw(callback)

    current.rawlink(fire)
    return lambda: current.unlink(fire)


class Wakeup:
    """A background loop's sleep that another greenlet or thread can cut short.

    ``sleep(delay)`` waits up to ``delay`` seconds on a fresh :func:`new_signal`
    (so it suits the loop's own thread); ``wake()``, from anywhere, ends the
    current sleep at once, or makes the next one return at once if the loop is
    not sleeping. Never blocks the caller of ``wake``.
    """

    __slots__ = ("_lock", "_pending", "_signal")

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._signal: Signal | None = None
        self._pending = False

    def wake(self) -> None:
        with self._lock:  # critical section: take the sleeper's signal, or leave a note
            signal, self._signal = self._signal, None
            if signal is None:
                self._pending = True
        if signal is not None:
            signal.set()

    def sleep(self, delay: float) -> None:
        signal = new_signal()
        with self._lock:  # critical section: sleep only if no wake-up came meanwhile
            if self._pending:
                self._pending = False
                return
            self._signal = signal
        try:
            signal.wait(delay)
        finally:
            with self._lock:  # critical section: a timed-out signal is nobody's any more
                if self._signal is signal:
                    self._signal = None


def run_periodically(
    tick: Callable[[], float | None],
    *,
    name: str,
    wakeup: Wakeup | None = None,
    on_death: Callable[[], None] | None = None,
) -> Any:
    """Call ``tick`` in the background until it returns None; it returns the next delay.

    A greenlet when the calling thread runs a gevent hub, else an OS thread
    (which never keeps the process alive); returns the greenlet, or None for a
    thread. ``tick`` must not raise; whatever it raises is logged and stops
    it. With ``wakeup``, its ``wake()`` ends a delay early (the next ``tick``
    runs at once). ``on_death`` is called when the loop stops other than by
    ``tick`` returning None: ``tick`` raised, or the greenlet was killed
    (``GreenletExit``, a stray ``gevent.Timeout``), so its owner can start
    another.
    """
    import logging

    log = logging.getLogger("django_gevent_pool")

    def loop(sleep: Callable[[float], None]) -> None:
        finished = False
        try:
            while True:
                try:
                    delay = tick()
                except Exception:
                    log.exception("%s stopped", name)
                    return
                if delay is None:
                    finished = True
                    return
                sleep(delay)
        finally:
            # Also on GreenletExit and gevent.Timeout (BaseExceptions both).
            if not finished and on_death is not None:
                on_death()

    if hub_in_this_thread():
        import gevent

        return gevent.spawn(loop, gevent.sleep if wakeup is None else wakeup.sleep)
    # A real OS thread even when gevent patched threading: its Thread class
    # would start a greenlet of this thread, which the blocking sleep below
    # (and a thread with no hub yet) would never let run again. The Wakeup's
    # signal is made in that thread: an OS lock there.
    start_new_thread = original("_thread", "start_new_thread")
    start_new_thread(loop, (original("time", "sleep") if wakeup is None else wakeup.sleep,))
    return None


def cooperative_sleep() -> Callable[[float], None]:
    """``gevent.sleep`` in a thread that runs a hub, else the OS ``time.sleep``."""
    if hub_in_this_thread():
        import gevent

        return gevent.sleep  # type: ignore[no-any-return]
    return original("time", "sleep")  # type: ignore[no-any-return]


def current_holder() -> tuple[Any, int]:
    """Who runs now, cheaply (two C calls): the current greenlet and the thread's id.

    For log messages later, through :func:`describe_holder`; nothing is
    formatted on the checkout path.
    """
    return _getcurrent(), _get_ident()


def describe_holder(holder: tuple[Any, int]) -> str:
    """``greenlet 'name' in thread 'name'`` or ``thread 'name'`` for a :func:`current_holder`."""
    glet, ident = holder
    import threading

    thread = next((t for t in threading.enumerate() if t.ident == ident), None)
    if thread is not None:
        where = f"thread {thread.name!r}"
    else:
        # Once gevent patched threading, OS threads are not listed by their real id.
        where = "the main thread" if ident == _MAIN_THREAD else f"thread {ident}"
    if glet is None or getattr(glet, "parent", None) is None:
        return where  # a thread's main greenlet: the thread itself holds it
    name = getattr(glet, "name", None) or repr(glet)
    state = " (ended)" if getattr(glet, "dead", False) else ""
    if ident == _MAIN_THREAD:
        return f"greenlet {name!r}{state}"
    return f"greenlet {name!r}{state} in {where}"


_MAIN_THREAD = _get_ident()


def current_name() -> str:
    """The current greenlet (when gevent runs here) or thread, for log messages."""
    gevent = sys.modules.get("gevent")
    if gevent is not None and hub_in_this_thread():
        current = gevent.getcurrent()
        return f"greenlet {getattr(current, 'name', None) or current!r}"
    import threading

    return f"thread {threading.current_thread().name!r}"


def wait_fd(fd: int, *, write: bool, timeout: float) -> bool:
    """Wait until descriptor ``fd`` is readable (or writable); False after ``timeout`` s.

    Yields to the gevent hub when this thread runs one (other greenlets go on);
    otherwise blocks this thread only, in the original ``poll``/``select``.
    GreenletExit or an outer ``gevent.Timeout`` raise through it.
    """
    timeout = max(timeout, 0.0)
    if hub_in_this_thread():
        from gevent.socket import wait_read, wait_write

        try:
            (wait_write if write else wait_read)(fd, timeout=timeout, timeout_exc=_FdTimeout())
        except _FdTimeout:
            return False
        return True
    if hasattr(select, "poll") or patched("select"):
        poller = original("select", "poll")()
        poller.register(fd, (select.POLLOUT if write else select.POLLIN) | select.POLLERR)
        return bool(poller.poll(timeout * 1000.0))
    want = ([], [fd]) if write else ([fd], [])
    ready = original("select", "select")(want[0], want[1], [], timeout)
    return bool(ready[0] or ready[1])


class _FdTimeout(Exception):
    """``wait_fd``'s own timeout, told apart from any other exception."""


class Watchdog:
    """Call ``fire`` once after ``seconds``, unless :meth:`disarm` comes first.

    For bounding a blocking call that another party can interrupt (a ping
    whose socket gets cut): a timer of the hub when this thread runs one (so
    ``fire`` runs in the hub and must not block: a system call such as
    ``shutdown`` is fine), else a real OS thread, started now and ended by
    :meth:`disarm`. ``fire`` must not raise; what it raises is logged.
    """

    __slots__ = ("_fire", "_fired", "_lock", "_pending", "_stop")

    def __init__(self, seconds: float, fire: Callable[[], None]) -> None:
        self._fire = fire
        self._fired = False
        self._pending = True
        self._lock = allocate_lock()
        self._stop: Callable[[], None]
        seconds = max(seconds, 0.0)
        if hub_in_this_thread():
            from gevent import get_hub

            timer = get_hub().loop.timer(seconds)
            # update=True: from the real time now, not the loop's cached time.
            timer.start(self._expire, update=True)
            self._stop = timer.close
        else:
            done = original("_thread", "allocate_lock")()
            done.acquire()

            def watch() -> None:
                if not done.acquire(True, min(seconds, _LONGEST_OS_WAIT)):
                    self._expire()

            original("_thread", "start_new_thread")(watch, ())
            self._stop = done.release

    def _expire(self) -> None:
        with self._lock:  # critical section: fire once, and never after disarm()
            if not self._pending:
                return
            self._pending = False
            self._fired = True
            try:
                self._fire()  # under the lock: disarm() returns only once it is done
            except Exception:
                import logging

                logging.getLogger("django_gevent_pool").exception("watchdog callback failed")

    def disarm(self) -> bool:
        """Stop the watchdog; True if it fired (before this call). Idempotent."""
        with self._lock:  # critical section: after this, fire() never runs
            pending, self._pending = self._pending, False
        if pending:
            self._stop()
        return self._fired


def in_background(func: Callable[[], None]) -> Signal:
    """Run ``func`` in a new greenlet (this thread runs a hub) or a new OS thread.

    Returns a signal set when ``func`` ends, however it ends; waiting on it
    is optional. ``func`` should not raise: what it raises is reported by
    gevent (a greenlet) or printed by the thread machinery.
    """
    done = new_signal()

    def run() -> None:
        try:
            func()
        finally:
            done.set()

    if hub_in_this_thread():
        import gevent

        gevent.spawn_raw(run)
    else:
        original("_thread", "start_new_thread")(run, ())
    return done
