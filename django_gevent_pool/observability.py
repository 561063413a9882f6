"""Observability from inside the serving process: stats, a periodic log line, a view, a middleware.

Everything here is optional and reads what the pools already keep; nothing
is added to a checkout. All of it is per process: under gunicorn, each worker
has its own pools and reports only those.

- :func:`pool_stats`: every pool of this process by alias (``get_stats()`` of each).
- :func:`start_stats_log` / :func:`stop_stats_log`: one INFO line per pool every
  ``interval`` seconds, with the counts now and the counters since the last line.
- :func:`configure_from_settings`: reads ``settings.DJANGO_GEVENT_POOL`` and
  starts the log and the Prometheus collector it asks for.
- :func:`stats_view`: a JSON view of :func:`pool_stats`, to mount behind your own auth.
- :class:`ServerTimingMiddleware`: a ``Server-Timing`` response header with the
  time the request waited for connections.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started
from django.http import HttpRequest, HttpResponseBase, HttpResponseNotAllowed, JsonResponse
from django.views.decorators.cache import never_cache
from greenlet import getcurrent as _getcurrent

from . import sync, timing
from .backends.base import all_stats, get_pool, registry
from .pool import ConnectionPool

__all__ = [
    "GAUGE_KEYS",
    "SETTING",
    "ServerTimingMiddleware",
    "configure_from_settings",
    "pool_stats",
    "start_stats_log",
    "stats_view",
    "stop_stats_log",
]

logger = logging.getLogger("django_gevent_pool")

#: The Django setting read by :func:`configure_from_settings`.
SETTING = "DJANGO_GEVENT_POOL"
_SETTING_KEYS = ("PROMETHEUS", "STATS_LOG_INTERVAL")

#: Keys of ``get_stats()`` that are a value now, not a count since the pool was
#: made (or since the last ``pop_stats()``). Every other key is a counter.
#: ``requests_wait_max_ms`` is a maximum: it only grows until ``pop_stats()``.
GAUGE_KEYS = frozenset(
    {
        "pool_min",
        "pool_max",
        "pool_size",
        "pool_available",
        "pool_in_use",
        "pool_opening",
        "requests_waiting",
        "requests_wait_max_ms",
        "requests_wait_p50_ms",
        "requests_wait_p95_ms",
        "requests_wait_p99_ms",
        # With a host budget (HOST_MAX_CONNS): its size, the slots held on the
        # whole host (-1: the lock file cannot be read), those this process holds.
        "host_max",
        "host_in_use",
        "host_held",
    }
)

# How long stop() waits for a line being written by the loop to be finished.
_STOP_GRACE = 1.0


# ------------------------------------------------------------------ stats


def pool_stats(alias: str | None = None) -> dict[str, dict[str, float]]:
    """``get_stats()`` of every pool of this process by alias, or of ``alias`` only.

    A pool is made the first time its alias connects, so an alias that has
    not connected yet in this process is absent: ``pool_stats("replica")`` is
    ``{}`` until then. The keys are the pool's own (see ``ConnectionPool.get_stats``).
    """
    if alias is None:
        return all_stats()
    pool = get_pool(alias)
    return {} if pool is None else {alias: pool.get_stats()}


def _counter_keys(stats: Mapping[str, float]) -> list[str]:
    return [key for key in stats if key not in GAUGE_KEYS]


class _Deltas:
    """Per alias, how much each counter grew since the previous :meth:`take`.

    The pool's counters are never reset here (other readers need them): the
    previous snapshot is kept and subtracted. A pool seen for the first time,
    or replaced by a new one for the same alias, counts from zero. If
    something else reset the pool's counters with ``pop_stats()`` meanwhile
    (seen as a counter or ``requests_wait_max_ms`` going down), the counts
    since that reset are taken whole; what happened between the previous take
    and the reset is lost. Not thread-safe: the caller serialises.
    """

    def __init__(self) -> None:
        self._prev: dict[str, tuple[weakref.ref[ConnectionPool], dict[str, float]]] = {}

    def take(
        self, alias: str, pool: ConnectionPool, stats: Mapping[str, float]
    ) -> dict[str, float]:
        prev_record = self._prev.get(alias)
        prev = prev_record[1] if prev_record is not None and prev_record[0]() is pool else None
        keys = _counter_keys(stats)
        if prev is not None and (
            any(stats[key] < prev.get(key, 0.0) for key in keys)
            or stats.get("requests_wait_max_ms", 0.0) < prev.get("requests_wait_max_ms", 0.0)
        ):
            prev = None  # reset by pop_stats() since the previous take
        deltas = {key: stats[key] - (prev.get(key, 0.0) if prev else 0.0) for key in keys}
        self._prev[alias] = (weakref.ref(pool), dict(stats))
        return deltas

    def forget_except(self, aliases: set[str]) -> None:
        """Drop the snapshots of aliases that have no pool any more."""
        for alias in list(self._prev):
            if alias not in aliases:
                del self._prev[alias]


def _current_pools() -> dict[str, ConnectionPool]:
    return {str(alias): pool for alias, pool in registry.pools().items()}


# ------------------------------------------------------------- stats log

# The stats log running in this process (at most one), and whether a fork
# happened since it started: the child gets a loop of its own (see _after_fork).
_lock = sync.allocate_lock()
_current: _StatsLog | None = None
_configured: _StatsLog | None = None  # the one configure_from_settings() started
_restart_after_fork = False


class _StatsLog:
    """One periodic stats log: its interval, logger, and counters at its last line."""

    def __init__(self, interval: float, log: logging.Logger) -> None:
        self.interval = interval
        self.logger = log
        self.pid = os.getpid()
        self.stopped = False
        self._emitting = False
        self._emitter: Any = None
        self._first_tick = True
        self._baseline()

    def _baseline(self) -> None:
        """Counters now are what the first line subtracts."""
        self._deltas = _Deltas()
        for alias, pool in _current_pools().items():
            self._deltas.take(alias, pool, pool.get_stats())
        self._last_line_at = time.monotonic()

    def tick(self) -> float | None:
        """Run by ``sync.run_periodically``: write the lines, return the next delay or None."""
        if os.getpid() != self.pid:
            # A loop that survived a fork: it becomes the child's log (counting
            # from now), unless the child has one already.
            return self.interval if self._adopt_after_fork() else None
        self._emitting = True  # before the check: stop() waits for this line to be done
        try:
            if self.stopped:
                return None
            if self._first_tick:
                # run_periodically calls at once; the baseline was just taken.
                self._first_tick = False
                return self.interval
            self._emitter = _getcurrent()
            try:
                self._write_lines()
            except Exception:  # keep logging on the next tick
                logger.exception("django_gevent_pool stats log: writing the lines failed")
            finally:
                self._emitter = None
        finally:
            self._emitting = False
        return self.interval

    def _adopt_after_fork(self) -> bool:
        """In a forked child where this loop survived (a greenlet does): become its log."""
        global _restart_after_fork
        with _lock:  # critical section: one log per process
            if _current is not self or self.stopped or not _restart_after_fork:
                return False
            _restart_after_fork = False
            self.pid = os.getpid()
        self._baseline()
        return True

    def _write_lines(self) -> None:
        now = time.monotonic()
        elapsed, self._last_line_at = now - self._last_line_at, now
        pools = _current_pools()
        self._deltas.forget_except(set(pools))
        for alias, pool in sorted(pools.items()):
            stats = pool.get_stats()
            deltas = self._deltas.take(alias, pool, stats)
            host, host_args, host_last, host_last_args = _host_parts(stats, deltas)
            self.logger.info(
                "pool %r: size=%d/%d in_use=%d idle=%d opening=%d waiting=%d" + host + " | last "
                "%.1f s: checkouts=%d queued=%d wait_ms=%.3f timeouts=%d too_many=%d errors=%d "
                "opened=%d connect_errors=%d lost=%d closed=%d bad_returns=%d rolled_back=%d "
                "pings=%d sessions=%d pins=%d" + host_last + " | wait_p50_ms=%.3f wait_p99_ms=%.3f",
                alias,
                stats["pool_size"],
                stats["pool_max"],
                stats["pool_in_use"],
                stats["pool_available"],
                stats["pool_opening"],
                stats["requests_waiting"],
                *host_args,
                elapsed,
                deltas.get("requests_num", 0),
                deltas.get("requests_queued", 0),
                deltas.get("requests_wait_ms", 0.0),
                deltas.get("requests_timeouts", 0),
                deltas.get("requests_too_many", 0),
                deltas.get("requests_errors", 0),
                deltas.get("connections_num", 0),
                deltas.get("connections_errors", 0),
                deltas.get("connections_lost", 0),
                deltas.get("connections_closed", 0),
                deltas.get("returns_bad", 0),
                deltas.get("returns_rolled_back", 0),
                deltas.get("pings", 0),
                deltas.get("sessions_num", 0),
                sum(v for k, v in deltas.items() if k.startswith("pins_")),
                *host_last_args,
                stats.get("requests_wait_p50_ms", 0.0),
                stats.get("requests_wait_p99_ms", 0.0),
                extra={
                    "pool_alias": alias,
                    "pool_stats": stats,
                    "pool_deltas": deltas,
                    "pool_elapsed": elapsed,
                },
            )

    def stop(self) -> None:
        """Stop this log; no line is written after this returns. Idempotent.

        A line being written by the loop at that moment is waited for (at most
        a second). The loop itself ends at its next tick, without writing.
        """
        global _current, _configured
        self.stopped = True
        with _lock:  # critical section: forget it
            if _current is self:
                _current = None
            if _configured is self:
                _configured = None
        if self.pid != os.getpid() or self._emitter is _getcurrent():
            return  # a loop of the parent process, or called from a log handler of the line
        sleep = sync.cooperative_sleep()
        deadline = time.monotonic() + _STOP_GRACE
        while self._emitting and time.monotonic() < deadline:
            sleep(0.005)


def _host_parts(
    stats: Mapping[str, float], deltas: Mapping[str, float]
) -> tuple[str, tuple[Any, ...], str, tuple[Any, ...]]:
    """The host budget's parts of a log line (format, arguments), empty without a budget.

    ``host=5/16 held=2``: slots held on the whole host out of HOST_MAX_CONNS
    (``?`` when the lock file cannot be read), and those this process holds
    (its aliases sharing the budget together); then, since the previous line,
    ``host_waits``, ``given_back`` and ``stepped_aside``.
    """
    if "host_max" not in stats:
        return "", (), "", ()
    in_use = stats.get("host_in_use", -1)
    return (
        " host=%s/%d held=%d",
        ("?" if in_use < 0 else str(int(in_use)), stats["host_max"], stats.get("host_held", 0)),
        " host_waits=%d given_back=%d stepped_aside=%d",
        (
            deltas.get("host_waits", 0),
            deltas.get("host_given_back", 0),
            deltas.get("host_stepped_aside", 0),
        ),
    )


def start_stats_log(
    interval: float = 60.0, *, logger_name: str = "django_gevent_pool.stats"
) -> Callable[[], None]:
    """Log one INFO line per pool of this process every ``interval`` s; return a stop function.

    Each line gives the counts now (size/max, in use, idle, opening, waiting;
    with a host budget also ``host=IN_USE/HOST_MAX_CONNS held=N``: the slots
    held on the whole host, ``?`` when its lock file cannot be read, and those
    this process holds), the counters since the previous line (checkouts,
    queued, total queued wait, timeouts, errors, connections opened/lost/closed,
    bad returns, rollbacks, pings; with a host budget ``host_waits``,
    ``given_back`` and ``stepped_aside``; the pool's own counters are not reset, the previous
    values are subtracted) and the p50/p99 of the time the latest (up to 2048)
    checkouts took to get a connection. The numbers also travel on the log
    record as ``pool_alias``, ``pool_stats``, ``pool_deltas`` and
    ``pool_elapsed``, for structured log formatters. The first lines come one
    interval after the start; an alias that has not connected yet has no line.

    One log per process: a second call replaces the first (the new interval
    and logger take effect; the old stop function then does nothing). The
    loop is a greenlet when the calling thread runs a gevent hub, else a
    daemon thread.

    Fork: a child process (gunicorn worker, Celery prefork child) gets a log
    of its own with the same interval and logger, counting its own pools:
    started at its first Django request (``request_started``), or by the loop
    itself when it survived the fork (a greenlet does; a thread does not).
    A child that serves no Django request and runs no gevent loop (Celery
    prefork) should call this function again after the fork, e.g. in
    ``worker_process_init``.

    Raises ``ValueError`` if ``interval`` is not a number > 0.
    """
    if not _valid_interval(interval):
        raise ValueError(f"interval must be a number of seconds > 0, got {interval!r}")
    return _start(float(interval), logger_name).stop


def _start(interval: float, logger_name: str, *, configured: bool = False) -> _StatsLog:
    """Start a log replacing the running one; ``configured``: on behalf of the settings."""
    global _current, _configured, _restart_after_fork
    log = _StatsLog(interval, logging.getLogger(logger_name))
    with _lock:  # critical section: one log per process
        old, _current = _current, log
        if configured:
            _configured = log
        _restart_after_fork = False
    if old is not None:
        old.stop()
    request_started.connect(_restart_in_forked_child, dispatch_uid=__name__ + ".restart")
    sync.run_periodically(log.tick, name="django_gevent_pool stats log")
    return log


def stop_stats_log() -> bool:
    """Stop the stats log of this process; True if one was running."""
    log = _current
    if log is None:
        return False
    log.stop()
    return True


def _valid_interval(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value > 0
    )


def _restart_in_forked_child(**_kwargs: Any) -> None:
    """``request_started`` receiver: the first request of a forked child restarts the log.

    One boolean test per request in the common case.
    """
    global _restart_after_fork
    if not _restart_after_fork:
        return
    with _lock:  # critical section: restart once
        log = _current
        if not _restart_after_fork or log is None or log.stopped:
            return
        _restart_after_fork = False
    _start(log.interval, log.logger.name, configured=log is _configured)


def _after_fork_in_child() -> None:
    """The parent's loop does not run here (a thread) or must not count for us (a greenlet)."""
    global _lock, _restart_after_fork
    _lock = sync.allocate_lock()  # another thread may have held it at the fork
    log = _current
    _restart_after_fork = log is not None and not log.stopped


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------- settings


