"""psycopg 3 made cooperative under gevent whatever the import order (drivers.psycopg_waiting).

Most claims depend on the order in which psycopg and gevent's monkey-patching
come, so they are proved in fresh subprocesses, as psycopg's own gevent test
does: a ticker greenlet records the time every 10 ms while other greenlets
talk to PostgreSQL; a blocked hub shows up as one long gap between ticks.
Each such test also runs a control (the same script without the patch, or
without part of it) whose gap, deadlock or surviving query shows that the
test can fail. Server-side claims are checked in ``pg_stat_activity``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from .proxy import Proxy
from .support import is_gevent, next_app_name

# Every subprocess is bounded: a hang fails the test instead of stalling CI.
SUBPROCESS_TIMEOUT = 45.0  # below the suite's per-test limit: a hang fails with output
# A ticker at 10 ms never waits this long unless something blocked the hub.
MAX_GAP = 0.25


def run_script(script: str, *args: str, timeout: float = SUBPROCESS_TIMEOUT) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; return the JSON of its last output line."""
    out = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    lines = out.stdout.strip().splitlines()
    assert lines, out.stderr
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# psycopg imported before gevent patches anything (gunicorn --preload, an
# import in gunicorn.conf.py): psycopg has chosen its blocking C wait.
IMPORT_BEFORE = """
import json, os, sys, time
import psycopg
from gevent import monkey
monkey.patch_all()
import gevent
from django_gevent_pool.drivers import psycopg_waiting
"""

# psycopg imported after the patching: psycopg chose gevent-aware waits itself.
IMPORT_AFTER = """
import json, os, sys, time
from gevent import monkey
monkey.patch_all()
import gevent
import psycopg
from django_gevent_pool.drivers import psycopg_waiting
"""

TICKER = """
ticks = []

def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

def max_gap(start, end):
    # The longest stretch between start and end with no tick: a blocked hub.
    points = [start] + [t for t in ticks if start < t < end] + [end]
    return max(b - a for a, b in zip(points, points[1:]))

ticking = gevent.spawn(ticker)
gevent.sleep(0.05)
"""


def script(imports: str, body: str) -> str:
    return textwrap.dedent(imports) + textwrap.dedent(TICKER) + textwrap.dedent(body)


# ---------------------------------------------------------------- 1. queries

QUERY_SCRIPT = script(
    IMPORT_BEFORE,
    """
    dsn, mode = sys.argv[1], sys.argv[2]
    if mode == "patch":
        psycopg_waiting.patch_psycopg()
    conn = psycopg.connect(dsn, autocommit=True)
    start = time.monotonic()
    query = gevent.spawn(lambda: conn.execute("SELECT pg_sleep(1)").fetchone())
    query.join(10)
    end = time.monotonic()
    ticking.kill()
    print(json.dumps({
        "ok": query.successful(), "error": repr(query.exception), "seconds": end - start,
        "max_gap": max_gap(start, end), "cooperative": psycopg_waiting.is_psycopg_cooperative(),
    }))
    """,
)


@pytest.mark.gevent_only
def test_psycopg_imported_before_patch_all_is_made_cooperative(dsn: str) -> None:
    patched = run_script(QUERY_SCRIPT, dsn, "patch")
    assert patched["ok"], patched
    assert 0.95 <= patched["seconds"] < 3.0, patched
    assert patched["max_gap"] < MAX_GAP, patched
    assert patched["cooperative"] is True
    # Control: the same script without patch_psycopg() stops the ticker for the
    # whole pg_sleep(1), the C wait holding the process.
    control = run_script(QUERY_SCRIPT, dsn, "control")
    assert control["ok"], control
    assert control["max_gap"] >= 0.8, control
    assert control["cooperative"] is False


# --------------------------------------------------------------- 2. connects

CONNECT_SCRIPT = script(
    IMPORT_BEFORE,
    """
    import socket
    slow_dsn, mode = sys.argv[1], sys.argv[2]
    if mode == "patch":
        psycopg_waiting.patch_psycopg()

    def connect():
        with psycopg.connect(slow_dsn, autocommit=True) as conn:
            return conn.execute("SELECT 1").fetchone()[0]

    # Four connects through a proxy that answers each after 0.5 s.
    start = time.monotonic()
    connects = [gevent.spawn(connect) for _ in range(4)]
    gevent.joinall(connects, timeout=20)
    end = time.monotonic()
    out = {
        "ok": [g.successful() and g.value == 1 for g in connects],
        "errors": [repr(g.exception) for g in connects if g.exception],
        "seconds": end - start, "max_gap": max_gap(start, end),
    }
    if mode == "patch":
        # A server that accepts and never answers: connect_timeout=2 (libpq's
        # minimum) must end the connect through psycopg's deadline, hub free.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        start = time.monotonic()
        stuck = gevent.spawn(psycopg.connect,
                             f"host=127.0.0.1 port={port} dbname=x user=x connect_timeout=2")
        stuck.join(15)
        end = time.monotonic()
        out.update({"silent_error": type(stuck.exception).__name__,
                    "silent_seconds": end - start, "silent_max_gap": max_gap(start, end)})
    ticking.kill()
    print(json.dumps(out))
    """,
)


