"""``make bench`` / ``make bench-quick``: our pool against the alternatives, side by side.

    .venv/bin/python benchmarks/run.py            # full: 3 rounds, about 21 minutes
    .venv/bin/python benchmarks/run.py --quick    # quick: 1 shorter round, about 5 minutes

1. Makes (or refreshes) the benchmark's own environment ``.bench-venv`` --
   Django, gevent, gunicorn, psycopg2, psycopg 3 + psycopg-pool, psycogreen,
   django-db-geventpool 4.0.8, PyMySQL, django-mysql-geventpool 0.2.5,
   matplotlib, py-spy, and our package from the
   working tree (``pip install -e .``) -- and re-runs itself with it. Installs
   ``wrk`` and ``pgbouncer`` with apt when they are missing.
2. Finds the server (``$DGP_DSN``, else 127.0.0.1:5432), creates the database
   ``dgp_bench`` and seeds it. Refuses to start if the server has fewer free
   connections than one competitor needs (workers x MAX_CONNS + a margin).
3. Per round, **micro** (``benchmarks/micro.py``, one process per competitor,
   no HTTP) then **http**: for each competitor in turn, its own gunicorn (gevent
   workers; PgBouncer started in front for that competitor), its pools filled
   (``/warm/``), one warm-up second of wrk, then wrk on the primary-key view,
   the ``pg_sleep(50 ms)`` view, the transaction view and the wait view (a
   query, 50 ms waiting on another service, a query), while a thread
   samples ``pg_stat_activity`` every 20 ms. The competitor is stopped (by PID)
   and its server connections drained before the next one starts. The order of
   the competitors rotates from round to round.
   Then **skewed** (``benchkit/skewed.py``): 4 gunicorn workers sharing 16
   server connections, a static split (MAX_CONNS = 4 each) against one host
   budget (HOST_MAX_CONNS = MAX_CONNS = 16), under a load pinned to workers by
   ``skewload.py`` (one busy worker, the others nearly idle; then all busy).
   Then **mysql** (``benchkit/mysqlbench.py``): the primary-key and wait views
   from MySQL/MariaDB (``$DGP_MYSQL``, else 127.0.0.1:3306; skipped when none
   answers), ours (session and transaction mode) against Django's stock MySQL
   backend (CONN_MAX_AGE 0 and 60) and django-mysql-geventpool 0.2.5, all on
   PyMySQL, each as a MySQL user of its own whose sessions are counted in
   PROCESSLIST every 20 ms.
4. Prints the tables and the targets of the issue (PASS/MISS). When a target
   is missed (full runs), profiles our side with py-spy. Writes
   ``benchmarks/results/latest.{json,md,png}`` (``quick.*`` for ``--quick``),
   and ``latest-profile.txt`` when it profiled.

A guard stops a competitor at once (SIGKILL to the processes this script
started) if the server ever shows more than workers x MAX_CONNS + 10 of its
connections: the server is shared, and other users must not get "too many
clients".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

# These import with the stdlib and psycopg2 only, which both environments have;
# matplotlib, Django and the competitors are used only after the re-exec.
from benchapp.competitors import COMPETITORS, DBNAME, ITEMS, MYSQL_CONFIGS, VIEWS  # noqa: E402
from benchkit import env as bench_env  # noqa: E402
from benchkit import report  # noqa: E402
from benchkit.runner import TMP, Config, Run  # noqa: E402
from benchkit.servers import Server  # noqa: E402

RESULTS = BENCH_DIR / "results"
STARTED_AT = "DGPB_STARTED_AT"
COMMAND = "DGPB_COMMAND"

FULL = {
    "rounds": 3,
    "http_seconds": 4.0,
    "sleep_seconds": 5.0,
    "micro_seconds": 1.5,
    "skew_seconds": 8.0,
    "skew_warmup": 2.0,
}
QUICK = {
    "rounds": 1,
    "http_seconds": 1.5,
    "sleep_seconds": 2.5,
    "micro_seconds": 1.0,
    "skew_seconds": 4.0,
    "skew_warmup": 1.0,
}
SCENARIOS = ("micro", "http", "skewed", "mysql")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Benchmark django-gevent-pool against the alternatives."
    )
    parser.add_argument("--quick", action="store_true", help="one short round (about 5 minutes)")
    parser.add_argument("--rounds", type=int, help="repetitions of every measurement")
    parser.add_argument("--http-seconds", type=float, help="seconds of wrk per view")
    parser.add_argument(
        "--sleep-seconds", type=float, help="seconds of wrk on the sleep and wait views"
    )
    parser.add_argument("--micro-seconds", type=float, help="seconds of the micro query loop")
    parser.add_argument("--workers", type=int, default=1, help="gunicorn workers (1)")
    parser.add_argument("--max-conns", type=int, default=20, help="MAX_CONNS per worker (20)")
    parser.add_argument("--clients", type=int, default=200, help="wrk connections (200)")
    parser.add_argument("--greenlets", type=int, default=200, help="micro greenlets (200)")
    parser.add_argument("--competitors", help="comma-separated subset (raw is always run)")
    parser.add_argument("--views", help=f"comma-separated subset of {','.join(VIEWS)} (all)")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"{','.join(SCENARIOS)} (all); mysql: the pk and wait views on MySQL/MariaDB "
        "($DGP_MYSQL host:port, default 127.0.0.1:3306; skipped when unreachable)",
    )
    parser.add_argument(
        "--skew-seconds", type=float, help="skewed: seconds measured per phase (after a warm-up)"
    )
    parser.add_argument("--skew-warmup", type=float, help="skewed: warm-up seconds per phase")
    parser.add_argument("--skew-workers", type=int, default=4, help="skewed: gunicorn workers (4)")
    parser.add_argument(
        "--skew-budget", type=int, default=16, help="skewed: connections of the host (16)"
    )
    parser.add_argument(
        "--skew-pool-timeout", type=float, default=2.0, help="skewed: POOL_TIMEOUT seconds (2)"
    )
    parser.add_argument(
        "--skew-light-pace",
        type=float,
        default=1.0,
        help="skewed: seconds between two requests of a light worker's client (1)",
    )
    parser.add_argument("--output", help="results/<name>.{json,md,png} (latest, or quick)")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="py-spy our side: when a target is missed in a full run (auto), always, never",
    )
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults of the full or quick run, overridden by explicit options."""
    base: dict[str, float] = dict(QUICK if args.quick else FULL)
    for name in base:
        value = getattr(args, name)
        if value is not None:
            base[name] = value
    known = [c.key for c in COMPETITORS]
    chosen = tuple(args.competitors.split(",")) if args.competitors else tuple(known)
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise SystemExit(f"unknown competitors {unknown}; known: {', '.join(known)}")
    if "raw" not in chosen:
        chosen = ("raw", *chosen)  # every ratio needs the limit of the same round
    views = tuple(args.views.split(",")) if args.views else VIEWS
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise SystemExit(f"unknown views {unknown}; known: {', '.join(VIEWS)}")
    scenarios = tuple(args.scenarios.split(","))
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    if args.skew_workers < 2 or args.skew_budget % args.skew_workers:
        raise SystemExit("--skew-budget must be a multiple of --skew-workers (>= 2)")
    return Config(
        quick=args.quick,
        rounds=int(base["rounds"]),
        http_seconds=float(base["http_seconds"]),
        sleep_seconds=float(base["sleep_seconds"]),
        http_warmup=1.0,
        micro_seconds=float(base["micro_seconds"]),
        micro_warmup=0.5,
        workers=args.workers,
        max_conns=args.max_conns,
        clients=args.clients,
        micro_greenlets=args.greenlets,
        competitors=chosen,
        views=tuple(v for v in VIEWS if v in views),
        scenarios=scenarios,
        output=args.output or ("quick" if args.quick else "latest"),
        profile=args.profile,
        profile_seconds=args.profile_seconds,
        skew_workers=args.skew_workers,
        skew_budget=args.skew_budget,
        skew_pool_timeout=args.skew_pool_timeout,
        skew_warmup=float(base["skew_warmup"]),
        skew_seconds=float(base["skew_seconds"]),
        skew_light_pace=args.skew_light_pace,
    )