def configure_from_settings() -> None:
    """Apply ``settings.DJANGO_GEVENT_POOL``; called when the app is ready.

    The setting is optional; all its keys are::

        DJANGO_GEVENT_POOL = {
            "STATS_LOG_INTERVAL": 60.0,  # seconds > 0: start_stats_log(); None (default): off
            "PROMETHEUS": True,          # register the collector in prometheus_client's REGISTRY
        }

    Everything is validated before anything starts: a value of the wrong
    kind, or an unknown key, raises ``ImproperlyConfigured`` naming the
    setting, the key and what is allowed (``PROMETHEUS`` without
    ``prometheus_client`` installed too). Calling it again applies the
    settings again: the stats log is replaced, or stopped if the interval is
    now None and this function started it; registering the collector is
    idempotent (``PROMETHEUS: False`` does not unregister one).
    """
    from django.conf import settings

    raw = getattr(settings, SETTING, None)
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ImproperlyConfigured(
            f"{SETTING} must be a dict with the keys {', '.join(_SETTING_KEYS)}, got {raw!r}"
        )
    for key in raw:
        if key not in _SETTING_KEYS:
            raise ImproperlyConfigured(
                f"{SETTING}[{key!r}] is not a known key; allowed: {', '.join(_SETTING_KEYS)}"
            )
    interval = raw.get("STATS_LOG_INTERVAL")
    if interval is not None and not _valid_interval(interval):
        raise ImproperlyConfigured(
            f"{SETTING}['STATS_LOG_INTERVAL'] must be a number of seconds > 0 or None, "
            f"got {interval!r}"
        )
    prometheus = raw.get("PROMETHEUS", False)
    if not isinstance(prometheus, bool):
        raise ImproperlyConfigured(
            f"{SETTING}['PROMETHEUS'] must be True or False, got {prometheus!r}"
        )
    register: Callable[[], Any] | None = None
    if prometheus:
        try:
            from .prometheus import register_collector
        except ImportError as exc:
            raise ImproperlyConfigured(
                f"{SETTING}['PROMETHEUS'] is True but prometheus_client cannot be imported "
                f"({exc}); pip install django-gevent-pool[prometheus]"
            ) from exc
        register = register_collector

    if interval is not None:
        _start(float(interval), "django_gevent_pool.stats", configured=True)
    else:
        started = _configured
        if started is not None:
            started.stop()
    if register is not None:
        register()


