"""``HOST_MAX_CONNS`` across real processes: gunicorn workers, Celery, commands, SIGKILL.

Every process here is a subprocess of the test, running the small project in
``tests/budgetapp`` against the suite's server, with a lock directory of the
test's own (``HOST_LOCK_DIR`` under ``tmp_path``) and an ``application_name``
per process that starts with one prefix per test. What the server saw comes
from ``pg_stat_activity``, sampled every ~20 ms for the whole test by a
:class:`Sampler`; what the pools saw from the processes' own ``get_stats()``.

The processes under test run with the driver under test (``DGP_TEST_DRIVER``).
Management commands run in the mode under test (monkey-patched by
``tests/budgetapp/manage.py`` in ``DGP_TEST_MODE=gevent``, OS threads
otherwise); gunicorn's and Celery's workers are gevent workers whatever the
mode, so the tests made of those alone run once per driver, in gevent mode.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from .support import ENGINE, MODE, backends, next_app_name, server, wait_until
from .test_examples import free_port, http_get, running_gunicorn

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "budgetapp"
# Each test's own bound (the suite's gevent hook adds one that dumps greenlets).
pytestmark = pytest.mark.timeout(90)
GEVENT_WORKERS_ONLY = pytest.mark.skipif(
    MODE != "gevent",
    reason="only gevent worker processes are under test: the test process's mode adds nothing",
)


def budget_env(tmp_path: Path, app_name: str, host_max: int, **extra: str) -> dict[str, str]:
    """The environment of a process of ``tests/budgetapp``: this one's, minus the suite's knobs."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DJANGO_SETTINGS_MODULE" and not key.startswith("DGP_")
    }
    path = os.environ.get("PYTHONPATH")
    env.update(
        DJANGO_SETTINGS_MODULE="tests.budgetapp.settings",
        PYTHONPATH=os.pathsep.join([str(ROOT), *([path] if path else [])]),
        DGP_HB_DSN=server()["test"],
        DGP_HB_ENGINE=ENGINE,
        DGP_HB_HOST_MAX=str(host_max),
        DGP_HB_LOCK_DIR=str(tmp_path / "locks"),
        DGP_HB_APPNAME=app_name,
        DGP_HB_MODE=MODE,
        **extra,
    )
    return env


# ------------------------------------------------------------------ sampling