@pytest.mark.gevent_only
def test_connects_are_cooperative_and_honour_connect_timeout(dsn: str) -> None:
    with Proxy(dsn) as proxy:
        proxy.connect_delay = 0.5
        patched = run_script(CONNECT_SCRIPT, proxy.dsn(), "patch")
        assert patched["ok"] == [True] * 4, patched
        # Concurrent: about one delay in all, not four in a row.
        assert patched["seconds"] < 1.5, patched
        assert patched["max_gap"] < MAX_GAP, patched
        assert patched["silent_error"] == "ConnectionTimeout", patched
        assert 1.9 <= patched["silent_seconds"] < 4.0, patched
        assert patched["silent_max_gap"] < MAX_GAP, patched
        # Control: unpatched, each connect holds the whole process for its delay.
        control = run_script(CONNECT_SCRIPT, proxy.dsn(), "control")
        assert control["ok"] == [True] * 4, control
        assert control["max_gap"] >= 0.4, control
        assert control["seconds"] >= 1.9, control


# ----------------------------------------------------- 3. one shared connection

SHARED_SCRIPT = script(
    IMPORT_BEFORE,
    """
    import threading
    dsn, mode = sys.argv[1], sys.argv[2]
    # threading.Lock as psycopg 3.2+ saw it at import: an OS lock (3.1 has none).
    os_lock = getattr(psycopg.connection, "Lock", None)
    psycopg_waiting.patch_psycopg()
    if mode == "waits-only":
        assert os_lock is not None, "this psycopg looks threading.Lock up at each connect"
        psycopg.connection.Lock = os_lock  # undo the lock's rebinding, keep the waits
    conn = psycopg.connect(dsn, autocommit=True)

    def watchdog():
        # A real OS thread: it runs while the hub is stuck on an OS lock.
        sleep = monkey.get_original("time", "sleep")
        while True:
            sleep(0.5)
            if time.monotonic() - ticks[-1] > 3.0:
                print(json.dumps({"deadlock": True}), flush=True)
                os._exit(0)

    monkey.get_original("_thread", "start_new_thread")(watchdog, ())
    start = time.monotonic()
    users = [gevent.spawn(lambda: conn.execute("SELECT pg_sleep(0.5), 1").fetchone()[1])
             for _ in range(2)]
    gevent.joinall(users, timeout=20)
    end = time.monotonic()
    ticking.kill()
    print(json.dumps({
        "deadlock": False, "ok": [g.successful() and g.value == 1 for g in users],
        "seconds": end - start, "max_gap": max_gap(start, end),
        "lock": type(conn.lock).__module__,
    }))
    """,
)


@pytest.mark.gevent_only
def test_two_greenlets_on_one_connection_are_serialised_without_deadlock(dsn: str) -> None:
    patched = run_script(SHARED_SCRIPT, dsn, "patch")
    assert patched["deadlock"] is False, patched
    assert patched["ok"] == [True, True], patched
    assert 0.95 <= patched["seconds"] < 3.0, patched  # one after the other
    assert patched["max_gap"] < MAX_GAP, patched
    assert patched["lock"].startswith("gevent"), patched
    # Control: cooperative waits but psycopg's OS lock: the second greenlet
    # blocks the hub on the lock the first holds while it waits in the hub.
    control = run_script(SHARED_SCRIPT, dsn, "waits-only")
    assert control["deadlock"] is True, control


# ------------------------------------------------- 4. interrupted mid-query

