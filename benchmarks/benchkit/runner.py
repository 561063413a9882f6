"""One benchmark run: competitors started one at a time, measured, stopped, recorded.

:class:`Run` owns the connection sampler (and its guard), starts each
competitor's processes, drives the loads and collects one record per
measurement. Every process it starts is stopped by PID before the next
competitor starts, and the server's connections of that competitor are
drained first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchapp.competitors import (
    APPNAME_PREFIX,
    BY_KEY,
    DBNAME,
    ITEMS,
    MICRO_BARE,
    MYSQL_CONFIGS,
    OURS_PSYCOPG3,
    SLEEP_SECONDS,
    Competitor,
    unavailable,
)

from . import env as bench_env
from . import mysqlbench, skewed
from .loads import run_micro, run_wrk
from .servers import (
    HOST,
    ConnectionSampler,
    Gunicorn,
    PgBouncer,
    Server,
    free_port,
    get_json,
)

BENCH_DIR = Path(__file__).resolve().parent.parent
TMP = BENCH_DIR / "results" / "tmp"
LOOPS = ("query", "query_uncontended", "noop")  # the loops of micro.py
STATEMENT_LOOPS = ("statement", "statement_busy", "interleaved")  # through Django only
#: The views that wait 50 ms (on the server, or off it): measured for ``sleep_seconds``.
LONG_VIEWS = ("sleep", "wait")
#: Server connections a competitor may show beyond workers x MAX_CONNS before the guard fires.
GUARD_MARGIN = 10


@dataclass(frozen=True)
class Config:
    """What one run measures, and for how long."""

    quick: bool
    rounds: int
    http_seconds: float
    sleep_seconds: float  # sleep and wait views run longer: wrk drops the requests in flight
    http_warmup: float
    micro_seconds: float
    micro_warmup: float
    workers: int
    max_conns: int
    clients: int
    micro_greenlets: int
    competitors: tuple[str, ...]
    views: tuple[str, ...]
    scenarios: tuple[str, ...]
    output: str
    profile: str  # "auto" (when a target is missed, full runs only), "always" or "never"
    profile_seconds: float
    # The skewed scenario (benchkit/skewed.py): a host budget against a static split.
    skew_workers: int = 4
    skew_budget: int = 16
    skew_pool_timeout: float = 2.0
    skew_warmup: float = 1.0
    skew_seconds: float = 5.0
    skew_busy_clients: int = 200
    skew_light_pace: float = 1.0
    skew_even_clients: int = 50

    def view_seconds(self, view: str) -> float:
        """Seconds of wrk on ``view``."""
        return self.sleep_seconds if view in LONG_VIEWS else self.http_seconds

    def served(self, key: str) -> list[str]:
        """The views of this run that competitor ``key`` serves, in order."""
        return [v for v in self.views if BY_KEY[key].serves(v)]

    def estimate_seconds(self) -> float:
        """A rough duration of the run, for the user's patience."""
        http = sum(
            2.5 + self.http_warmup + sum(self.view_seconds(v) + 0.6 for v in self.served(k))
            for k in self.competitors
            if self.served(k)
        )
        micro_keys = sum(1 for k in self.competitors if BY_KEY[k].in_micro) + 1
        micro = micro_keys * (1.5 + self.micro_warmup * 3 + self.micro_seconds * 3)
        # Per configuration: start, warm, two phases (pinning, warm-up, window, drain), stop.
        skewed = 2 * (6.0 + 2 * (3.0 + self.skew_warmup + self.skew_seconds))
        # Per MySQL competitor: start, warm, warm-up, its views, drains, stop.
        mysql = len(MYSQL_CONFIGS) * (
            6.0
            + self.http_warmup
            + sum(self.view_seconds(v) + 1.0 for v in mysqlbench.scenario_views(self.views))
        )
        per_round = (
            ("http" in self.scenarios) * http
            + ("micro" in self.scenarios) * micro
            + ("skewed" in self.scenarios) * skewed
            + ("mysql" in self.scenarios) * mysql
        )
        return self.rounds * per_round

    def guard_limit(self) -> int:
        """Server connections beyond which the guard kills what runs."""
        need = self.workers * self.max_conns
        if "skewed" in self.scenarios:
            need = max(need, self.skew_budget)
        return need + GUARD_MARGIN


