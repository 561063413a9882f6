"""``make demo``: the demo project under gunicorn gevent workers, loaded far above MAX_CONNS.

    python examples/demo.py

1. Finds a PostgreSQL server: ``$DGP_DSN``, else 127.0.0.1:5432, else an
   embedded one (``pgserver``) that lives as long as this script.
2. Creates the database, migrates it and seeds the shop (``manage.py``).
3. Starts gunicorn with ``examples/gunicorn.conf.py`` (one gevent worker,
   MAX_CONNS connections) on a free loopback port.
4. Drives a few seconds of keep-alive HTTP traffic from many concurrent
   clients (greenlets in this process) at ``/item/<pk>/``, ``/sleep/`` and
   ``/tx/``, while sampling ``pg_stat_activity`` every 20 ms for the worker's
   ``application_name``.
5. Prints requests, errors, throughput, latencies, the pool's own statistics
   (from ``/stats/``) and the peak number of server connections, then stops
   gunicorn (and the embedded server, if any).

Exits 1 if a request failed, if the orders in the database do not match the
successful ``/tx/`` requests, or if the server ever saw more than MAX_CONNS
connections from the worker (or none, which would mean nothing was measured).

``DGP_DEMO_DB=mysql`` (``make demo DB=mysql``) runs the same on MySQL or
MariaDB through ``django_gevent_pool.backends.mysql`` instead: the server is
``$DGP_MYSQL`` (``host:port``, default 127.0.0.1:3306, as root without a
password, which creates the database and a ``dgp_demo`` user), there is no
embedded fallback, and the connections counted are that user's sessions in
``information_schema.PROCESSLIST``.

Knobs (environment): DGP_DEMO_SECONDS (5), DGP_DEMO_CLIENTS (200),
DGP_DEMO_MAX_REQUESTS (20000), DGP_MAX_CONNS (10), DGP_DBNAME (dgp_demo),
DGP_DEMO_EMBEDDED=1 (use an embedded server even if another is reachable),
DGP_DEMO_DB (postgresql; or mysql), DGP_MYSQL, DGP_DB_USER (dgp_demo, on MySQL),
DGP_DEMO_JSON=path (also write the results there as JSON).
"""

# First, before anything imports socket, threading, ssl or subprocess: the
# HTTP clients below are greenlets on gevent's cooperative sockets.
from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import IO, Any, NoReturn  # noqa: E402

import gevent  # noqa: E402
import psycopg2  # noqa: E402

from django_gevent_pool import devserver  # noqa: E402

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from pgwatch import MySQLSessionSampler, ServerConnectionSampler  # noqa: E402

HOST = "127.0.0.1"
#: Share of each endpoint in the traffic.
MIX = {"/item/": 6, "/sleep/": 2, "/tx/": 2}
STARTUP_LIMIT = 30.0  # seconds gunicorn gets to answer
STOP_LIMIT = 15.0  # seconds gunicorn gets to exit after SIGTERM
REQUEST_TIMEOUT = 30.0  # seconds one request may take (the pool's own timeout is 10)


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment."""
    return int(os.environ.get(name) or default)


def env_float(name: str, default: float) -> float:
    """A number knob from the environment."""
    return float(os.environ.get(name) or default)


@dataclass
class Config:
    """What one demo run does."""

    seconds: float = field(default_factory=lambda: env_float("DGP_DEMO_SECONDS", 5.0))
    clients: int = field(default_factory=lambda: env_int("DGP_DEMO_CLIENTS", 200))
    max_requests: int = field(default_factory=lambda: env_int("DGP_DEMO_MAX_REQUESTS", 20000))
    max_conns: int = field(default_factory=lambda: env_int("DGP_MAX_CONNS", 10))
    items: int = field(default_factory=lambda: env_int("DGP_ITEMS", 1000))
    dbname: str = field(default_factory=lambda: os.environ.get("DGP_DBNAME") or "dgp_demo")
    embedded: bool = field(default_factory=lambda: os.environ.get("DGP_DEMO_EMBEDDED") == "1")
    json_out: str | None = field(default_factory=lambda: os.environ.get("DGP_DEMO_JSON"))
    appname: str = field(default_factory=lambda: f"dgp-demo-{os.getpid()}")
    db: str = field(default_factory=lambda: os.environ.get("DGP_DEMO_DB") or "postgresql")


@dataclass
class Load:
    """What the clients saw: latencies (seconds) of good responses, errors, by endpoint."""

    deadline: float
    budget: int
    issued: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in MIX})
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)

    def take_ticket(self) -> bool:
        """True if one more request may be sent (time and count both bound the run)."""
        if self.issued >= self.budget or time.monotonic() >= self.deadline:
            return False
        self.issued += 1  # no lock needed: greenlets switch only on I/O
        return True

    def error(self, endpoint: str, what: str) -> None:
        """Record a failed request."""
        self.errors[endpoint] += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{endpoint}: {what}")


# ------------------------------------------------------------------ server side


def resolve_server(config: Config) -> tuple[str, str]:
    """``(dsn, where)`` of the PostgreSQL server to use."""
    # pgserver's platformdirs complains when XDG_RUNTIME_DIR is unset; harmless here.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    if config.embedded:
        # Forced: the same embedded server server_dsn() falls back to.
        dsn, where = devserver.server_dsn(prefer_embedded=True)
        return dsn, f"{where} (DGP_DEMO_EMBEDDED=1)"
    return devserver.server_dsn()


#: The user the MySQL variant serves the project as (its sessions are counted):
#: ``DGP_DB_USER``, default ``dgp_demo``.
MYSQL_USER, MYSQL_PASSWORD = os.environ.get("DGP_DB_USER") or "dgp_demo", "dgp-demo"


def mysql_root() -> dict[str, Any]:
    """Root's connection parameters for ``$DGP_MYSQL`` (default 127.0.0.1:3306)."""
    host, _, port = (os.environ.get("DGP_MYSQL") or "127.0.0.1:3306").rpartition(":")
    return {"host": host or "127.0.0.1", "port": int(port), "user": "root", "password": ""}


