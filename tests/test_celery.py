"""A real Celery worker with the gevent pool (``examples/celeryapp.py``) keeps the pool's promises.

The worker is a subprocess started the way the README says
(``celery -A celeryapp worker --pool gevent --concurrency 50``), against the
same server as the rest of the suite, with a broker and a result store made of
folders under this test's temporary directory. This process only sends tasks
by name, through a bare Celery client that needs neither the example's module
nor its Django settings, and reads their results; it never imports gevent in
``DGP_TEST_MODE=threads``. What the server saw comes from ``pg_stat_activity``
(the worker's connections carry an ``application_name`` of their own), what
the pool saw from a task that returns the worker's ``all_stats()``.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from django_gevent_pool import devserver

from .support import DRIVER, ENGINE, backends, next_app_name, wait_until

pytest.importorskip("celery")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# One database per test process: runs side by side must not seed each other's.
DBNAME = f"dgp_examples_celery_{os.getpid()}"
MAX_CONNS = 5
CONCURRENCY = 50
ITEMS = 50
STARTUP_LIMIT = 20.0  # seconds for the worker to answer its first task
RESULTS_LIMIT = 20.0  # seconds for a batch of tasks to finish
# Seconds from SIGTERM (warm shutdown) to SIGKILL. A gevent worker's consumer
# loop looks for the shutdown request every 2 s: it takes a few seconds here.
KILL_AFTER = 15.0
# A hard bound on the worker's life, should this process die without stopping it.
WORKER_LIFETIME = 120


def worker_env(
    db_dsn: str, app_name: str, folder: Path | None = None, pool_mode: str = "session"
) -> dict[str, str]:
    """The example's environment: this one minus the suite's settings, plus the example's knobs.

    ``folder`` holds the worker's broker and results (``DGP_CELERY_DIR``);
    ``pool_mode`` is the pool's ``POOL_MODE``.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DJANGO_SETTINGS_MODULE" and not key.startswith("DGP_")
    }
    env.update(
        DGP_DSN=db_dsn,
        DGP_ENGINE=ENGINE,
        DGP_DBNAME=DBNAME,
        DGP_MAX_CONNS=str(MAX_CONNS),
        DGP_APPNAME=app_name,
        DGP_ITEMS=str(ITEMS),
        DGP_POOL_MODE=pool_mode,
    )
    if folder is not None:
        env["DGP_CELERY_DIR"] = str(folder)
    return env


def client_app(folder: Path) -> Any:
    """A Celery producer and result reader for the worker's folders; no Django, no gevent.

    Its broker and result settings come from ``examples/fsbroker.py``, loaded
    by path: this process never imports the example app or its Django settings.
    """
    from celery import Celery

    name = "dgp_examples_fsbroker"
    fsbroker = sys.modules.get(name)
    if fsbroker is None:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "fsbroker.py")
        assert spec is not None and spec.loader is not None
        fsbroker = importlib.util.module_from_spec(spec)
        sys.modules[name] = fsbroker  # its settings name its classes by module path
        spec.loader.exec_module(fsbroker)
    app = Celery("dgp-test-client", fixups=[], set_as_current=False)
    app.conf.update(
        **fsbroker.filesystem_broker(folder),
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )
    return app


def manage(env: dict[str, str], *args: str) -> None:
    """Run ``examples/manage.py`` with ``args``; fail with its output if it fails."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "manage.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout}{done.stderr}"


def worker_command(*args: str) -> list[str]:
    """``celery -A celeryapp worker ...`` with this interpreter, bounded in time if possible."""
    command = [sys.executable, "-m", "celery", "-A", "celeryapp", "worker", *args]
    bound = shutil.which("timeout")
    if bound is not None:
        # Passes SIGTERM on to the worker, then SIGKILL KILL_AFTER seconds later if
        # it is still there; does both by itself if it outlives WORKER_LIFETIME.
        command = [bound, f"--kill-after={KILL_AFTER:g}", str(WORKER_LIFETIME), *command]
    return command


@dataclass
class Worker:
    """A running worker subprocess and its log file."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, limit: int = 12000) -> str:
        """The end of the worker's output."""
        text = self.log_path.read_text(errors="replace")
        return text[-limit:]

    def stop(self) -> int:
        """Warm shutdown (SIGTERM to its PID), SIGKILL if it lingers; its exit status.

        Under ``timeout`` the SIGKILL comes from ``timeout`` itself, which alone
        knows the worker's PID: it is killed here only if ``timeout`` hangs.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(KILL_AFTER + 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


@dataclass
class Sampler:
    """Counts, every few milliseconds, the server backends named ``app_name``; keeps the peak."""

    dsn: str
    app_name: str
    peak: int = 0
    samples: int = 0
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = psycopg2.connect(self.dsn, application_name="dgp-celery-sampler")
        conn.autocommit = True  # a fresh snapshot of pg_stat_activity per sample
        try:
            deadline = time.monotonic() + WORKER_LIFETIME
            while not self._stop.is_set() and time.monotonic() < deadline:
                self.peak = max(self.peak, backends(conn, self.app_name))
                self.samples += 1
                time.sleep(0.01)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)
        finally:
            conn.close()

    def stop(self) -> int:
        """Stop sampling; the peak. A sampling error fails the test: the peak would be a lie."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        assert not self.errors, f"sampling pg_stat_activity failed: {self.errors[0]!r}"
        return self.peak


