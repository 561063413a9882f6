"""The examples run, end to end, and keep the pool's promise: never more than MAX_CONNS.

Each example runs in a subprocess of its own (this test process may be
monkey-patched by gevent, and the examples patch themselves), against the
same server as the rest of the suite: ``$DGP_DSN``, else 127.0.0.1:5432, else
an embedded one that lives as long as this process. Each reports its numbers
as JSON, which the assertions read; the server-side peak comes from
``pg_stat_activity``, not from the pool's own bookkeeping.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import parse_dsn

from django_gevent_pool import devserver

from .mysql_support import in_mysql_runs, root_params
from .support import ENGINE

__all__ = ["root_params"]  # a fixture

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
README = EXAMPLES.parent / "README.rst"
RUN_TIMEOUT = 50  # seconds per example run; below the suite's per-test limit


@pytest.fixture(scope="module")
def server_dsn() -> Iterator[str]:
    """DSN of the server the examples use (any database; each example picks its own).

    The examples' databases carry this process's pid (two suites on one server,
    say a test-matrix cell beside a developer's run, must not seed or count each
    other's orders) and are dropped at the end.
    """
    dsn, _where = devserver.server_dsn()
    yield dsn
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for name in _MADE:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


_MADE: set[str] = set()


def dbname(name: str) -> str:
    """``name`` made unique to this test process (dropped by ``server_dsn`` at the end)."""
    unique = f"{name}_{os.getpid()}"
    _MADE.add(unique)
    return unique


def example_env(dsn: str, name: str, **extra: str) -> dict[str, str]:
    """The environment of an example run: this one, minus the suite's Django settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DJANGO_SETTINGS_MODULE" and not key.startswith("DGP_")
    }
    env.update(
        DGP_DSN=devserver.ensure_database(dsn, name),
        DGP_DBNAME=name,
        DGP_ENGINE=ENGINE,  # the examples run on the driver under test
        **extra,
    )
    return env