KILL_SCRIPT_BODY = """
dsn, app, how, mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "patch":
    psycopg_waiting.patch_psycopg()
admin = psycopg.connect(dsn, autocommit=True)
conn = psycopg.connect(dsn, autocommit=True, application_name=app)

def count(where=""):
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s " + where
    return admin.execute(sql, [app]).fetchone()[0]

def poll(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.01)
    return predicate()

caught = {}

def victim():
    caught["started"] = time.monotonic()
    timeout = gevent.Timeout(0.5) if how == "timeout" else None
    if timeout is not None:
        timeout.start()
    try:
        conn.execute("SELECT pg_sleep(30)")
    except BaseException as exc:
        caught.update(type=type(exc).__name__, at=time.monotonic(), same=exc is timeout)
        if how != "timeout":
            raise
    finally:
        if timeout is not None:
            timeout.close()

start = time.monotonic()
g = gevent.spawn(victim)
assert poll(lambda: count("AND state = 'active'") == 1, 5), "the query never started"
if how == "kill":
    interrupted = time.monotonic()
    gevent.kill(g)
else:
    interrupted = caught["started"]
g.join(5)
out = {"dead": g.dead, "type": caught.get("type"), "same": caught.get("same"),
       "delay": caught.get("at", 1e9) - interrupted}
gone = time.monotonic()
out["query_gone"] = poll(lambda: count("AND state = 'active'") == 0, 1.0)
out["query_gone_seconds"] = time.monotonic() - gone
out["backend_gone"] = poll(lambda: count() == 0, 2.0)
used = time.monotonic()
with gevent.Timeout(3, False):
    try:
        conn.execute("SELECT 1")
        out["next_use"] = "worked"
    except Exception as exc:
        out["next_use"] = type(exc).__name__
        out["next_use_operational"] = isinstance(exc, psycopg.OperationalError)
out["next_use_seconds"] = time.monotonic() - used
out["closed"] = conn.closed
end = time.monotonic()
ticking.kill()
out["max_gap"] = max_gap(start, end)
admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
              "WHERE application_name = %s", [app])
print(json.dumps(out))
"""


@pytest.mark.gevent_only
@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_an_interrupted_query_is_cancelled_and_its_connection_broken(dsn: str, how: str) -> None:
    app = next_app_name()
    result = run_script(script(IMPORT_BEFORE, KILL_SCRIPT_BODY), dsn, app, how, "patch")
    assert result["dead"], result
    if how == "kill":
        assert result["type"] == "GreenletExit", result
        assert result["delay"] < 0.5, result
    else:
        assert result["type"] == "Timeout" and result["same"] is True, result
        assert 0.5 <= result["delay"] < 1.0, result
    assert result["query_gone"] is True and result["query_gone_seconds"] < 1.0, result
    assert result["backend_gone"] is True, result
    assert result["next_use_operational"] is True, result
    assert result["next_use_seconds"] < 1.0 and result["closed"] is True, result
    assert result["max_gap"] < MAX_GAP, result


@pytest.mark.gevent_only
def test_control_psycopg_alone_leaves_an_interrupted_query_running(dsn: str) -> None:
    # psycopg imported after patch_all waits cooperatively by itself, but
    # without patch_psycopg() nobody cancels the query of a killed greenlet.
    app = next_app_name()
    result = run_script(script(IMPORT_AFTER, KILL_SCRIPT_BODY), dsn, app, "kill", "control")
    assert result["type"] == "GreenletExit", result
    assert result["query_gone"] is False, result
    assert result["backend_gone"] is False, result
    assert result["closed"] is False, result


# ------------------------------------------------------------------ 5. COPY

COPY_SCRIPT = script(
    IMPORT_BEFORE,
    """
    dsn, mode = sys.argv[1], sys.argv[2]
    if mode == "patch":
        psycopg_waiting.patch_psycopg()
    conn = psycopg.connect(dsn, autocommit=True)
    # The server takes its time over each row, so both directions wait on the
    # socket for about a second: a blocked hub cannot hide in it.
    conn.execute("CREATE TEMP TABLE dgp_copy (id int, payload text)")
    conn.execute(
        "CREATE FUNCTION pg_temp.dgp_nap(i int) RETURNS int LANGUAGE plpgsql AS "
        "$$ BEGIN IF i % 4 = 0 THEN PERFORM pg_sleep(0.0002); END IF; RETURN i; END $$"
    )
    conn.execute(
        "CREATE FUNCTION pg_temp.dgp_slow() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_temp.dgp_nap(NEW.id); RETURN NEW; END $$"
    )
    conn.execute("CREATE TRIGGER dgp_slow BEFORE INSERT ON dgp_copy "
                 "FOR EACH ROW EXECUTE FUNCTION pg_temp.dgp_slow()")
    payload = "x" * 1000
    rows = 4000

    def copy_in():
        with conn.cursor() as cur, cur.copy("COPY dgp_copy (id, payload) FROM STDIN") as copy:
            for i in range(rows):
                copy.write_row((i, payload))

    def copy_out():
        size = 0
        with conn.cursor() as cur, cur.copy(
            "COPY (SELECT pg_temp.dgp_nap(id), payload FROM dgp_copy) TO STDOUT"
        ) as copy:
            for data in copy:
                size += len(data)
        return size

    out = {}
    for name, func in (("in", copy_in), ("out", copy_out)):
        start = time.monotonic()
        g = gevent.spawn(func)
        g.join(30)
        end = time.monotonic()
        out[name] = {"ok": g.successful(), "error": repr(g.exception), "value": g.value,
                     "seconds": end - start, "max_gap": max_gap(start, end)}
    ticking.kill()
    out["server"] = list(conn.execute(
        "SELECT count(*), sum(length(payload)), count(DISTINCT id) FROM dgp_copy").fetchone())
    out["expected_out"] = sum(len(f"{i}\\t{payload}\\n") for i in range(rows))
    print(json.dumps(out))
    """,
)


