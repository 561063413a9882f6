"""The pool's counters and checkout-time percentiles.

Counters are plain numbers in a dict, changed by the pool under its lock; the
latest checkout times go into a bounded deque (appends are atomic: no lock).
Key names follow psycopg_pool where they fit.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from .pinning import REASONS

#: Counters, reset by ``pop_stats()``.
COUNTERS = (
    "requests_num",
    "requests_queued",
    "requests_wait_ms",
    "requests_wait_max_ms",
    "requests_timeouts",
    "requests_too_many",
    "requests_errors",
    "connections_num",
    "connections_ms",
    "connections_errors",
    "connections_lost",
    "connections_closed",
    "returns_bad",
    "returns_rolled_back",
    "pings",
    "usage_ms",
    "sessions_num",
    "host_waits",
    "host_given_back",
    "host_stepped_aside",
    *("pins_" + reason for reason in REASONS),
)

#: The wait percentiles cover this many of the latest checkouts.
WAIT_SAMPLES = 2048


def new_counters() -> dict[str, float]:
    """Every counter at zero."""
    return dict.fromkeys(COUNTERS, 0)


def new_samples() -> deque[float]:
    """An empty, bounded record of the latest checkouts' times in seconds."""
    return deque(maxlen=WAIT_SAMPLES)


def with_percentiles(snap: dict[str, Any], samples: list[float]) -> dict[str, float]:
    """``snap`` with ``requests_wait_p50_ms``, ``_p95_ms`` and ``_p99_ms`` of ``samples``.

    Nearest rank: the smallest sample with at least p% of them at or below
    it; 0 when there are no samples.
    """
    ordered = sorted(samples)
    for p in (50, 95, 99):
        key = f"requests_wait_p{p}_ms"
        if ordered:
            rank = max(1, -(-len(ordered) * p // 100))
            snap[key] = ordered[rank - 1] * 1000.0
        else:
            snap[key] = 0.0
    return snap