@dataclass
class Sampler:
    """Every ~20 ms, the server's backends whose application_name starts with ``prefix``.

    ``samples`` holds (monotonic time before the query, {application_name: count}).
    """

    dsn: str
    prefix: str
    every: float = 0.02
    lifetime: float = 120.0
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        if MODE == "gevent":
            import django_gevent_pool

            django_gevent_pool.patch_drivers()  # the sampler's queries yield to the clients
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_until(lambda: bool(self.samples or self.errors), what="a first sample")
        return self

    def _run(self) -> None:
        try:
            conn = psycopg2.connect(self.dsn, application_name="dgp-host-budget-sampler")
            conn.autocommit = True  # a fresh snapshot of pg_stat_activity per sample
            try:
                deadline = time.monotonic() + self.lifetime
                with conn.cursor() as cur:
                    while not self._stop.is_set() and time.monotonic() < deadline:
                        now = time.monotonic()
                        cur.execute(
                            "SELECT application_name, count(*) FROM pg_stat_activity "
                            "WHERE left(application_name, %s) = %s GROUP BY 1",
                            [len(self.prefix), self.prefix],
                        )
                        self.samples.append((now, {str(n): int(c) for n, c in cur.fetchall()}))
                        self._stop.wait(max(0.0, now + self.every - time.monotonic()))
            finally:
                conn.close()
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def stop(self) -> None:
        """Stop sampling; a sampling error fails the test (the peaks would be a lie)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        assert not self.errors, f"sampling pg_stat_activity failed: {self.errors[0]!r}"
        assert self.samples, "no sample taken"

    def latest(self) -> dict[str, int]:
        return self.samples[-1][1] if self.samples else {}

    def peak(
        self,
        names: Callable[[str], bool] = lambda name: True,
        since: float = 0.0,
        until: float = float("inf"),
    ) -> int:
        """The most backends of the ``names`` seen at once between ``since`` and ``until``."""
        return max(
            (
                sum(n for name, n in counts.items() if names(name))
                for t, counts in self.samples
                if since <= t <= until
            ),
            default=0,
        )

    def first(self, predicate: Callable[[dict[str, int]], bool], since: float) -> float | None:
        """The time of the first sample from ``since`` on that satisfies ``predicate``."""
        return next((t for t, c in self.samples if t >= since and predicate(c)), None)


@contextmanager
def sampling(prefix: str) -> Iterator[Sampler]:
    sampler = Sampler(server()["test"], prefix).start()
    try:
        yield sampler
    finally:
        sampler.stop()


# ---------------------------------------------------------- management commands


@dataclass
class Command:
    """``tests/budgetapp/manage.py <command>`` running, its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def events(self) -> list[dict[str, Any]]:
        lines = self.out.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def output(self) -> str:
        return (
            f"exit status {self.proc.poll()}\n--- stdout\n{self.out.read_text(errors='replace')}"
            f"\n--- stderr\n{self.err.read_text(errors='replace')[-6000:]}"
        )

    def wait_event(self, name: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first ``name`` event it printed; fail if it exits or is silent ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e["event"] == name]
            if found:
                return found[0]
            assert self.proc.poll() is None, f"exited before {name!r}:\n{self.output()}"
            assert time.monotonic() < deadline, f"no {name!r} in {timeout} s:\n{self.output()}"
            time.sleep(0.005)

    def finish(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit in {timeout} s:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL it (by the PID this test started), if still running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_command(env: dict[str, str], tmp_path: Path, label: str, *args: str) -> Command:
    out, err = tmp_path / f"{label}.out", tmp_path / f"{label}.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(APP / "manage.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    return Command(proc, out, err)


@contextmanager
def commands() -> Iterator[list[Command]]:
    """The commands a test starts; any still running at the end is killed by its PID."""
    started: list[Command] = []
    try:
        yield started
    finally:
        for command in started:
            command.kill()


# ------------------------------------------------------------------ 1. gunicorn

GUNICORN_WORKERS = 4
GUNICORN_BUDGET = 8
CLIENTS = 48


@contextmanager
def gunicorn(env: dict[str, str], log: Path) -> Iterator[tuple[int, list[int]]]:
    """``tests/budgetapp/gunicorn_conf.py``: its port and its workers' pids; stopped by PID."""
    port = int(env["DGP_HB_BIND"].rsplit(":", 1)[1])
    command = [sys.executable, "-m", "gunicorn", "-c", str(APP / "gunicorn_conf.py")]
    with running_gunicorn(command, env, log, port, GUNICORN_WORKERS, cwd=ROOT) as (_, workers):
        yield port, workers


class Load:
    """``CLIENTS`` concurrent clients, one new HTTP connection per request, on ``path``.

    Counts, per phase, the requests each worker served (by the pid in the
    answer) and those for which it used the database.
    """

    def __init__(self, port: int, clients: int, lifetime: float = 60.0) -> None:
        self.port = port
        self.path = "/db/"
        self.phase = 1
        self.served: Counter[tuple[int, int]] = Counter()  # (phase, pid) -> requests
        self.used_db: Counter[tuple[int, int]] = Counter()  # (phase, pid) -> with the database
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _client(self) -> None:
        for _ in range(100_000):  # bounded in count as in time
            if self._stop.is_set() or time.monotonic() > self._deadline:
                return
            phase, path = self.phase, self.path
            try:
                status, body = http_get(self.port, path, timeout=30)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{path}: {exc!r}")
                return
            if status != 200:
                self.failures.append(f"{path}: HTTP {status}: {body[:300]!r}")
                return
            answer = json.loads(body)
            self.served[phase, answer["pid"]] += 1
            if answer["db"] is not None:
                self.used_db[phase, answer["pid"]] += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)
        assert not any(t.is_alive() for t in self._threads), "a client did not finish"


def stats_of_every_worker(port: int, pids: list[int]) -> dict[int, dict[str, Any]]:
    """Each worker's pool stats, from ``/stats/`` asked until every worker has answered once."""
    found: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 10
    for _ in range(500):
        if set(found) >= set(pids) or time.monotonic() > deadline:
            break
        status, body = http_get(port, "/stats/")
        assert status == 200, body
        answer = json.loads(body)
        found.setdefault(answer["pid"], answer["pools"].get("default", {}))
    return found


