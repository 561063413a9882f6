"""Run Django's own test suite through our engine; fail on anything not expected.

    python tests/django_suite/run.py [--modes gevent,threads] [--backend ours|stock|both]
                                     [--apps APP ...] [--include-async]

``make test-django`` runs it. Django's test suite ships in its sdist, not in
the wheel: the sdist of the *installed* Django version is fetched once with
pip into ``.cache/django-suite/`` and its ``tests/`` folder extracted there,
then reused. Each mode (``gevent``: monkey-patched first; ``threads``: no
gevent) runs :data:`APPS` in a process of its own (``child.py``), serially
(``--parallel 1``), against the same server as the rest of our suite
(``devserver.server_dsn()``), both of Django's aliases (``default`` and
``other``) through our engine.

Every failure or error must be listed in ``expected.py`` with its reason, and
every deviation listed there must still fail: a deviation that went away is
reported so that the list stays honest. ``--backend stock`` runs Django's own
PostgreSQL backend (psycopg2) instead, to tell our deviations from failures
the stock backend has too in this environment; ``--backend both`` runs both and
checks each deviation's ``stock_too`` claim as well.

Exits 0 when everything matched, 1 otherwise (each reason printed), 2 when the
suite could not be fetched or a run crashed, hung or overran its time limit.
"""

from __future__ import annotations

import argparse
import json
import os
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
MODES = ("gevent", "threads")
#: Seconds one mode's whole run may take before it is killed (a hang, not slowness).
RUN_LIMIT = float(os.environ.get("DGP_DJANGO_RUN_LIMIT", "900"))


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


def run_once(
    tests_dir: Path, mode: str, backend: str, apps: list[str], *, include_async: bool
) -> dict[str, Any]:
    """Run ``apps`` in one child process; return its recorded results and how long it took.

    Raises SuiteError if the child crashed, hung in a test (the watchdog names
    it) or overran RUN_LIMIT; its log is kept in the cache folder.
    """
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results = logs / f"{backend}-{mode}.json"
    current = logs / f"{backend}-{mode}.current"
    log = logs / f"{backend}-{mode}.log"
    for path in (results, current):
        path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "DGP_TEST_MODE": mode,
        "DGP_DJANGO_BACKEND": backend,
        "DGP_DJANGO_RESULTS": str(results),
        "DGP_DJANGO_CURRENT": str(current),
        "DGP_DJANGO_INCLUDE_ASYNC": "1" if include_async else "0",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    command = [
        sys.executable, str(HERE / "child.py"), str(tests_dir),
        "--settings=tests.django_suite.settings", "--parallel=1", "--noinput",
        "--verbosity=1", *apps,
    ]  # fmt: skip
    print(f"== Django {tests_dir.parent.name} suite, {backend} backend, {mode} mode", flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        try:
            child = subprocess.run(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_LIMIT
            )
        except subprocess.TimeoutExpired as exc:
            raise SuiteError(
                f"{backend}/{mode}: killed after {RUN_LIMIT:.0f} s in "
                f"{_read(current) or 'setup'}; log: {log}"
            ) from exc
    elapsed = time.monotonic() - started
    if not results.is_file():
        tail = "\n".join(_read(log).splitlines()[-40:])
        raise SuiteError(
            f"{backend}/{mode}: the run ended (exit {child.returncode}) without results, "
            f"last test {_read(current) or 'none'}; log: {log}\n{tail}"
        )
    data: dict[str, Any] = json.loads(results.read_text())
    data["elapsed"] = elapsed
    data["log"] = str(log)
    print(
        f"   {data['run']} tests in {elapsed:.0f} s: {len(data['failed'])} failed, "
        f"{data['skipped']} skipped, {len(data['left_out'])} left out; log: {log}",
        flush=True,
    )
    return data


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _selected(test: str, apps: Iterable[str]) -> bool:
    return any(test == app or test.startswith(app + ".") for app in apps)


def check(
    results: dict[str, Any], deviations: list[Deviation], mode: str, apps: list[str]
) -> list[str]:
    """Problems of one run of ours against the expected deviations of ``mode``."""
    expected = {d.test: d for d in deviations if mode in d.modes and _selected(d.test, apps)}
    failed: dict[str, str] = results["failed"]
    problems = []
    for test, trace in sorted(failed.items()):
        if test not in expected:
            problems.append(f"{mode}: {test} failed, not an expected deviation:\n{_tail(trace)}")
    for test in sorted(expected):
        if test not in failed:
            problems.append(
                f"{mode}: {test} is listed in expected.py but passed: remove it from the list"
            )
    for test in results["unexpected_successes"]:
        problems.append(f"{mode}: {test} is marked expectedFailure by Django but passed")
    return problems


def check_stock_claims(
    stock: dict[str, Any], deviations: list[Deviation], mode: str, apps: list[str]
) -> list[str]:
    """Problems with the ``stock_too`` claims of ``mode``'s deviations, from a stock run."""
    problems = []
    for dev in deviations:
        if mode not in dev.modes or not _selected(dev.test, apps):
            continue
        fails = dev.test in stock["failed"]
        if fails != dev.stock_too:
            problems.append(
                f"{mode}: {dev.test} says stock_too={dev.stock_too}, but the stock "
                f"backend {'fails' if fails else 'passes'} it"
            )
    return problems


def _tail(trace: str, lines: int = 12) -> str:
    return "\n".join("      " + line for line in trace.rstrip().splitlines()[-lines:])


def report_stock(stock: dict[str, Any], mode: str, ours: dict[str, Any] | None) -> None:
    """Print what the stock backend fails, and which of those ours fails too."""
    print(f"-- stock backend, {mode}: {len(stock['failed'])} failed")
    for test in sorted(stock["failed"]):
        both = "" if ours is None else (" (ours too)" if test in ours["failed"] else " (not ours)")
        print(f"   {test}{both}")


def main(argv: list[str] | None = None) -> int:
    """Fetch the suite, run it as asked, print the verdict; the exit status says it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--modes", default=",".join(MODES), help="gevent,threads (both)")
    parser.add_argument("--backend", choices=("ours", "stock", "both"), default="ours")
    parser.add_argument("--apps", nargs="+", default=APPS, help="Django test labels to run")
    parser.add_argument(
        "--include-async",
        action="store_true",
        help="keep the *_async tests in gevent mode (they fail there with any backend)",
    )
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        parser.error(f"--modes: choose among {', '.join(MODES)}")

    import django

    try:
        tests_dir = django_tests_dir(django.__version__)
        problems: list[str] = []
        timings: list[str] = []
        for mode in modes:
            runs: dict[str, dict[str, Any]] = {}
            for backend in ("ours", "stock"):
                if args.backend in (backend, "both"):
                    runs[backend] = run_once(
                        tests_dir, mode, backend, args.apps, include_async=args.include_async
                    )
                    timings.append(f"{backend}/{mode} {runs[backend]['elapsed']:.0f} s")
            if "ours" in runs:
                problems += check(runs["ours"], EXPECTED, mode, args.apps)
            if "stock" in runs:
                report_stock(runs["stock"], mode, runs.get("ours"))
                if "ours" in runs:
                    problems += check_stock_claims(runs["stock"], EXPECTED, mode, args.apps)
    except SuiteError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    print("time: " + ", ".join(timings))
    if args.backend == "stock":
        return 0
    kept = [d for d in EXPECTED if set(d.modes) & set(modes) and _selected(d.test, args.apps)]
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for problem in problems:
            print(" - " + problem)
        return 1
    print(f"OK: every failure is one of the {len(kept)} expected deviation(s) of expected.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
