"""COPY (``copy_expert``, ``copy_from``, ``copy_to``) with psycopg2 under gevent.

psycopg2 refuses COPY whenever a wait callback is installed ("copy_expert
cannot be used with an asynchronous callback"): its COPY protocol runs in C
and has no cooperative version. Under gevent a wait callback is always
installed (the pool installs it, or psycogreen does), so COPY needs the
callback lifted for its duration, and while it is lifted every psycopg2 call
in the process blocks: the COPY blocks the gevent hub, and so every greenlet
of the process, until it ends. There is nothing better with psycopg2.

:func:`blocking_copy` does that lifting, explicitly and for as short as the
caller makes it. Without it, the pooled backends' cursors refuse COPY under
gevent with :class:`CopyBlocksTheHub`, which says what to do, instead of
psycopg2's message (a raw psycopg2 cursor still gives psycopg2's).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

from . import sync


class CopyBlocksTheHub(psycopg2.ProgrammingError):
    """COPY was called while psycopg2 is cooperative (gevent): use ``blocking_copy()``."""


# The wait callback saved by the outermost blocking_copy(), and how many are
# active (nested, or in several greenlets or threads at once): the last one out
# restores it. Changed only under _lock, a real OS lock (sync.allocate_lock):
# its critical sections are two attribute updates and a C call, no I/O.
_lock = sync.allocate_lock()
_active = 0
_saved: Any = None


@contextmanager
def blocking_copy() -> Iterator[None]:
    """Lift psycopg2's gevent wait callback for the block, so that COPY can run in it.

    Use it around the COPY only, on a cursor obtained before (so that the
    checkout itself still waits cooperatively)::

        with connection.cursor() as cursor:
            with blocking_copy():
                cursor.copy_expert("COPY item (name, price) FROM STDIN (FORMAT csv)", data)

    **It blocks the gevent hub** for as long as the block runs: no other
    greenlet of the process runs until the COPY ends (in a gunicorn gevent
    worker, every other request of the worker waits), and any psycopg2 call
    made meanwhile (from a greenlet the file object switches to, or from
    another thread of the process) blocks its thread too. Keep COPYs that run
    in serving processes short, or run them in a process of their own (a
    management command, a Celery task on a non-gevent worker).

    The callback is restored however the block ends, by an exception,
    ``GreenletExit`` or ``gevent.Timeout`` included; nested or concurrent
    blocks restore it when the last one ends. Without gevent (no callback
    installed) it does nothing.
    """
    global _active, _saved
    with _lock:  # critical section: the first one in lifts the callback
        if _active == 0:
            _saved = psycopg2.extensions.get_wait_callback()
            if _saved is not None:
                psycopg2.extensions.set_wait_callback(None)
        _active += 1
    try:
        yield
    finally:
        # Also on GreenletExit/gevent.Timeout (BaseException): a callback left
        # lifted would make every later query of the process block the hub.
        with _lock:  # critical section: the last one out restores it
            _active -= 1
            if _active == 0:
                if _saved is not None:
                    psycopg2.extensions.set_wait_callback(_saved)
                _saved = None


def _refuse_if_cooperative(method: str) -> None:
    if psycopg2.extensions.get_wait_callback() is not None:
        raise CopyBlocksTheHub(
            f"{method}() cannot run while psycopg2 is cooperative under gevent (psycopg2 "
            "refuses COPY when a wait callback is set). Run it inside "
            "`with django_gevent_pool.blocking_copy():`, which lifts the callback for "
            "the COPY's duration and blocks the gevent hub (every greenlet of the "
            "process) until it ends"
        )


class CopyGuardMixin:
    """In front of Django's ``CursorWrapper``: COPY under gevent fails saying what to do.

    Django's wrappers hand ``copy_*`` to the psycopg2 cursor (the debug wrapper
    logs them first); this checks for the wait callback before they do.
    """

    cursor: Any

    def copy_expert(self, *args: Any, **kwargs: Any) -> Any:
        """psycopg2's ``copy_expert``; ``CopyBlocksTheHub`` if a wait callback is set."""
        _refuse_if_cooperative("copy_expert")
        return self._copy("copy_expert", args, kwargs)

    def copy_from(self, *args: Any, **kwargs: Any) -> Any:
        """psycopg2's ``copy_from``; ``CopyBlocksTheHub`` if a wait callback is set."""
        _refuse_if_cooperative("copy_from")
        return self._copy("copy_from", args, kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> Any:
        """psycopg2's ``copy_to``; ``CopyBlocksTheHub`` if a wait callback is set."""
        _refuse_if_cooperative("copy_to")
        return self._copy("copy_to", args, kwargs)

    def _copy(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The next class's own method if it has one (Django's debug wrapper logs
        # the statement), else the driver cursor's, as CursorWrapper.__getattr__ does.
        method = getattr(super(), name, None)
        if method is None:
            method = getattr(self.cursor, name)
        return method(*args, **kwargs)


_made: dict[tuple[type, type], type] = {}


def in_front(mixin: type, wrapper_class: type) -> type:
    """``wrapper_class`` (a Django ``CursorWrapper`` class) with ``mixin`` in front.

    Made once per pair and kept (a few classes per process at most), in the
    mixin's module.
    """
    if issubclass(wrapper_class, mixin):
        return wrapper_class
    made = _made.get((mixin, wrapper_class))
    if made is None:
        made = type(wrapper_class.__name__, (mixin, wrapper_class), {})
        made.__module__ = mixin.__module__
        _made[(mixin, wrapper_class)] = made
    return made


def guarded(wrapper_class: type) -> type:
    """``wrapper_class`` with :class:`CopyGuardMixin` in front."""
    return in_front(CopyGuardMixin, wrapper_class)