@pytest.fixture
def celery_folder(tmp_path: Path) -> Path:
    """The worker's broker and result folders live here (``filesystem_broker`` makes them)."""
    return tmp_path / "celery"


@pytest.fixture
def example_db() -> Iterator[str]:
    """This process's database for the example project: migrated, seeded, dropped afterwards."""
    dsn, _where = devserver.server_dsn()
    db_dsn = devserver.ensure_database(dsn, DBNAME)
    try:
        env = worker_env(db_dsn, "dgp-celery-setup")
        manage(env, "migrate", "--noinput", "--verbosity=0")
        manage(env, "seed", f"--items={ITEMS}", "--verbosity=0")
        yield db_dsn
    finally:
        conn = psycopg2.connect(dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')
        finally:
            conn.close()


@pytest.fixture
def worker_app_name() -> str:
    return f"{next_app_name()}-celery"


@pytest.fixture(params=["session", "transaction"])
def pool_mode(request: pytest.FixtureRequest) -> str:
    """The worker's ``POOL_MODE``: each task holds a connection per task, or per statement."""
    return str(request.param)


@pytest.fixture
def worker(
    example_db: str, worker_app_name: str, celery_folder: Path, tmp_path: Path, pool_mode: str
) -> Iterator[Worker]:
    """``celery -A celeryapp worker --pool gevent --concurrency 50``; stopped by PID afterwards.

    Its output is printed at teardown, which pytest shows when the test failed.
    """
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            worker_command(
                "--pool",
                "gevent",
                "--concurrency",
                str(CONCURRENCY),
                "--loglevel",
                "info",
                "--hostname",
                f"{worker_app_name}@localhost",
            ),
            cwd=EXAMPLES,
            env=worker_env(example_db, worker_app_name, celery_folder, pool_mode),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    handle = Worker(proc, log_path)
    try:
        yield handle
    finally:
        status = handle.stop()
        print(f"--- worker (exit status {status}) output:\n{handle.log()}")


def wait_for_results(
    app: Any, task_ids: list[str], worker: Worker, limit: float = RESULTS_LIMIT
) -> dict[str, dict[str, Any]]:
    """Each task's stored meta (status, result) once all are ready; fail after ``limit`` s."""
    from celery import states

    deadline = time.monotonic() + limit
    metas: dict[str, dict[str, Any]] = {}
    pending = list(task_ids)
    while pending:
        waiting = []
        for task_id in pending:
            meta = app.backend.get_task_meta(task_id)
            if meta["status"] in states.READY_STATES:
                metas[task_id] = meta
            else:
                waiting.append(task_id)
        pending = waiting
        if pending:
            assert worker.proc.poll() is None, "the worker exited"
            assert time.monotonic() < deadline, (
                f"{len(pending)} of {len(task_ids)} tasks unfinished"
            )
            time.sleep(0.05)
    return metas


def run_one(app: Any, name: str, worker: Worker, *args: Any) -> Any:
    """Send one task, wait for it, return its result; fail if it failed."""
    task_id = app.send_task(f"celeryapp.{name}", args=list(args)).id
    meta = wait_for_results(app, [task_id], worker)[task_id]
    assert meta["status"] == "SUCCESS", meta
    return meta["result"]


def worker_stats(app: Any, worker: Worker) -> dict[str, Any]:
    """What ``pool_stats`` returns in the worker: pid, patch state, ``all_stats()``."""
    stats: dict[str, Any] = run_one(app, "pool_stats", worker)
    return stats


def test_gevent_worker_runs_200_tasks_within_max_conns(
    worker: Worker,
    celery_folder: Path,
    example_db: str,
    worker_app_name: str,
    admin: Any,
    pool_mode: str,
) -> None:
    """200 mixed tasks on 50 greenlets, pool of 5: all as expected, never a sixth connection.

    Among them: tasks that raise inside ``transaction.atomic()`` (rolled back,
    their connection reused) and one killed by its time limit in the middle of
    a query (its query cancelled on the server, its connection discarded).
    """
    gevent_before = "gevent" in sys.modules
    sampler = Sampler(example_db, worker_app_name).start()
    app = client_app(celery_folder)
    try:
        # The worker is up once it answers; it reports on its own process.
        first = app.send_task("celeryapp.pool_stats").id
        first_stats = wait_for_results(app, [first], worker, STARTUP_LIMIT)[first]["result"]
        assert first_stats["gevent_patched"] is True, "celery did not monkey-patch the worker"
        assert first_stats["driver"] == DRIVER
        assert first_stats["cooperative"] is True
        assert first_stats["pool_mode"] == pool_mode
        worker_pid = first_stats["pid"]

        # First, a task that will be killed by its time limit (1 s) in a 30 s query.
        killed = app.send_task("celeryapp.sleep_in_db", args=[30], time_limit=1).id
        rng = random.Random(0)
        batch: list[tuple[str, list[Any]]] = (
            [("item_name", [rng.randint(1, ITEMS)]) for _ in range(120)]
            + [("place_order", [rng.randint(1, ITEMS)]) for _ in range(40)]
            + [("place_order", [rng.randint(1, ITEMS), 1, True]) for _ in range(19)]
            + [("sleep_in_db", [0.05]) for _ in range(20)]
        )
        rng.shuffle(batch)
        sent = [
            (app.send_task(f"celeryapp.{name}", args=args).id, name, args) for name, args in batch
        ]
        metas = wait_for_results(app, [killed] + [task_id for task_id, _, _ in sent], worker)

        failures = {
            task_id: meta["result"]
            for task_id, meta in metas.items()
            if meta["status"] != "SUCCESS" and task_id != killed
        }
        ordered, rejected = [], []
        for task_id, name, args in sent:
            meta = metas[task_id]
            if name == "place_order" and len(args) == 3:
                assert meta["status"] == "FAILURE", meta
                assert type(meta["result"]).__name__ == "OrderRejected", meta
                number = re.search(r"order (\d+)", str(meta["result"]))
                assert number is not None, meta
                rejected.append(int(number.group(1)))
                failures.pop(task_id)
            elif name == "item_name":
                assert meta["result"] == f"item {args[0]}", meta
            elif name == "place_order":
                ordered.append(meta["result"])
            else:
                assert isinstance(meta["result"], int), meta  # a backend pid
        assert not failures, f"{len(failures)} tasks failed: {list(failures.values())[:5]}"
        assert metas[killed]["status"] == "FAILURE"
        assert type(metas[killed]["result"]).__name__ == "TimeLimitExceeded", metas[killed]

        # The database: each good order written once, each rejected one rolled back.
        with psycopg2.connect(example_db) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM shop_order WHERE id = ANY(%s)", [ordered])
            assert cur.fetchone()[0] == 40
            cur.execute("SELECT count(*) FROM shop_order WHERE id = ANY(%s)", [rejected])
            assert cur.fetchone()[0] == 0, "a rejected order survived its rollback"
        conn.close()

        # The pool is whole: the next tasks, after failures and a kill, all succeed.
        after = [app.send_task("celeryapp.item_name", args=[pk]).id for pk in range(1, 21)]
        after_metas = wait_for_results(app, after, worker)
        assert [after_metas[task_id]["result"] for task_id in after] == [
            f"item {pk}" for pk in range(1, 21)
        ]

        # Every connection is back: nothing lent once the tasks are done (a task
        # gives its connection back in task_postrun, just after its result is stored).
        deadline = time.monotonic() + 5
        while True:
            stats = worker_stats(app, worker)
            pool = stats["pools"]["default"]
            if pool["pool_in_use"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        # The killed task's query was cancelled on the server, not left running.
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND state = 'active' AND query LIKE %s",
                [worker_app_name, "%pg_sleep(30)%"],
            )
            assert cur.fetchone()[0] == 0, "the killed task's query still runs"
        server_now = backends(admin, worker_app_name)
    finally:
        peak = sampler.stop()

    assert stats["pid"] == worker_pid, "the gevent pool runs every task in the worker process"
    assert pool["pool_in_use"] == 0, pool
    assert pool["requests_waiting"] == 0, pool
    assert pool["pool_max"] == MAX_CONNS
    assert pool["pool_size"] <= MAX_CONNS, pool
    assert pool["connections_num"] - pool["connections_closed"] <= MAX_CONNS, pool
    assert pool["requests_timeouts"] == 0, pool
    assert pool["requests_errors"] == 0, pool
    assert pool["requests_queued"] > 0, "no task ever waited: the cap was never tested"
    assert pool["returns_bad"] >= 1, "the killed task's broken connection was not discarded"
    # What the server saw, sampled all along: never more than MAX_CONNS.
    assert sampler.samples > 0
    assert 1 <= peak <= MAX_CONNS, f"peak {peak} server connections, MAX_CONNS {MAX_CONNS}"
    assert server_now <= MAX_CONNS
    if not gevent_before:
        assert "gevent" not in sys.modules, "the test process imported gevent"

    # A warm shutdown exits cleanly, and the worker's sessions end with it.
    assert worker.stop() == 0
    wait_until(lambda: backends(admin, worker_app_name) == 0, what="the worker's sessions to end")


def test_gevent_pool_chosen_without_patching_refuses_to_start(
    celery_folder: Path, worker_app_name: str
) -> None:
    """``-Pgevent`` (one word) escapes celery's early monkey-patching: the example refuses it.

    Without the check in ``examples/celeryapp.py`` such a worker starts, takes
    tasks and never runs them.
    """
    done = subprocess.run(
        worker_command("-Pgevent", "--concurrency", "5"),
        cwd=EXAMPLES,
        env=worker_env(devserver.LOCAL_DSN, worker_app_name, celery_folder),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "the gevent pool needs gevent's monkey-patching" in output, output
    assert "ready." not in output, output
