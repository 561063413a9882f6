"""The ``mysql`` scenario: the primary-key and wait views served from MySQL/MariaDB.

Five competitors (``benchapp.competitors.MYSQL_CONFIGS``), each in its own
gunicorn of gevent workers, on the database ``dgp_bench`` of the MySQL server
``$DGP_MYSQL`` (``host:port``, default 127.0.0.1:3306, as root without a
password), created and seeded here with the same items as on PostgreSQL:

- ours, ``django_gevent_pool.backends.mysql``, MAX_CONNS = REUSE_CONNS, POOL_TIMEOUT 10;
- ours again with ``POOL_MODE = "transaction"`` (skipped, saying why, by a
  package that refuses the option);
- Django's stock MySQL backend, CONN_MAX_AGE=0 and 60, capped by gunicorn's
  ``worker_connections`` = MAX_CONNS as on PostgreSQL;
- django-mysql-geventpool 0.2.5, OPTIONS ``MAX_CONNS``.

All on PyMySQL (the stock backend and django-mysql-geventpool get it
installed as ``MySQLdb`` in the worker, the way their gevent users must;
ours installs it itself). Every pool is filled first (``/warm/``), then wrk
drives ``/item/<pk>/`` and ``/wait/`` (a lookup, 50 ms of ``gevent.sleep``
off the database, a lookup) in turn, with the clients and durations of the
http scenario (``--views`` keeps a subset of the two).

MySQL has no ``application_name``: each competitor connects as a MySQL user of
its own (``MYSQL_USERS``), created here and dropped at the end, and
:class:`ProcessListSampler` counts each user's rows in
``information_schema.PROCESSLIST`` every 20 ms, with a guard that kills
(by PID) a competitor going beyond ``workers x MAX_CONNS + 10``. With no
MySQL server reachable the scenario is skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from benchapp.competitors import (
    DBNAME,
    ITEMS,
    MYSQL_CONFIGS,
    MYSQL_PASSWORD,
    MYSQL_USERS,
    MYSQL_VIEWS,
    unavailable,
)

from .loads import run_wrk
from .servers import HOST, Gunicorn, Peaks, free_port
from .skewed import library_digest

if TYPE_CHECKING:
    from .runner import Run

#: Seconds a MySQL server gets to answer the first connect.
CONNECT_LIMIT = 5
#: Seconds the sessions of a stopped (or quiet) competitor get to go away.
DRAIN_LIMIT = 10.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS bench_item (
        id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
        name varchar(100) NOT NULL,
        price decimal(10, 2) NOT NULL,
        stock integer NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE IF NOT EXISTS bench_order (
        id bigint NOT NULL AUTO_INCREMENT PRIMARY KEY,
        item_id bigint NOT NULL,
        quantity integer NOT NULL,
        created_at datetime(6) NOT NULL,
        KEY bench_order_item_id (item_id),
        CONSTRAINT bench_order_item FOREIGN KEY (item_id) REFERENCES bench_item (id)
    ) ENGINE=InnoDB""",
)


def root_params() -> dict[str, Any]:
    """Root's connection parameters for ``$DGP_MYSQL`` (default 127.0.0.1:3306)."""
    host, _, port = (os.environ.get("DGP_MYSQL") or "127.0.0.1:3306").rpartition(":")
    return {"host": host or HOST, "port": int(port), "user": "root", "password": ""}


def connect_root(**extra: Any) -> Any:
    """An autocommit PyMySQL connection as root."""
    import pymysql

    return pymysql.connect(**root_params(), connect_timeout=CONNECT_LIMIT, autocommit=True, **extra)


@dataclass
class MySQLScenario:
    """What the scenario set up: the server, its version, the sampler; or why it is skipped."""

    host: str = ""
    port: int = 0
    version: str = ""
    skipped: str | None = None
    sampler: ProcessListSampler | None = None
    users: list[str] = field(default_factory=list)
    #: The competitors to measure (those the package accepts the options of).
    keys: list[str] = field(default_factory=list)
    #: The views to measure on each, in order (``MYSQL_VIEWS`` within ``--views``).
    views: list[str] = field(default_factory=list)


def scenario_views(views: tuple[str, ...]) -> list[str]:
    """The views of this scenario that ``--views`` keeps, in order."""
    return [view for view in MYSQL_VIEWS if view in views]