@GEVENT_WORKERS_ONLY
def test_gunicorn_workers_never_exceed_the_budget_and_idle_ones_give_back(
    tmp_path: Path,
) -> None:
    """4 gevent workers, HOST_MAX_CONNS = MAX_CONNS = 8, 48 clients.

    Phase 1: every worker serves database requests and holds some of the 8.
    Phase 2: only one worker uses the database (the one whose pid the busy
    file names); the others answer without it, so their connections go idle,
    and once they see the busy worker's demand they give them back: the busy
    worker reaches the whole budget within seconds. Sampled on the server all
    along, the workers together never have more than 8 backends.
    """
    n = GUNICORN_BUDGET
    prefix = f"{next_app_name()}-gunicorn-"
    busy_file = tmp_path / "busy.pid"
    env = budget_env(
        tmp_path,
        prefix.rstrip("-"),
        n,
        DGP_HB_MAX_CONNS=str(n),
        DGP_HB_BUSY_FILE=str(busy_file),
        DGP_HB_BIND=f"127.0.0.1:{free_port()}",
        DGP_HB_WORKERS=str(GUNICORN_WORKERS),
    )
    with sampling(prefix) as sampler, gunicorn(env, tmp_path / "gunicorn.log") as (port, pids):
        names = {pid: f"{prefix}{pid}" for pid in pids}
        load = Load(port, CLIENTS).start()
        try:
            # Phase 1: until every worker holds some connections at the same moment.
            wait_until(
                lambda: (
                    all(sampler.latest().get(name, 0) >= 1 for name in names.values())
                    or bool(load.failures)
                ),
                what="every worker to hold connections",
                timeout=20,
            )
            assert not load.failures, load.failures[:5]
            at_switch = sampler.latest()
            busy = pids[0]  # any of them
            # Phase 2: only the busy worker uses the database.
            busy_file.write_text(str(busy))
            load.path, load.phase = "/work/", 2
            switched = time.monotonic()
            wait_until(
                lambda: sampler.latest().get(names[busy], 0) >= n or bool(load.failures),
                what=f"the busy worker to reach {n} backends",
                timeout=10,
            )
            reached = sampler.first(lambda c: c.get(names[busy], 0) >= n, switched)
            # The whole budget stays with the busy worker while the load lasts.
            held_from = time.monotonic()
            wait_until(
                lambda: time.monotonic() - held_from >= 1.0 or bool(load.failures),
                what="a second of phase 2 at the full budget",
            )
            after = sampler.latest()
        finally:
            load.stop()
        worker_stats = stats_of_every_worker(port, pids)
        log = (tmp_path / "gunicorn.log").read_text(errors="replace")

    served = {
        pid: {
            "phase1": load.served[1, pid],
            "phase1_db": load.used_db[1, pid],
            "phase2": load.served[2, pid],
            "phase2_db": load.used_db[2, pid],
        }
        for pid in pids
    }
    peak = sampler.peak()
    given_back = {pid: worker_stats[pid].get("host_given_back") for pid in worker_stats}
    print(
        f"host budget {n}, {GUNICORN_WORKERS} workers, {CLIENTS} clients; "
        f"{len(sampler.samples)} samples, peak {peak} backends; busy worker {busy} at {n} "
        f"{(reached or float('nan')) - switched:.3f} s after phase 2 began; "
        f"at the switch {at_switch}; served {served}; given back {given_back}"
    )
    assert not load.failures, load.failures[:5]
    assert "Traceback" not in log, log[-4000:]
    # The promise, on the server's side: never more than the host's budget.
    assert len(sampler.samples) > 50
    assert peak <= n, f"{peak} backends of the workers at once, HOST_MAX_CONNS {n}"
    assert max(sum(c.values()) for _, c in sampler.samples) == peak
    # Phase 1 had every worker on the database, with connections of its own.
    assert all(row["phase1_db"] > 0 for row in served.values()), served
    assert sum(1 for name in names.values() if at_switch.get(name, 0) >= 1) == GUNICORN_WORKERS
    # Phase 2: the others gave back what they held; the busy worker got all of it, soon.
    assert sum(at_switch.get(names[pid], 0) for pid in pids if pid != busy) >= 1
    assert reached is not None and reached - switched <= 5.0, (reached, switched)
    assert after.get(names[busy], 0) == n, after
    assert all(row["phase2_db"] == 0 for pid, row in served.items() if pid != busy), served
    assert served[busy]["phase2_db"] > 0, served
    # What the pools say: the busy worker waited for the host, the idle ones gave back.
    assert set(worker_stats) == set(pids), f"not every worker answered /stats/: {worker_stats}"
    assert worker_stats[busy]["host_waits"] >= 1, worker_stats[busy]
    # Closed idle (given back), or on return while the busy worker waited (stepped aside).
    gave = sum(
        worker_stats[pid]["host_given_back"] + worker_stats[pid]["host_stepped_aside"]
        for pid in pids
        if pid != busy
    )
    assert gave >= 1, given_back
    for pid, stats in worker_stats.items():
        assert stats["host_max"] == n
        assert stats["pool_max"] == n
        assert stats["requests_timeouts"] == 0, (pid, stats)
        assert stats["host_in_use"] <= n


