"""What the MySQL tests share: the server, a user per test, counting its sessions.

The server is ``$DGP_MYSQL`` (``host:port``, user root, no password; the
database ``test``), by default 127.0.0.1:3306. With none reachable the tests
skip and say why (fail under ``DGP_REQUIRE_MYSQL=1``, which ``.ci/run`` sets
when a server answers there). They run in the psycopg2 runs of ``make test``
(gevent and threads): the PostgreSQL driver under test changes nothing there.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from .support import DRIVER

_users = itertools.count()


def only_in_psycopg2_runs() -> None:
    """Skip the calling test module outside the psycopg2 runs."""
    if DRIVER != "psycopg2":
        pytest.skip(
            "the MySQL tests run in the psycopg2 runs only (the PostgreSQL driver changes nothing)",
            allow_module_level=True,
        )


def server() -> dict[str, Any]:
    """Root's connection parameters for ``$DGP_MYSQL`` (default 127.0.0.1:3306)."""
    host, _, port = os.environ.get("DGP_MYSQL", "127.0.0.1:3306").rpartition(":")
    return {"host": host or "127.0.0.1", "port": int(port), "user": "root", "password": ""}


@pytest.fixture(scope="module")
def root_params() -> dict[str, Any]:
    import pymysql

    params = server()
    try:
        conn = pymysql.connect(**params, connect_timeout=2, autocommit=True)
    except pymysql.err.MySQLError as exc:
        why = f"no MySQL server at {params['host']}:{params['port']} ({exc}); set DGP_MYSQL"
        if os.environ.get("DGP_REQUIRE_MYSQL") == "1":
            pytest.fail(f"DGP_REQUIRE_MYSQL=1 but {why}")
        pytest.skip(why)
    conn.close()
    return params


@pytest.fixture
def admin(root_params: dict[str, Any]) -> Iterator[Any]:
    import pymysql

    conn = pymysql.connect(**root_params, autocommit=True)
    yield conn
    conn.close()


@pytest.fixture
def params(root_params: dict[str, Any], admin: Any) -> Iterator[dict[str, Any]]:
    """Connection parameters of a user of this test's own (its sessions are the app's).

    The user may do anything (the test runner creates and drops databases),
    and is dropped at the end with its sessions.
    """
    import pymysql

    user = f"dgp_{os.getpid()}_{next(_users)}"
    with admin.cursor() as cur:
        for host in ("%", "localhost", "127.0.0.1"):
            cur.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY 'pw'")
            cur.execute(f"GRANT ALL ON *.* TO '{user}'@'{host}'")
    yield {**root_params, "user": user, "password": "pw", "database": "test"}
    with admin.cursor() as cur:
        cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s", [user])
        for (thread_id,) in cur.fetchall():
            try:
                cur.execute(f"KILL {int(thread_id)}")
            except pymysql.err.MySQLError:
                pass  # ended meanwhile
        for host in ("%", "localhost", "127.0.0.1"):
            cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


def sessions(
    admin: Any, user: str, *, running: str | None = None, besides: tuple[str, ...] = ()
) -> list[int]:
    """Thread ids of ``user``'s sessions: those running ``running``, none running ``besides``."""
    sql = "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s"
    args: list[Any] = [user]
    if running is not None:
        sql += " AND INFO LIKE %s"
        args.append(running + "%")
    for other in besides:
        sql += " AND (INFO IS NULL OR INFO NOT LIKE %s)"
        args.append(other + "%")
    with admin.cursor() as cur:
        cur.execute(sql, args)
        return [int(row[0]) for row in cur.fetchall()]


def one(conn: Any, sql: str, args: Any = None) -> Any:
    """The first column of the first row of ``sql`` on ``conn`` (None: no row)."""
    with conn.cursor() as cur:
        cur.execute(sql, args)
        row = cur.fetchone()
        return None if row is None else row[0]
