"""A real PgBouncer on a loopback port, in front of the test server.

:func:`running_pgbouncer` starts the ``pgbouncer`` binary (Debian package
``pgbouncer``) in the foreground as a child process, with its own ini and auth
file in a temporary directory, on 127.0.0.1 and a free ephemeral port, and
stops it by its PID when the block ends. Its admin console (``dbname=pgbouncer``)
is open to the upstream user. The ``pgbouncer_transaction`` and
``pgbouncer_session`` fixtures wrap it per test module.

Where the binary is missing the fixtures skip, saying how to install it,
unless ``DGP_REQUIRE_PGBOUNCER=1`` (set by .ci/run, which installs it) makes
that a failure.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from .support import server

ENV_REQUIRE = "DGP_REQUIRE_PGBOUNCER"
ENV_BINARY = "DGP_PGBOUNCER"  # path of the binary, when it is not on PATH or in /usr/sbin
#: Server connections per (database, user) pair: fewer than the clients the tests open.
DEFAULT_POOL_SIZE = 3
#: A user PgBouncer knows but that is neither admin nor stats user.
PLAIN_USER = "dgp_plain"
INSTALL_HINT = (
    "pgbouncer is not installed; install it with "
    "`apt-get install pgbouncer` (Debian/Ubuntu) or set $DGP_PGBOUNCER to the binary"
)
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


@dataclass
class PgBouncer:
    """A running PgBouncer: where it listens, how it pools, and where it forwards."""

    host: str
    port: int
    pool_mode: str
    pool_size: int
    user: str
    password: str
    upstream_host: str
    upstream_port: int
    process: subprocess.Popen[bytes]
    workdir: str
    log_path: str
    _admins: list[Any] = field(default_factory=list, repr=False)
    _console: Any = field(default=None, repr=False)  # show()'s own connection

    @property
    def pid(self) -> int:
        return self.process.pid

    def conn_params(self, dbname: str, **extra: Any) -> dict[str, Any]:
        """libpq parameters that reach ``dbname`` through this PgBouncer."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": str(self.port),
            "user": self.user,
            "dbname": dbname,
            "connect_timeout": "3",
        }
        if self.password:
            params["password"] = self.password
        params.update(extra)
        return params

    def dsn(self, dbname: str, **extra: Any) -> str:
        """A DSN string for ``dbname`` through this PgBouncer."""
        return " ".join(f"{k}={v}" for k, v in self.conn_params(dbname, **extra).items())

    def django_settings(self, dbname: str) -> dict[str, str]:
        """The ``DATABASES`` fields (NAME, USER, PASSWORD, HOST, PORT) for ``dbname``."""
        return {
            "NAME": dbname,
            "USER": self.user,
            "PASSWORD": self.password,
            "HOST": self.host,
            "PORT": str(self.port),
        }

    def admin(self) -> Any:
        """A new autocommit connection to the admin console; closed when PgBouncer stops
        if the caller did not close it before."""
        conn = psycopg2.connect(self.dsn("pgbouncer"))
        conn.autocommit = True  # the console knows no BEGIN
        self._admins.append(conn)
        return conn

    def show(self, what: str, conn: Any = None) -> list[dict[str, Any]]:
        """``SHOW <what>`` on the admin console (POOLS, CLIENTS, SERVERS...) as dicts."""
        if what.upper() not in {
            "POOLS",
            "CLIENTS",
            "SERVERS",
            "DATABASES",
            "USERS",
            "CONFIG",
            "STATS",
            "LISTS",
            "VERSION",
        }:
            raise ValueError(f"not a SHOW command the tests use: {what!r}")
        if conn is None:
            if self._console is None or self._console.closed:
                self._console = self.admin()
            conn = self._console
        with conn.cursor() as cur:
            cur.execute(f"SHOW {what}")
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def clients(self, dbname: str, application_name: str | None = None) -> list[dict[str, Any]]:
        """Client connections to ``dbname`` (optionally with ``application_name``)."""
        return [
            row
            for row in self.show("CLIENTS")
            if row["database"] == dbname
            and (application_name is None or row.get("application_name") == application_name)
        ]

    def servers(self, dbname: str) -> list[dict[str, Any]]:
        """Server connections PgBouncer holds for ``dbname``, in any state."""
        return [row for row in self.show("SERVERS") if row["database"] == dbname]

    def log(self) -> str:
        """What PgBouncer wrote so far (for assertion messages)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def close_admins(self) -> None:
        for conn in self._admins:
            with contextlib.suppress(Exception):
                conn.close()
        self._admins.clear()


def find_binary() -> str | None:
    """The pgbouncer binary: $DGP_PGBOUNCER, then PATH, then /usr/sbin; None if missing."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in (
        "/usr/sbin/pgbouncer",
        "/usr/local/sbin/pgbouncer",
        "/usr/local/bin/pgbouncer",
    ):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def require_binary() -> str:
    """The binary, or skip the test (fail under ``DGP_REQUIRE_PGBOUNCER=1``) saying why.

    Also skips when ``$DGP_DSN`` names a Unix socket: PgBouncer runs as
    another user when we are root, and the socket's directory may not be
    theirs to enter. (The embedded server listens on loopback TCP.)
    """
    binary = find_binary()
    reason = None
    if binary is None:
        reason = INSTALL_HINT
    elif _upstream()[0].startswith("/") and _run_as() is not None:
        reason = (
            "the PgBouncer tier needs a test server reachable over TCP, and $DGP_DSN "
            "names a Unix socket, which PgBouncer (run as another user than root) may "
            "not enter: give $DGP_DSN a TCP host"
        )
    if reason is not None:
        if os.environ.get(ENV_REQUIRE) == "1":
            pytest.fail(f"{ENV_REQUIRE}=1 but {reason}")
        pytest.skip(reason)
    assert binary is not None
    return binary


