"""The gevent hub is never blocked while a query runs through the pool.

As psycopg's own gevent test does it: in a fresh, monkey-patched subprocess, a
ticker greenlet counts ticks while another greenlet runs ``pg_sleep`` through a
pool. If the driver blocked the process, the ticker would stall for the whole
query and count about one tick. The scripts use the driver under test
(``DGP_TEST_DRIVER``), passed to them on their command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from .support import DRIVER

# The driver's module imported before gevent patches anything (gunicorn
# --preload, an import in gunicorn.conf.py), or after it.
DRIVER_FIRST = "import importlib, sys; importlib.import_module(sys.argv[2])\n"

SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import importlib, json, sys, time
    import gevent
    from django_gevent_pool import ConnectionPool

    db = importlib.import_module(sys.argv[2])
    # Nobody called patch_psycopg2() or patch_psycopg(): the pool must make
    # its driver cooperative itself.
    pool = ConnectionPool(lambda: db.connect(sys.argv[1]), driver=sys.argv[2],
                          options={"MAX_CONNS": 2})
    ticks = []

    def ticker():
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    def query():
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.5)")

    t = gevent.spawn(ticker)
    gevent.sleep(0)
    q = gevent.spawn(query)
    q.join()
    t.kill()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # No gap at all (None) when the query blocked the hub before a second tick.
    print(json.dumps({"ticks": len(ticks), "max_gap": max(gaps, default=None),
                      "ok": q.successful(),
                      "cooperative": pool.driver.is_cooperative(),
                      "driver": pool.driver.name}))
    """
)


@pytest.mark.parametrize("order", ["patched first", "driver imported first"])
def test_a_running_query_does_not_block_the_hub(dsn: str, order: str) -> None:
    script = (DRIVER_FIRST if order == "driver imported first" else "") + SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", script, dsn, DRIVER], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["cooperative"]
    assert result["driver"] == DRIVER
    # 0.5 s of query at a 10 ms rhythm: a blocked hub would give one or two ticks
    # and a single gap of 0.5 s.
    assert result["ticks"] >= 10
    assert result["max_gap"] is not None and result["max_gap"] < 0.4


FIRST_USE_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import importlib, json, sys, threading
    from django_gevent_pool import ConnectionPool

    db = importlib.import_module(sys.argv[2])
    # No greenlet was ever spawned: this thread has no gevent hub yet when the
    # first checkout starts the pool's background housekeeping.
    pool = ConnectionPool(lambda: db.connect(sys.argv[1]), driver=sys.argv[2],
                          options={"MAX_CONNS": 2, "IDLE_TIMEOUT": 0.2})
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    pool.putconn(conn)
    # The housekeeping runs beside us (a real thread): it closes the idle
    # connection while this thread blocks, which a greenlet could not do.
    monkey.get_original("time", "sleep")(1.0)
    print(json.dumps({"size": pool.get_stats()["pool_size"],
                      "threads": threading.active_count()}))
    """
)


def test_first_checkout_in_a_patched_script_without_a_hub_does_not_hang(dsn: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FIRST_USE_SCRIPT, dsn, DRIVER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["size"] == 0  # closed by the housekeeping after IDLE_TIMEOUT


# A patched script whose first checkout has to connect while no gevent hub
# exists yet: the connect (slow here) must still end at POOL_TIMEOUT.
NO_HUB_DEADLINE_SCRIPT = textwrap.dedent(
    """
    from gevent import monkey
    monkey.patch_all()

    import importlib, json, sys, time
    import gevent, gevent._hub_local
    from django_gevent_pool import ConnectionPool, PoolTimeout

    db = importlib.import_module(sys.argv[2])

    def slow_connect():
        gevent.sleep(3)  # a server slow to accept: the wait goes through a hub
        return db.connect(sys.argv[1])

    pool = ConnectionPool(slow_connect, driver=sys.argv[2], options={"POOL_TIMEOUT": 0.3})
    assert gevent._hub_local.get_hub_if_exists() is None, "no hub before the checkout"
    started = time.monotonic()
    try:
        pool.getconn()
        outcome = "connected"
    except PoolTimeout as exc:
        outcome = str(exc)
    stats = pool.get_stats()
    print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - started,
                      "timeouts": stats["requests_timeouts"], "size": stats["pool_size"]}))
    """
)


def test_a_connect_in_a_patched_script_without_a_hub_still_ends_at_the_deadline(
    dsn: str,
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", NO_HUB_DEADLINE_SCRIPT, dsn, DRIVER],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "connecting took longer than the checkout timeout" in result["outcome"], result
    assert 0.3 <= result["seconds"] < 2.0, result
    assert result["timeouts"] == 1 and result["size"] == 0, result