class Run:
    """One benchmark run: the server, the sampler, the records collected so far."""

    def __init__(self, config: Config, server: Server, tools: dict[str, str]) -> None:
        self.config = config
        self.server = server
        self.tools = tools
        self.dbname = DBNAME
        self.records: list[dict[str, Any]] = []
        self.guard_limit = config.guard_limit()
        self.guard_tripped: list[str] = []
        #: Competitors left out of this run, and why (an option this package refuses).
        self.skipped: dict[str, str] = {}
        #: The MySQL server of the ``mysql`` scenario ({} when not run; "skipped": why).
        self.mysql: dict[str, Any] = {}
        self._active: list[subprocess.Popen[Any]] = []
        self._active_gunicorn: Gunicorn | None = None
        self.sampler = ConnectionSampler(server, DBNAME)
        self.sampler.guard(self.guard_limit, self._on_guard)

    # ----------------------------------------------------------- guard

    def _on_guard(self, total: int) -> None:
        """Called from the sampler thread: kill what runs now, by PID."""
        message = f"{total} server connections > {self.guard_limit}: competitor killed"
        self.guard_tripped.append(message)
        print(f"\n  GUARD: {message}", flush=True)
        gunicorn = self._active_gunicorn
        pids = list(gunicorn.worker_pids()) if gunicorn is not None else []
        pids += [p.pid for p in self._active if p.poll() is None]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _check_guard(self, key: str) -> None:
        if self.guard_tripped:
            raise RuntimeError(f"{key}: " + "; ".join(self.guard_tripped))

    # ----------------------------------------------------------- environment

    def child_env(self, key: str, hide_psycopg: bool, host: str, port: str) -> dict[str, str]:
        """The environment of a competitor's process."""
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", bench_env.REEXEC_MARK)
            and not k.startswith("DGPB_")
        }
        env.update(
            DGPB_COMPETITOR=key,
            DGPB_HOST=host,
            DGPB_PORT=port,
            DGPB_USER=self.server.user,
            DGPB_PASSWORD=self.server.password,
            DGPB_MAX_CONNS=str(self.config.max_conns),
        )
        if hide_psycopg:
            env["PYTHONPATH"] = str(BENCH_DIR / "psycopg2_only")
        return env

    def micro_env(self, key: str) -> dict[str, str]:
        """The environment of ``micro.py`` for ``key`` (a competitor or ``ours-bare``)."""
        hide = BY_KEY[key].hide_psycopg if key in BY_KEY else False
        return self.child_env(key, hide, self.server.host, self.server.port)

    def register(self, proc: subprocess.Popen[Any]) -> None:
        """Remember a process the guard may have to kill."""
        self._active.append(proc)

    def settle(self) -> int:
        """Forget the processes (they have ended); wait until the server drained; return left."""
        self._active.clear()
        return self.server.wait_drained(self.dbname)

    # ----------------------------------------------------------- micro

    def micro_round(self, round_no: int, keys: list[str]) -> None:
        """Every micro competitor once, each in its own process."""
        for key in keys:
            print(f"  micro  {key:<16}", end="", flush=True)
            try:
                with self.sampler.window() as peaks:
                    result = run_micro(
                        sys.executable,
                        self.micro_env(key),
                        key,
                        self.config.micro_greenlets,
                        self.config.micro_warmup,
                        self.config.micro_seconds,
                        TMP / f"micro-{key}-{round_no}.log",
                        on_start=self.register,
                    )
            finally:
                self.settle()
            self._check_guard(key)
            check_micro_wait(key, result)
            check_pool_mode(f"micro {key}", result)
            loops = [k for k in (*LOOPS, *STATEMENT_LOOPS) if k in result]
            record = {
                "scenario": "micro",
                "round": round_no,
                "competitor": key,
                "query_ops_per_s": result["query"]["ops_per_s"],
                "uncontended_ops_per_s": result["query_uncontended"]["ops_per_s"],
                "noop_us": result["noop"]["us_per_op"],
                # Through Django only: one ORM statement per op, the "request" kept open.
                "statement_us": _us_per_op(result, "statement"),
                "statement_busy_us": _us_per_op(result, "statement_busy"),
                # Ours only: the same statement given back each time, and held (atomic()).
                "released_us": result.get("interleaved", {}).get("released_us"),
                "held_us": result.get("interleaved", {}).get("held_us"),
                "errors": sum(result[k]["errors"] for k in loops),
                "first_error": next(
                    (result[k]["first_error"] for k in loops if result[k]["first_error"]), None
                ),
                "peak_total": peaks.total,
                "samples": peaks.samples,
                "detail": result,
            }
            self.records.append(record)
            statement = ""
            if record["statement_us"] is not None:
                statement = (
                    f"  pk statement {record['statement_us']:>6.1f} us"
                    f" ({record['statement_busy_us'] or 0:>5.1f} busy)"
                )
            if record["released_us"] is not None and record["held_us"] is not None:
                statement += (
                    f", released {record['released_us']:.1f} / held {record['held_us']:.1f} us"
                )
            print(
                f"{record['query_ops_per_s']:>9.0f} ops/s  uncontended "
                f"{record['uncontended_ops_per_s']:>6.0f} ops/s  checkout+return "
                f"{record['noop_us']:>6.1f} us{statement}  errors {record['errors']}  "
                f"server conns {peaks.total}",
                flush=True,
            )

    # ----------------------------------------------------------- http

    @contextlib.contextmanager
    def serving(self, key: str, log_name: str) -> Iterator[tuple[Gunicorn, int]]:
        """Competitor ``key`` up (PgBouncer too, if it is its), workers checked, pools full.

        Yields the gunicorn and the number of wrk connections to use. Stops
        everything it started, by PID, and waits for the server connections
        to drain, however the block ends.
        """
        competitor = BY_KEY[key]
        config = self.config
        bouncer_dir: str | None = None
        bouncer: PgBouncer | None = None
        gunicorn: Gunicorn | None = None
        try:
            host, port = self.server.host, self.server.port
            if competitor.pgbouncer:
                bouncer_dir = tempfile.mkdtemp(prefix="dgpb-pgbouncer-")
                bouncer = PgBouncer(
                    self.tools["pgbouncer"],
                    self.server,
                    self.dbname,
                    config.workers * config.max_conns,
                    Path(bouncer_dir),
                )
                self.register(bouncer.proc)
                host, port = HOST, str(bouncer.port)
            http_port = free_port()
            env = self.child_env(key, competitor.hide_psycopg, host, port)
            env.update(
                DGPB_BIND=f"{HOST}:{http_port}",
                DGPB_WORKERS=str(config.workers),
                DGPB_WORKER_CONNECTIONS=str(
                    config.max_conns if competitor.capped_by_gunicorn else 1000
                ),
                DGPB_WSGI_APP=(
                    "benchapp.rawapp:application"
                    if competitor.raw_app
                    else "benchapp.wsgi:application"
                ),
            )
            gunicorn = Gunicorn(sys.executable, env, http_port, TMP / f"{log_name}.log")
            self.register(gunicorn.proc)
            self._active_gunicorn = gunicorn
            check_workers(competitor, gunicorn.wait_ready(config.workers))
            in_every_worker(http_port, "/warm/", config.workers)
            clients = (
                config.workers * config.max_conns
                if competitor.capped_by_gunicorn
                else config.clients
            )
            yield gunicorn, clients
        finally:
            self._active_gunicorn = None
            if gunicorn is not None:
                gunicorn.stop()
            if bouncer is not None:
                bouncer.stop()
            if bouncer_dir is not None:
                shutil.rmtree(bouncer_dir, ignore_errors=True)
            left = self.settle()
            if left:
                print(f"  warning: {left} server connections left after {key}", flush=True)
        self._check_guard(key)

    def http_competitor(self, round_no: int, key: str) -> None:
        """One competitor: start it, fill it, drive the views it serves, stop it."""
        competitor = BY_KEY[key]
        config = self.config
        wrk = self.tools["wrk"]
        views = config.served(key)
        if not views:
            return
        line = [f"  http   {key:<16}"]
        with self.serving(key, f"gunicorn-{key}-{round_no}") as (gunicorn, clients):
            port = gunicorn.port
            run_wrk(wrk, port, views[0], clients, config.http_warmup, ITEMS)
            self.between_measurements(port, competitor)
            for view in views:
                if competitor.ours:
                    pool_counters(port, config.workers)  # from now on
                with self.sampler.window() as peaks:
                    result = run_wrk(wrk, port, view, clients, config.view_seconds(view), ITEMS)
                result.update(
                    scenario="http",
                    round=round_no,
                    competitor=key,
                    peak_total=peaks.total,
                    peak_per_worker=peaks.per_worker(f"{APPNAME_PREFIX}-{key}-"),
                    peak_by_name=peaks.per_name,
                    busy_share=peaks.busy_share(),
                    states=peaks.states,
                    samples=peaks.samples,
                )
                self.between_measurements(port, competitor)
                if competitor.ours:
                    # Once the requests wrk gave up on ended too: checkouts and requests
                    # begun, both counted by the workers over the same window.
                    result["pool"] = pool_counters(port, config.workers)
                self.records.append(result)
                line.append(
                    f"{view} {result['rps']:>6.0f}/s p99 {result['p99_ms']:>6.1f}ms "
                    f"err {result['errors']} conns {peaks.total}"
                )
        print(" | ".join(line), flush=True)

    def between_measurements(self, port: int, competitor: Competitor) -> None:
        """Free what the last wrk run's clients left behind, before the next run.

        First wait until the workers run none of the requests wrk gave up on
        (they may still be queued in the worker, or sleeping off the server in
        the wait view) and the server runs nothing for this competitor (the
        sleep view leaves half a second of them, which would land in the next
        view's latencies). Then ``gc.collect()`` in every worker closes the per-greenlet persistent
        connections of finished greenlets (Django stock, CONN_MAX_AGE=60), and
        wait, bounded, until the server shows no more than the pools keep (none
        for the stock backend), collecting again while it does not.
        """
        config = self.config
        if not requests_done(port, config.workers) or not self.server.wait_quiet(self.dbname):
            print(f"  warning: {competitor.key} still busy 10 s after wrk stopped", flush=True)
        at_most = 0 if competitor.capped_by_gunicorn else config.workers * config.max_conns
        for _ in range(5):
            in_every_worker(port, "/collect/", config.workers)
            if self.server.wait_drained(self.dbname, limit=1.0, at_most=at_most) <= at_most:
                return
        print(f"  warning: {competitor.key} keeps more than {at_most} connections", flush=True)

    # ----------------------------------------------------------- all

    def execute(self) -> None:
        """All rounds of all scenarios."""
        config = self.config
        for key in config.competitors:
            why = unavailable(key)
            if why is not None:
                self.skipped[key] = why
                print(f"  skipped {key}: {why}", flush=True)
        http_keys = [k for k in config.competitors if k not in self.skipped]
        micro_keys = [k for k in http_keys if BY_KEY[k].in_micro]
        if "ours" in micro_keys:
            micro_keys.insert(micro_keys.index("ours"), MICRO_BARE)
        locks = skewed.lock_root() if "skewed" in config.scenarios else None
        mysql = mysqlbench.setup(self) if "mysql" in config.scenarios else None
        if mysql is not None:
            self.mysql = {
                "server": f"{mysql.host}:{mysql.port}",
                "version": mysql.version,
                "skipped": mysql.skipped,
            }
        try:
            for round_no in range(config.rounds):
                print(f"round {round_no + 1}/{config.rounds}", flush=True)
                if "micro" in config.scenarios:
                    self.micro_round(round_no, rotate(micro_keys, round_no))
                if "http" in config.scenarios:
                    self.server_sleep_rate(round_no)
                    for key in rotate([k for k in http_keys if config.served(k)], round_no):
                        self.http_competitor(round_no, key)
                if locks is not None:
                    skewed.skewed_round(self, round_no, locks)
                if mysql is not None and mysql.skipped is None:
                    mysqlbench.mysql_round(self, round_no, mysql)
        finally:
            if locks is not None:
                skewed.remove_lock_root(locks)
            if mysql is not None:
                mysqlbench.teardown(mysql)

    def server_sleep_rate(self, round_no: int) -> None:
        """The sleep view's real ceiling this round: the server alone, MAX_CONNS per worker."""
        config = self.config
        rate = self.server.sleep_rate(
            self.dbname, config.workers * config.max_conns, SLEEP_SECONDS, per_connection=10
        )
        self.records.append({"scenario": "server", "round": round_no, "sleep_rps": rate})
        print(f"  server alone: {rate:.0f} pg_sleep({SLEEP_SECONDS})/s", flush=True)


