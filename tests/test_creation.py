"""The test database through our engine: created, cloned and dropped for real.

Also ``destroy_test_db_connection_close_method`` (Django 6.1): the name of the
connection method that ``destroy_test_db()`` closes the connection with, which
Django's own tests (``backends.base.test_creation``) replace with a mock on a
shallow copy of the default connection. On our wrapper that method is
``close``: it gives the connection back to the pool, and a copy shares the
original's checkout, so a real ``close()`` on the copy hands the original's
connection back behind its back.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.db import ProgrammingError
from django.db.utils import load_backend

from django_gevent_pool.backends.base import close_pools, get_pool
from django_gevent_pool.serverinfo import configured_databases

ALIAS = "creation"


@pytest.fixture
def wrapper(django_db_blocker: Any, app_name: str) -> Any:
    """A connected wrapper of our engine on its own alias, holding one checkout."""
    base = configured_databases()["default"]
    settings_dict = {
        **base,
        "OPTIONS": {**base["OPTIONS"], "MAX_CONNS": 2, "application_name": app_name},
    }
    conn = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, ALIAS)
    with django_db_blocker.unblock():
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            yield conn
        finally:
            try:
                conn.close()
            except ProgrammingError:
                pass  # the control case returned it already
            close_pools(ALIAS)


def copy_of(conn: Any) -> Any:
    """What Django's ``backends.base.test_creation`` tests do: a shallow copy, own settings."""
    twin = copy.copy(conn)
    twin.settings_dict = copy.deepcopy(conn.settings_dict)
    return twin


def in_use() -> int:
    pool = get_pool(ALIAS)
    assert pool is not None
    return int(pool.get_stats()["pool_in_use"])


def test_destroy_test_db_closes_through_the_method_it_names(wrapper: Any) -> None:
    creation = wrapper.creation
    assert creation.destroy_test_db_connection_close_method == "close"
    assert in_use() == 1
    # destroy_test_db() gives the connection back through that method; the drop
    # itself (_destroy_test_db) is not wanted here.
    with (
        mock.patch.object(type(creation), "_destroy_test_db"),
        mock.patch.object(wrapper, "close", wraps=wrapper.close) as closed,
    ):
        creation.destroy_test_db(verbosity=0)
    closed.assert_called_once_with()
    assert in_use() == 0


def test_a_copy_with_that_method_mocked_leaves_the_original_checkout_alone(wrapper: Any) -> None:
    """Django 6.1's pattern: the original keeps its connection and returns it once."""
    twin = copy_of(wrapper)
    creation = twin.creation_class(twin)
    setattr(twin, creation.destroy_test_db_connection_close_method, mock.Mock())
    with mock.patch.object(creation, "_destroy_test_db"):
        creation.destroy_test_db(verbosity=0)
    assert in_use() == 1
    with wrapper.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    wrapper.close()
    assert in_use() == 0


def test_without_the_mock_the_copy_returns_the_originals_connection(wrapper: Any) -> None:
    """Why the attribute must name ``close``: left None, the copy's real close() does this."""
    twin = copy_of(wrapper)
    creation = twin.creation_class(twin)
    with mock.patch.object(creation, "_destroy_test_db"):
        creation.destroy_test_db(verbosity=0)
    assert in_use() == 0, "the original's connection went back behind its back"
    with pytest.raises(ProgrammingError, match="already returned"):
        wrapper.close()


def test_manage_py_test_creates_clones_and_drops_its_databases(tmp_path: Path, admin: Any) -> None:
    """Django's runner through our engine, then nothing of its databases is left on the server."""
    name = f"test_dgp_creation_{uuid.uuid4().hex[:8]}"
    (tmp_path / "creation_settings.py").write_text(
        textwrap.dedent(
            f"""
            from tests.settings import *  # noqa: F403

            DATABASES["default"]["TEST"] = {{"NAME": {name!r}}}  # noqa: F405
            DATABASES["other"]["TEST"] = {{"NAME": {name + "_other"!r}}}  # noqa: F405
            """
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "django",
            "test",
            "tests.testapp.runner_tests",
            "--parallel",
            "2",
            "--noinput",
            "-v",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "creation_settings",
            "PYTHONPATH": os.pathsep.join([os.getcwd(), str(tmp_path)]),
        },
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert f"Creating test database for alias 'default' ('{name}')" in log
    assert f"Cloning test database for alias 'default' ('{name}')" in log
    assert f"Destroying test database for alias 'default' ('{name}')" in log
    assert "being accessed by other users" not in log
    with admin.cursor() as cur:
        cur.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname",
            [f"{name}%"],
        )
        left = [row[0] for row in cur.fetchall()]
    assert left == [], f"test databases left behind: {left}"