# ------------------------------------------------------------------ view


@never_cache
def stats_view(request: HttpRequest) -> HttpResponseBase:
    """GET: this process's pool stats as JSON, never cached; other methods get 405.

    ``{"pid": 4242, "time": 1764052800.5, "pools": {"default": {...}}}``:
    ``time`` is the Unix time of the snapshot, ``pools`` is :func:`pool_stats`
    (``?alias=default`` for one alias). Under gunicorn each request reaches
    one worker, so this shows that worker's pools only (hence ``pid``).

    It has no access control of its own: the stats reveal load and
    configuration, so mount it behind yours, for example::

        from django.contrib.admin.views.decorators import staff_member_required
        path("ops/pool-stats/", staff_member_required(stats_view))
    """
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    alias = request.GET.get("alias") or None
    return JsonResponse({"pid": os.getpid(), "time": time.time(), "pools": pool_stats(alias)})


# ------------------------------------------------------------ middleware


class ServerTimingMiddleware:
    """Add the time the request waited for (and held) database connections as ``Server-Timing``.

    ``Server-Timing: db-pool;dur=12.345;desc="3 checkouts"``: ``dur`` is the
    milliseconds this request's checkouts spent getting a connection (queueing
    behind a busy pool, plus connecting or pinging when that was needed) and
    ``desc`` how many checkouts it made, on every pool; then
    ``db-held;dur=4.567;desc="0 pins"``: the milliseconds its connections were
    held, counted as they came back before the response was made, and how
    many times transaction mode pinned one. In transaction mode
    (``POOL_MODE``) that is nearly all of them, one checkout per statement or
    transaction outside pins; in session mode a request makes one checkout
    per alias and gives it back at ``request_finished``, after the response:
    ``db-held`` is then 0. A checkout that failed
    counts too, with all the time it waited: the 500 of a request whose
    checkout timed out says ``dur`` = the timeout. A ``Server-Timing``
    header set by the view or an inner middleware is kept: the metric is
    appended to it after a comma. Put it first in ``MIDDLEWARE`` to count the
    checkouts of the other middleware too.

    Streaming responses: headers leave before the body, so the metric covers
    the checkouts made until the view returned, not those made while the body
    is generated.

    Synchronous only: gevent deployments are WSGI (gunicorn gevent workers).
    Under ASGI, Django would run it in a thread through ``sync_to_async`` on
    every request; don't use it there. The tally lives in a context variable
    (per greenlet, per thread): greenlets spawned by the view are not counted.
    """

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        tally, token = timing.start_tally()
        try:
            response = self.get_response(request)
        finally:
            # Also when the view raised through Django's handler (or was killed):
            # the tally must not leak into what this greenlet or thread does next.
            timing.stop_tally(token)
        n, pins = tally.checkouts, tally.pins
        metric = (
            f'db-pool;dur={tally.seconds * 1000.0:.3f};desc="{n} checkout{"" if n == 1 else "s"}", '
            f'db-held;dur={tally.held * 1000.0:.3f};desc="{pins} pin{"" if pins == 1 else "s"}"'
        )
        existing = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{existing}, {metric}" if existing else metric
        return response