def rotate(keys: list[str], by: int) -> list[str]:
    """``keys`` rotated left by ``by`` (so no competitor always runs first)."""
    if not keys:
        return keys
    by %= len(keys)
    return keys[by:] + keys[:by]


def check_workers(competitor: Competitor, infos: list[dict[str, Any]]) -> None:
    """Refuse to measure a competitor whose workers do not run what it claims."""
    for info in infos:
        problems = []
        if info["driver"] != competitor.driver:
            problems.append(f"driver {info['driver']} (expected {competitor.driver})")
        if competitor.driver == "psycopg2" and not info["psycopg2_wait_callback"]:
            problems.append("psycopg2 has no gevent wait callback")
        wait = info.get("psycopg_wait")
        if competitor.driver == "psycopg" and (wait is None or wait.endswith(".wait_c")):
            # wait_c (psycopg's C wait) blocks the whole worker on every query.
            problems.append(f"psycopg 3 waits with {wait} (not gevent-friendly)")
        if competitor.key == OURS_PSYCOPG3 and "django_gevent_pool" not in str(wait):
            problems.append(f"psycopg 3 waits with {wait}, not ours")
        if competitor.ours and "django_gevent_pool" not in info["engine"]:
            problems.append(f"engine {info['engine']}")
        problem = pool_mode_problem(info)
        if problem:
            problems.append(problem)
        if problems:
            raise RuntimeError(f"{competitor.key}, worker {info['pid']}: " + ", ".join(problems))