@pytest.mark.gevent_only
def test_copy_in_and_out_keep_the_hub_running(dsn: str) -> None:
    patched = run_script(COPY_SCRIPT, dsn, "patch")
    assert patched["in"]["ok"] and patched["out"]["ok"], patched
    assert patched["server"] == [4000, 4_000_000, 4000], patched
    assert patched["out"]["value"] == patched["expected_out"], patched
    for direction in ("in", "out"):
        assert patched[direction]["seconds"] >= 0.5, patched  # long enough to show a stall
        assert patched[direction]["max_gap"] < MAX_GAP, patched
    control = run_script(COPY_SCRIPT, dsn, "control")
    assert control["in"]["ok"] and control["out"]["ok"], control
    assert max(control["in"]["max_gap"], control["out"]["max_gap"]) >= 0.4, control


# -------------------------------------------- 6. idempotence, import order

STATE_SCRIPT_BODY = """
from psycopg import waiting
dsn, order = sys.argv[1], sys.argv[2]
out = {"cooperative_before": psycopg_waiting.is_psycopg_cooperative(),
       "patched_before": psycopg_waiting.is_psycopg_patched()}
out["ensure"] = psycopg_waiting.ensure_psycopg_cooperative()
def state():
    lock = getattr(psycopg.connection, "Lock", psycopg_waiting.connection_lock)  # 3.1: none
    return (waiting.wait, waiting.wait_conn, lock, psycopg.Connection.wait)

first = state()
psycopg_waiting.patch_psycopg()
psycopg_waiting.patch_psycopg()
out["ensure_again"] = psycopg_waiting.ensure_psycopg_cooperative()
now = state()
out["stable"] = all(a is b for a, b in zip(first, now, strict=True))
out["ours"] = [waiting.wait is psycopg_waiting.green_wait,
               waiting.wait_conn is psycopg_waiting.green_wait_conn,
               now[2] is psycopg_waiting.connection_lock]
inner = psycopg.Connection.wait.__dgp_original__
out["wrapped_once"] = not hasattr(inner, "__dgp_original__")
out["kept_psycopg_waits"] = [psycopg_waiting._original_wait.__name__,
                             psycopg_waiting._original_wait_conn.__name__]
out["cooperative_after"] = psycopg_waiting.is_psycopg_cooperative()
conn = psycopg.connect(dsn, autocommit=True)
out["lock"] = type(conn.lock).__module__
out["query"] = conn.execute("SELECT 41 + 1").fetchone()[0]
start = time.monotonic()
out["notifies"] = list(conn.notifies(timeout=0.3))  # the deadline path
out["notifies_seconds"] = time.monotonic() - start
start = time.monotonic()
out["notifies_zero"] = list(conn.notifies(timeout=0))  # a zero deadline looks once
out["notifies_zero_seconds"] = time.monotonic() - start
out["max_gap"] = max_gap(start - 0.3, time.monotonic())
ticking.kill()
print(json.dumps(out))
"""


@pytest.mark.gevent_only
def test_patch_is_idempotent_and_import_order_is_reported(dsn: str) -> None:
    after = run_script(script(IMPORT_AFTER, STATE_SCRIPT_BODY), dsn, "after")
    # Imported after patch_all: psycopg chose cooperative waits itself...
    assert after["cooperative_before"] is True and after["patched_before"] is False, after
    # ...and ensure still patches, for the cancel of interrupted queries.
    assert after["ensure"] is True and after["ensure_again"] is True, after
    assert after["kept_psycopg_waits"] == ["wait_poll", "wait_conn"], after
    before = run_script(script(IMPORT_BEFORE, STATE_SCRIPT_BODY), dsn, "before")
    assert before["cooperative_before"] is False and before["patched_before"] is False, before
    assert before["ensure"] is True, before
    assert before["kept_psycopg_waits"] == ["wait_c", "wait_conn"], before
    for result in (after, before):
        assert result["stable"] and result["wrapped_once"], result
        assert result["ours"] == [True, True, True], result
        assert result["cooperative_after"] is True, result
        assert result["lock"].startswith("gevent"), result
        assert result["query"] == 42, result
        assert result["notifies"] == [] and 0.3 <= result["notifies_seconds"] < 0.6, result
        assert result["notifies_zero"] == [] and result["notifies_zero_seconds"] < 0.05, result
        assert result["max_gap"] < MAX_GAP, result


