"""What the MySQL tests share: the server, a user per test, counting its sessions.

The server is ``$DGP_MYSQL`` (``host:port``, user root, no password; the
database ``test``), by default 127.0.0.1:3306. With none reachable the tests
skip and say why (fail under ``DGP_REQUIRE_MYSQL=1``, which ``.ci/run`` sets
when a server answers there). They run in the psycopg2 runs of ``make test``
(gevent and threads) and in the Django 6.x cells of ``make test-matrix``
(:func:`in_mysql_runs`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from .support import DRIVER

_users = itertools.count()


def in_mysql_runs() -> bool:
    """Do the MySQL tests run here? In the psycopg2 runs and on Django 6.x.

    The PostgreSQL driver changes nothing for them: once per mode in ``make
    test`` (its psycopg2 runs), and in the Django 6.x cells of ``make
    test-matrix`` (run on psycopg 3), so every supported Django meets PyMySQL.
    """
    import django

    return DRIVER == "psycopg2" or django.VERSION >= (6, 0)


def only_in_mysql_runs() -> None:
    """Skip the calling test module where :func:`in_mysql_runs` says no."""
    if not in_mysql_runs():
        pytest.skip(
            "the MySQL tests run in the psycopg2 runs and on Django 6.x (the PostgreSQL "
            "driver changes nothing)",
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
    except pymysql.MySQLError as exc:
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
            except pymysql.MySQLError:
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


class ThrowawayMariaDB:
    """A MariaDB (or MySQL) server of a test's own, on a free loopback port, to restart or kill.

    ``mariadb-install-db`` makes its data directory (root without a
    password), ``mariadbd`` serves it; never the shared server.
    """

    def __init__(self, base: str) -> None:
        import shutil
        import socket

        self.mariadbd = shutil.which("mariadbd", path="/usr/sbin:/usr/local/sbin:/usr/bin")
        install = shutil.which("mariadb-install-db", path="/usr/bin:/usr/local/bin:/usr/sbin")
        if self.mariadbd is None or install is None:
            pytest.skip("no mariadbd / mariadb-install-db for a throwaway MariaDB server")
        self.base = base
        self.datadir = os.path.join(base, "data")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._process: Any = None
        import subprocess

        subprocess.run(
            [
                install,
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--user={_user_name()}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def params(self) -> dict[str, Any]:
        return {"host": "127.0.0.1", "port": self.port, "user": "root", "password": ""}

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it accepts connections."""
        import subprocess
        import time

        self._process = subprocess.Popen(
            [
                str(self.mariadbd),
                "--no-defaults",
                f"--datadir={self.datadir}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={os.path.join(self.base, 'sock')}",
                f"--pid-file={os.path.join(self.base, 'pid')}",
                f"--log-error={os.path.join(self.base, 'error.log')}",
                f"--user={_user_name()}",
                "--skip-log-bin",
                "--innodb-buffer-pool-size=16M",
                "--max-connections=100",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.accepts():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the throwaway MariaDB did not start: see {self.base}")
            time.sleep(0.02)

    def accepts(self) -> bool:
        import pymysql

        try:
            pymysql.connect(**self.params(), connect_timeout=1).close()
        except pymysql.MySQLError:
            return False
        return True

    def stop(self, *, kill: bool = False, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM: a clean shutdown; ``kill``: SIGKILL) and wait for it."""
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        process.wait(timeout)


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name
