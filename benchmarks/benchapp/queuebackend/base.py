"""Django's psycopg2 backend on MAX_CONNS connections in a plain gevent queue: no pool logic.

The benchmark's "pool that costs nothing" competitor. A checkout takes a
connection from a ``gevent.queue.Queue`` (opening one while fewer than
MAX_CONNS exist) and ``close()`` puts it back: no timeout, no fairness, no
health check, no look at the transaction status, no greenlet-end return, no
stats. Like ours, it runs Django's per-connection session setup only when a
connection is opened, and leaves autocommit alone when it is already right.

What is left is Django's own connect/close machinery around a checkout that
costs next to nothing: where ours keeps up with it, the pool's own cost is not
what limits a result. It is not a strict bound (the queue's scheduling is its
own: a new checkout takes a connection put back before the oldest waiter is
woken, which is fast on average and unfair), and not something to deploy: a
connection given back in a transaction, or broken, goes to the next request
as it is.
"""

from __future__ import annotations

from typing import Any

import gevent.queue
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.postgresql import base

from benchapp.competitors import env_settings

_idle: gevent.queue.Queue[Any] = gevent.queue.Queue()
_opened = 0


class DatabaseWrapper(base.DatabaseWrapper):
    """The stock wrapper, borrowing from the module's queue instead of connecting."""

    _from_queue = False

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        global _opened
        if _idle.empty() and _opened < env_settings()["max_conns"]:
            _opened += 1  # no switch between the test and this line
            conn = super().get_new_connection(conn_params)
            self._from_queue = False  # full session setup once, in connect()
            return conn
        self._from_queue = True
        return _idle.get()

    def _set_autocommit(self, autocommit: bool) -> None:
        if not self._from_queue or self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)

    def init_connection_state(self) -> None:
        if self._from_queue:
            BaseDatabaseWrapper.init_connection_state(self)
        else:
            super().init_connection_state()

    def _close(self) -> None:
        if self.connection is not None:
            _idle.put(self.connection)

    def close_if_unusable_or_obsolete(self) -> None:
        # At request start and finish: always give the connection back.
        if self.connection is not None:
            self.close()