# ------------------------------------------------------------------ facts


def machine_facts(server: Server) -> dict[str, Any]:
    """nproc, the CPU model, PostgreSQL's and Python's versions."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "postgresql": server.version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions(tools: dict[str, str]) -> dict[str, str]:
    """Versions of everything measured."""
    from importlib import metadata

    out = {}
    for dist in (
        "Django",
        "gevent",
        "gunicorn",
        "psycopg2-binary",
        "psycopg",
        "psycopg-pool",
        "psycogreen",
        "django-db-geventpool",
        "django-gevent-pool",
        "PyMySQL",
        "django-mysql-geventpool",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    for name, flags in (("pgbouncer", ["--version"]), ("wrk", ["-v"])):
        done = subprocess.run(
            [tools[name], *flags], capture_output=True, text=True, timeout=10, check=False
        )
        first = (done.stdout or done.stderr).strip().splitlines()
        out[name] = first[0] if first else "unknown"
    return out


def _relative(parts: list[str]) -> list[str]:
    """Paths inside the repository made relative to its root (the command as a user types it)."""
    out = []
    for part in parts:
        relative = os.path.relpath(os.path.abspath(part), bench_env.ROOT)
        out.append(part if relative.startswith("..") or not os.path.exists(part) else relative)
    return out


# ------------------------------------------------------------------ main


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(128 + signum)


def bootstrap(argv: list[str]) -> tuple[float, str]:
    """Make ``.bench-venv`` and re-run this script with it (no return) unless already there.

    Returns when running under ``.bench-venv``: the start time of the whole
    command (setup included) and the command line as the user typed it.
    """
    if not bench_env.in_venv():
        os.environ.setdefault(STARTED_AT, str(time.time()))
        command = shlex.join(_relative([sys.executable, __file__, *argv]))
        if os.environ.get("MAKELEVEL") and argv in ([], ["--quick"]):
            command = f"make bench{'-quick' if argv else ''}  # {command}"
        os.environ.setdefault(COMMAND, command)
        spent = bench_env.ensure_venv()
        if spent:
            print(f"  ready in {spent:.0f} s", flush=True)
        bench_env.reexec_in_venv([str(Path(__file__).resolve()), *argv])
    bench_env.ensure_venv()  # run directly with .bench-venv's Python: still keep it fresh
    started = float(os.environ.get(STARTED_AT) or time.time())
    command = os.environ.get(COMMAND) or shlex.join(_relative([sys.executable, __file__, *argv]))
    return started, command


def main(argv: list[str]) -> int:
    """Set up, run, report; 0 unless the run itself failed (a MISS is a result, not a failure)."""
    args = parse_args(argv)
    started, command = bootstrap(argv)
    signal.signal(signal.SIGTERM, _terminate)
    from django_gevent_pool import devserver  # .bench-venv's: the working tree

    config = config_from_args(args)
    bench_env.ensure_tools()
    tools = {name: bench_env.find_binary(name) or name for name in ("wrk", "pgbouncer")}
    TMP.mkdir(parents=True, exist_ok=True)
    dsn, where = devserver.server_dsn()
    server = Server.from_dsn(dsn)
    print(f"server: {where} ({server.version()})", flush=True)
    needed = config.guard_limit() + 5
    headroom = server.headroom()
    if headroom < needed:
        print(
            f"the server has {headroom} free connections; one competitor needs {needed} "
            f"({config.workers} workers x MAX_CONNS {config.max_conns}, or the skewed "
            f"scenario's budget {config.skew_budget}, + margin). Try later "
            "or pass --max-conns / --workers / --skew-budget.",
            file=sys.stderr,
        )
        return 2
    server.prepare(DBNAME, ITEMS)
    measured = len(config.competitors) if {"micro", "http"} & set(config.scenarios) else 0
    measured += 2 * ("skewed" in config.scenarios)
    measured += len(MYSQL_CONFIGS) * ("mysql" in config.scenarios)
    print(
        f"{'quick' if config.quick else 'full'} run: {config.rounds} round(s), "
        f"{measured} competitors, about {config.estimate_seconds():.0f} s "
        "(plus profiling if a target is missed)",
        flush=True,
    )
    run = Run(config, server, tools)
    run.sampler.start()
    try:
        run.execute()
        summary = report.summarize(run.records, asdict(config), run.skipped, run.mysql)
        found = report.targets(summary, asdict(config))
        profiles = []
        # The profiles are of ours on PostgreSQL: a missed MySQL target does not call for them.
        missed = any(t.passed is False and t.name not in report.MYSQL_TARGETS for t in found)
        if config.profile == "always" or (config.profile == "auto" and missed and not config.quick):
            from benchkit.profiling import profile_ours

            print("profiling our side (a target was missed)..." if missed else "profiling...")
            profiles = profile_ours(run, config.profile_seconds)
    except BaseException:
        partial = TMP / f"{config.output}-partial.json"
        partial.write_text(json.dumps({"config": asdict(config), "records": run.records}))
        print(f"run aborted; records so far in {partial.relative_to(bench_env.ROOT)}")
        raise
    finally:
        run.sampler.stop()
    wall = time.time() - started
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": machine_facts(server),
        "versions": versions(tools),
        "server": where,
        "wall_seconds": wall,
        "orders_written": server.count_orders(DBNAME),
    }
    print(report.text_report(summary, found, asdict(config)))
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / config.output
    written = [Path(f"{base}.json"), Path(f"{base}.md"), Path(f"{base}.png")]
    if profiles:
        profile_text = "\n\n".join(p.text() for p in profiles)
        print(f"\nprofile of our side (py-spy):\n{profile_text}")
        written.append(Path(f"{base}-profile.txt"))
        written[-1].write_text(
            f"{meta['date']}, {command}\n"
            "py-spy on our processes; shares of their CPU time (active samples only).\n"
            "py-spy samples wall-clock stacks: on contended cores, time around system calls\n"
            "(the socket look in sync.py readable(), libpq I/O and the hub switch in\n"
            "green.py gevent_wait_callback) is over-represented; read them as upper bounds.\n\n"
            f"{profile_text}\n"
        )
    written[0].write_text(
        json.dumps(
            {
                "meta": meta,
                "config": asdict(config),
                "summary": summary,
                "targets": [t.as_dict() for t in found],
                "profile": [p.as_dict() for p in profiles],
                "records": run.records,
            },
            indent=1,
        )
        + "\n"
    )
    written[1].write_text(report.rst_report(summary, found, asdict(config), meta))
    report.chart(
        summary,
        written[2],
        f"django-gevent-pool vs alternatives -- {meta['date']}, {meta['machine']['nproc']} "
        f"cores, {report.plural(config.workers, 'worker')} x MAX_CONNS {config.max_conns}, "
        f"{config.clients} clients",
    )
    print("\nwrote " + ", ".join(str(p.relative_to(bench_env.ROOT)) for p in written))
    print(f"total {wall:.0f} s ({'quick' if config.quick else 'full'} run, setup included)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