def prepare_mysql(config: Config) -> str:
    """Create the demo's database and user on the MySQL server; return where it is.

    Raises SystemExit with the reason when no server answers: the MySQL
    variant has no embedded fallback.
    """
    import pymysql

    root = mysql_root()
    try:
        conn = pymysql.connect(**root, connect_timeout=5, autocommit=True)
    except pymysql.MySQLError as exc:
        raise SystemExit(
            f"no MySQL server to use at {root['host']}:{root['port']} as root ({exc}); "
            "set DGP_MYSQL=host:port"
        ) from exc
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{config.dbname}`")
            for host in ("%", "localhost", "127.0.0.1"):
                cursor.execute(
                    f"CREATE USER IF NOT EXISTS '{MYSQL_USER}'@'{host}' "
                    f"IDENTIFIED BY '{MYSQL_PASSWORD}'"
                )
                cursor.execute(f"GRANT ALL ON `{config.dbname}`.* TO '{MYSQL_USER}'@'{host}'")
        version = conn.get_server_info()
    finally:
        conn.close()
    return f"MySQL/MariaDB {version} at {root['host']}:{root['port']}"


def project_env(config: Config, db_dsn: str) -> dict[str, str]:
    """The environment of every process running the demo project."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="demoproject.settings",
        DGP_DSN=db_dsn,
        DGP_DBNAME=config.dbname,
        DGP_MAX_CONNS=str(config.max_conns),
        DGP_APPNAME=config.appname,
        DGP_ITEMS=str(config.items),
    )
    if config.db == "mysql":
        env.update(
            DGP_DB="mysql",
            DGP_MYSQL="{host}:{port}".format(**mysql_root()),
            DGP_DB_USER=MYSQL_USER,
            DGP_DB_PASSWORD=MYSQL_PASSWORD,
        )
    # One stats line per second from the worker (DJANGO_GEVENT_POOL in the settings).
    env.setdefault("DGP_STATS_LOG", "1")
    return env


def manage(env: dict[str, str], *args: str) -> None:
    """Run ``examples/manage.py`` with ``args``; raise with its output if it fails."""
    command = [sys.executable, os.path.join(EXAMPLES, "manage.py"), *args]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}{done.stderr}")


def free_port() -> int:
    """A TCP port nobody listens on right now, on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_gunicorn(env: dict[str, str], port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start gunicorn with examples/gunicorn.conf.py and one worker, output to ``log``."""
    env = {**env, "DGP_BIND": f"{HOST}:{port}", "DGP_WORKERS": "1", "DGP_NO_CONTROL_SOCKET": "1"}
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        os.path.join(EXAMPLES, "gunicorn.conf.py"),
    ]
    # Its own session: a Ctrl-C reaches this script only, which then stops it.
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_gunicorn(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the gunicorn master by PID, wait, SIGKILL if it will not go."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_LIMIT)


def get_headers(port: int, path: str, timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    """GET ``path`` on a fresh connection; the status and the headers (lower-case names)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, {name.lower(): value for name, value in response.getheaders()}
    finally:
        conn.close()


def get_json(port: int, path: str, timeout: float = 5.0) -> Any:
    """GET ``path`` on a fresh connection; the decoded JSON, or an exception."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        conn.close()


def wait_until_up(proc: subprocess.Popen[bytes], port: int) -> None:
    """Poll ``/stats/`` until gunicorn answers; raise if it exits or takes too long."""
    deadline = time.monotonic() + STARTUP_LIMIT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with status {proc.returncode} while starting")
        try:
            get_json(port, "/stats/", timeout=2.0)
            return
        except (OSError, http.client.HTTPException):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"gunicorn did not answer within {STARTUP_LIMIT:.0f} s"
                ) from None
        gevent.sleep(0.1)


# ------------------------------------------------------------------ client side


def client(port: int, load: Load, items: int, seed: int) -> None:
    """One keep-alive HTTP client: send requests until the load's time or count is up."""
    rng = random.Random(seed)
    endpoints, weights = list(MIX), list(MIX.values())
    conn: http.client.HTTPConnection | None = None
    try:
        while load.take_ticket():
            endpoint = rng.choices(endpoints, weights)[0]
            path = f"/item/{rng.randint(1, items)}/" if endpoint == "/item/" else endpoint
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
            started = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                load.error(endpoint, repr(exc))
                conn.close()
                conn = None
                continue
            elapsed = time.perf_counter() - started
            if response.status == 200:
                load.latencies[endpoint].append(elapsed)
            else:
                load.error(endpoint, f"HTTP {response.status}: {body[:80]!r}")
            if response.will_close:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()


def drive(port: int, config: Config) -> tuple[Load, float]:
    """Run ``config.clients`` clients against gunicorn; return what they saw and the wall time."""
    load = Load(deadline=time.monotonic() + config.seconds, budget=config.max_requests)
    started = time.perf_counter()
    clients = [
        gevent.spawn(client, port, load, config.items, seed) for seed in range(config.clients)
    ]
    try:
        # Every client stops at the deadline; the margin covers requests in flight.
        gevent.joinall(clients, timeout=config.seconds + REQUEST_TIMEOUT + 5)
        for greenlet in clients:
            if not greenlet.dead:
                load.error("(client)", "still running after the deadline, killed")
            elif greenlet.exception is not None:
                load.error("(client)", repr(greenlet.exception))
    finally:
        # Also when interrupted: no client keeps talking to a gunicorn being stopped.
        gevent.killall(clients, block=True, timeout=5)
    return load, time.perf_counter() - started


def count_orders(db_dsn: str, config: Config) -> int:
    """Rows in the shop's order table."""
    if config.db == "mysql":
        import pymysql

        conn = pymysql.connect(**mysql_root(), database=config.dbname)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT COUNT(*) FROM shop_order")
                return int(cursor.fetchone()[0])
        finally:
            conn.close()
    conn = psycopg2.connect(db_dsn, application_name="dgp-demo-check")
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM shop_order")
            return int(cursor.fetchone()[0])
    finally:
        conn.close()


# ------------------------------------------------------------------ report


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(
    config: Config,
    where: str,
    load: Load,
    wall: float,
    stats: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The results of the run, as plain data."""
    all_latencies = [v for values in load.latencies.values() for v in values]
    endpoints = {
        endpoint: {
            "ok": len(values),
            "errors": load.errors[endpoint],
            "p50_ms": percentile(values, 50) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
        }
        for endpoint, values in load.latencies.items()
    }
    return {
        "server": where,
        "database": config.dbname,
        "application_name": config.appname,
        "clients": config.clients,
        "seconds": config.seconds,
        "max_conns": config.max_conns,
        "requests": len(all_latencies) + sum(load.errors.values()),
        "ok": len(all_latencies),
        "errors": sum(load.errors.values()),
        "error_samples": load.error_samples,
        "wall_s": wall,
        "rps": len(all_latencies) / wall if wall else 0.0,
        "p50_ms": percentile(all_latencies, 50) * 1000,
        "p99_ms": percentile(all_latencies, 99) * 1000,
        "endpoints": endpoints,
        "worker_pid": stats.get("pid"),
        "driver": stats.get("driver"),
        "cooperative": stats.get("cooperative"),
        "pool_stats": stats.get("pools", {}).get("default", {}),
        **extra,
    }


def report(result: dict[str, Any]) -> list[str]:
    """Print the results; return the reasons to fail, if any."""
    print()
    print("django-gevent-pool demo")
    print(f"  server       {result['server']}, database {result['database']}")
    counted = (
        f"user {MYSQL_USER!r}"
        if result["watched"].startswith("information_schema")
        else f"application_name {result['application_name']!r}"
    )
    print(
        f"  gunicorn     1 gevent worker (pid {result['worker_pid']}), "
        f"MAX_CONNS={result['max_conns']}, {counted}"
    )
    print(f"  driver       {result['driver']}, cooperative in the worker: {result['cooperative']}")
    print(
        f"  load         {result['clients']} concurrent keep-alive clients, "
        f"{result['wall_s']:.1f} s"
    )
    print()
    print(f"  {'endpoint':<10}{'ok':>8}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for endpoint, row in result["endpoints"].items():
        print(
            f"  {endpoint:<10}{row['ok']:>8}{row['errors']:>8}"
            f"{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
        )
    print(
        f"  {'all':<10}{result['ok']:>8}{result['errors']:>8}"
        f"{result['p50_ms']:>10.1f}{result['p99_ms']:>10.1f}"
    )
    print(f"  throughput   {result['rps']:.0f} requests/s (latencies measured by the clients)")
    for sample in result["error_samples"]:
        print(f"  error        {sample}")
    print()
    stats = result["pool_stats"]
    print(f"  pool stats from /stats/ (worker pid {result['worker_pid']}):")
    for key, value in stats.items():
        print(f"    {key:<22}{value:g}")
    print()
    print(f"  Server-Timing of GET /item/1/: {result['server_timing']}")
    print(f"  GET /ops/pool-stats/ without logging in: {result['ops_view']}")
    print(f"  last stats line of the worker: {result['stats_log']}")
    print()
    if result["server_warnings"]:
        print(f"  gunicorn logged {len(result['server_warnings'])} warnings or errors:")
        for line in result["server_warnings"][:10]:
            print(f"    {line}")
        print()
    print(
        f"  orders in the database: {result['orders']} "
        f"(successful /tx/ requests: {result['endpoints']['/tx/']['ok']})"
    )
    print(
        f"  peak server connections: {result['peak']} "
        f"(MAX_CONNS {result['max_conns']}, {result['samples']} samples of {result['watched']})"
    )
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} requests failed")
    if result["orders"] != result["endpoints"]["/tx/"]["ok"]:
        problems.append("orders in the database != successful /tx/ requests")
    if result["peak"] > result["max_conns"]:
        problems.append(f"the server saw {result['peak']} connections > MAX_CONNS")
    if result["peak"] == 0:
        problems.append("the sampler never saw a connection: nothing was measured")
    if not result["cooperative"]:
        problems.append(f"{result['driver']} does not yield to gevent in the worker: it blocks")
    if not result["ok"]:
        problems.append("no request succeeded")
    if not result["server_timing"].startswith("db-pool;dur="):
        problems.append("no Server-Timing header from the pool's middleware")
    if not result["ops_view"].startswith("302 /login/"):
        problems.append("the staff-only stats view answered anonymous users")
    if "pool 'default': size=" not in result["stats_log"]:
        problems.append("the worker wrote no periodic stats line")
    return problems


# ------------------------------------------------------------------ main


class SignalGuard:
    """Turns SIGINT and SIGTERM into exceptions, so ``finally`` blocks stop what was started.

    Inside :meth:`held` a signal is only noted, and raised when the block
    ends: starting or stopping a server is not interrupted half way, which
    would leave it running with nobody to stop it.
    """

    def __init__(self) -> None:
        self._holding = 0
        self._pending: int | None = None

    def install(self) -> None:
        """Handle SIGINT and SIGTERM in this process from now on."""
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._holding:
            self._pending = self._pending or signum
            return
        self._raise(signum)

    @staticmethod
    def _raise(signum: int) -> NoReturn:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"terminated by {signal.Signals(signum).name}", file=sys.stderr)
        raise SystemExit(128 + signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold signals back for the duration of the block; raise a held one after it."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding and self._pending is not None:
            signum, self._pending = self._pending, None
            self._raise(signum)


def main() -> int:
    """Run the demo; 0 if every check passed, 1 otherwise."""
    guard = SignalGuard()
    guard.install()
    config = Config()
    if config.db not in ("postgresql", "mysql"):
        raise SystemExit(f"DGP_DEMO_DB must be 'postgresql' or 'mysql', got {config.db!r}")
    if config.db == "mysql":
        print(f"finding a MySQL server (database {config.dbname})...", flush=True)
        where, db_dsn = prepare_mysql(config), ""
    else:
        print(f"finding a PostgreSQL server (database {config.dbname})...", flush=True)
        with guard.held():  # an embedded server half started would outlive us
            dsn, where = resolve_server(config)
        db_dsn = devserver.ensure_database(dsn, config.dbname)
    print(f"  using {where}", flush=True)
    env = project_env(config, db_dsn)
    print(f"migrating and seeding {config.items} items...", flush=True)
    manage(env, "migrate", "--noinput", "--verbosity=0")
    manage(env, "seed", f"--items={config.items}", "--verbosity=0")

    port = free_port()
    with tempfile.TemporaryFile() as log:
        print(f"starting gunicorn on http://{HOST}:{port} ...", flush=True)
        with guard.held():  # started and known by its PID, or not started
            proc = start_gunicorn(env, port, log)
        try:
            wait_until_up(proc, port)
            sampler: Any = (
                MySQLSessionSampler(mysql_root(), MYSQL_USER)
                if config.db == "mysql"
                else ServerConnectionSampler(db_dsn, config.appname)
            ).start()
            try:
                print(
                    f"driving {config.clients} clients for {config.seconds:g} s "
                    f"(at most {config.max_requests} requests)...",
                    flush=True,
                )
                load, wall = drive(port, config)
            finally:
                peak = sampler.stop()
            stats = get_json(port, "/stats/")
            # ServerTimingMiddleware: this request's wait for a connection.
            _, headers = get_headers(port, "/item/1/")
            server_timing = headers.get("server-timing", "")
            # The library's JSON view, mounted for staff only: anonymous is redirected.
            ops_status, ops_headers = get_headers(port, "/ops/pool-stats/")
            gevent.sleep(1.2)  # let the worker write one more stats line
        except Exception:
            print_log(log)
            raise
        finally:
            with guard.held():
                stop_gunicorn(proc)
        if proc.returncode not in (0, -signal.SIGTERM):
            print_log(log)
        server_warnings = noteworthy_lines(log)
        stats_lines = [line for line in read_log(log) if "django_gevent_pool.stats" in line]

    extra = {
        "peak": peak,
        "samples": sampler.samples,
        "orders": count_orders(db_dsn, config),
        "watched": (
            f"information_schema.PROCESSLIST (user {MYSQL_USER})"
            if config.db == "mysql"
            else "pg_stat_activity"
        ),
        "server_warnings": server_warnings,
        "server_timing": server_timing,
        "ops_view": f"{ops_status} {ops_headers.get('location', '')}".strip(),
        "stats_log": stats_lines[-1] if stats_lines else "",
    }
    result = summarize(config, where, load, wall, stats, extra)
    problems = report(result)
    result["problems"] = problems
    if config.json_out:
        with open(config.json_out, "w") as out:
            json.dump(result, out, indent=2)
    print()
    print("FAILED: " + "; ".join(problems) if problems else "OK: no errors, never above MAX_CONNS")
    return 1 if problems else 0


def read_log(log: IO[bytes]) -> list[str]:
    """Every line gunicorn (and the worker's logging) wrote so far."""
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace").splitlines()


def noteworthy_lines(log: IO[bytes]) -> list[str]:
    """Warnings, errors and tracebacks in gunicorn's output (the pool logs at WARNING)."""
    marks = ("[WARNING]", "[ERROR]", "[CRITICAL]", "Traceback")
    return [line for line in read_log(log) if any(mark in line for mark in marks)]


def print_log(log: IO[bytes]) -> None:
    """Print the end of gunicorn's output."""
    tail = read_log(log)[-40:]
    print("---- gunicorn output (last lines) ----", file=sys.stderr)
    for line in tail:
        print(line, file=sys.stderr)
    print("--------------------------------------", file=sys.stderr)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
