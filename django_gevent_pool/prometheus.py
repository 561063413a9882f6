"""A Prometheus collector for the pools of this process (optional extra ``prometheus``).

::

    from django_gevent_pool.prometheus import register_collector
    register_collector()   # or DJANGO_GEVENT_POOL = {"PROMETHEUS": True}

Every metric is labelled by ``alias`` and prefixed ``django_gevent_pool_``.
Current counts are gauges (the ``host_*`` ones only for aliases with a host
budget, ``HOST_MAX_CONNS``); the pool's counters are exported as counters that
only go up: the collector keeps its own totals and adds what each pool's
counters grew by since the previous scrape, so a ``pop_stats()`` somewhere
else (which resets the pool's counters) or a pool replaced after a settings
change does not make them go down. What happened between the previous scrape
and such a reset is lost.

Per process: under gunicorn each worker has its own pools, and a scrape that
reaches one worker sees that worker's pools only. prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) does not run custom
collectors like this one. Scrape each worker on its own port instead (see
README.rst, "Observability"), or run one worker per container.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Iterator, Mapping

try:
    from prometheus_client import REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "django_gevent_pool.prometheus needs prometheus_client: "
        "pip install django-gevent-pool[prometheus]"
    ) from exc

from . import sync
from .observability import _Deltas
from .pinning import REASONS
from .pool import ConnectionPool

__all__ = ["COUNTERS", "GAUGES", "PINS", "QUANTILES", "PoolCollector", "register_collector"]

logger = logging.getLogger("django_gevent_pool")

_PREFIX = "django_gevent_pool_"

#: Gauges: stats key -> (metric name without prefix, help, scale to the metric's unit).
GAUGES: dict[str, tuple[str, str, float]] = {
    "pool_min": ("connections_min", "MIN_CONNS: connections kept open.", 1.0),
    "pool_max": ("connections_max", "MAX_CONNS: most connections open at once.", 1.0),
    "pool_size": ("connections", "Open connections: idle + in use + opening.", 1.0),
    "pool_available": ("connections_idle", "Idle connections, ready to lend.", 1.0),
    "pool_in_use": ("connections_in_use", "Connections lent out.", 1.0),
    "pool_opening": ("connections_opening", "Connections being opened.", 1.0),
    "requests_waiting": ("requests_waiting", "Checkouts queued for a connection now.", 1.0),
    "requests_wait_max_ms": (
        "requests_wait_max_seconds",
        "Longest queued checkout wait since the pool was made or its last pop_stats().",
        0.001,
    ),
    # Only for aliases with a host budget (OPTIONS['HOST_MAX_CONNS']).
    "host_max": (
        "host_max_connections",
        "HOST_MAX_CONNS: most connections open at once by all processes of this host sharing "
        "the budget (same server, database and user).",
        1.0,
    ),
    "host_in_use": (
        "host_connections_in_use",
        "Slots of the host budget held by all processes of this host (absent when its lock "
        "file cannot be read).",
        1.0,
    ),
    "host_held": (
        "host_connections_held",
        "Slots of the host budget held by this process (all its aliases sharing the budget).",
        1.0,
    ),
}

#: The checkout-time percentiles: stats key -> quantile label.
QUANTILES: dict[str, str] = {
    "requests_wait_p50_ms": "0.5",
    "requests_wait_p95_ms": "0.95",
    "requests_wait_p99_ms": "0.99",
}

#: Counters: stats key -> (metric name without prefix and ``_total``, help, scale).
COUNTERS: dict[str, tuple[str, str, float]] = {
    "requests_num": ("requests", "Checkouts asked for.", 1.0),
    "requests_queued": ("requests_queued", "Checkouts that had to queue.", 1.0),
    "requests_wait_ms": (
        "requests_wait_seconds",
        "Seconds queued checkouts spent in the queue.",
        0.001,
    ),
    "requests_timeouts": ("requests_timeouts", "Checkouts that timed out (PoolTimeout).", 1.0),
    "requests_too_many": (
        "requests_too_many",
        "Checkouts refused because MAX_WAITING were queued (TooManyRequests).",
        1.0,
    ),
    "requests_errors": (
        "requests_errors",
        "Checkouts failed by the pool (timeouts, too many waiting, connect backoff).",
        1.0,
    ),
    "connections_num": ("connections_opened", "Connections opened.", 1.0),
    "connections_ms": (
        "connections_connect_seconds",
        "Seconds spent opening connections, failed attempts included.",
        0.001,
    ),
    "connections_errors": ("connections_errors", "Connection attempts that failed.", 1.0),
    "connections_lost": (
        "connections_lost",
        "Connections found dead (server restart, terminated backend, network).",
        1.0,
    ),
    "connections_closed": ("connections_closed", "Connections closed by the pool.", 1.0),
    "returns_bad": ("returns_bad", "Connections discarded when given back, as broken.", 1.0),
    "returns_rolled_back": (
        "returns_rolled_back",
        "Connections returned in a transaction and rolled back.",
        1.0,
    ),
    "pings": ("pings", "Round trips made to check a connection before lending it.", 1.0),
    "usage_ms": (
        "connections_usage_seconds",
        "Seconds connections spent lent out, counted when they are given back.",
        0.001,
    ),
    "sessions_num": (
        "sessions",
        "Units of work served (requests, tasks); checkouts per unit = requests / sessions.",
        1.0,
    ),
    "host_waits": (
        "host_waits",
        "Checkouts that queued for a slot of the host budget (HOST_MAX_CONNS); 0 without one.",
        1.0,
    ),
    "host_given_back": (
        "host_given_back",
        "Idle connections closed early because another process of the host waited for a "
        "slot of the budget; 0 without one.",
        1.0,
    ),
    "host_stepped_aside": (
        "host_stepped_aside",
        "Returned connections closed instead of lent again, so that a process of the host "
        "below its share of the budget could have the slot; 0 without one.",
        1.0,
    ),
}

#: The pins of transaction mode, one counter labelled by reason (``pins_<reason>`` keys).
PINS = (
    "pins",
    "Transaction-mode connections kept by their borrower, by reason (session state, "
    "open named cursor, pinned()).",
)


def _django_pools() -> Mapping[str, ConnectionPool]:
    from .backends.base import registry

    return {str(alias): pool for alias, pool in registry.pools().items()}


class PoolCollector(Collector):
    """Yields the stats of every pool of this process, labelled by alias.

    ``pools`` returns the pools to report by alias; by default the Django
    backend's pools. Safe to collect from several threads or greenlets at
    once. After a fork the totals start again from the child's own pools.
    """

    def __init__(self, pools: Callable[[], Mapping[str, ConnectionPool]] | None = None) -> None:
        self._pools = pools or _django_pools
        # An OS lock: the sections below read the pools' stats and add, no I/O.
        # Renewed in a forked child (another thread may have held it at the fork).
        self._lock = sync.allocate_lock()
        self._reset()
        _collectors.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._deltas = _Deltas()
        self._totals: dict[str, dict[str, float]] = {}

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (lets the registry check names at once)."""
        gauges, quantiles, counters, pins = self._families()
        yield from gauges.values()
        yield quantiles
        yield from counters.values()
        yield pins

    def collect(self) -> Iterator[Metric]:
        """One sample per alias for every metric."""
        gauges, quantiles, counters, pins = self._families()
        with self._lock:  # critical section: snapshot the pools, add to the totals
            if self._pid != os.getpid():
                self._reset()  # a forked child: its pools started afresh
            pools = dict(self._pools())
            rows = []
            for alias, pool in sorted(pools.items()):
                stats = pool.get_stats()
                totals = self._totals.setdefault(alias, {})
                for key, grown in self._deltas.take(alias, pool, stats).items():
                    totals[key] = totals.get(key, 0.0) + grown
                rows.append((alias, stats, dict(totals)))
        for alias, stats, totals in rows:
            for key, (_name, _help, scale) in GAUGES.items():
                # host_in_use is -1 when the budget's lock file cannot be read: no sample.
                if key in stats and stats[key] >= 0:
                    gauges[key].add_metric([alias], stats[key] * scale)
            for key, quantile in QUANTILES.items():
                if key in stats:
                    quantiles.add_metric([alias, quantile], stats[key] * 0.001)
            for key, (_name, _help, scale) in COUNTERS.items():
                if key in totals:
                    counters[key].add_metric([alias], totals[key] * scale)
            for reason in REASONS:
                key = "pins_" + reason
                if key in totals:
                    pins.add_metric([alias, reason], totals[key])
        yield from gauges.values()
        yield quantiles
        yield from counters.values()
        yield pins

    def _families(
        self,
    ) -> tuple[
        dict[str, GaugeMetricFamily],
        GaugeMetricFamily,
        dict[str, CounterMetricFamily],
        CounterMetricFamily,
    ]:
        gauges = {
            key: GaugeMetricFamily(_PREFIX + name, doc, labels=["alias"])
            for key, (name, doc, _scale) in GAUGES.items()
        }
        quantiles = GaugeMetricFamily(
            _PREFIX + "checkout_seconds",
            "Time the latest checkouts (up to 2048) took to get a connection, waiting or not.",
            labels=["alias", "quantile"],
        )
        counters = {
            key: CounterMetricFamily(_PREFIX + name, doc, labels=["alias"])
            for key, (name, doc, _scale) in COUNTERS.items()
        }
        pins = CounterMetricFamily(_PREFIX + PINS[0], PINS[1], labels=["alias", "reason"])
        return gauges, quantiles, counters, pins


