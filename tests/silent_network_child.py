"""The pool on a silent network, in a process of its own: run by tests/test_silent_network.py.

``python -m tests.silent_network_child SCENARIO PROXIED_DSN DIRECT_DSN APP_NAME``
with ``DGP_TEST_MODE`` set. The parent owns the loopback proxy: a line
``STALL`` or ``RESUME`` on stdout asks it to stop or restart forwarding, and
it answers ``OK`` on stdin. The last line is ``RESULT {json}``.

A process of its own because the failure being tested is a frozen process:
a ticker (a greenlet, or an OS thread in threads mode) appends the time every
10 ms, and the largest gap between ticks is how long the process stood still.
If it freezes for good, the parent resumes the proxy after its own bound,
which unfreezes it, and the gap tells how long it stood.
"""

# ruff: noqa: E402 (gevent must patch the process before the other imports)
from __future__ import annotations

import os
import sys

MODE = os.environ.get("DGP_TEST_MODE", "gevent")
if MODE == "gevent":
    from gevent import monkey

    monkey.patch_all()

import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg2

from django_gevent_pool import ConnectionPool, PoolError

from .support import DRIVER, connect, db

SCENARIO, PROXIED, DIRECT, APP = sys.argv[1:5]
WORKERS = 24
ticks: list[float] = [time.monotonic()]
_ticking = [True]


def _tick() -> None:
    while _ticking[0]:
        ticks.append(time.monotonic())
        time.sleep(0.01)


def max_gap(since: float) -> float:
    """The longest the process stood still since ``since`` (to now)."""
    times = [t for t in ticks if t >= since] + [time.monotonic()]
    before = [t for t in ticks if t < since]
    if before:
        times.insert(0, before[-1])
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def spawn(func: Callable[[], Any]) -> Any:
    if MODE == "gevent":
        import gevent

        return gevent.spawn(func)
    thread = threading.Thread(target=func, daemon=True)
    thread.start()
    return thread


def alive(handle: Any) -> bool:
    return not handle.dead if MODE == "gevent" else bool(handle.is_alive())


def join_all(handles: list[Any], timeout: float) -> int:
    """Join within ``timeout`` s in all; how many are still running."""
    deadline = time.monotonic() + timeout
    for handle in handles:
        handle.join(max(0.0, deadline - time.monotonic()))
    return sum(alive(h) for h in handles)


def control(word: str) -> None:
    """Ask the parent to STALL or RESUME the proxy; wait for its OK."""
    print(word, flush=True)
    if MODE == "gevent":
        from gevent.socket import wait_read

        wait_read(sys.stdin.fileno(), timeout=30)
    line = sys.stdin.readline().strip()
    assert line == "OK", line


def new_pool(**options: Any) -> ConnectionPool:
    # A plain thread cannot be interrupted in a connect: libpq's connect_timeout
    # bounds it (README's recipe). Under gevent the checkout's deadline does.
    extra = {} if MODE == "gevent" else {"connect_timeout": 2}
    return ConnectionPool(
        lambda: connect(PROXIED, application_name=APP, **extra),
        driver=DRIVER,
        name=APP,
        options=options,
    )


def served_after_resume(pool: ConnectionPool) -> float:
    """RESUME, then seconds until a checkout and a query succeed (bounded: 10 s)."""
    control("RESUME")
    resumed = time.monotonic()
    while time.monotonic() - resumed < 10:
        try:
            with pool.connection(timeout=1.0) as conn, conn.cursor() as cur:
                cur.execute("SELECT 1")
                cur.fetchone()
            return time.monotonic() - resumed
        except db.Error:
            time.sleep(0.02)
    return float("inf")


def outcome(exc: BaseException | None) -> str:
    """The name of what ended a worker: "ok", a pool error's class, "Timeout" (gevent's),
    or "OperationalError" for any of the driver's (psycopg 3 raises subclasses of it:
    ``ConnectionTimeout`` for a connect past its connect_timeout)."""
    if exc is not None and type(exc).__name__ not in ("PoolTimeout", "Timeout"):
        print(f"worker error: {exc!r}", file=sys.stderr, flush=True)
    if exc is None:
        return "ok"
    if isinstance(exc, db.OperationalError) and not isinstance(exc, PoolError):
        return "OperationalError"
    return type(exc).__name__


def running_sleeps(admin: Any, count: int) -> None:
    """Wait (at most 10 s) until ``count`` of our backends run pg_sleep."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
                [APP],
            )
            if cur.fetchone()[0] >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"{count} queries never ran")


# ---------------------------------------------------------------- scenarios


def scenario_ping() -> dict[str, Any]:
    """The issue's pool: an idle connection, then silence, then 24 checkouts."""
    pool = new_pool(MAX_CONNS=2, PING_AFTER=0, POOL_TIMEOUT=2)
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT 1")
    control("STALL")
    stalled = time.monotonic()
    results: list[tuple[str, float]] = []

    def checkout() -> None:
        started = time.monotonic()
        exc: BaseException | None = None
        try:
            if MODE == "gevent":
                import gevent

                with gevent.Timeout(8):  # the caller's own bound, as in the issue
                    pool.putconn(pool.getconn())
            else:
                pool.putconn(pool.getconn())
        except BaseException as error:  # recorded: the parent asserts on it
            exc = error
        results.append((outcome(exc), time.monotonic() - started))

    handles = [spawn(checkout) for _ in range(WORKERS)]
    left = join_all(handles, 20)
    gap = max_gap(stalled)
    served = served_after_resume(pool)
    return {
        "outcomes": sorted({o for o, _ in results}),
        "longest": max((d for _, d in results), default=None),
        "finished": len(results),
        "left": left,
        "gap": gap,
        "served": served,
        "stats": pool.get_stats(),
    }


