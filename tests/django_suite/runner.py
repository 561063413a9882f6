"""Django's ``DiscoverRunner``, recording every outcome as JSON for ``run.py``.

Set as ``TEST_RUNNER`` by ``settings.py``. What it adds:

- In gevent mode, async tests (``async def`` test methods, which include every
  ``*_async`` one) are left out, and listed as such. Their ORM calls go
  through ``sync_to_async``, whose executor runs them in a greenlet of the
  thread that runs the event loop: Django's ``async_unsafe`` guard sees that
  loop and raises ``SynchronousOnlyOperation``. Django's stock backend fails
  them the same way there (the async ORM and gevent's monkey-patching do not
  mix; nothing to do with the pool). ``run.py --include-async`` keeps them, to
  check that claim.
- A watchdog per test: a test still running after ``DGP_DJANGO_TEST_LIMIT``
  seconds (180) makes the process dump every thread's stack and exit, and the
  id of that test is left in ``$DGP_DJANGO_CURRENT`` for ``run.py`` to name.
- The outcome of every failed test, error and unexpected success is written to
  ``$DGP_DJANGO_RESULTS`` once the suite has run, with the driver Django's
  PostgreSQL or MySQL backend really used (for MySQL, the name of the module
  its ``Database`` is: ``pymysql`` when PyMySQL is installed as ``MySQLdb``)
  and our engine's ``POOL_MODE`` (``run.py`` checks they are the ones asked
  for).
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
import unittest
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.test.runner import DiscoverRunner
from django.test.utils import iter_test_cases

MODE = os.environ.get("DGP_TEST_MODE", "gevent")
TEST_LIMIT = float(os.environ.get("DGP_DJANGO_TEST_LIMIT", "180"))


def test_id(test: Any) -> str:
    """A test's id; a subtest counts as its test, so expectations name tests only."""
    return str(getattr(test, "test_case", test).id())


class RecordingResult(unittest.TextTestResult):
    """A text result that also arms the per-test watchdog and times each test."""

    current_file = os.environ.get("DGP_DJANGO_CURRENT")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.durations_seen: dict[str, float] = {}
        self._started = 0.0

    def startTest(self, test: unittest.TestCase) -> None:
        if self.current_file:
            with open(self.current_file, "w") as out:
                out.write(test.id())
        faulthandler.dump_traceback_later(TEST_LIMIT, exit=True, file=sys.stderr)
        self._started = time.perf_counter()
        super().startTest(test)

    def stopTest(self, test: unittest.TestCase) -> None:
        super().stopTest(test)
        faulthandler.cancel_dump_traceback_later()
        self.durations_seen[test.id()] = time.perf_counter() - self._started


class RecordingRunner(DiscoverRunner):
    """``DiscoverRunner`` that leaves async tests out under gevent and records the results."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.left_out: list[str] = []

    def build_suite(self, *args: Any, **kwargs: Any) -> unittest.TestSuite:
        suite = super().build_suite(*args, **kwargs)
        if MODE != "gevent" or os.environ.get("DGP_DJANGO_INCLUDE_ASYNC") == "1":
            return suite
        kept = []
        for test in iter_test_cases(suite):
            method = getattr(type(test), getattr(test, "_testMethodName", ""), None)
            if iscoroutinefunction(method):
                self.left_out.append(test.id())
            else:
                kept.append(test)
        return self.test_suite(kept)

    def get_resultclass(self) -> Any:
        return RecordingResult

    def run_suite(self, suite: unittest.TestSuite, **kwargs: Any) -> Any:
        result = super().run_suite(suite, **kwargs)
        path = os.environ.get("DGP_DJANGO_RESULTS")
        if path:
            failed: dict[str, str] = {}
            for test, trace in [*result.errors, *result.failures]:
                failed.setdefault(test_id(test), trace)
            durations: dict[str, float] = getattr(result, "durations_seen", {})
            slowest = sorted(durations.items(), key=lambda kv: -kv[1])[:10]
            per_app: dict[str, float] = {}
            for test, seconds in durations.items():
                app = test.split(".", 1)[0]
                per_app[app] = per_app.get(app, 0.0) + seconds
            with open(path, "w") as out:
                json.dump(
                    {
                        "driver": _driver_in_use(),
                        "pool_mode": _pool_mode(),
                        "pool_stats": _pool_stats(),
                        "run": result.testsRun,
                        "skipped": len(result.skipped),
                        "expected_failures": len(result.expectedFailures),
                        "failed": failed,
                        "unexpected_successes": [test_id(t) for t in result.unexpectedSuccesses],
                        "left_out": self.left_out,
                        "slowest": slowest,
                        "per_app": per_app,
                    },
                    out,
                    indent=1,
                )
        return result


def _pool_mode() -> str:
    """Our engine's ``POOL_MODE`` on the default alias (``session`` when not set)."""
    from django.conf import settings

    return str(settings.DATABASES["default"].get("OPTIONS", {}).get("POOL_MODE", "session"))


def _pool_stats() -> dict[str, dict[str, float]]:
    """Our pools' counters at the end (checkouts, sessions, pins), by alias; {} if not ours.

    With ``POOL_MODE = "transaction"``, checkouts per session show how much of
    the run gave connections back between statements: a ``TestCase`` runs in
    ``atomic()``, which holds its connection throughout.
    """
    base = sys.modules.get("django_gevent_pool.backends.base")
    if base is None:
        return {}
    kept = ("requests_num", "sessions_num", "connections_num", "returns_bad")
    return {
        alias: {k: v for k, v in stats.items() if k in kept or k.startswith("pins_")}
        for alias, stats in base.all_stats().items()
    }


def _driver_in_use() -> str | None:
    """The driver Django's PostgreSQL or MySQL backend was bound to in this process, if loaded.

    The default alias's vendor says which: on MySQL, the name of the module
    Django's backend imported as ``MySQLdb`` (``pymysql`` once installed so).
    """
    from django.db import connection

    if connection.vendor == "mysql":
        mysql = sys.modules.get("django.db.backends.mysql.base")
        database = getattr(mysql, "Database", None)
        return None if database is None else str(database.__name__)
    psycopg_any = sys.modules.get("django.db.backends.postgresql.psycopg_any")
    if psycopg_any is None:
        return None
    return "psycopg" if psycopg_any.is_psycopg3 else "psycopg2"