_registered: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = (
    weakref.WeakKeyDictionary()
)
_lock = sync.allocate_lock()
_collectors: weakref.WeakSet[PoolCollector] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """New locks in a forked child: a scrape in another thread may have held one at the fork.

    A lock inherited held would block the child's first scrape for good (a
    frozen worker under gevent). The totals start again from the child's pools.
    """
    global _lock
    _lock = sync.allocate_lock()
    for collector in list(_collectors):
        collector._lock = sync.allocate_lock()
        collector._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register_collector(registry: CollectorRegistry | None = None) -> PoolCollector:
    """Register a :class:`PoolCollector` in ``registry`` (default: prometheus_client's REGISTRY).

    Idempotent: a second call for the same registry returns the collector
    registered the first time. When ``PROMETHEUS_MULTIPROC_DIR`` is set, a
    warning says that the metrics are this process's only: prometheus_client's
    multiprocess mode leaves custom collectors out of what it aggregates.
    """
    target = REGISTRY if registry is None else registry
    with _lock:  # critical section: one collector per registry
        collector = _registered.get(target)
        if collector is not None:
            return collector
        collector = _registered[target] = PoolCollector()
    try:
        # Outside our lock: the registry takes its own, which gevent may have patched.
        target.register(collector)
    except BaseException:
        with _lock:  # critical section: undo the reservation
            if _registered.get(target) is collector:
                del _registered[target]
        raise
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        logger.warning(
            "PROMETHEUS_MULTIPROC_DIR is set, but prometheus_client's multiprocess mode does "
            "not aggregate custom collectors: the django_gevent_pool_* metrics are those of "
            "the process that answers the scrape only"
        )
    return collector