def scenario_cancel() -> dict[str, Any]:
    """Queries running when the network goes silent, then stopped by their callers."""
    pool = new_pool(MAX_CONNS=WORKERS + 1, POOL_TIMEOUT=5)
    admin = psycopg2.connect(DIRECT)
    admin.autocommit = True
    ends: list[tuple[str, float]] = []
    severed: list[tuple[Any, int]] = []

    def query(sql: str, bound: float | None) -> None:
        exc: BaseException | None = None
        conn, lease = pool.checkout()
        try:
            if bound is None:
                # Returned by somebody else while running: with the lease, as
                # a return from another greenlet must name the checkout.
                severed.append((conn, lease))
                with conn.cursor() as cur:
                    cur.execute(sql)
            else:
                import gevent

                with gevent.Timeout(bound), conn.cursor() as cur:
                    cur.execute(sql)
        except BaseException as error:  # recorded: the parent asserts on it
            exc = error
        ends.append((outcome(exc), time.monotonic()))
        if bound is not None:
            # Broken when the wait failed (psycopg2 closes it; psycopg 3's
            # interrupted wait cancels the query and cuts it): discarded.
            pool.putconn(conn)

    # Stopped by their own gevent.Timeout (gevent) and returned by somebody
    # else while running (both modes: putconn on an ACTIVE connection).
    timed = 20 if MODE == "gevent" else 0
    severable = WORKERS - timed
    handles = [spawn(lambda: query("SELECT pg_sleep(30)", 3.0)) for _ in range(timed)]
    handles += [spawn(lambda: query("SELECT pg_sleep(30)", None)) for _ in range(severable)]
    running_sleeps(admin, WORKERS)
    control("STALL")
    stalled = time.monotonic()
    returns = []
    for conn, lease in list(severed):
        started = time.monotonic()
        pool.putconn(conn, lease=lease)  # ACTIVE: cancelled and cut
        returns.append(time.monotonic() - started)
    left = join_all(handles, 20)
    gap = max_gap(stalled)
    served = served_after_resume(pool)
    admin.close()
    return {
        "outcomes": sorted({o for o, _ in ends}),
        "latest_end": max((t - stalled for _, t in ends), default=None),
        "finished": len(ends),
        "severed": len(returns),
        "longest_return": max(returns, default=None),
        "left": left,
        "gap": gap,
        "served": served,
        "stats": pool.get_stats(),
    }


def scenario_close() -> dict[str, Any]:
    """Discarding, returning and closing connections while the network is silent."""
    pool = new_pool(MAX_CONNS=WORKERS, POOL_TIMEOUT=5)
    conns = [pool.getconn() for _ in range(WORKERS)]
    for conn in conns:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        conn.commit()
    for conn in conns[: WORKERS // 2]:
        pool.putconn(conn)  # idle in the pool
    in_transaction = conns[WORKERS // 2]
    with in_transaction.cursor() as cur:
        cur.execute("SELECT 1")  # left open: its return rolls back
    control("STALL")
    stalled = time.monotonic()
    pool.putconn(in_transaction)  # the rollback gets no answer
    rolled_back = time.monotonic()
    for conn in conns[WORKERS // 2 + 1 : -4]:
        pool.putconn(conn, discard=True)
    pool.close()  # closes the idle ones
    for conn in conns[-4:]:
        pool.putconn(conn)  # returned after close: closed
    done = time.monotonic()
    gap = max_gap(stalled)
    control("RESUME")
    return {
        "rollback": rolled_back - stalled,
        "took": done - rolled_back,
        "gap": gap,
        "stats": pool.get_stats(),
    }


def scenario_recipe() -> dict[str, Any]:
    """README's recipe: a query on a network that goes silent under it fails within its bound."""
    import gevent

    pool = new_pool(MAX_CONNS=2, POOL_TIMEOUT=5)
    admin = psycopg2.connect(DIRECT)
    admin.autocommit = True
    result: dict[str, Any] = {}

    def request() -> None:
        started = time.monotonic()
        try:
            with pool.connection() as conn:
                with gevent.Timeout(2.0), conn.cursor() as cur:
                    cur.execute("SELECT pg_sleep(1)")
        except gevent.Timeout:
            result["outcome"] = "Timeout"
        except BaseException as exc:  # recorded: the parent asserts on it
            result["outcome"] = type(exc).__name__
        result["took"] = time.monotonic() - started

    job = spawn(request)
    running_sleeps(admin, 1)
    control("STALL")  # the answer to the running query never comes
    stalled = time.monotonic()
    left = join_all([job], 10)
    gap = max_gap(stalled)
    before = pool.get_stats()
    served = served_after_resume(pool)
    admin.close()
    return {
        **result,
        "left": left,
        "gap": gap,
        "served": served,
        "before": before,
        "after": pool.get_stats(),
    }


def main() -> None:
    ticker = spawn(_tick)
    result = globals()[f"scenario_{SCENARIO}"]()
    _ticking[0] = False
    ticker.join(1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
