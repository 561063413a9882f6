"""Fork safety (gunicorn --preload, Celery prefork, multiprocessing).

In a subprocess: a pool and a Django connection are used in the parent, then
the process forks. The child must get its own connections, and nothing it does
with the inherited ones (returning them, closing the pool, garbage collection)
may end the parent's sessions: closing a libpq connection sends a Terminate
message on the socket the two processes share. The scripts use the driver
under test (``DGP_TEST_DRIVER``: psycopg2 or psycopg 3), given on their
command line, for the pools and for Django's engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from .support import DRIVER, ENGINE

SCRIPT = textwrap.dedent(
    """
    import sys
    if sys.argv[2] == "gevent":
        from gevent import monkey
        monkey.patch_all()

    import gc, importlib, json, os
    import django
    from django.conf import settings
    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.devserver import django_settings

    dsn, app = sys.argv[1], f"dgp-fork-{os.getpid()}"
    driver, engine = sys.argv[3], sys.argv[4]
    db = importlib.import_module(driver)
    settings.configure(DATABASES={"default": {
        "ENGINE": engine,
        **django_settings(dsn), "OPTIONS": {"MAX_CONNS": 2, "application_name": app + "-dj"},
    }})
    django.setup()
    from django.db import connection

    def pid(conn):
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            return cur.fetchone()[0]

    pool = ConnectionPool(lambda: db.connect(dsn, application_name=app), driver=driver,
                          options={"MAX_CONNS": 3})
    a, b = pool.getconn(), pool.getconn()
    a.autocommit = b.autocommit = True
    parent = [pid(a), pid(b), pid(connection)]  # the Django connection stays held
    pool.putconn(a)                             # a idle, b in use
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        c = pool.getconn()
        c.autocommit = True
        out = {"pool": pid(c), "django": pid(connection)}
        pool.putconn(c)
        pool.putconn(b)          # lent before the fork: must not reach the parent's session
        connection.close()
        pool.close()
        del a, b, c, pool
        gc.collect()
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.waitpid(child, 0)
    got = json.loads(os.read(r, 4096))
    a2 = pool.getconn()
    print(json.dumps({"parent": parent, "child": got, "same_a": a2 is a,
                      "a": pid(a2), "b": pid(b), "django": pid(connection),
                      "driver": [type(a).__module__, connection.connection.__class__.__module__]}))
    """
)


@pytest.mark.parametrize("mode", ["plain", "gevent"])
def test_a_forked_child_never_uses_or_closes_the_parents_connections(dsn: str, mode: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, dsn, mode, DRIVER, ENGINE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    parent = result["parent"]
    child = result["child"]
    assert child["pool"] not in parent
    assert child["django"] not in parent
    # The parent's sessions survived the child's returns, close() and GC.
    assert result["same_a"]
    assert [result["a"], result["b"], result["django"]] == parent
    # The pool's and Django's connections were the driver's under test.
    assert all(module.split(".")[0] == DRIVER for module in result["driver"]), result["driver"]


REGISTRY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    from django_gevent_pool.registry import PoolRegistry

    registry = PoolRegistry()
    inside, release = threading.Event(), threading.Event()

    def hold_the_lock():
        with registry._lock:  # another thread is in a critical section at the fork
            inside.set()
            release.wait(10)

    threading.Thread(target=hold_the_lock, daemon=True).start()
    inside.wait(10)
    pid = os.fork()
    if pid == 0:
        got = registry._lock.acquire(timeout=2)
        if got:
            registry._lock.release()
        os.write(1, (json.dumps({"child_got_lock": got, "pools": len(registry.pools())})
                     + "\\n").encode())
        os._exit(0)
    release.set()
    os.waitpid(pid, 0)
    """
)


def test_a_registry_lock_held_by_another_thread_at_fork_is_free_in_the_child() -> None:
    out = subprocess.run(
        [sys.executable, "-c", REGISTRY_SCRIPT], capture_output=True, text=True, timeout=20
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"child_got_lock": True, "pools": 0}


