"""Test configuration: the serving mode, the PostgreSQL server, and fail-fast timeouts.

``DGP_TEST_MODE=gevent`` (the default) monkey-patches the process before
anything else is imported and runs concurrent work in greenlets;
``DGP_TEST_MODE=threads`` leaves gevent out entirely and uses OS threads. The
Makefile runs the suite once in each mode.
"""

from __future__ import annotations

from .gevent_mode import MODE

if MODE == "gevent":
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        raise RuntimeError("run pytest as `python -m pytest` so -p tests.gevent_mode loads first")

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from .support import DRIVER, TEST_TIMEOUT, Workers, next_app_name, server
from .support import MODE as SUPPORT_MODE

assert SUPPORT_MODE == MODE


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = server()
    return [
        f"django-gevent-pool: mode={MODE}, driver={DRIVER}, PostgreSQL from {info['where']}"
    ]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gevent_only: needs gevent's monkey-patching")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="runs in DGP_TEST_MODE=gevent only")
    for item in items:
        if MODE != "gevent" and "gevent_only" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """In gevent mode, a test blocked past TEST_TIMEOUT fails with every greenlet's stack."""
    if MODE != "gevent":
        yield
        return
    import gevent
    from gevent.util import format_run_info

    class _Hung(Exception):
        pass

    timer = gevent.Timeout(TEST_TIMEOUT, _Hung)
    timer.start()
    try:
        outcome = yield
    finally:
        timer.close()
    excinfo = outcome.excinfo
    if excinfo is not None and excinfo[0] is _Hung:
        dump = "\n".join(format_run_info())
        outcome.force_exception(
            AssertionError(f"test hung for {TEST_TIMEOUT} s; greenlets:\n{dump}")
        )


@pytest.fixture
def dsn() -> str:
    """DSN of the test database (no application_name)."""
    return server()["test"]


@pytest.fixture
def app_name() -> str:
    """A unique application_name, to count a pool's backends in pg_stat_activity."""
    return next_app_name()


@pytest.fixture
def admin() -> Iterator[Any]:
    """A plain autocommit connection outside any pool, for looking and killing."""
    conn = psycopg2.connect(server()["test"])
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def workers() -> Workers:
    """Concurrent workers: greenlets in gevent mode, OS threads in threads mode."""
    return Workers()