# ------------------------------------------------------------------ 2. SIGKILL

KILL_BUDGET = 4


def test_sigkill_of_the_holder_frees_its_slots_for_a_waiting_process_at_once(
    tmp_path: Path, admin: Any
) -> None:
    """One process holds the whole budget; another waits; SIGKILL the first.

    The kernel drops the dead process's locks: the waiter, polling the budget
    from its pool's housekeeping, has a connection within 1 s (0.5 s slack for a
    busy machine) of the kill, measured on the host's one monotonic clock.
    """
    n = KILL_BUDGET
    base = next_app_name()
    with sampling(f"{base}-") as sampler, commands() as started:
        holder = start_command(
            budget_env(tmp_path, f"{base}-holder", n),
            tmp_path,
            "holder",
            "budget_hold",
            f"--conns={n}",
            f"--release-file={tmp_path / 'never'}",  # held until killed
            "--max-seconds=60",
        )
        started.append(holder)
        held = holder.wait_event("held")
        assert backends(admin, f"{base}-holder") == n
        assert (held["stats"]["host_held"], held["stats"]["host_in_use"]) == (n, n), held
        waiter = start_command(
            budget_env(tmp_path, f"{base}-waiter", n, DGP_HB_POOL_TIMEOUT="30"),
            tmp_path,
            "waiter",
            "budget_wait",
            "--max-seconds=40",
        )
        started.append(waiter)
        queued = waiter.wait_event("queued")
        # It waits for the host, not for its own pool: it has no connection at all.
        assert queued["stats"]["host_in_use"] == n, queued
        assert queued["stats"]["host_waits"] >= 1, queued
        assert queued["stats"]["pool_size"] == 0, queued
        assert backends(admin, f"{base}-waiter") == 0
        # Half a second in line: it stays there while the holder lives.
        queued_at = time.monotonic()
        wait_until(lambda: time.monotonic() - queued_at >= 0.5, what="half a second")
        assert not [e for e in waiter.events() if e["event"] == "got"], waiter.output()
        assert waiter.proc.poll() is None, waiter.output()

        killed_at = time.monotonic()
        os.kill(holder.proc.pid, signal.SIGKILL)
        got = waiter.wait_event("got", timeout=10)
        assert holder.finish() == -signal.SIGKILL
        assert waiter.finish() == 0, waiter.output()
        wait_until(lambda: backends(admin, f"{base}-holder") == 0, what="the holder's backends")

    delay = got["got"] - killed_at
    peak_after_kill = sampler.peak(since=killed_at)
    print(
        f"waiter queued for {killed_at - got['asked']:.3f} s before the kill; served "
        f"{delay:.3f} s after it; peak backends before the kill "
        f"{sampler.peak(until=killed_at)}, after it {peak_after_kill}"
    )
    assert got["asked"] < killed_at, "the waiter was not waiting when the holder was killed"
    assert 0 < delay <= 1.0 + 0.5, f"served {delay:.3f} s after the SIGKILL"
    assert got["stats"]["host_waits"] >= 1, got
    assert sampler.peak(until=killed_at) == n