def run_example(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` with this interpreter; its output is kept for the failure message."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def read_result(path: Path, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON an example wrote, or a failure showing its output."""
    output = f"exit status {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert path.exists(), f"no results written\n{output}"
    result: dict[str, Any] = json.loads(path.read_text())
    assert done.returncode == 0, f"{result['problems']}\n{output}"
    return result


def test_script_stays_within_max_conns(server_dsn: str, tmp_path: Path) -> None:
    """200 greenlets through a pool of 5: all succeed, the server never sees a sixth."""
    out = tmp_path / "script.json"
    env = example_env(server_dsn, dbname("dgp_examples_script"))
    done = run_example("script.py", env, "--greenlets=200", "--max-conns=5", f"--json-out={out}")
    result = read_result(out, done)

    assert result["errors"] == 0
    assert result["done"] == 200
    assert result["orders"] == 200
    # Measured on the server, while greenlets were waiting for the pool.
    assert 1 <= result["peak"] <= 5, result
    assert result["samples"] > 0
    stats = result["pool_stats"]
    assert stats["pool_max"] == 5
    assert stats["requests_queued"] > 0, "no greenlet ever waited: the cap was never tested"
    assert stats["requests_timeouts"] == 0
    assert stats["pool_in_use"] == 0, "close_connection gave every connection back"
    assert (
        f"peak server connections for application_name {result['application_name']!r}: "
        f"{result['peak']} (MAX_CONNS 5"
    ) in done.stdout
    assert done.stdout.rstrip().endswith("OK")


def test_script_in_transaction_mode_shares_connections_while_visits_wait(
    server_dsn: str, tmp_path: Path
) -> None:
    """100 visits that wait 0.2 s on another service, 5 connections: session vs transaction.

    In session mode the visits queue for the connections they hold while
    waiting (100 x 0.2 s / 5 = 4 s at least); in transaction mode they hold
    none while waiting, so the run takes about one wait. Same run, same
    machine: the ratio, not a time, is asserted.
    """
    results = {}
    for mode in ("session", "transaction"):
        out = tmp_path / f"script-{mode}.json"
        env = example_env(server_dsn, dbname("dgp_examples_script_tx"))
        args = ("--greenlets=100", "--max-conns=5", f"--pool-mode={mode}", "--wait=0.2")
        done = run_example("script.py", env, *args, f"--json-out={out}")
        results[mode] = read_result(out, done)
        assert results[mode]["errors"] == 0
        assert 1 <= results[mode]["peak"] <= 5
        assert results[mode]["pool_stats"]["pool_in_use"] == 0
    session, tx = results["session"], results["transaction"]
    assert session["elapsed"] >= 100 * 0.2 / 5
    assert tx["elapsed"] < session["elapsed"] / 3, (tx["elapsed"], session["elapsed"])
    assert tx["notified"] == "hello", "the LISTEN inside pinned() got its notification"
    stats = tx["pool_stats"]
    assert stats["pins_explicit"] == 1
    # Each visit: its statements outside atomic() and one transaction, one checkout each.
    assert stats["requests_num"] >= 3 * 100
    assert stats["requests_timeouts"] == 0


def test_demo_serves_without_errors_within_max_conns(server_dsn: str, tmp_path: Path) -> None:
    """gunicorn with a gevent worker, 50 keep-alive clients on a pool of 4: no errors, <= 4."""
    out = tmp_path / "demo.json"
    env = example_env(
        server_dsn,
        dbname("dgp_examples_demo"),
        DGP_DEMO_SECONDS="2",
        DGP_DEMO_CLIENTS="50",
        DGP_MAX_CONNS="4",
        DGP_ITEMS="200",
        DGP_DEMO_JSON=str(out),
    )
    done = run_example("demo.py", env)
    result = read_result(out, done)

    assert result["errors"] == 0, result["error_samples"]
    for endpoint, row in result["endpoints"].items():
        assert row["ok"] > 0, f"no successful {endpoint} request"
    assert result["orders"] == result["endpoints"]["/tx/"]["ok"]
    assert 1 <= result["peak"] <= 4, result
    stats = result["pool_stats"]
    assert stats["pool_max"] == 4
    assert stats["requests_queued"] > 0, "no request ever waited: the cap was never tested"
    assert stats["requests_timeouts"] == 0
    assert "peak server connections: " in done.stdout
    # The observability the demo turns on: Server-Timing, the guarded view, the log.
    assert re.fullmatch(
        r'db-pool;dur=\d+\.\d{3};desc="1 checkout", db-held;dur=\d+\.\d{3};desc="0 pins"',
        result["server_timing"],
    )
    assert result["ops_view"].startswith("302 /login/?next=")
    assert "pool 'default': size=" in result["stats_log"]
    # The worker that served (and the master with it) is gone once the demo has exited.
    with pytest.raises(ProcessLookupError):
        os.kill(result["worker_pid"], 0)


def test_bare_pool_example_shares_five_connections(server_dsn: str) -> None:
    """The README's bare-pool example: 50 greenlets, 5 connections, every result right."""
    done = run_example("bare_pool.py", example_env(server_dsn, dbname("dgp_examples_bare")))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sum"] == 2 * sum(range(50))
    stats = result["stats"]
    assert stats["requests_num"] == 50
    assert stats["connections_num"] <= 5
    assert stats["requests_queued"] > 0  # the greenlets really did wait for each other
    assert stats["requests_errors"] == 0


# ------------------------------------------------- pool_connections, 3 workers

WORKERS = 3
WORKER_MAX_CONNS = 4
HTTP_HOST = "127.0.0.1"
#: The names README's pool_connections example shows, put in place of this run's own.
README_DBNAME = "dgp_readme_demo"
README_APPNAME = "shop-web"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HTTP_HOST, 0))
        return int(sock.getsockname()[1])


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET ``path`` on a new HTTP connection (closed after): a new accept() for every request."""
    conn = http.client.HTTPConnection(HTTP_HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def worker_pids(master: int) -> set[int]:
    """The gunicorn master's child processes (its workers), from /proc."""
    children = Path(f"/proc/{master}/task/{master}/children")
    return {int(pid) for pid in children.read_text().split()} if children.exists() else set()


def sockets_to(port: int, pids: set[int]) -> dict[int, int]:
    """Per PID, its TCP sockets connected to ``port`` (on any address), from /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    counts: dict[int, int] = {}
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        n = 0
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        counts[pid] = n
    return counts


def app_states(dsn: str, app_name: str) -> dict[str, int]:
    """How many of the server's backends carry ``app_name``, by state."""
    conn = psycopg2.connect(dsn, application_name="dgp-examples-look")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT state, count(*) FROM pg_stat_activity WHERE application_name = %s "
                "GROUP BY state",
                [app_name],
            )
            return {str(state): int(n) for state, n in cur.fetchall()}
    finally:
        conn.close()


@contextmanager
def gunicorn(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """examples/gunicorn.conf.py with WORKERS gevent workers; stopped by PID on exit."""
    env = {
        **env,
        "DGP_BIND": f"{HTTP_HOST}:{port}",
        "DGP_WORKERS": str(WORKERS),
        "DGP_NO_CONTROL_SOCKET": "1",
    }
    command = [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLES / "gunicorn.conf.py")]
    with running_gunicorn(command, env, log, port, WORKERS) as (proc, _workers):
        yield proc


@contextmanager
def running_gunicorn(
    command: list[str],
    env: dict[str, str],
    log: Path,
    port: int,
    workers_wanted: int,
    cwd: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """Start gunicorn; up when its ``workers_wanted`` workers are forked and ``/stats/``
    answers (30 s at most). Yields it and its workers' pids; on exit it is stopped,
    then every worker it forked is killed, by PID."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while True:  # up when every worker is forked and one of them answers
            assert proc.poll() is None, f"gunicorn exited:\n{log.read_text()}"
            workers = worker_pids(proc.pid) or workers
            try:
                if len(workers) == workers_wanted and http_get(port, "/stats/", 2)[0] == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            assert time.monotonic() < deadline, f"gunicorn not up in 30 s:\n{log.read_text()}"
            time.sleep(0.05)
        yield proc, sorted(workers)
    finally:
        workers |= worker_pids(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for pid in workers:  # only the workers this gunicorn forked, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def fill_every_pool(port: int, dsn: str, app_name: str, expected: int) -> None:
    """Concurrent /sleep/ requests until the server sees ``expected`` backends of ``app_name``.

    Each request is a new HTTP connection, so gunicorn's workers race for
    every one of them; 16 per worker in flight fill each worker's pool.
    """
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                status, body = http_get(port, "/sleep/")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
                return
            if status != 200:
                failures.append(f"HTTP {status}: {body[:80]!r}")
                return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(16 * WORKERS)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 20
        while sum(app_states(dsn, app_name).values()) < expected and not failures:
            assert time.monotonic() < deadline, f"pools not filled: {app_states(dsn, app_name)}"
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
    assert not failures, failures


def readme_pool_connections_sample() -> list[str]:
    """The lines of README's ``pool_connections --workers`` example output, dedented."""
    lines = README.read_text().splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.strip().startswith("$ python manage.py pool_con")
    )
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith("    ")):
        end += 1
    return [line[4:] for line in lines[start + 1 : end] if line.strip()]


def normalized(line: str, names: dict[str, str]) -> str:
    """``line`` with this run's names put back to README's; times, numbers, spacing blurred."""
    for ours, readme in names.items():
        line = line.replace(ours, readme)
    line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \([^)]*\)", "<time>", line)
    line = re.sub(r"\d+(\.\d+)?s\b", "<duration>", line)
    line = re.sub(r"\d+", "#", line)
    return " ".join(line.split())


def test_pool_connections_counts_three_gunicorn_workers(server_dsn: str, tmp_path: Path) -> None:
    """README's "Who holds the connections" example, for real: 3 gevent workers, MAX_CONNS 4.

    Each worker's pool is filled under load (checked per process through the
    workers' own sockets, from /proc), then ``manage.py pool_connections``
    must count all 12 from the server's side against the cap 3 x 4 = 12, flag
    them as over the cap with ``--workers 2``, and print what README shows.
    """
    workers_db = dbname("dgp_examples_workers")
    app_name = f"shop-web-{os.getpid()}"
    env = example_env(
        server_dsn,
        workers_db,
        DJANGO_SETTINGS_MODULE="demoproject.settings",
        DGP_MAX_CONNS=str(WORKER_MAX_CONNS),
        DGP_APPNAME=app_name,
    )
    db_dsn = env["DGP_DSN"]
    expected = WORKERS * WORKER_MAX_CONNS
    port = free_port()
    with gunicorn(env, port, tmp_path / "gunicorn.log") as proc:
        fill_every_pool(port, db_dsn, app_name, expected)
        # The requests are over; the connections stay in the pools, idle.
        deadline = time.monotonic() + 10
        while app_states(db_dsn, app_name) != {"idle": expected}:
            assert time.monotonic() < deadline, app_states(db_dsn, app_name)
            time.sleep(0.05)
        params = parse_dsn(db_dsn)
        if not str(params.get("host", "/")).startswith("/") and Path("/proc/net/tcp").exists():
            per_process = sockets_to(int(params.get("port") or 5432), worker_pids(proc.pid))
            assert sorted(per_process.values()) == [WORKER_MAX_CONNS] * WORKERS, per_process

        def pool_connections(*args: str) -> subprocess.CompletedProcess[str]:
            done = subprocess.run(
                [sys.executable, str(EXAMPLES / "manage.py"), "pool_connections", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            return done

        report = json.loads(pool_connections("--workers", str(WORKERS), "--json").stdout)
        human = pool_connections("--workers", str(WORKERS)).stdout
        wrong = pool_connections("--workers", str(WORKERS - 1)).stdout

    alias = report["aliases"]["default"]
    assert (alias["database"], alias["application_name"]) == (workers_db, app_name)
    assert (alias["max_conns"], alias["workers"]) == (WORKER_MAX_CONNS, WORKERS)
    assert alias["expected_max_per_host"] == expected
    assert alias["connections"] == expected
    assert alias["by_state"] == {"idle": expected}
    [(client, per_host)] = alias["by_client"].items()
    assert per_host == {"connections": expected, "expected_max": expected, "over": False}
    [server] = report["servers"]
    assert server["this_app"] == expected
    assert report["unreachable"] == {}

    verdict = human.splitlines()[-1]
    assert verdict.endswith(
        f"this app: {expected} (cap {WORKER_MAX_CONNS} per process x {WORKERS} workers "
        f"= {expected})"
    ), verdict
    assert "OVER" not in human
    small = (WORKERS - 1) * WORKER_MAX_CONNS
    assert (
        f"OVER THE CAP: default from {client}: {expected} > {small} (more processes than "
        "--workers, or another client with the same database and user)"
    ) in wrong.splitlines()[-1]

    # README shows this output: the same lines, but for its names and this run's numbers.
    names = {app_name: README_APPNAME, workers_db: README_DBNAME, client: "127.0.0.1"}
    printed = {normalized(line, names) for line in human.splitlines()}
    sample = readme_pool_connections_sample()
    assert sample[-1].startswith("server: "), sample
    ours = [line for line in sample if not line.lstrip().startswith("(other)")]
    missing = [line for line in ours if normalized(line, names) not in printed]
    assert not missing, "README lines the command does not print:\n" + "\n".join(missing)
    assert sum(line.lstrip().startswith("default ") for line in sample) == 3, (
        "README shows one row per table for the alias: by alias, by host, grouped"
    )
    [flagged] = [line.strip() for line in README.read_text().splitlines() if "OVER THE CAP" in line]
    assert normalized(flagged, names) == normalized(wrong.splitlines()[-1], names)


@pytest.mark.skipif(
    not in_mysql_runs(), reason="the MySQL demo runs in the psycopg2 runs and on Django 6.x only"
)
def test_the_demo_on_mysql_serves_without_errors_within_max_conns(
    root_params: dict[str, Any], tmp_path: Path
) -> None:
    """``make demo DB=mysql``: the same load on MariaDB through the MySQL engine."""
    import pymysql

    out = tmp_path / "demo-mysql.json"
    name, user = f"dgp_examples_demo_{os.getpid()}", f"dgp_demo_{os.getpid()}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DJANGO_SETTINGS_MODULE" and not key.startswith("DGP_")
    }
    env.update(
        DGP_DEMO_DB="mysql",
        DGP_MYSQL=f"{root_params['host']}:{root_params['port']}",
        DGP_DBNAME=name,
        DGP_DB_USER=user,
        DGP_DEMO_SECONDS="2",
        DGP_DEMO_CLIENTS="50",
        DGP_MAX_CONNS="4",
        DGP_ITEMS="200",
        DGP_DEMO_JSON=str(out),
    )
    try:
        done = run_example("demo.py", env)
        result = read_result(out, done)
    finally:
        conn = pymysql.connect(**root_params, autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
                for host in ("%", "localhost", "127.0.0.1"):
                    cur.execute(f"DROP USER IF EXISTS '{user}'@'{host}'")
        finally:
            conn.close()
    assert result["driver"] == "pymysql" and result["cooperative"]
    assert result["errors"] == 0, result["error_samples"]
    for endpoint, row in result["endpoints"].items():
        assert row["ok"] > 0, f"no successful {endpoint} request"
    assert result["orders"] == result["endpoints"]["/tx/"]["ok"]
    assert 1 <= result["peak"] <= 4, result
    stats = result["pool_stats"]
    assert stats["requests_queued"] > 0, "no request ever waited: the cap was never tested"
    assert stats["requests_timeouts"] == 0
