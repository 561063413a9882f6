"""The ``skewed`` scenario: one host budget against a static split of it, under uneven load.

Two configurations of ours (psycopg2), each served in turn by its own gunicorn
of ``skew_workers`` gevent workers, with a short ``POOL_TIMEOUT``:

- **static split** (``skew-static``): each worker ``MAX_CONNS = budget / workers``,
  no ``HOST_MAX_CONNS`` -- what a deployment does without a host budget;
- **host budget** (``skew-host``): ``HOST_MAX_CONNS = MAX_CONNS = budget``,
  one ``HOST_LOCK_DIR`` for the run (under ``results/tmp/``).

Both start alike: every worker opens its share (``/warm/?n=budget/workers``),
as after a period of even load. Then two phases, each after a warm-up:

``skewed``
    ``skewload.py`` pins ``skew_busy_clients`` keep-alive connections to one
    worker (closed loop) and one to each other worker (one request every
    ``skew_light_pace`` s). Every request is ``/skewed/``: ``pg_sleep(0.05)``
    on a pooled connection. The same view everywhere: the skew is only in the
    traffic, as when a proxy's long-lived connections land on one worker.
``even``
    Right after (same processes, so the host budget starts where the skew
    left it): ``skew_even_clients`` closed-loop clients pinned to every
    worker; the budget is the bottleneck of all. The served requests per
    worker, min / max, say whether a process starves.

A 503 answering a pool timeout counts as a timeout; any other failure as an
error. Per worker, ``/poolstats/`` gives our pool's counters over each phase
(``requests_timeouts``, ``host_waits``, ``host_given_back``...), and the
sampler the peak server connections, per worker and in all.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchapp.competitors import APPNAME_PREFIX, SKEW_CONFIGS, SKEW_HOST, SKEW_STATIC

from .loads import run_skewload
from .servers import HOST, Gunicorn, free_port, get_json

if TYPE_CHECKING:
    from .runner import Run

#: Our pool's numbers kept per worker and phase (``pop_stats()``: counters since the last call).
POOL_KEYS = (
    "requests_num",
    "requests_queued",
    "requests_timeouts",
    "requests_errors",
    "requests_wait_p99_ms",
    "connections_num",
    "connections_closed",
    "pool_size",
    "host_max",
    "host_in_use",
    "host_held",
    "host_waits",
    "host_given_back",
    "host_stepped_aside",
)
PHASES = ("skewed", "even")


def plans(workers: int, busy: int, light_pace: float, even: int) -> dict[str, list[dict[str, Any]]]:
    """The clients of each phase, one entry per worker (``skewload.py``'s ``--plan``)."""
    return {
        "skewed": [
            {"group": "busy", "clients": busy, "pace": 0.0},
            *({"group": "light", "clients": 1, "pace": light_pace} for _ in range(workers - 1)),
        ],
        "even": [{"group": "even", "clients": even, "pace": 0.0} for _ in range(workers)],
    }


def skewed_round(run: Run, round_no: int, lock_root: Path) -> None:
    """Both configurations once, in an order that alternates from round to round."""
    order = [SKEW_STATIC, SKEW_HOST] if round_no % 2 == 0 else [SKEW_HOST, SKEW_STATIC]
    for key in order:
        skewed_config(run, round_no, key, lock_root)


def skewed_config(run: Run, round_no: int, key: str, lock_root: Path) -> None:
    """One configuration: its gunicorn up, warmed to the even split, both phases, stopped."""
    from .runner import TMP, check_workers, in_every_worker, requests_done

    config = run.config
    workers, budget = config.skew_workers, config.skew_budget
    share = budget // workers
    max_conns = share if key == SKEW_STATIC else budget
    port = free_port()
    env = run.child_env(key, False, run.server.host, run.server.port)
    env.update(
        DGPB_BIND=f"{HOST}:{port}",
        DGPB_WORKERS=str(workers),
        DGPB_WORKER_CONNECTIONS="1000",
        DGPB_WSGI_APP="benchapp.wsgi:application",
        DGPB_MAX_CONNS=str(max_conns),
        DGPB_POOL_TIMEOUT=str(config.skew_pool_timeout),
    )
    if key == SKEW_HOST:
        # A directory of its own per start: no lock file of an earlier run is ever met.
        lock_dir = tempfile.mkdtemp(prefix=f"round{round_no}-", dir=lock_root)
        env.update(DGPB_HOST_MAX_CONNS=str(budget), DGPB_HOST_LOCK_DIR=lock_dir)
    line = [f"  skewed {key:<16}"]
    gunicorn = Gunicorn(sys.executable, env, port, TMP / f"gunicorn-{key}-{round_no}.log")
    run.register(gunicorn.proc)
    run._active_gunicorn = gunicorn
    try:
        check_workers(SKEW_CONFIGS[key], gunicorn.wait_ready(workers))
        in_every_worker(port, f"/warm/?n={share}", workers)
        phase_plans = plans(
            workers, config.skew_busy_clients, config.skew_light_pace, config.skew_even_clients
        )
        for phase in PHASES:
            worker_stats(port, workers)  # counters from now on
            with run.sampler.window() as peaks:
                result = run_skewload(
                    sys.executable,
                    port,
                    phase_plans[phase],
                    config.skew_warmup,
                    config.skew_seconds,
                    TMP / f"skewload-{key}-{phase}-{round_no}.log",
                    on_start=run.register,
                )
            if not requests_done(port, workers) or not run.server.wait_quiet(run.dbname):
                print(f"  warning: {key} still busy 10 s after the {phase} load", flush=True)
            pool = worker_stats(port, workers)
            prefix = f"{APPNAME_PREFIX}-{key}-"
            record = {
                "scenario": "skewed",
                "phase": phase,
                "round": round_no,
                "competitor": key,
                "worker_count": workers,
                "budget": budget,
                "max_conns": max_conns,
                "host_max_conns": budget if key == SKEW_HOST else None,
                "pool_timeout": config.skew_pool_timeout,
                "plan": phase_plans[phase],
                "peak_total": peaks.total,
                "peak_per_worker": {
                    name[len(prefix) :]: n
                    for name, n in peaks.per_name.items()
                    if name.startswith(prefix)
                },
                "samples": peaks.samples,
                "pool": pool,
                "library_digest": library_digest(),
                **result,
            }
            run.records.append(record)
            line.append(phase_line(record))
    finally:
        run._active_gunicorn = None
        gunicorn.stop()
        left = run.settle()
        if left:
            print(f"  warning: {left} server connections left after {key}", flush=True)
    print(" | ".join(line), flush=True)
    if run.guard_tripped:
        raise RuntimeError(f"{key}: " + "; ".join(run.guard_tripped))


def phase_line(record: dict[str, Any]) -> str:
    """One phase in a few numbers, for the progress output."""
    groups = record["groups"]
    if record["phase"] == "skewed":
        busy, light = groups.get("busy", {}), groups.get("light", {})
        return (
            f"skewed: busy {busy.get('rps', 0):.0f}/s p99 {busy.get('p99_ms') or 0:.0f}ms "
            f"timeouts {busy.get('timeouts', 0)}, light timeouts {light.get('timeouts', 0)} "
            f"err {busy.get('errors', 0) + light.get('errors', 0)}, conns {record['peak_total']}"
        )
    served = [w["served"] for w in record["workers"].values()]
    even = groups.get("even", {})
    ratio = min(served) / max(served) if served and max(served) else 0.0
    return (
        f"even: {even.get('rps', 0):.0f}/s timeouts {even.get('timeouts', 0)} "
        f"per worker {'/'.join(str(n) for n in sorted(served))} (min/max {ratio:.2f}), "
        f"conns {record['peak_total']}"
    )


def worker_stats(port: int, workers: int) -> dict[str, dict[str, float]]:
    """Each worker's pool numbers since the last call, by PID (``/poolstats/``)."""
    seen: dict[str, dict[str, float]] = {}
    # A new connection each time: the kernel picks the worker. One still busy
    # with the phase's last requests accepts rarely: ask for 30 s at most.
    deadline = time.monotonic() + 30.0
    for _ in range(1000 * workers):
        if time.monotonic() > deadline:
            break
        try:
            answer = get_json(port, "/poolstats/", timeout=30)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise RuntimeError(f"/poolstats/ failed: {exc!r}") from exc
        pid = str(answer["pid"])
        if pid in seen:
            time.sleep(0.005)
            continue
        stats = answer["stats"] or {}
        seen[pid] = {"served": float(answer["served"])}
        seen[pid].update({k: float(stats[k]) for k in POOL_KEYS if k in stats})
        if len(seen) >= workers:
            return seen
    raise RuntimeError(f"only {len(seen)} of {workers} workers answered /poolstats/")


def library_digest() -> str:
    """A short digest of the measured package's sources (the working tree, installed -e)."""
    import django_gevent_pool

    digest = hashlib.sha256()
    for path in sorted(Path(django_gevent_pool.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def lock_root() -> Path:
    """This run's directory of host-budget lock directories, under ``results/tmp/``."""
    from .runner import TMP

    TMP.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"hostlock-{time.strftime('%Y%m%d-%H%M%S')}-", dir=TMP))


def remove_lock_root(path: Path) -> None:
    """Remove the lock directories (every process that held them has ended)."""
    shutil.rmtree(path, ignore_errors=True)