COLLECTOR_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, threading
    from prometheus_client import CollectorRegistry
    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.prometheus import register_collector

    class Conn:
        closed = 0
        def close(self):
            self.closed = 1

    pool = ConnectionPool(Conn, driver=sys.argv[1], name="fork", background=False)
    registry = CollectorRegistry()
    collector = register_collector(registry)
    collector._pools = lambda: {"fork": pool}
    inside, release = threading.Event(), threading.Event()

    def scrape_in_progress():
        with collector._lock:  # a scrape of another thread is mid-way at the fork
            inside.set()
            release.wait(10)

    threading.Thread(target=scrape_in_progress, daemon=True).start()
    inside.wait(10)
    pid = os.fork()
    if pid == 0:
        import signal
        signal.alarm(5)  # a blocked scrape kills the child instead of hanging the test
        names = [m.name for m in registry.collect()]
        again = register_collector(registry) is collector
        os.write(1, (json.dumps({"metrics": len(names), "same": again}) + "\\n").encode())
        os._exit(0)
    release.set()
    os.waitpid(pid, 0)
    """
)


def test_a_prometheus_scrape_in_progress_at_fork_does_not_block_the_childs_scrapes() -> None:
    pytest.importorskip("prometheus_client")
    # No Django settings there: the script needs none, and loading the suite's
    # would start an embedded server in a child that leaves by os._exit.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", COLLECTOR_SCRIPT, DRIVER],
        capture_output=True,
        text=True,
        timeout=20,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines, f"the child's scrape never returned: {out.stderr}"
    result = json.loads(lines[-1])
    assert result["metrics"] > 10 and result["same"] is True


IN_FLIGHT_SCRIPT = textwrap.dedent(
    """
    import sys
    from gevent import monkey
    monkey.patch_all()

    import importlib, json, os, time
    import gevent
    from django_gevent_pool import ConnectionPool, PoolClosed, PoolTimeout

    dsn = sys.argv[1]  # through a proxy that delays every connect by 1 s
    db = importlib.import_module(sys.argv[2])
    pool = ConnectionPool(lambda: db.connect(dsn), driver=sys.argv[2], name="fork",
                          options={"MAX_CONNS": 2, "POOL_TIMEOUT": 10})
    held = pool.getconn()
    connecting = gevent.spawn(pool.getconn)  # the second slot: a connect in flight
    queued = gevent.spawn(pool.getconn)      # MAX_CONNS reached: queued
    deadline = time.monotonic() + 5
    while pool.get_stats()["requests_waiting"] < 1 or pool.get_stats()["pool_opening"] < 1:
        assert time.monotonic() < deadline, pool
        gevent.sleep(0.01)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        started = time.monotonic()
        out = {}
        for name, glet in (("queued", queued), ("connecting", connecting)):
            glet.join(5)
            exc = glet.exception
            out[name] = [type(exc).__name__, str(exc), round(time.monotonic() - started, 2)]
        pool.check_invariants()
        out["size_after"] = pool.get_stats()["pool_size"]
        a, b = pool.getconn(), pool.getconn()  # the child's own MAX_CONNS
        try:
            pool.getconn(timeout=0.2)
            out["third"] = "lent"
        except PoolTimeout:
            out["third"] = "PoolTimeout"
        pool.check_invariants()
        for conn in (a, b):
            pool.putconn(conn)
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    connecting.join(5)
    second = connecting.value
    pool.putconn(held)
    queued.join(5)
    pool.check_invariants()
    parent = {"connecting_ok": second is not None and not second.closed,
              "queued_ok": queued.value is not None}
    with second.cursor() as cur:
        cur.execute("SELECT 1")
        parent["second_works"] = cur.fetchone()[0] == 1
    os.waitpid(pid, 0)
    child = json.loads(os.read(r, 65536))
    print(json.dumps({"child": child, "parent": parent}))
    """
)


def test_a_fork_with_a_checkout_queued_and_one_connecting(dsn: str) -> None:
    """Both fail fast in the child and leave its counts alone; the parent's go on."""
    from .proxy import Proxy

    with Proxy(dsn) as proxy:
        proxy.connect_delay = 1.0
        out = subprocess.run(
            [sys.executable, "-c", IN_FLIGHT_SCRIPT, proxy.dsn(), DRIVER],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    child, parent = result["child"], result["parent"]
    for name in ("queued", "connecting"):
        kind, message, after = child[name]
        assert kind == "PoolClosed", child
        assert "began before the process forked" in message
        assert after < 1.5, f"{name} failed only after {after} s"
    assert child["size_after"] == 0
    assert child["third"] == "PoolTimeout", "the child's cap is MAX_CONNS, not one more"
    assert parent == {"connecting_ok": True, "queued_ok": True, "second_works": True}


TX_SCRIPT = textwrap.dedent(
    """
    import sys
    if sys.argv[2] == "gevent":
        from gevent import monkey
        monkey.patch_all()

    import json, os
    import django
    from django.conf import settings
    from django_gevent_pool.devserver import django_settings

    dsn, engine = sys.argv[1], sys.argv[3]
    settings.configure(DATABASES={"default": {
        "ENGINE": engine, **django_settings(dsn),
        "OPTIONS": {"MAX_CONNS": 2, "POOL_MODE": "transaction",
                    "application_name": f"dgp-fork-tx-{os.getpid()}"},
    }})
    django.setup()
    from django.db import connection

    def one(sql):
        with connection.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0] if cur.description else None

    one("SELECT 1")                              # a statement: the connection went back
    one("SET statement_timeout = '3333ms'")      # pinned: held, with session state
    parent = one("SELECT pg_backend_pid()")
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        out = {"held": connection.connection is not None, "pid": one("SELECT pg_backend_pid()"),
               "timeout": one("SHOW statement_timeout")}
        connection.close()
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.waitpid(child, 0)
    got = json.loads(os.read(r, 4096))
    print(json.dumps({"parent": parent, "child": got, "pid": one("SELECT pg_backend_pid()"),
                      "timeout": one("SHOW statement_timeout")}))
    """
)


@pytest.mark.parametrize("mode", ["plain", "gevent"])
def test_a_fork_in_a_pinned_transaction_mode_session(dsn: str, mode: str) -> None:
    """The child starts a session of its own; the parent's pinned one keeps its state."""
    out = subprocess.run(
        [sys.executable, "-c", TX_SCRIPT, dsn, mode, ENGINE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["child"]["held"] is False
    assert result["child"]["pid"] != result["parent"]
    assert result["child"]["timeout"] == "0"
    assert result["pid"] == result["parent"]
    assert result["timeout"] == "3333ms"
