"""Run Django's own test suite through our engine; fail on anything not expected.

    python tests/django_suite/run.py [--driver psycopg2|psycopg|both|pymysql]
                                     [--modes gevent,threads] [--backend ours|stock|both]
                                     [--pool-mode session|transaction]
                                     [--jobs N] [--apps APP ...] [--include-async]

``make test-django`` runs it. Django's test suite ships in its sdist, not in
the wheel: the sdist of the *installed* Django version is fetched once with
pip into ``.cache/django-suite/`` and its ``tests/`` folder extracted there,
then reused. Each driver (``psycopg2``: our ``postgresql_psycopg2`` engine;
``psycopg``: ``postgresql_psycopg3``; Django picks one driver per process) and
each mode (``gevent``: monkey-patched first; ``threads``: no gevent) runs
:data:`APPS` in a process of its own (``child.py``), serially (``--parallel
1``), against the same server as the rest of our suite
(``devserver.server_dsn()``), both of Django's aliases (``default`` and
``other``) through our engine.

``--driver pymysql`` (never part of ``both``) runs :data:`MYSQL_APPS` through
our ``mysql`` engine instead, against the MySQL or MariaDB server at
``$DGP_MYSQL`` (``host:port``, 127.0.0.1:3306 by default; user root, no
password; it must let root create and drop databases), and its stock
reference is Django's MySQL backend on PyMySQL installed as ``MySQLdb``.

Every failure or error must be listed in ``expected.py`` with its reason, and
every deviation listed there must still fail: a deviation that went away is
reported so that the list stays honest. ``--backend stock`` runs Django's own
PostgreSQL backend on the same driver instead, to tell our deviations from
failures the stock backend (or the driver) has too in this environment;
``--backend both`` runs both and checks each deviation's ``stock_too`` claim
as well. With ``--driver both`` (the default) psycopg 3 must be installed.

``--pool-mode transaction`` runs our engine with ``OPTIONS["POOL_MODE"] =
"transaction"`` (``session``, the option's default, otherwise): the connection
goes back to the pool between statements (with ``--driver pymysql`` too: the
MySQL dialect of its pinning). Deviations scoped to one pool mode
(``Deviation.pool_modes``) apply to that mode's runs only; the stock backend
has no such option and runs as always.

The runs (driver x mode x backend) go ``--jobs`` at a time (2: ours and the
stock backend of one driver and mode side by side, each in its own process
and its own test databases). Each run is killed after RUN_LIMIT seconds and
the whole tier after TOTAL_LIMIT (``$DGP_DJANGO_RUN_LIMIT``,
``$DGP_DJANGO_TOTAL_LIMIT``): a hang fails the tier, it never eats CI's time.

Exits 0 when everything matched, 1 otherwise (each reason printed), 2 when the
suite could not be fetched or a run crashed, hung or overran its time limit.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "django-suite"
sys.path.insert(0, str(ROOT))

from tests.django_suite.expected import EXPECTED, Deviation  # noqa: E402

#: Django's test apps we run: the database layer and what leans on it most.
APPS = [
    "backends",
    "transactions",
    "basic",
    "select_for_update",
    "transaction_hooks",
    "queries",
    "multiple_database",
    "test_utils",
    "delete",
    "update",
    "get_or_create",
    "bulk_create",
    # Beyond those: request boundaries (handlers), connections shared with a
    # live server's threads (servers), the connection handler (db_utils), the
    # session time zone (timezones), psycopg2 specifics (postgres_tests), DDL
    # and atomic migrations, and more of the ORM on a real server.
    "handlers",
    "servers",
    "db_utils",
    "timezones",
    "postgres_tests",
    "schema",
    "migrations",
    "introspection",
    "fixtures",
    "sessions_tests",
    "raw_query",
    "db_functions",
    "model_fields",
    "expressions",
    "aggregation",
]
#: The apps run on MySQL (``--driver pymysql``): APPS but postgres_tests (PostgreSQL only).
MYSQL_APPS = [app for app in APPS if app != "postgres_tests"]
MODES = ("gevent", "threads")
#: The drivers, as ``DGP_DJANGO_DRIVER`` names them (psycopg 3 is ``psycopg``):
#: those of ``--driver both``.
DRIVERS = ("psycopg2", "psycopg")
#: MySQL's driver, run only when asked (``--driver pymysql``).
MYSQL_DRIVER = "pymysql"
#: Seconds one run (a driver, a mode, a backend) may take before it is killed (a hang).
RUN_LIMIT = float(os.environ.get("DGP_DJANGO_RUN_LIMIT", "900"))
#: Seconds the whole tier may take (CI has 90 minutes for everything): past that, the
#: runs still going are killed and the tier fails (exit 2).
TOTAL_LIMIT = float(os.environ.get("DGP_DJANGO_TOTAL_LIMIT", "2400"))
#: Runs at once (``--jobs``): each has its own process and test databases.
JOBS = int(os.environ.get("DGP_DJANGO_JOBS", "2"))


class SuiteError(Exception):
    """The suite could not be fetched, or a run crashed, hung or overran RUN_LIMIT."""


def django_tests_dir(version: str) -> Path:
    """Django's ``tests/`` folder for ``version``, fetched and extracted on first use.

    Raises SuiteError if pip cannot fetch the sdist (PyPI unreachable) or the
    archive has no runtests.py.
    """
    target = CACHE / f"django-{version}" / "tests"
    if (target / "runtests.py").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"django-{version}.tar.gz"
    if not sdist.is_file():
        print(f"fetching the Django {version} sdist (its tests ship only there)", flush=True)
        fetched = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--no-binary", ":all:", f"django=={version}", "--dest", str(CACHE),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        if fetched.returncode != 0 or not sdist.is_file():
            raise SuiteError(
                f"could not download the Django {version} sdist with pip "
                f"(exit {fetched.returncode}):\n{fetched.stderr[-2000:]}"
            )
    prefix = f"django-{version}/tests/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise SuiteError(f"{sdist} has no {prefix} folder")
        archive.extractall(CACHE, members=members, filter="data")
    if not (target / "runtests.py").is_file():
        raise SuiteError(f"{sdist} has no {prefix}runtests.py")
    return target


class Child:
    """One run of ``apps`` (one driver, mode and backend) in a child process of its own.

    Started at once, in a session of its own so that it and anything it
    starts can be killed together, by its process group id.
    """

    def __init__(
        self,
        tests_dir: Path,
        driver: str,
        mode: str,
        backend: str,
        apps: list[str],
        *,
        include_async: bool,
        deadline: float,
        pool_mode: str = "session",
    ) -> None:
        logs = CACHE / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.driver, self.mode, self.backend = driver, mode, backend
        # POOL_MODE is ours: the stock backend has no such option.
        self.pool_mode = pool_mode if backend == "ours" else "session"
        transaction = "-transaction" if self.pool_mode == "transaction" else ""
        self.name = f"{driver}-{backend}{transaction}-{mode}"
        self.results = logs / f"{self.name}.json"
        self.current = logs / f"{self.name}.current"
        self.log = logs / f"{self.name}.log"
        for path in (self.results, self.current):
            path.unlink(missing_ok=True)
        env = {
            **os.environ,
            "DGP_TEST_MODE": mode,
            "DGP_DJANGO_DRIVER": driver,
            "DGP_DJANGO_BACKEND": backend,
            "DGP_DJANGO_POOL_MODE": self.pool_mode,
            "DGP_DJANGO_RESULTS": str(self.results),
            "DGP_DJANGO_CURRENT": str(self.current),
            "DGP_DJANGO_INCLUDE_ASYNC": "1" if include_async else "0",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("DJANGO_SETTINGS_MODULE", None)
        command = [
            sys.executable, str(HERE / "child.py"), str(tests_dir),
            "--settings=tests.django_suite.settings", "--parallel=1", "--noinput",
            "--verbosity=1", *apps,
        ]  # fmt: skip
        pooling = f" (POOL_MODE {self.pool_mode})" if self.pool_mode != "session" else ""
        print(
            f"== Django {tests_dir.parent.name} suite, {backend} backend{pooling}, {driver}, "
            f"{mode} mode",
            flush=True,
        )
        self.started = time.monotonic()
        # RUN_LIMIT for this run, or what is left of the whole tier's time.
        self.deadline = min(self.started + RUN_LIMIT, deadline)
        self._out = open(self.log, "w")  # closed by outcome() or kill()
        self.proc = subprocess.Popen(
            command, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def finished(self) -> bool:
        """True once the child has exited; SuiteError once it overran its deadline (killed)."""
        if self.proc.poll() is not None:
            return True
        if time.monotonic() >= self.deadline:
            self.kill()
            raise SuiteError(
                f"{self.name}: killed after {time.monotonic() - self.started:.0f} s (run limit "
                f"{RUN_LIMIT:.0f} s, tier limit {TOTAL_LIMIT:.0f} s) in "
                f"{_read(self.current) or 'setup'}; log: {self.log}"
            )
        return False

    def kill(self) -> None:
        """Kill the child and whatever it started (its own process group), then reap it.

        Its test databases (named after its PID by ``settings.py``) are left
        behind by a kill: they are dropped here, best effort.
        """
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            _drop_test_databases(self.proc.pid, self.driver)
        self._out.close()

    def outcome(self) -> dict[str, Any]:
        """The recorded results of the exited child, and how long it took.

        Raises SuiteError if it crashed or hung in a test (the watchdog names
        it) without results, or ran on another driver than asked; its log is
        kept in the cache folder.
        """
        self._out.close()
        elapsed = time.monotonic() - self.started
        if not self.results.is_file():
            tail = "\n".join(_read(self.log).splitlines()[-40:])
            raise SuiteError(
                f"{self.name}: the run ended (exit {self.proc.returncode}) without results, "
                f"last test {_read(self.current) or 'none'}; log: {self.log}\n{tail}"
            )
        data: dict[str, Any] = json.loads(self.results.read_text())
        if data.get("driver") != self.driver:
            vendor = "MySQL" if self.driver == MYSQL_DRIVER else "PostgreSQL"
            raise SuiteError(
                f"{self.name}: Django's {vendor} backend ran on {data.get('driver')}, "
                f"not {self.driver}; log: {self.log}"
            )
        if self.backend == "ours" and data.get("pool_mode") != self.pool_mode:
            raise SuiteError(
                f"{self.name}: our engine ran with POOL_MODE {data.get('pool_mode')!r}, "
                f"not {self.pool_mode!r}; log: {self.log}"
            )
        data["elapsed"] = elapsed
        data["log"] = str(self.log)
        print(
            f"   {self.name}: {data['run']} tests in {elapsed:.0f} s: "
            f"{len(data['failed'])} failed, {data['skipped']} skipped, "
            f"{len(data['left_out'])} left out; log: {self.log}",
            flush=True,
        )
        if self.pool_mode == "transaction":
            # How much of the run really gave connections back between statements.
            for alias, stats in sorted(data.get("pool_stats", {}).items()):
                pins = {k[5:]: int(v) for k, v in stats.items() if k.startswith("pins_") and v}
                print(
                    f"   {alias}: {int(stats.get('requests_num', 0))} checkouts in "
                    f"{int(stats.get('sessions_num', 0))} sessions, pins {pins or 'none'}",
                    flush=True,
                )
        return data


def _drop_test_databases(pid: int, driver: str = "psycopg2") -> None:
    """Drop the test databases of the killed child ``pid`` (``$DGP_DSN`` or the local server;
    ``$DGP_MYSQL`` or 127.0.0.1:3306 for ``pymysql``)."""
    if driver == MYSQL_DRIVER:
        _drop_mysql_test_databases(pid)
        return
    import psycopg2

    from django_gevent_pool import devserver

    dsn = os.environ.get(devserver.ENV_DSN) or devserver.LOCAL_DSN
    try:
        conn = psycopg2.connect(dsn, connect_timeout=5)
    except psycopg2.Error as exc:
        print(f"   could not drop the test databases of {pid}: {exc}", flush=True)
        return
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for alias in ("default", "other"):
                cur.execute(f'DROP DATABASE IF EXISTS "test_dgp_django_{alias}_{pid}" WITH (FORCE)')
    except psycopg2.Error as exc:
        print(f"   could not drop the test databases of {pid}: {exc}", flush=True)
    finally:
        conn.close()


def _drop_mysql_test_databases(pid: int) -> None:
    """Drop the MySQL test databases of the killed child ``pid`` (``$DGP_MYSQL``, as root)."""
    import pymysql

    host, _, port = os.environ.get("DGP_MYSQL", "127.0.0.1:3306").rpartition(":")
    try:
        conn = pymysql.connect(
            host=host or "127.0.0.1", port=int(port), user="root", password="",
            connect_timeout=5, autocommit=True,
        )  # fmt: skip
    except pymysql.MySQLError as exc:
        print(f"   could not drop the test databases of {pid}: {exc}", flush=True)
        return
    try:
        with conn.cursor() as cur:
            for alias in ("default", "other"):
                cur.execute(f"DROP DATABASE IF EXISTS `test_dgp_django_{alias}_{pid}`")
    except pymysql.MySQLError as exc:
        print(f"   could not drop the test databases of {pid}: {exc}", flush=True)
    finally:
        conn.close()


def run_all(
    tests_dir: Path,
    plan: list[tuple[str, str, str]],
    apps: list[str],
    *,
    include_async: bool,
    jobs: int,
    pool_mode: str = "session",
) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Run each (driver, mode, backend) of ``plan``, ``jobs`` at a time, in the plan's order.

    Our engine's runs use ``pool_mode`` (its ``POOL_MODE``).

    Returns the results of each, with its start and end times (monotonic).
    Raises SuiteError as soon as one run fails as :meth:`Child.outcome` says
    or overruns its limit, or the tier overruns TOTAL_LIMIT; the runs still
    going are killed then.
    """
    deadline = time.monotonic() + TOTAL_LIMIT
    pending = list(plan)
    running: dict[tuple[str, str, str], Child] = {}
    done: dict[tuple[str, str, str], dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                driver, mode, backend = key = pending.pop(0)
                running[key] = Child(
                    tests_dir,
                    driver,
                    mode,
                    backend,
                    apps,
                    include_async=include_async,
                    deadline=deadline,
                    pool_mode=pool_mode,
                )
            for key, child in list(running.items()):
                if child.finished():
                    del running[key]
                    done[key] = child.outcome()
                    done[key]["started"] = child.started
                    done[key]["ended"] = time.monotonic()
            time.sleep(0.2)
    finally:
        for child in running.values():
            child.kill()
    return done


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _selected(test: str, apps: Iterable[str]) -> bool:
    return any(test == app or test.startswith(app + ".") for app in apps)


def _applies(
    dev: Deviation, driver: str, mode: str, apps: Iterable[str], pool_mode: str = "session"
) -> bool:
    return (
        driver in dev.drivers
        and mode in dev.modes
        and pool_mode in dev.pool_modes
        and _selected(dev.test, apps)
    )


def check(
    results: dict[str, Any],
    deviations: list[Deviation],
    driver: str,
    mode: str,
    apps: list[str],
    pool_mode: str = "session",
) -> list[str]:
    """Problems of one run of ours against the expected deviations of ``driver``, ``mode``
    and ``pool_mode``."""
    expected = {d.test: d for d in deviations if _applies(d, driver, mode, apps, pool_mode)}
    failed: dict[str, str] = results["failed"]
    where = f"{driver}/{mode}" + ("/transaction" if pool_mode == "transaction" else "")
    problems = []
    for test, trace in sorted(failed.items()):
        if test not in expected:
            problems.append(f"{where}: {test} failed, not an expected deviation:\n{_tail(trace)}")
    for test in sorted(expected):
        if test not in failed:
            problems.append(
                f"{where}: {test} is listed in expected.py but passed: remove it from the list"
            )
    for test in results["unexpected_successes"]:
        problems.append(f"{where}: {test} is marked expectedFailure by Django but passed")
    return problems


def check_stock_claims(
    stock: dict[str, Any],
    deviations: list[Deviation],
    driver: str,
    mode: str,
    apps: list[str],
    pool_mode: str = "session",
) -> list[str]:
    """Problems with the ``stock_too`` claims of the deviations of ``driver`` and ``mode``
    (those of our ``pool_mode`` run)."""
    problems = []
    for dev in deviations:
        if not _applies(dev, driver, mode, apps, pool_mode):
            continue
        fails = dev.test in stock["failed"]
        if fails != dev.stock_too:
            problems.append(
                f"{driver}/{mode}: {dev.test} says stock_too={dev.stock_too}, but the stock "
                f"backend {'fails' if fails else 'passes'} it"
            )
    return problems


def _tail(trace: str, lines: int = 12) -> str:
    return "\n".join("      " + line for line in trace.rstrip().splitlines()[-lines:])


def report_stock(
    stock: dict[str, Any], driver: str, mode: str, ours: dict[str, Any] | None
) -> None:
    """Print what the stock backend fails, and which of those ours fails too."""
    print(f"-- stock backend, {driver}, {mode}: {len(stock['failed'])} failed")
    for test in sorted(stock["failed"]):
        both = "" if ours is None else (" (ours too)" if test in ours["failed"] else " (not ours)")
        print(f"   {test}{both}")


def main(argv: list[str] | None = None) -> int:
    """Fetch the suite, run it as asked, print the verdict; the exit status says it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--driver",
        choices=(*DRIVERS, "both", MYSQL_DRIVER),
        default="both",
        help="psycopg2, psycopg (psycopg 3) or both (the default), psycopg2's runs first; "
        "pymysql: MySQL through our mysql engine (never part of both)",
    )
    parser.add_argument("--modes", default=",".join(MODES), help="gevent,threads (both)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=JOBS,
        help=f"runs at once, each in its own process and databases ({JOBS}: "
        "ours and the stock backend side by side)",
    )
    parser.add_argument("--backend", choices=("ours", "stock", "both"), default="ours")
    parser.add_argument(
        "--pool-mode",
        choices=("session", "transaction"),
        default="session",
        help="our engine's OPTIONS['POOL_MODE'] (the stock backend has none)",
    )
    parser.add_argument(
        "--apps",
        nargs="+",
        help="Django test labels to run (APPS; MYSQL_APPS with --driver pymysql)",
    )
    parser.add_argument(
        "--include-async",
        action="store_true",
        help="keep the *_async tests in gevent mode (they fail there with any backend)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose among {', '.join(MODES)}")
    if args.jobs < 1:
        parser.error("--jobs: at least 1")
    if args.apps is None:
        args.apps = MYSQL_APPS if args.driver == MYSQL_DRIVER else APPS

    drivers = list(DRIVERS) if args.driver == "both" else [args.driver]

    import django

    try:
        if "psycopg" in drivers and importlib.util.find_spec("psycopg") is None:
            raise SuiteError("--driver psycopg needs psycopg 3: pip install 'psycopg[binary]'")
        if MYSQL_DRIVER in drivers and importlib.util.find_spec("pymysql") is None:
            raise SuiteError("--driver pymysql needs PyMySQL: pip install PyMySQL")
        tests_dir = django_tests_dir(django.__version__)
        backends = ["ours", "stock"] if args.backend == "both" else [args.backend]
        # Ours and the stock backend of the same driver and mode side by side.
        plan = [(d, m, b) for d in drivers for m in modes for b in backends]
        started = time.monotonic()
        runs = run_all(
            tests_dir,
            plan,
            args.apps,
            include_async=args.include_async,
            jobs=args.jobs,
            pool_mode=args.pool_mode,
        )
    except SuiteError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    problems: list[str] = []
    timings: list[str] = []
    for driver in drivers:
        for mode in modes:
            ours, stock = runs.get((driver, mode, "ours")), runs.get((driver, mode, "stock"))
            if ours is not None:
                problems += check(ours, EXPECTED, driver, mode, args.apps, args.pool_mode)
            if stock is not None:
                report_stock(stock, driver, mode, ours)
                if ours is not None:
                    problems += check_stock_claims(
                        stock, EXPECTED, driver, mode, args.apps, args.pool_mode
                    )
        mine = {(m, b): r for (d, m, b), r in runs.items() if d == driver}
        wall = max(r["ended"] for r in mine.values()) - min(r["started"] for r in mine.values())
        each = ", ".join(f"{b}/{m} {r['elapsed']:.0f} s" for (m, b), r in mine.items())
        timings.append(f"{driver} {wall:.0f} s ({each})")
    timings.append(f"in all {time.monotonic() - started:.0f} s with --jobs {args.jobs}")
    print("time: " + "; ".join(timings))
    if args.backend == "stock":
        return 0
    kept = [
        d
        for d in EXPECTED
        if set(d.drivers) & set(drivers)
        and set(d.modes) & set(modes)
        and args.pool_mode in d.pool_modes
        and _selected(d.test, args.apps)
    ]
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for problem in problems:
            print(" - " + problem)
        return 1
    print(f"OK: every failure is one of the {len(kept)} expected deviation(s) of expected.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
