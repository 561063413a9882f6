"""The physical limit: the views' queries on raw psycopg2 connections, no Django, no pool.

A minimal WSGI app. Each gunicorn worker holds at most MAX_CONNS connections,
opened on first need and kept open for the life of the worker, in a plain
``gevent.queue.Queue``: a request takes one (waiting FIFO when all are busy),
runs the same SQL as the Django view, and puts it back. No health check, no
state check, no accounting: nothing a pool does is done here, so no pool can
be faster on the same server, and every competitor is reported as a fraction
of this. Its ``/wait/`` takes a connection for each of its two queries only,
as the best transaction-mode pool would, and gives it back during the wait.

The same connections serve the ``raw-per-query`` reference: Django's request
handling around the same SQL on a connection taken for each query
(``views.wait_raw``).
"""

from __future__ import annotations

import gc
import json
import os
import random
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import gevent
import gevent.queue
import psycopg2

from benchapp.competitors import (
    DBNAME,
    ITEMS,
    SLEEP_SECONDS,
    WAIT_SECONDS,
    appname,
    env_settings,
)

_ITEM_SQL = (
    "SELECT id, name, price, stock FROM bench_item WHERE id = %s LIMIT 21"  # as Django's .get()
)
_UPDATE_SQL = "UPDATE bench_item SET stock = stock - 1 WHERE id = %s"
_INSERT_SQL = (
    "INSERT INTO bench_order (item_id, quantity, created_at) VALUES (%s, 1, now()) RETURNING id"
)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class FixedConnections:
    """At most ``size`` open connections in a FIFO queue; opened lazily, never closed.

    ``key`` is the competitor they are counted for (``application_name``).
    """

    def __init__(self, size: int, key: str = "raw") -> None:
        self._size = size
        self._opened = 0
        self._queue: gevent.queue.Queue[Any] = gevent.queue.Queue()
        params = env_settings()
        self._connect_kwargs = {
            "host": params["host"],
            "port": params["port"],
            "user": params["user"],
            "password": params["password"],
            "dbname": DBNAME,
            "application_name": appname(key),
        }

    def get(self) -> Any:
        """A connection: an idle one, a new one while fewer than ``size`` exist, or wait."""
        if self._queue.empty() and self._opened < self._size:
            self._opened += 1  # no switch between the test and this line: greenlet-safe
            try:
                conn = psycopg2.connect(**self._connect_kwargs)
            except BaseException:
                self._opened -= 1
                raise
            conn.autocommit = True
            return conn
        return self._queue.get()

    def put(self, conn: Any) -> None:
        """Give a connection back (the next waiter, FIFO, gets it)."""
        self._queue.put(conn)


_connections: FixedConnections | None = None


def connections() -> FixedConnections:
    """This worker's connections (made after the fork, on the first request)."""
    global _connections
    if _connections is None:
        key = os.environ.get("DGPB_COMPETITOR", "raw")
        _connections = FixedConnections(env_settings()["max_conns"], key)
    return _connections


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body, default=lambda v: str(v) if isinstance(v, Decimal) else v).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def run(work: Callable[[Any], dict[str, Any] | None]) -> dict[str, Any] | None:
    """``work(cursor)`` on a connection taken for it alone, given back right after."""
    pool = connections()
    conn = pool.get()
    try:
        with conn.cursor() as cursor:
            return work(cursor)
    finally:
        pool.put(conn)


def item(cursor: Any, pk: int) -> dict[str, Any] | None:
    """The item view's query: one row by primary key, as a dict (None if missing)."""
    cursor.execute(_ITEM_SQL, [pk])
    row = cursor.fetchone()
    if row is None:
        return None
    return {"id": row[0], "name": row[1], "price": row[2], "stock": row[3]}


def wait() -> dict[str, Any]:
    """The wait view's work: a query, a cooperative wait, a query; no connection held between."""
    first = run(lambda cursor: item(cursor, random.randint(1, ITEMS)))
    gevent.sleep(WAIT_SECONDS)  # another service (HTTP, an LLM) answering
    second = run(lambda cursor: item(cursor, random.randint(1, ITEMS)))
    return {"first": first, "second": second, "waited": WAIT_SECONDS}


def sleep(cursor: Any) -> dict[str, Any]:
    """The sleep view's query: ``pg_sleep`` for SLEEP_SECONDS."""
    cursor.execute("SELECT pg_sleep(%s)", [SLEEP_SECONDS])
    return {"slept": SLEEP_SECONDS}


def _tx(cursor: Any, pk: int) -> dict[str, Any] | None:
    # The same four round trips as Django's atomic(): BEGIN, UPDATE, INSERT, COMMIT.
    cursor.execute("BEGIN")
    try:
        cursor.execute(_UPDATE_SQL, [pk])
        if cursor.rowcount != 1:
            cursor.execute("ROLLBACK")
            return None
        cursor.execute(_INSERT_SQL, [pk])
        order = cursor.fetchone()[0]
        cursor.execute("COMMIT")
    except BaseException:
        cursor.connection.rollback()
        raise
    return {"order": order, "item": pk}


def warm() -> int:
    """Open every connection of this worker: MAX_CONNS greenlets each hold one at once."""
    count = env_settings()["max_conns"]
    greenlets = [gevent.spawn(run, sleep) for _ in range(count)]
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    return count


#: Requests of the views still running in this worker (``/inflight/``).
_running = 0


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """The WSGI app: the four views, and ``/warm/``, ``/collect/``, ``/info/``, ``/inflight/``."""
    global _running
    path = environ.get("PATH_INFO", "")
    if path == "/inflight/":
        return _json(start_response, "200 OK", {"pid": os.getpid(), "running": _running})
    _running += 1  # no switch between here and the view: greenlet-safe
    try:
        return _view(path, start_response)
    finally:
        _running -= 1


def _view(path: str, start_response: StartResponse) -> list[bytes]:
    if path.startswith("/item/"):
        try:
            pk = int(path.strip("/").split("/")[1])
        except (IndexError, ValueError):
            return _json(start_response, "404 Not Found", {"error": "bad path"})
        row = run(lambda cursor: item(cursor, pk))
        if row is None:
            return _json(start_response, "404 Not Found", {"error": f"no item {pk}"})
        return _json(start_response, "200 OK", row)
    if path == "/sleep/":
        return _json(start_response, "200 OK", run(sleep) or {})
    if path == "/wait/":
        return _json(start_response, "200 OK", wait())
    if path == "/tx/":
        pk = random.randint(1, ITEMS)
        result = run(lambda cursor: _tx(cursor, pk))
        if result is None:
            return _json(start_response, "404 Not Found", {"error": f"no item {pk}"})
        return _json(start_response, "200 OK", result)
    if path == "/warm/":
        return _json(start_response, "200 OK", {"pid": os.getpid(), "warmed": warm()})
    if path == "/collect/":
        return _json(start_response, "200 OK", {"pid": os.getpid(), "collected": gc.collect()})
    if path == "/info/":
        callback = psycopg2.extensions.get_wait_callback()
        return _json(
            start_response,
            "200 OK",
            {
                "pid": os.getpid(),
                "competitor": "raw",
                "engine": "raw WSGI app",
                "driver": "psycopg2",
                "psycopg2_wait_callback": (
                    None if callback is None else f"{callback.__module__}.{callback.__qualname__}"
                ),
            },
        )
    return _json(start_response, "404 Not Found", {"error": "no such path"})