@GEVENT_WORKERS_ONLY
def test_sigkill_of_a_gunicorn_worker_frees_its_slots_for_a_waiting_process(
    tmp_path: Path, admin: Any
) -> None:
    """A gunicorn gevent worker holds the whole budget (requests holding their
    connections); a management command waits; SIGKILL the worker: the command is
    served within 1 s (0.5 s slack), and the master's new worker takes nothing."""
    n = KILL_BUDGET
    base = next_app_name()
    env = budget_env(
        tmp_path, f"{base}-web", n, DGP_HB_BIND=f"127.0.0.1:{free_port()}", DGP_HB_WORKERS="1"
    )
    port = int(env["DGP_HB_BIND"].rsplit(":", 1)[1])
    command = [sys.executable, "-m", "gunicorn", "-c", str(APP / "gunicorn_conf.py")]
    outcomes: list[str] = []

    def hold() -> None:
        try:
            http_get(port, "/hold/?seconds=20", timeout=30)
            outcomes.append("served")
        except (OSError, http.client.HTTPException):
            outcomes.append("cut")  # its worker was killed

    with (
        sampling(f"{base}-") as sampler,
        commands() as started,
        running_gunicorn(command, env, tmp_path / "gunicorn.log", port, 1, cwd=ROOT) as (_, pids),
    ):
        (worker,) = pids
        holders = [threading.Thread(target=hold, daemon=True) for _ in range(n)]
        for thread in holders:
            thread.start()
        web = f"{base}-web-{worker}"
        wait_until(lambda: backends(admin, web) == n, what=f"the worker to hold {n}")
        waiter = start_command(
            budget_env(tmp_path, f"{base}-waiter", n, DGP_HB_POOL_TIMEOUT="30"),
            tmp_path,
            "waiter",
            "budget_wait",
            "--max-seconds=40",
        )
        started.append(waiter)
        queued = waiter.wait_event("queued")
        assert queued["stats"]["host_in_use"] == n and queued["stats"]["pool_size"] == 0, queued
        killed_at = time.monotonic()
        os.kill(worker, signal.SIGKILL)
        got = waiter.wait_event("got", timeout=10)
        assert waiter.finish() == 0, waiter.output()
        for thread in holders:
            thread.join(40)
        wait_until(lambda: backends(admin, web) == 0, what="the killed worker's backends")

    delay = got["got"] - killed_at
    print(
        f"served {delay:.3f} s after the SIGKILL of worker {worker}; peak before the kill "
        f"{sampler.peak(until=killed_at)}, after it {sampler.peak(since=killed_at)}"
    )
    assert outcomes == ["cut"] * n, outcomes
    assert 0 < delay <= 1.0 + 0.5, f"served {delay:.3f} s after the SIGKILL"
    assert sampler.peak(until=killed_at) == n


# ------------------------------------------------------------------ 3. Celery

CELERY_BUDGET = 6
COMMAND_HOLDS = 4
TASKS = 16
TASK_SECONDS = 0.4