def binary_version(binary: str) -> tuple[int, int, int]:
    """The version of a ``pgbouncer`` binary (``pgbouncer --version``: "PgBouncer 1.18.0")."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def free_port() -> int:
    """An ephemeral loopback port free right now (PgBouncer binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    """Who PgBouncer runs as when we are root (it refuses root): postgres, else nobody."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither user 'postgres' nor 'nobody' exists")


def _quote(value: str) -> str:
    """A double-quoted auth_file field (a literal quote is doubled)."""
    return '"' + value.replace('"', '""') + '"'


def write_config(
    workdir: str,
    *,
    port: int,
    pool_mode: str,
    pool_size: int,
    upstream_host: str,
    upstream_port: int,
    user: str,
    password: str,
    settings: Mapping[str, str] | None = None,
    databases: Mapping[str, str] | None = None,
    users: Mapping[str, str] | None = None,
) -> str:
    """Write pgbouncer.ini and userlist.txt into ``workdir``; return the ini's path.

    Every database name is forwarded to the upstream server (``*``); clients
    are trusted (loopback only); ``user`` may use the admin console,
    :data:`PLAIN_USER` may connect but not to the console. ``databases`` adds
    ``[databases]`` entries (name -> extra parameters such as
    ``dbname=x pool_mode=session``), ``users`` adds ``[users]`` entries
    (name -> settings such as ``pool_mode=statement``), ``settings`` adds or
    overrides ``[pgbouncer]`` settings.
    """
    known = [user] if user == PLAIN_USER else [user, PLAIN_USER]
    with open(os.path.join(workdir, "userlist.txt"), "w", encoding="utf-8") as fh:
        for name in known:
            fh.write(f"{_quote(name)} {_quote(password if name == user else '')}\n")
    ini = os.path.join(workdir, "pgbouncer.ini")
    upstream = f"host={upstream_host} port={upstream_port}"
    main = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": os.path.join(workdir, "userlist.txt"),
        "admin_users": user,
        "stats_users": user,
        "pool_mode": pool_mode,
        "default_pool_size": str(pool_size),
        "max_client_conn": "500",
        "server_login_retry": "1",
        "log_connections": "0",
        "log_disconnections": "0",
        # A client waiting for a server connection fails after this instead of
        # hanging a test (PgBouncer's default is 120 s).
        "query_wait_timeout": "10",
        **(settings or {}),
    }
    lines = ["[databases]", f"* = {upstream}"]
    lines += [f"{name} = {upstream} {extra}" for name, extra in (databases or {}).items()]
    lines += ["", "[pgbouncer]"]
    lines += [f"{key} = {value}".rstrip() for key, value in main.items()]
    if users:
        lines += ["", "[users]"] + [f"{name} = {value}" for name, value in users.items()]
    lines.append("")
    with open(ini, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return ini


def _upstream() -> tuple[str, int, str, str]:
    """Host, port, user and password of the test server."""
    params = parse_dsn(server()["admin"])
    host = params.get("host") or "/var/run/postgresql"
    return (
        host,
        int(params.get("port") or 5432),
        params.get("user") or "postgres",
        params.get("password", ""),
    )


def _wait_ready(bouncer: PgBouncer, timeout: float) -> None:
    """Poll the admin console until it answers; fail if PgBouncer exits or time runs out."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            raise RuntimeError(
                f"pgbouncer exited with {bouncer.process.returncode}:\n{bouncer.log()}"
            )
        try:
            conn = psycopg2.connect(bouncer.dsn("pgbouncer", connect_timeout="1"))
        except psycopg2.Error as exc:
            last = exc
            time.sleep(0.05)
            continue
        conn.close()
        return
    raise RuntimeError(
        f"pgbouncer did not accept connections in {timeout} s ({last}):\n{bouncer.log()}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop our child by its PID: SIGTERM, then SIGKILL after a bounded wait."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(_STOP_TIMEOUT)


@contextlib.contextmanager
def running_pgbouncer(
    pool_mode: str = "transaction",
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    binary: str | None = None,
    settings: Mapping[str, str] | None = None,
    databases: Mapping[str, str] | None = None,
    users: Mapping[str, str] | None = None,
) -> Iterator[PgBouncer]:
    """Run a PgBouncer in ``pool_mode`` in front of the test server for the ``with`` block.

    ``settings``, ``databases`` and ``users`` go to :func:`write_config`.

    Raises RuntimeError if the binary is missing (see :func:`require_binary`
    for tests), if it exits at startup or does not answer within a few
    seconds; the child is stopped and the directory removed in every case.
    """
    if pool_mode not in ("session", "transaction", "statement"):
        raise ValueError(f"pool_mode must be session, transaction or statement, not {pool_mode!r}")
    binary = binary or find_binary()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    host, port, user, password = _upstream()
    workdir = tempfile.mkdtemp(prefix=f"dgp-pgbouncer-{pool_mode}-")
    run_as = _run_as()
    try:
        command = [binary]
        if run_as is not None:
            command += ["-u", run_as.pw_name]
        for attempt in range(3):
            listen = free_port()
            ini = write_config(
                workdir,
                port=listen,
                pool_mode=pool_mode,
                pool_size=pool_size,
                upstream_host=host,
                upstream_port=port,
                user=user,
                password=password,
                settings=settings,
                databases=databases,
                users=users,
            )
            if run_as is not None:
                # PgBouncer reads its files after dropping root.
                os.chmod(workdir, 0o755)
                for name in os.listdir(workdir):
                    os.chown(os.path.join(workdir, name), run_as.pw_uid, run_as.pw_gid)
            log_path = os.path.join(workdir, f"pgbouncer-{attempt}.log")
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [*command, ini], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            bouncer = PgBouncer(
                host="127.0.0.1",
                port=listen,
                pool_mode=pool_mode,
                pool_size=pool_size,
                user=user,
                password=password,
                upstream_host=host,
                upstream_port=port,
                process=process,
                workdir=workdir,
                log_path=log_path,
            )
            try:
                _wait_ready(bouncer, _START_TIMEOUT)
            except BaseException as exc:  # a test timeout too: never leave the child behind
                _stop(process)
                # Someone may have taken the port between our probe and its bind.
                retry = isinstance(exc, RuntimeError) and "Address already in use" in bouncer.log()
                if retry and attempt < 2:
                    continue
                raise
            break
        try:
            yield bouncer
        finally:
            bouncer.close_admins()
            _stop(bouncer.process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module", name="pgbouncer_transaction")
def pgbouncer_transaction_fixture() -> Iterator[PgBouncer]:
    """A PgBouncer in transaction mode for the test module (skips if not installed)."""
    binary = require_binary()
    with running_pgbouncer("transaction", binary=binary) as bouncer:
        yield bouncer


@pytest.fixture(scope="module", name="pgbouncer_session")
def pgbouncer_session_fixture() -> Iterator[PgBouncer]:
    """A PgBouncer in session mode for the test module (skips if not installed).

    A client that waits for a server connection fails after 1 s
    (``query_wait_timeout``): in session mode a server stays with its client
    until the client disconnects, so such a wait may never end.
    """
    binary = require_binary()
    with running_pgbouncer(
        "session", binary=binary, settings={"query_wait_timeout": "1"}
    ) as bouncer:
        yield bouncer
