"""What the orchestrator starts and watches: the database, gunicorn, PgBouncer, a sampler.

Every process started here is remembered by its ``Popen`` and stopped by PID
(SIGTERM, then SIGKILL after a bounded wait). Nothing here ever stops a
process it did not start, and the PostgreSQL server itself is only used.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg2
from psycopg2.extensions import parse_dsn

HOST = "127.0.0.1"
STARTUP_LIMIT = 30.0  # seconds a server gets to answer
STOP_LIMIT = 15.0  # seconds a server gets to exit after SIGTERM
DRAIN_LIMIT = 10.0  # seconds the server's backends of a stopped competitor get to go away
SAMPLER_APPNAME = "dgpb-sampler"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_item (
    id bigserial PRIMARY KEY,
    name varchar(100) NOT NULL,
    price numeric(10, 2) NOT NULL,
    stock integer NOT NULL
);
CREATE TABLE IF NOT EXISTS bench_order (
    id bigserial PRIMARY KEY,
    item_id bigint NOT NULL REFERENCES bench_item (id) DEFERRABLE INITIALLY DEFERRED,
    quantity integer NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS bench_order_item_id ON bench_order (item_id);
"""


# ------------------------------------------------------------------ database


@dataclass(frozen=True)
class Server:
    """The PostgreSQL server under test: a libpq DSN for admin work and its parts."""

    dsn: str  # to the maintenance database ("postgres")
    host: str
    port: str
    user: str
    password: str

    @classmethod
    def from_dsn(cls, dsn: str) -> Server:
        """Split ``dsn`` into the parts competitors are configured with."""
        params = parse_dsn(dsn)
        return cls(
            dsn=dsn,
            host=params.get("host", HOST),
            port=params.get("port", "5432"),
            user=params.get("user", "postgres"),
            password=params.get("password", ""),
        )

    def connect(self, dbname: str | None = None, **extra: Any) -> Any:
        """A plain autocommit psycopg2 connection (to ``dbname``, default: the DSN's)."""
        params = parse_dsn(self.dsn)
        if dbname is not None:
            params["dbname"] = dbname
        params.update(extra)
        conn = psycopg2.connect(**params)
        conn.autocommit = True
        return conn

    def version(self) -> str:
        """``SELECT version()``, up to its ' on ' (e.g. 'PostgreSQL 15.20 (Debian ...)')."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT version()")
            return str(cursor.fetchone()[0]).split(" on ")[0]

    def headroom(self) -> int:
        """Connections that may still be opened by non-superusers right now."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT current_setting('max_connections')::int"
                " - current_setting('superuser_reserved_connections')::int"
                " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
            )
            return int(cursor.fetchone()[0])

    def sleep_rate(
        self, dbname: str, connections: int, seconds: float, per_connection: int
    ) -> float:
        """Sleeps per second the server runs with nothing but clients in between.

        ``connections`` OS threads, each on its own connection, run
        ``SELECT pg_sleep(seconds)`` ``per_connection`` times back to back;
        the rate is all of them over the wall time. It is the sleep view's
        ceiling as this machine really has it (timer slack, scheduling, the
        round trip), with no HTTP, no Django and no pool in the way.
        """
        conns = [
            self.connect(dbname, application_name="dgpb-sleep-rate") for _ in range(connections)
        ]
        try:
            start = threading.Barrier(connections + 1)

            def sleeper(conn: Any) -> None:
                with conn.cursor() as cursor:
                    start.wait(10)
                    for _ in range(per_connection):
                        cursor.execute("SELECT pg_sleep(%s)", [seconds])

            threads = [threading.Thread(target=sleeper, args=(c,), daemon=True) for c in conns]
            for thread in threads:
                thread.start()
            start.wait(10)
            began = time.perf_counter()
            for thread in threads:
                thread.join(per_connection * seconds * 20 + 10)
            elapsed = time.perf_counter() - began
        finally:
            for conn in conns:
                conn.close()
        return connections * per_connection / elapsed

    def prepare(self, dbname: str, items: int) -> None:
        """Create ``dbname`` and the shop's tables if missing; empty them; seed ``items`` items."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname])
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{dbname}"')
        with contextlib.closing(self.connect(dbname)) as conn, conn.cursor() as cursor:
            cursor.execute(_SCHEMA)
            cursor.execute("TRUNCATE bench_order, bench_item RESTART IDENTITY")
            cursor.execute(
                "INSERT INTO bench_item (name, price, stock)"
                " SELECT 'item ' || g, (100 + (g * 7919) %% 9900) / 100.0, 100000000"
                " FROM generate_series(1, %s) AS g",
                [items],
            )
            cursor.execute("VACUUM ANALYZE bench_item")

    def wait_quiet(self, dbname: str, quiet_for: float = 0.1, limit: float = DRAIN_LIMIT) -> bool:
        """Wait (bounded) until no backend on ``dbname`` has run anything for ``quiet_for`` s.

        After wrk stops, requests it gave up on may still be queued in the
        server process (the sleep view leaves up to 180 of them, half a second
        of work): the next measurement must not start behind them.
        """
        deadline = time.monotonic() + limit
        quiet_since: float | None = None
        with contextlib.closing(self.connect(application_name=SAMPLER_APPNAME)) as conn:
            with conn.cursor() as cursor:
                while time.monotonic() < deadline:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                        " AND state IS DISTINCT FROM 'idle'",
                        [dbname],
                    )
                    now = time.monotonic()
                    if int(cursor.fetchone()[0]) == 0:
                        quiet_since = now if quiet_since is None else quiet_since
                        if now - quiet_since >= quiet_for:
                            return True
                    else:
                        quiet_since = None
                    time.sleep(0.01)
        return False

    def count_orders(self, dbname: str) -> int:
        """Rows in ``bench_order`` (each successful ``/tx/`` adds one)."""
        with contextlib.closing(self.connect(dbname)) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM bench_order")
            return int(cursor.fetchone()[0])

    def wait_drained(self, dbname: str, limit: float = DRAIN_LIMIT, at_most: int = 0) -> int:
        """Wait (bounded) until at most ``at_most`` backends are on ``dbname``; return the count."""
        deadline = time.monotonic() + limit
        with contextlib.closing(self.connect(application_name=SAMPLER_APPNAME)) as conn:
            with conn.cursor() as cursor:
                while True:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [dbname]
                    )
                    left = int(cursor.fetchone()[0])
                    if left <= at_most or time.monotonic() >= deadline:
                        return left
                    time.sleep(0.05)


# ------------------------------------------------------------------ sampler


@dataclass
class Peaks:
    """Server connections seen in one window.

    ``total`` and ``per_name`` are peaks (all backends, and per
    application_name); ``states`` adds up, over the samples, how many
    backends were in each ``pg_stat_activity.state``: the share of
    connection-time spent ``idle`` -- open but doing nothing, in a pool or
    held by a request between queries -- is capacity the load did not use.
    """

    total: int = 0
    per_name: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    states: dict[str, int] = field(default_factory=dict)

    def busy_share(self) -> float | None:
        """Share of sampled connection-time not ``idle`` (running, or inside a transaction)."""
        seen = sum(self.states.values())
        return (seen - self.states.get("idle", 0)) / seen if seen else None

    def per_worker(self, prefix: str) -> int:
        """The highest count of any one process whose application_name starts with ``prefix``."""
        return max((n for name, n in self.per_name.items() if name.startswith(prefix)), default=0)


class ConnectionSampler:
    """A thread counting, every ``interval`` s, the server's backends on ``dbname``.

    Counts come from ``pg_stat_activity`` on a separate connection to another
    database, so the sampler never counts itself. :meth:`window` collects the
    peaks of one measurement. A failed sample stops the sampling and is
    re-raised by the next :meth:`window` or :meth:`stop`: a peak that silently
    stopped being measured would prove nothing.
    """

    def __init__(self, server: Server, dbname: str, interval: float = 0.02) -> None:
        self.server = server
        self.dbname = dbname
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._window: Peaks | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._guard_limit: int | None = None
        self._on_guard: Callable[[int], None] | None = None
        self._guard_fired = False

    def guard(self, limit: int, on_guard: Callable[[int], None]) -> None:
        """Call ``on_guard(total)`` (in the sampler's thread) when a sample exceeds ``limit``.

        It fires once per window (and once outside windows); its job is to
        stop whatever opened so many connections, at once.
        """
        self._guard_limit = limit
        self._on_guard = on_guard

    def start(self) -> ConnectionSampler:
        """Connect and start the sampling thread; return self."""
        self._conn = self.server.connect(application_name=SAMPLER_APPNAME)
        self._thread = threading.Thread(target=self._run, name="dgpb-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        query = (
            "SELECT application_name, coalesce(state, 'unknown'), count(*)"
            " FROM pg_stat_activity WHERE datname = %s GROUP BY 1, 2"
        )
        try:
            with self._conn.cursor() as cursor:
                while not self._stop.is_set():
                    cursor.execute(query, [self.dbname])
                    counts: dict[str, int] = {}
                    states: dict[str, int] = {}
                    for name, state, n in cursor.fetchall():
                        counts[name] = counts.get(name, 0) + n
                        states[state] = states.get(state, 0) + n
                    total = sum(counts.values())
                    if (
                        self._guard_limit is not None
                        and self._on_guard is not None
                        and total > self._guard_limit
                        and not self._guard_fired
                    ):
                        self._guard_fired = True
                        self._on_guard(total)
                    with self._lock:
                        window = self._window
                        if window is not None:
                            window.samples += 1
                            window.total = max(window.total, total)
                            for name, n in counts.items():
                                if n > window.per_name.get(name, 0):
                                    window.per_name[name] = n
                            for state, n in states.items():
                                window.states[state] = window.states.get(state, 0) + n
                    self._stop.wait(self.interval)
        except BaseException as exc:  # re-raised in the orchestrator's thread
            self._error = exc

    @contextlib.contextmanager
    def window(self) -> Iterator[Peaks]:
        """Collect peaks while the block runs; the yielded object is filled in place."""
        peaks = Peaks()
        with self._lock:
            self._window = peaks
            self._guard_fired = False
        try:
            yield peaks
        finally:
            with self._lock:
                self._window = None
        if self._error is not None:
            raise RuntimeError(f"sampling pg_stat_activity failed: {self._error!r}")

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._error is not None:
            raise RuntimeError(f"sampling pg_stat_activity failed: {self._error!r}")


# ------------------------------------------------------------------ processes


def free_port() -> int:
    """A TCP port nobody listens on right now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc`` (by its PID), wait, SIGKILL if it will not go."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_LIMIT)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """GET ``path`` from the loopback server on ``port``; the decoded JSON body."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


class Gunicorn:
    """One competitor's gunicorn (gevent workers), started and stopped by PID."""

    def __init__(self, python: str, env: dict[str, str], port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # closed in stop()
        conf = Path(__file__).resolve().parent.parent / "benchapp" / "gunicorn_conf.py"
        self.proc = subprocess.Popen(
            [python, "-m", "gunicorn", "-c", str(conf)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the orchestrator only, which stops it
        )

    def wait_ready(self, workers: int) -> list[dict[str, Any]]:
        """Poll ``/info/`` until every worker answered once; return their answers."""
        deadline = time.monotonic() + STARTUP_LIMIT
        seen: dict[int, dict[str, Any]] = {}
        while len(seen) < workers:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with status {self.proc.returncode} while starting:\n"
                    + tail(self.log_path)
                )
            try:
                info = get_json(self.port, "/info/", timeout=2.0)
                seen[int(info["pid"])] = info
            except (OSError, urllib.error.URLError, ValueError):
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"gunicorn: {len(seen)} of {workers} workers answered within "
                    f"{STARTUP_LIMIT:.0f} s:\n" + tail(self.log_path)
                )
        return list(seen.values())

    def worker_pids(self) -> list[int]:
        """PIDs of the master's children (the workers)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in children.split()]

    def stop(self) -> None:
        """Stop the master (it stops its workers) and close the log."""
        try:
            stop_process(self.proc)
        finally:
            self._log.close()


class PgBouncer:
    """PgBouncer in transaction mode on a free loopback port, in front of the server.

    Its files live in ``workdir``. Run as root, PgBouncer refuses to start
    unless told to switch user (``-u``): it then runs as ``postgres`` (or
    ``nobody``), which must be able to write its log there.
    """

    def __init__(self, binary: str, server: Server, dbname: str, pool_size: int, workdir: Path):
        self.port = free_port()
        self.pool_size = pool_size
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "pgbouncer.log"
        users = workdir / "users.txt"
        users.write_text(f'"{server.user}" "{server.password}"\n')
        ini = workdir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{dbname} = host={server.host} port={server.port} dbname={dbname}\n"
            "[pgbouncer]\n"
            f"listen_addr = {HOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            f"max_db_connections = {pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            "max_client_conn = 2000\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.log_path}\n"
        )
        command = [binary]
        if os.geteuid() == 0:
            user = _unprivileged_user()
            uid = pwd.getpwnam(user).pw_uid
            for path in (workdir, users, ini):
                os.chown(path, uid, -1)
            workdir.chmod(0o755)
            command += ["-u", user]
        command.append(str(ini))
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with status {self.proc.returncode}:\n" + tail(self.log_path)
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    raise RuntimeError("pgbouncer did not listen in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop PgBouncer (it closes its server connections)."""
        stop_process(self.proc)


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither user 'postgres' nor 'nobody' exists")