def test_celery_worker_and_a_management_command_share_one_budget(
    tmp_path: Path, admin: Any
) -> None:
    """HOST_MAX_CONNS 6: a command holds 4, a gevent Celery worker's tasks get only 2.

    16 tasks that each hold a connection 0.4 s queue for the host (the
    worker's own MAX_CONNS, defaulted to HOST_MAX_CONNS, is 6): on the
    server, never more than 2 of the worker's backends while the command
    holds its 4. Once the command gives its connections back to its pool, it
    sees the worker's demand and closes them: waiting tasks get slots, and the
    worker reaches the whole budget. Never more than 6 in all.
    """
    pytest.importorskip("celery")
    from .test_celery import Worker, client_app, wait_for_results, worker_command

    n, k = CELERY_BUDGET, COMMAND_HOLDS
    base = next_app_name()
    worker_name, command_name = f"{base}-celery", f"{base}-command"
    folder = tmp_path / "celery"
    release, finish = tmp_path / "release", tmp_path / "finish"
    log_path = tmp_path / "celery.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            worker_command(
                "--pool=gevent",  # a form celery monkey-patches for, first thing
                "--concurrency=24",
                "--loglevel=warning",
                f"--hostname={worker_name}@localhost",
            ),
            cwd=APP,  # "-A celeryapp" is tests/budgetapp/celeryapp.py
            env=budget_env(tmp_path, worker_name, n, DGP_CELERY_DIR=str(folder)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    worker = Worker(proc, log_path)
    try:
        with sampling(f"{base}-") as sampler, commands() as started:
            command = start_command(
                budget_env(tmp_path, command_name, n),
                tmp_path,
                "command",
                "budget_hold",
                f"--conns={k}",
                f"--release-file={release}",
                f"--exit-file={finish}",
                "--max-seconds=60",
            )
            started.append(command)
            app = client_app(folder)
            first = app.send_task("celeryapp.pool_stats").id
            wait_for_results(app, [first], worker, 30)
            command.wait_event("held")
            assert backends(admin, command_name) == k

            sent = [app.send_task("celeryapp.hold", args=[TASK_SECONDS]).id for _ in range(TASKS)]
            started_at = time.monotonic()
            wait_until(
                lambda: sampler.latest().get(worker_name, 0) >= n - k,
                what=f"the worker to use the {n - k} slots left",
            )
            stats_id = app.send_task("celeryapp.pool_stats").id
            waiting = wait_for_results(app, [stats_id], worker)[stats_id]["result"]["pools"]
            # A second round on the same two connections, while the others still wait.
            wait_until(
                lambda: (
                    sum(
                        app.backend.get_task_meta(task_id)["status"] == "SUCCESS"
                        for task_id in sent
                    )
                    >= n - k + 1
                ),
                what="a first round of tasks to finish",
            )
            released_at = time.monotonic()
            release.touch()
            command.wait_event("released")
            metas = wait_for_results(app, sent, worker, 30)
            finish.touch()
            ended = command.wait_event("exit")
            assert command.finish() == 0, command.output()
        last_id = app.send_task("celeryapp.pool_stats").id
        last = wait_for_results(app, [last_id], worker)[last_id]["result"]["pools"]["default"]
    finally:
        status = worker.stop()
        print(f"--- worker (exit status {status}) output:\n{worker.log()}")

    results = [meta["result"] for meta in metas.values()]
    assert all(meta["status"] == "SUCCESS" for meta in metas.values()), metas
    before = sampler.peak(lambda name: name == worker_name, started_at, released_at)
    with_command = sampler.peak(lambda name: name == command_name, started_at, released_at)
    more = sampler.first(lambda c: c.get(worker_name, 0) > n - k, released_at)
    full = sampler.first(lambda c: c.get(worker_name, 0) >= n, released_at)
    late = [r for r in results if r["asked"] < released_at < r["got"]]
    print(
        f"{len(sampler.samples)} samples; peak {sampler.peak()} backends in all; worker peak "
        f"{before} while the command held {with_command}; after the release: more at "
        f"{more - released_at if more else None} s, {n} at "
        f"{full - released_at if full else None} s; {len(late)} tasks waited past the release"
    )
    assert sampler.peak() <= n, f"{sampler.peak()} backends at once, HOST_MAX_CONNS {n}"
    # While the command held k, the tasks had n - k, all of them, never more.
    assert (before, with_command) == (n - k, k)
    pool = waiting["default"]
    assert pool["pool_max"] == n, pool  # MAX_CONNS defaults to HOST_MAX_CONNS
    assert pool["host_in_use"] == n, pool
    assert pool["host_held"] == n - k, pool
    assert pool["requests_waiting"] >= 1 and pool["host_waits"] >= 1, pool
    # Waiting tasks were served once the command gave back, and soon.
    assert late, "no task was waiting for a slot when the command released"
    assert min(r["got"] for r in late) - released_at <= 3.0
    assert more is not None and more - released_at <= 3.0
    assert full is not None, "the worker never used the whole budget after the release"
    # Its connections went back to the host: closed idle (given back) or, as they
    # came back while the worker waited and it held more than its share, closed
    # on return (stepped aside).
    gave = ended["stats"]["host_given_back"] + ended["stats"]["host_stepped_aside"]
    assert gave >= 1, ended["stats"]
    assert ended["stats"]["host_held"] == 0, ended["stats"]
    assert last["requests_timeouts"] == 0, last
    assert last["host_waits"] >= 1, last


# ------------------------------------------------------- 4. budgets that differ


def test_processes_configuring_different_budgets_are_refused(tmp_path: Path) -> None:
    """HOST_MAX_CONNS 4 in a running process, 3 in another: ImproperlyConfigured naming both.

    Once the first process has exited, its lock file is no conflict: the
    second then starts a budget of its own.
    """
    base = next_app_name()
    release, finish = tmp_path / "release", tmp_path / "finish"
    with commands() as started:
        first = start_command(
            budget_env(tmp_path, f"{base}-first", 4),
            tmp_path,
            "first",
            "budget_hold",
            "--conns=1",
            f"--release-file={release}",
            f"--exit-file={finish}",
        )
        started.append(first)
        first.wait_event("held")
        second_env = budget_env(tmp_path, f"{base}-second", 3)
        refused = subprocess.run(
            [sys.executable, str(APP / "manage.py"), "budget_hold", "--conns=1"],
            cwd=ROOT,
            env=second_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        release.touch()
        finish.touch()
        assert first.finish() == 0, first.output()

    assert refused.returncode != 0, refused.stdout
    message = re.search(r"ImproperlyConfigured: (.*)", refused.stderr)
    assert message is not None, refused.stderr
    assert message.group(1).startswith("DATABASES['default']: HOST_MAX_CONNS = 3 for "), message
    assert "already sharing its budget on this host use 4" in message.group(1), message
    assert '"held"' not in refused.stdout

    alone = subprocess.run(
        [sys.executable, str(APP / "manage.py"), "budget_hold", "--conns=1"],
        cwd=ROOT,
        env=second_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout.splitlines()[0])["stats"]["host_max"] == 3