def check_micro_wait(key: str, result: dict[str, Any]) -> None:
    """Refuse a micro result of a psycopg 3 competitor whose psycopg 3 wait blocks the hub."""
    competitor = BY_KEY.get(key)
    if competitor is None or competitor.driver != "psycopg":
        return
    wait = result.get("psycopg_wait")
    if wait is None or wait.endswith(".wait_c"):
        raise RuntimeError(f"micro {key}: psycopg 3 waits with {wait} (not gevent-friendly)")
    if key == OURS_PSYCOPG3 and "django_gevent_pool" not in wait:
        raise RuntimeError(f"micro {key}: psycopg 3 waits with {wait}, not ours")


def pool_mode_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with a transaction-mode pool that kept a connection after a statement.

    ``info`` has ``pool_mode`` (the OPTIONS asked for) and ``lent_after_statement``
    (our pool's connections in use right after one ORM statement in
    autocommit, in the same request): transaction mode gives the connection
    back when the statement ends, so it must be 0.
    """
    if info.get("pool_mode") != "transaction":
        return None
    lent = info.get("lent_after_statement")
    if lent != 0:
        return (
            f'POOL_MODE="transaction" accepted, but {lent} connection(s) still lent after one '
            "statement in autocommit (expected 0: given back when the statement ends)"
        )
    return None


def check_pool_mode(where: str, info: dict[str, Any]) -> None:
    """Refuse a transaction-mode measurement whose pool does not give connections back."""
    problem = pool_mode_problem(info)
    if problem:
        raise RuntimeError(f"{where}: {problem}")


def _us_per_op(result: dict[str, Any], loop: str) -> float | None:
    value = result.get(loop, {}).get("us_per_op")
    return None if value is None else float(value)


def pool_counters(port: int, workers: int) -> dict[str, float] | None:
    """Our pools' counters since the last call, summed over every worker (None if not ours).

    ``served`` is the requests the workers began over the same window.
    """
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(60):
        try:
            answer = get_json(port, "/poolstats/", timeout=30)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise RuntimeError(f"/poolstats/ failed: {exc!r}") from exc
        seen.setdefault(int(answer["pid"]), answer)
        if len(seen) >= workers:
            break
    if all(answer["stats"] is None for answer in seen.values()):
        return None
    total: dict[str, float] = {"served": float(sum(a["served"] for a in seen.values()))}
    for answer in seen.values():
        for name, value in (answer["stats"] or {}).items():
            if not name.startswith(("requests_", "connections_", "returns_", "pins_", "sessions_")):
                continue
            if "_max_" in name or "_wait_p" in name:  # maxima and percentiles: the worst worker
                total[name] = max(total.get(name, 0.0), value)
            else:  # counters: all workers together
                total[name] = total.get(name, 0.0) + value
    return total


def requests_done(port: int, workers: int, limit: float = 10.0) -> bool:
    """Wait (bounded) until every worker's last ``/inflight/`` says no view request runs."""
    deadline = time.monotonic() + limit
    running: dict[int, int] = {}
    while True:
        try:
            answer = get_json(port, "/inflight/", timeout=limit)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise RuntimeError(f"/inflight/ failed: {exc!r}") from exc
        running[int(answer["pid"])] = int(answer["running"])
        if len(running) >= workers and not any(running.values()):
            return True
        if time.monotonic() >= deadline:
            return False
        if any(running.values()):
            time.sleep(0.02)


def in_every_worker(port: int, path: str, workers: int, attempts: int = 60) -> None:
    """GET ``path`` on fresh connections until every worker has answered it once."""
    seen: set[int] = set()
    for _ in range(attempts):
        try:
            seen.add(int(get_json(port, path, timeout=30)["pid"]))
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise RuntimeError(f"{path} failed: {exc!r}") from exc
        if len(seen) >= workers:
            return
    raise RuntimeError(f"only {len(seen)} of {workers} workers answered {path}")
