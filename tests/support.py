"""Helpers shared by the tests: the server, the driver, counting backends, workers."""

from __future__ import annotations

import importlib
import itertools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from django_gevent_pool import devserver

MODE = os.environ.get("DGP_TEST_MODE", "gevent")
#: The driver of the pools under test: ``psycopg2`` (the default) or ``psycopg``
#: (psycopg 3). Tools that only look at the server (``admin``) use psycopg2.
DRIVER = os.environ.get("DGP_TEST_DRIVER", "psycopg2")
if DRIVER not in ("psycopg2", "psycopg"):
    raise RuntimeError(f"DGP_TEST_DRIVER must be 'psycopg2' or 'psycopg', got {DRIVER!r}")
#: The driver's module: ``db.OperationalError``, ``db.errors``...
db: Any = importlib.import_module(DRIVER)
#: Our engine for the driver under test.
ENGINE = {
    "psycopg2": "django_gevent_pool.backends.postgresql_psycopg2",
    "psycopg": "django_gevent_pool.backends.postgresql_psycopg3",
}[DRIVER]


def connect(dsn: str, **kwargs: Any) -> Any:
    """A new connection of the driver under test (libpq keywords as ``kwargs``)."""
    return db.connect(dsn, **kwargs)


def is_active(conn: Any) -> bool:
    """Is a query running on ``conn`` (transaction status ACTIVE)? Either driver."""
    return not conn.closed and int(conn.info.transaction_status) == 1
TEST_DB = "dgp_tests"
# Per-test budget before a hanging test fails with every greenlet's stack.
TEST_TIMEOUT = float(os.environ.get("DGP_TEST_TIMEOUT", "60"))

_server: dict[str, str] = {}
_app_names = itertools.count()


def server() -> dict[str, str]:
    """The server's DSN (found once per process) and the test database's DSN."""
    if not _server:
        dsn, where = devserver.server_dsn()
        _server["admin"] = dsn
        _server["where"] = where
        _server["test"] = devserver.ensure_database(dsn, TEST_DB)
    return _server


def next_app_name() -> str:
    return f"dgp-{os.getpid()}-{next(_app_names)}"


def is_gevent() -> bool:
    return MODE == "gevent"


def backends(admin: Any, app_name: str) -> int:
    """How many server backends carry ``app_name`` right now."""
    with admin.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app_name])
        return int(cur.fetchone()[0])


def terminate(admin: Any, app_name: str) -> int:
    """pg_terminate_backend every backend carrying ``app_name``; return how many."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s",
            [app_name],
        )
        killed = int(cur.fetchone()[0])
    wait_until(lambda: backends(admin, app_name) == 0, what="terminated backends to go")
    return killed


def wait_until(predicate: Callable[[], bool], *, what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (yielding between polls) until true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Workers:
    """Run callables concurrently as greenlets (gevent mode) or OS threads (threads mode)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.results: list[Any] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def spawn(self, func: Callable[..., Any], *args: Any) -> Any:
        def run() -> None:
            try:
                result = func(*args)
            except BaseException as exc:  # collected, the test asserts on it
                with self._lock:
                    self.errors.append(exc)
                if MODE == "gevent":
                    import gevent

                    if isinstance(exc, gevent.GreenletExit):
                        return
                raise
            with self._lock:
                self.results.append(result)

        if MODE == "gevent":
            import gevent

            handle = gevent.spawn(run)
        else:
            handle = threading.Thread(target=_quiet(run), daemon=True)
            handle.start()
        self._handles.append(handle)
        return handle

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for handle in self._handles:
            remaining = max(0.0, deadline - time.monotonic())
            if MODE == "gevent":
                handle.join(remaining)
                alive = not handle.dead
            else:
                handle.join(remaining)
                alive = handle.is_alive()
            if alive:
                raise AssertionError("a worker did not finish in time")


def _quiet(func: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except BaseException:
            pass  # already recorded in Workers.errors

    return run


def sleep(seconds: float) -> None:
    """A sleep that yields in both modes (time.sleep is patched in gevent mode)."""
    time.sleep(seconds)