# ------------------------------------------------------ fork during a connect

FORK_SCRIPT = script(
    IMPORT_BEFORE,
    """
    slow_dsn = sys.argv[1]
    psycopg_waiting.patch_psycopg()

    def connect():
        with psycopg.connect(slow_dsn, autocommit=True) as conn:
            return conn.execute("SELECT 1").fetchone()[0]

    g = gevent.spawn(connect)
    deadline = time.monotonic() + 5
    while not psycopg_waiting._connecting and time.monotonic() < deadline:
        gevent.sleep(0.01)
    fd = next(iter(psycopg_waiting._connecting)).fd
    before = os.readlink(f"/proc/self/fd/{fd}")
    # The plain fork: gevent's own after-fork work (a new hub, its threadpool)
    # is not under test, and the child only looks and leaves. Our hook runs
    # either way (os.register_at_fork).
    from gevent.monkey import get_original
    fork, waitpid = get_original("os", ["fork", "waitpid"])
    pid = fork()
    if pid == 0:
        detached = (os.readlink(f"/proc/self/fd/{fd}") == "/dev/null"
                    and not psycopg_waiting._connecting)
        os._exit(0 if detached else 1)
    # Polled and bounded: a child that never comes back fails the test, never hangs it.
    status = None
    until = time.monotonic() + 10
    while status is None and time.monotonic() < until:
        done, code = waitpid(pid, os.WNOHANG)
        if done == pid:
            status = code
        else:
            gevent.sleep(0.01)
    if status is None:
        os.kill(pid, 9)
        status = 1 << 8  # "exit 1": the child never came back
    g.join(10)
    ticking.kill()
    print(json.dumps({"before": before, "child_detached": os.waitstatus_to_exitcode(status) == 0,
                      "parent_ok": g.successful() and g.value == 1,
                      "error": repr(g.exception), "tracked": len(psycopg_waiting._connecting)}))
    """,
)


@pytest.mark.gevent_only
def test_a_fork_during_a_connect_detaches_it_in_the_child_only(dsn: str) -> None:
    with Proxy(dsn) as proxy:
        proxy.connect_delay = 1.0
        result = run_script(FORK_SCRIPT, proxy.dsn())
    assert result["before"].startswith("socket:"), result
    assert result["child_detached"] is True, result
    assert result["parent_ok"] is True, result  # the parent's connect went on unharmed
    assert result["tracked"] == 0, result


# ------------------------------------------------------- 7. plain OS threads


@pytest.mark.skipif(is_gevent(), reason="runs in DGP_TEST_MODE=threads only")
def test_without_gevent_psycopg_is_left_alone_and_threads_work(dsn: str) -> None:
    import psycopg
    from psycopg import waiting

    from django_gevent_pool.drivers import psycopg_waiting

    gevent_modules = {name for name in sys.modules if name.split(".")[0] == "gevent"}
    before = (waiting.wait, waiting.wait_conn, psycopg.connection.Lock, psycopg.Connection.wait)
    assert psycopg_waiting.ensure_psycopg_cooperative() is False
    assert psycopg_waiting.is_psycopg_cooperative() is False
    after = (waiting.wait, waiting.wait_conn, psycopg.connection.Lock, psycopg.Connection.wait)
    assert all(a is b for a, b in zip(before, after, strict=True))
    assert not psycopg_waiting.is_psycopg_patched()
    # The module itself brought no gevent in.
    assert {name for name in sys.modules if name.split(".")[0] == "gevent"} == gevent_modules

    results: list[int] = []
    errors: list[BaseException] = []

    def query() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                results.append(conn.execute("SELECT pg_sleep(0.5), 7").fetchone()[1])
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=query, daemon=True) for _ in range(4)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    elapsed = time.monotonic() - start
    assert not errors and results == [7] * 4, errors
    assert elapsed < 1.5  # in parallel: psycopg's C wait releases the GIL