def setup(run: Run) -> MySQLScenario:
    """Reach the server, create and seed the database and the users, start the sampler.

    Returns a skipped scenario (with the reason) when no server answers, when
    it has too few free connections for one competitor, or when ``--views``
    leaves none of its views. A competitor of ours whose options the package
    refuses (``POOL_MODE`` before it exists) goes to ``run.skipped``, with
    the reason, and the others are measured.
    """
    params = root_params()
    where = f"{params['host']}:{params['port']}"
    scenario = MySQLScenario(host=params["host"], port=params["port"])
    scenario.views = scenario_views(run.config.views)
    if not scenario.views:
        scenario.skipped = f"--views keeps none of {', '.join(MYSQL_VIEWS)}"
        return _skip(run, scenario)
    for key in MYSQL_CONFIGS:
        why = unavailable(key)
        if why is None:
            scenario.keys.append(key)
        else:
            run.skipped[key] = why
            print(f"  skipped {key}: {why}", flush=True)
    try:
        import pymysql
    except ImportError as exc:
        scenario.skipped = f"PyMySQL is not installed ({exc})"
        return _skip(run, scenario)
    try:
        conn = connect_root()
    except pymysql.err.MySQLError as exc:
        scenario.skipped = f"no MySQL server reachable at {where} as root ({exc}); set DGP_MYSQL"
        return _skip(run, scenario)
    try:
        with conn.cursor() as cursor:
            scenario.version = str(conn.get_server_info())
            cursor.execute("SELECT @@max_connections")
            limit = int(cursor.fetchone()[0])
            cursor.execute("SELECT COUNT(*) FROM information_schema.PROCESSLIST")
            used = int(cursor.fetchone()[0])
            needed = run.config.workers * run.config.max_conns + 15
            if limit - used < needed:
                scenario.skipped = (
                    f"the MySQL server at {where} has {limit - used} free connections; "
                    f"one competitor needs {needed}"
                )
                return _skip(run, scenario)
            prepare(cursor)
            for key in MYSQL_CONFIGS:
                create_user(cursor, MYSQL_USERS[key])
                scenario.users.append(MYSQL_USERS[key])
    except BaseException:
        with contextlib.suppress(Exception):
            drop_users(conn, scenario.users)
        conn.close()
        raise
    conn.close()
    scenario.sampler = ProcessListSampler(list(MYSQL_USERS.values()))
    scenario.sampler.guard(run.guard_limit, run._on_guard)
    scenario.sampler.start()
    print(f"  mysql server: MariaDB/MySQL {scenario.version} at {where}", flush=True)
    return scenario


def _skip(run: Run, scenario: MySQLScenario) -> MySQLScenario:
    print(f"  skipped mysql scenario: {scenario.skipped}", flush=True)
    return scenario


def prepare(cursor: Any) -> None:
    """Create ``dgp_bench`` and its tables if missing, empty them, seed ``ITEMS`` items.

    The same rows as on PostgreSQL: ``item <n>``, the same prices, a large stock.
    """
    cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{DBNAME}`")
    cursor.execute(f"USE `{DBNAME}`")
    for statement in _SCHEMA:
        cursor.execute(statement)
    cursor.execute("DELETE FROM bench_order")
    cursor.execute("DELETE FROM bench_item")
    cursor.execute("ALTER TABLE bench_item AUTO_INCREMENT = 1")
    cursor.executemany(
        "INSERT INTO bench_item (id, name, price, stock) VALUES (%s, %s, %s, %s)",
        [
            (g, f"item {g}", (100 + (g * 7919) % 9900) / 100.0, 100000000)
            for g in range(1, ITEMS + 1)
        ],
    )
    cursor.execute("ANALYZE TABLE bench_item")
    cursor.fetchall()


def create_user(cursor: Any, user: str) -> None:
    """``user`` afresh, from any loopback address, with every right on ``dgp_bench`` only."""
    for host in ("%", "localhost", "127.0.0.1"):
        cursor.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
        cursor.execute(f"CREATE USER '{user}'@'{host}' IDENTIFIED BY '{MYSQL_PASSWORD}'")
        cursor.execute(f"GRANT ALL ON `{DBNAME}`.* TO '{user}'@'{host}'")


def drop_users(conn: Any, users: list[str]) -> None:
    """Drop the scenario's users (their sessions have ended)."""
    with conn.cursor() as cursor:
        for user in users:
            for host in ("%", "localhost", "127.0.0.1"):
                cursor.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")


def teardown(scenario: MySQLScenario) -> None:
    """Stop the sampler and drop the users."""
    try:
        if scenario.sampler is not None:
            scenario.sampler.stop()
    finally:
        if scenario.users:
            conn = connect_root()
            try:
                drop_users(conn, scenario.users)
            finally:
                conn.close()


# ------------------------------------------------------------------ sampler


class ProcessListSampler:
    """A thread counting, every ``interval`` s, each user's sessions in PROCESSLIST.

    The MySQL side of :class:`servers.ConnectionSampler`: its peaks are per
    user (one per competitor), its ``states`` per ``COMMAND`` (``Sleep`` is an
    idle session). Besides the measurement window it keeps each user's peak
    since :meth:`reset_life`: a competitor's whole life, warm-up included.
    Connected as root, it never counts itself.
    """

    def __init__(self, users: list[str], interval: float = 0.02) -> None:
        self.users = users
        self.interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._window: Peaks | None = None
        self._life: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self._guard_limit: int | None = None
        self._on_guard: Any = None
        self._guard_fired = False

    def guard(self, limit: int, on_guard: Any) -> None:
        """Call ``on_guard(count)`` (in the sampler's thread) when a user exceeds ``limit``."""
        self._guard_limit = limit
        self._on_guard = on_guard

    def start(self) -> ProcessListSampler:
        """Connect and start the sampling thread; return self."""
        self._conn = connect_root()
        self._thread = threading.Thread(target=self._run, name="dgpb-mysql-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        marks = ", ".join(["%s"] * len(self.users))
        query = (
            "SELECT USER, COMMAND, COUNT(*) FROM information_schema.PROCESSLIST"
            f" WHERE USER IN ({marks}) GROUP BY USER, COMMAND"
        )
        try:
            with self._conn.cursor() as cursor:
                while not self._stop.is_set():
                    cursor.execute(query, self.users)
                    counts: dict[str, int] = {}
                    states: dict[str, int] = {}
                    for user, command, n in cursor.fetchall():
                        counts[user] = counts.get(user, 0) + int(n)
                        state = "idle" if command == "Sleep" else str(command)
                        states[state] = states.get(state, 0) + int(n)
                    worst = max(counts.values(), default=0)
                    if (
                        self._guard_limit is not None
                        and self._on_guard is not None
                        and worst > self._guard_limit
                        and not self._guard_fired
                    ):
                        self._guard_fired = True
                        self._on_guard(worst)
                    with self._lock:
                        self._last = counts
                        for user, n in counts.items():
                            self._life[user] = max(self._life.get(user, 0), n)
                        window = self._window
                        if window is not None:
                            window.samples += 1
                            window.total = max(window.total, sum(counts.values()))
                            for user, n in counts.items():
                                window.per_name[user] = max(window.per_name.get(user, 0), n)
                            for state, n in states.items():
                                window.states[state] = window.states.get(state, 0) + n
                    self._stop.wait(self.interval)
        except BaseException as exc:  # re-raised in the orchestrator's thread
            self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"sampling PROCESSLIST failed: {self._error!r}")

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
        self._check()

    def reset_life(self, user: str) -> None:
        """Start ``user``'s life peak afresh (a competitor about to start)."""
        with self._lock:
            self._life[user] = 0
            self._guard_fired = False

    def life_peak(self, user: str) -> int:
        """``user``'s peak since :meth:`reset_life`."""
        self._check()
        with self._lock:
            return self._life.get(user, 0)

    def stop(self) -> None:
        """Stop the thread and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._check()


def wait_drained(user: str, at_most: int = 0, limit: float = DRAIN_LIMIT) -> int:
    """Wait (bounded) until ``user`` has at most ``at_most`` sessions; return the count."""
    deadline = time.monotonic() + limit
    with contextlib.closing(connect_root()) as conn, conn.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s", [user]
            )
            left = int(cursor.fetchone()[0])
            if left <= at_most or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)


def wait_quiet(user: str, quiet_for: float = 0.1, limit: float = DRAIN_LIMIT) -> bool:
    """Wait (bounded) until no session of ``user`` has run anything for ``quiet_for`` s."""
    deadline = time.monotonic() + limit
    quiet_since: float | None = None
    with contextlib.closing(connect_root()) as conn, conn.cursor() as cursor:
        while time.monotonic() < deadline:
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE USER = %s AND COMMAND NOT IN ('Sleep', 'Connect')",
                [user],
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


# ------------------------------------------------------------------ the scenario


def mysql_round(run: Run, round_no: int, scenario: MySQLScenario) -> None:
    """Every competitor once, in an order rotating from round to round."""
    from .runner import rotate

    for key in rotate(list(scenario.keys), round_no):
        mysql_competitor(run, round_no, key, scenario)


def mysql_competitor(run: Run, round_no: int, key: str, scenario: MySQLScenario) -> None:
    """One competitor: its gunicorn up, checked, warmed, each view measured in turn, stopped.

    One warm-up run of wrk on the first view, as in the http scenario; before
    and after each measured view, the abandoned requests finished and the
    stray sessions closed (:func:`settle_between`). One record per view; its
    ``peak_life`` is the competitor's peak from its start to that view's end.
    """
    from .runner import TMP, check_workers, in_every_worker, pool_counters

    competitor = MYSQL_CONFIGS[key]
    config = run.config
    user = MYSQL_USERS[key]
    sampler = scenario.sampler
    assert sampler is not None
    wrk = run.tools["wrk"]
    port = free_port()
    env = run.child_env(key, False, scenario.host, str(scenario.port))
    env.update(
        DGPB_USER=user,
        DGPB_PASSWORD=MYSQL_PASSWORD,
        DGPB_BIND=f"{HOST}:{port}",
        DGPB_WORKERS=str(config.workers),
        DGPB_WORKER_CONNECTIONS=str(config.max_conns if competitor.capped_by_gunicorn else 1000),
        DGPB_WSGI_APP="benchapp.wsgi:application",
        DGPB_POOL_TIMEOUT="10",
    )
    clients = config.workers * config.max_conns if competitor.capped_by_gunicorn else config.clients
    sampler.reset_life(user)
    gunicorn = Gunicorn(sys.executable, env, port, TMP / f"gunicorn-{key}-{round_no}.log")
    run.register(gunicorn.proc)
    run._active_gunicorn = gunicorn
    views = [view for view in scenario.views if competitor.serves(view)]
    results: list[dict[str, Any]] = []
    try:
        check_workers(competitor, gunicorn.wait_ready(config.workers))
        # Every pool filled first: django-mysql-geventpool's as django-db-geventpool's.
        in_every_worker(port, "/warm/", config.workers)
        run_wrk(wrk, port, views[0], clients, config.http_warmup, ITEMS)
        settle_between(run, port, key)
        for view in views:
            if competitor.ours:
                pool_counters(port, config.workers)  # from now on
            with sampler.window() as peaks:
                result = run_wrk(wrk, port, view, clients, config.view_seconds(view), ITEMS)
            settle_between(run, port, key)
            if competitor.ours:
                result["pool"] = pool_counters(port, config.workers)
            result.update(
                scenario="mysql",
                round=round_no,
                competitor=key,
                user=user,
                peak_total=peaks.per_name.get(user, 0),
                peak_life=sampler.life_peak(user),
                busy_share=peaks.busy_share(),
                states=peaks.states,
                samples=peaks.samples,
                library_digest=library_digest(),
            )
            results.append(result)
            if run.guard_tripped:
                break
            print(
                f"  mysql  {key:<22} {view:<4} {result['rps']:>6.0f}/s "
                f"p50 {result['p50_ms']:>6.1f}ms p99 {result['p99_ms']:>6.1f}ms "
                f"err {result['errors']} conns {result['peak_total']} "
                f"(life {result['peak_life']})",
                flush=True,
            )
    finally:
        run._active_gunicorn = None
        gunicorn.stop()
        run._active.clear()
        left = wait_drained(user)
        if left:
            print(f"  warning: {left} MySQL sessions of {user} left after {key}", flush=True)
    if run.guard_tripped:
        raise RuntimeError(f"{key}: " + "; ".join(run.guard_tripped))
    run.records.extend(results)


def settle_between(run: Run, port: int, key: str) -> None:
    """After a wrk run: its abandoned requests done, the server quiet, stray sessions closed.

    As :meth:`Run.between_measurements`, by MySQL user: the stock backend's
    per-greenlet persistent connections of finished greenlets are closed by
    ``gc.collect()`` (``/collect/``); the pools keep at most MAX_CONNS.
    """
    from .runner import in_every_worker, requests_done

    config = run.config
    competitor = MYSQL_CONFIGS[key]
    user = MYSQL_USERS[key]
    if not requests_done(port, config.workers) or not wait_quiet(user):
        print(f"  warning: {key} still busy 10 s after wrk stopped", flush=True)
    at_most = 0 if competitor.capped_by_gunicorn else config.workers * config.max_conns
    for _ in range(5):
        in_every_worker(port, "/collect/", config.workers)
        if wait_drained(user, at_most=at_most, limit=1.0) <= at_most:
            return
    print(f"  warning: {key} keeps more than {at_most} MySQL sessions", flush=True)
