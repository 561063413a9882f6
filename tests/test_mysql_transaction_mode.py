"""POOL_MODE "transaction" on MySQL: held only while it works; MySQL's session state pins.

Django runs in a child process (as in ``test_mysql_backend``), against the real
server as a user of the test's own. Every pin is proven on the server: the
state a pinned request made (a user variable, ``GET_LOCK``, ``LOCK TABLES``, a
temporary table, a prepared statement, an open ``HANDLER``, ``USE``, session
variables) stays with that request while it runs, is seen by no concurrent
borrower, and is gone after the request when the same session (the same
``CONNECTION_ID()``: a reset, not a reconnect) serves the next one, with
Django's session setup back (``READ-COMMITTED``, ``sql_auto_is_null = 0``).
"""

from __future__ import annotations

import random
import textwrap
import time
from typing import Any

import pytest

from .mysql_support import admin, params, root_params
from .support import sleep
from .test_mysql_backend import PRELUDE, result, result_and_peak, run_child

__all__ = ["admin", "params", "root_params"]  # fixtures

TX = PRELUDE + textwrap.dedent(
    """
    import time
    from django_gevent_pool import pinned
    from django_gevent_pool.backends.base import close_pools

    def pool_stats():
        return get_pool().get_stats()

    def scalar(sql, args=None):
        with connection.cursor() as cur:
            cur.execute(sql, args)
            row = cur.fetchone()
            return None if row is None else row[0]

    def probe(sql):
        try:
            return scalar(sql)
        except Exception as exc:
            return "error"

    def sleep(seconds):
        if mode == "gevent":
            import gevent
            gevent.sleep(seconds)
        else:
            time.sleep(seconds)
    """
)

# (reason, statements that make the state, probe, owner sees, a concurrent
# borrower sees, the next request on the same session sees): "error" for a
# probe that fails, "any" for one not compared.
PINS: list[tuple[str, list[str], str, Any, Any, Any]] = [
    ("set", ["SET @dgp_v = 42"], "SELECT @dgp_v", 42, None, None),
    ("set", ["SELECT @dgp_w := 9"], "SELECT @dgp_w", 9, None, None),
    ("set", ["SELECT 11 INTO @dgp_x"], "SELECT @dgp_x", 11, None, None),
    ("set", ["USE mysql"], "SELECT DATABASE()", "mysql", "test", "test"),
    (
        "set",
        ["SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE"],
        "ISOLATION",  # the session's isolation level, named as this server names it
        "SERIALIZABLE",
        "READ-COMMITTED",  # Django's session setup, run again after the reset
        "READ-COMMITTED",
    ),
    ("set", ["SET SESSION sql_auto_is_null = 1"], "SELECT @@sql_auto_is_null", 1, 0, 0),
    ("set", ["SET foreign_key_checks = 0"], "SELECT @@foreign_key_checks", 0, 1, 1),
    (
        "set",
        ["SELECT SQL_CALC_FOUND_ROWS n FROM dgp_pin_t LIMIT 1"],
        "SELECT FOUND_ROWS()",
        3,
        "any",
        "any",
    ),
    (
        "advisory_lock",
        ["SELECT GET_LOCK('dgp_pin_lock', 0)"],
        "SELECT IS_USED_LOCK('dgp_pin_lock') = CONNECTION_ID()",
        1,
        0,  # held, by the owner
        None,  # free
    ),
    (
        "temp_table",
        ["CREATE TEMPORARY TABLE dgp_tmp (a INT)", "INSERT INTO dgp_tmp VALUES (3)"],
        "SELECT COUNT(*) FROM dgp_tmp",
        1,
        "error",
        "error",
    ),
    ("prepare", ["PREPARE dgp_s FROM 'SELECT 5'"], "EXECUTE dgp_s", 5, "error", "error"),
    (
        "table_lock",
        ["LOCK TABLES dgp_pin_t READ"],
        "SELECT COUNT(*) FROM dgp_pin_u",  # a table not locked: refused while locked
        "error",
        0,
        0,
    ),
    (
        "cursor",
        ["HANDLER dgp_pin_t OPEN"],
        "HANDLER dgp_pin_t READ `PRIMARY` FIRST",
        1,
        "error",
        "error",
    ),
]

PIN = TX + textwrap.dedent(
    """
    import threading
    cases = json.loads(sys.argv[4])
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS dgp_pin_t (n INT PRIMARY KEY)")
        cur.execute("CREATE TABLE IF NOT EXISTS dgp_pin_u (n INT)")
        cur.execute("DELETE FROM dgp_pin_t")
        cur.execute("DELETE FROM dgp_pin_u")
        cur.execute("INSERT INTO dgp_pin_t VALUES (1), (2), (3)")
    # MySQL 5.7.20+ and MariaDB 11.1+ say transaction_isolation; older ones tx_isolation.
    isolation = "SELECT @@SESSION.transaction_isolation"
    if probe(isolation) == "error":
        isolation = "SELECT @@SESSION.tx_isolation"
    connection.close()
    close_pools()
    out = []
    for reason, setup, sql, _, _, _ in cases:
        sql = isolation if sql == "ISOLATION" else sql
        got = {"reason": reason}
        made, owner_done = threading.Event(), threading.Event()  # gevent's when patched

        def owner(_):
            got["owner_id"] = scalar("SELECT CONNECTION_ID()")
            for statement in setup:
                with connection.cursor() as cur:
                    cur.execute(statement)
            got["held"] = pool_stats()["pool_in_use"]  # between statements
            made.set()
            sleep(0.1)  # other I/O: a pinned connection stays
            got["owner"] = probe(sql)
            got["owner_id_after"] = scalar("SELECT CONNECTION_ID()")
            owner_done.wait(10)
            connection.close()  # the request ends: the connection goes back reset

        def other(_):
            made.wait(10)
            got["other_id"] = scalar("SELECT CONNECTION_ID()")
            got["other"] = probe(sql)
            connection.close()
            owner_done.set()

        spawn_all(lambda i: (owner, other)[i](i), 2)
        got["pins"] = pool_stats()["pins_" + reason]

        after = []

        def next_request(_):
            with transaction.atomic():  # both connections at once
                after.append((scalar("SELECT CONNECTION_ID()"), probe(sql)))
                sleep(0.1)
            connection.close()

        spawn_all(next_request, 2)
        got["after"] = after
        stats = pool_stats()
        got["opened"], got["in_use"] = stats["connections_num"], stats["pool_in_use"]
        get_pool().check_invariants()
        close_pools()
        out.append(got)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_each_pin_keeps_its_state_with_its_request_and_the_reset_wipes_it(
    params: dict[str, Any], mode: str
) -> None:
    child = run_child(PIN, mode, params, {"MAX_CONNS": 2, "POOL_MODE": "transaction"}, PINS)
    got = result(child, timeout=120)
    assert len(got) == len(PINS)
    for (_, setup, sql, owner, other, after), seen in zip(PINS, got, strict=True):
        what = f"{setup} then {sql}: {seen}"
        assert seen["held"] == 1, what  # pinned: kept between statements
        assert seen["owner_id_after"] == seen["owner_id"], what
        assert seen["other_id"] != seen["owner_id"], what
        assert seen["pins"] == 1, what
        if owner != "any":
            assert seen["owner"] == owner, what
        if other != "any":
            assert seen["other"] == other, what
        # The next requests: both sessions, the pinned one reset, not replaced.
        assert seen["opened"] == 2 and seen["in_use"] == 0, what
        assert {session for session, _ in seen["after"]} == {
            seen["owner_id"],
            seen["other_id"],
        }, what
        if after != "any":
            assert [value for _, value in seen["after"]] == [after, after], what


STATEMENTS = TX + textwrap.dedent(
    """
    out = {}
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS dgp_ai (id INT AUTO_INCREMENT PRIMARY KEY, v INT)")
        cur.execute("DROP PROCEDURE IF EXISTS dgp_double")
        cur.execute("CREATE PROCEDURE dgp_double(INOUT x INT) SET x = x * 2")
    connection.close()
    close_pools()

    # Results stay after the connection went back; so do lastrowid and rowcount.
    with connection.cursor() as cur:
        cur.execute("INSERT INTO dgp_ai (v) VALUES (1), (2)")
        out["insert"] = [pool_stats()["pool_in_use"], cur.lastrowid > 0, cur.rowcount]
        cur.execute("SELECT v FROM dgp_ai WHERE id >= %s ORDER BY id", [cur.lastrowid])
        out["select"] = [pool_stats()["pool_in_use"], list(cur.fetchall()), cur.rowcount]
        cur.execute("UPDATE dgp_ai SET v = v")
        out["no_rows"] = [cur.fetchone(), list(cur.fetchmany(2)), list(cur.fetchall())]
        out["last_query"] = connection.ops.last_executed_query(cur, "", ())

    # Every result set of a multi-statement string; a later statement's error
    # raised from execute(); a BEGIN in one holds the connection until COMMIT.
    with connection.cursor() as cur:
        cur.execute("SELECT 1; SELECT 2; DO 0")
        sets = [list(cur.fetchall())]
        while cur.nextset():
            sets.append(list(cur.fetchall()) if cur.description else None)
        out["sets"] = [pool_stats()["pool_in_use"], sets]
        try:
            cur.execute("SELECT 1; SELECT dgp_no_such_column")
            out["later_error"] = None
        except Exception as exc:
            out["later_error"] = [type(exc).__name__, pool_stats()["pool_in_use"]]
        out["after_error"] = scalar("SELECT 7")
        cur.execute("BEGIN; SELECT CONNECTION_ID()")
        cur.nextset()  # the first result is BEGIN's
        first = cur.fetchone()[0]
        held = pool_stats()["pool_in_use"]
        cur.execute("SELECT CONNECTION_ID()")
        same = cur.fetchone()[0] == first
        cur.execute("COMMIT")
        out["begin"] = [held, same, pool_stats()["pool_in_use"]]

    # atomic(): one session throughout, back after the on_commit hooks.
    hooks = []
    with transaction.atomic():
        ids = {scalar("SELECT CONNECTION_ID()") for _ in range(3)}
        transaction.on_commit(lambda: hooks.append(pool_stats()["pool_in_use"]))
    out["atomic"] = [len(ids), hooks, pool_stats()["pool_in_use"]]

    # callproc: PyMySQL passes arguments through user variables: it pins.
    with connection.cursor() as cur:
        cur.callproc("dgp_double", [21])
        cur.execute("SELECT @_dgp_double_0")
        out["callproc"] = [cur.fetchone()[0], pool_stats()["pool_in_use"], pool_stats()["pins_set"]]
    connection.close()

    # pinned(): state made where detection cannot see it (the driver connection).
    with pinned():
        session = scalar("SELECT CONNECTION_ID()")
        with connection.connection.cursor() as raw:
            raw.execute("SET @dgp_raw = 1")
        inside = scalar("SELECT @dgp_raw")
    out["pinned"] = [inside, pool_stats()["pool_in_use"], scalar("SELECT @dgp_raw"),
                     scalar("SELECT CONNECTION_ID()") == session]
    kept = connection.cursor()
    kept.execute("SELECT 1")
    connection.close()
    try:
        kept.execute("SELECT 1")
        out["kept"] = None
    except Exception as exc:
        out["kept"] = [type(exc).__name__, str(exc)]
    out["opened"] = pool_stats()["connections_num"]
    get_pool().check_invariants()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_results_sets_atomic_callproc_and_pinned_across_returns(
    params: dict[str, Any], mode: str
) -> None:
    got = result(run_child(STATEMENTS, mode, params, {"MAX_CONNS": 1, "POOL_MODE": "transaction"}))
    assert got["insert"] == [0, True, 2]
    assert got["select"] == [0, [[1], [2]], 2]
    assert got["no_rows"] == [None, [], []]  # as PyMySQL answers after an UPDATE
    assert "UPDATE dgp_ai SET v = v" in got["last_query"]
    assert got["sets"] == [0, [[[1]], [[2]], None]]
    assert got["later_error"] == ["OperationalError", 0]
    assert got["after_error"] == 7
    assert got["begin"] == [1, True, 0]
    assert got["atomic"] == [1, [1], 0]  # held through the hooks, back after them
    assert got["callproc"] == [42, 1, 1]
    assert got["pinned"] == [1, 0, None, True]  # reset on the block's end, the same session
    assert got["kept"] == ["ProgrammingError", "Cursor closed"]
    assert got["opened"] == 1  # a reset is no reconnect


WAITERS = TX + textwrap.dedent(
    """
    errors, ids, started = [], set(), []
    midway = []

    def visit(i):
        try:
            ids.add(scalar("SELECT CONNECTION_ID()"))
            started.append(i)
            sleep(0.5)  # a request waiting on other I/O holds no connection
            assert scalar("SELECT %s", [i]) == i
            with transaction.atomic():
                scalar("SELECT %s", [i])
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            connection.close()

    def sample():
        # 0.3 s in, every request made its first statement and waits: none
        # holds a connection.
        sleep(0.3)
        midway.append((len(started), pool_stats()["pool_in_use"]))

    start = time.monotonic()
    if mode == "gevent":
        import gevent
        sampler = gevent.spawn(sample)
    else:
        sampler = threading.Thread(target=sample)
        sampler.start()
    spawn_all(visit, 30)
    elapsed = time.monotonic() - start
    sampler.join()
    stats = pool_stats()
    print(json.dumps({
        "errors": errors, "elapsed": elapsed, "sessions": len(ids), "midway": midway[0],
        "checkouts": stats["requests_num"], "in_use": stats["pool_in_use"],
    }))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_30_requests_waiting_on_other_io_need_no_connection_meanwhile(
    admin: Any, params: dict[str, Any], mode: str
) -> None:
    """30 requests that each wait 0.5 s on other I/O between statements, on 2 connections.

    In session mode they would need 30 x 0.5 / 2 = 7.5 s of connection time and
    time out (POOL_TIMEOUT 3 s); here nobody holds a connection while it waits.
    """
    child = run_child(
        WAITERS, mode, params, {"MAX_CONNS": 2, "POOL_TIMEOUT": 3, "POOL_MODE": "transaction"}
    )
    got, peak = result_and_peak(child, admin, params["user"])
    assert got["errors"] == []
    assert got["elapsed"] < 3.0, got
    assert peak <= 2, f"the server saw {peak} sessions of the app (MAX_CONNS=2)"
    assert got["sessions"] <= 2
    assert got["midway"] == [30, 0]  # all 30 waiting, no connection held
    assert got["checkouts"] >= 90 and got["in_use"] == 0


def live_sessions(admin: Any, user: str) -> list[int]:
    """``user``'s sessions but those killed (on their way out) and the ``KILL`` side
    connections of the pool (unbudgeted: one per session severed mid-statement)."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE USER = %s"
            " AND COMMAND <> 'Killed' AND (INFO IS NULL OR INFO NOT LIKE 'KILL %%')",
            [user],
        )
        return [int(row[0]) for row in cur.fetchall()]


SOAK = TX + textwrap.dedent(
    """
    import random
    from django.db import OperationalError
    rounds, limit = int(sys.argv[4]), time.monotonic() + 40
    leaks, mixups, lost, other = [], [], [], []

    def visit(i):
        rng = random.Random(i)
        for r in range(rounds):
            if time.monotonic() > limit:
                return
            mine = i * 1000 + r
            try:
                seen = scalar("SELECT @dgp_mine")
                if seen is not None:
                    leaks.append(seen)  # another request's state reached this one
                if rng.random() < 0.4:
                    scalar("SET @dgp_mine = %s", [mine])  # pins
                    sleep(rng.random() * 0.01)
                    if scalar("SELECT @dgp_mine") != mine:
                        mixups.append(mine)
                elif rng.random() < 0.5:
                    with transaction.atomic():
                        scalar("SELECT %s", [mine])
                        sleep(rng.random() * 0.01)
                else:
                    scalar("SELECT %s", [mine])
                    sleep(rng.random() * 0.01)
                    scalar("SELECT %s", [mine])
            except OperationalError as exc:
                lost.append(str(exc))  # a session the test killed under it
            except Exception as exc:
                other.append(repr(exc))
            finally:
                connection.close()

    spawn_all(visit, 25)
    if mode == "gevent":
        import gevent
        gevent.sleep(0.2)
    stats = pool_stats()
    get_pool().check_invariants()
    print(json.dumps({
        "leaks": leaks, "mixups": mixups, "lost": len(lost), "other": other,
        "in_use": stats["pool_in_use"], "pins": stats["pins_set"],
        "sessions": stats["sessions_num"],
    }))
    """
)


@pytest.mark.parametrize("mode", ["gevent", "threads"])
def test_25_greenlets_pinning_and_not_with_sessions_killed_under_them(
    admin: Any, params: dict[str, Any], mode: str
) -> None:
    """Pinned and unpinned requests share 3 sessions while the server kills some of them.

    No request ever sees another's user variable, a pinned request always
    reads its own, the cap holds on the server, and a killed session costs
    only the statement that was on it.
    """
    import pymysql

    child = run_child(
        SOAK,
        mode,
        params,
        {"MAX_CONNS": 3, "POOL_TIMEOUT": 10, "POOL_MODE": "transaction"},
        extra=20,
    )
    rng = random.Random(7)
    peak, kills = 0, 0
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        found = live_sessions(admin, params["user"])
        peak = max(peak, len(found))
        if found and kills < 6 and rng.random() < 0.05:
            with admin.cursor() as cur:
                try:
                    cur.execute(f"KILL {rng.choice(found):d}")
                    kills += 1
                except pymysql.MySQLError:
                    pass  # ended meanwhile
        sleep(0.01)
    got = result(child, timeout=60)
    assert got["leaks"] == [] and got["mixups"] == [] and got["other"] == []
    assert got["in_use"] == 0
    assert got["pins"] > 0 and got["sessions"] >= 25 * 5
    assert peak <= 3, f"the server saw {peak} sessions of the app (MAX_CONNS=3)"
    assert kills > 0


KILLED = TX + textwrap.dedent(
    """
    import gevent
    import pymysql as raw
    lock = "dgp_killed_" + params["user"]
    holder = raw.connect(host=params["host"], port=params["port"], user=params["user"],
                         password=params["password"], autocommit=True)
    with holder.cursor() as cur:
        cur.execute("SELECT GET_LOCK(%s, 1)", [lock])
    timeouts = []

    def stuck(i):
        # Killed at each point of a statement: at its first switch (taking a
        # connection, sending), while the server runs it, after a pinning SET.
        try:
            with gevent.Timeout((0.0001, 0.2, 0.3)[i % 3]):
                if i % 3 == 2:
                    scalar("SET @dgp_stuck = 1")
                scalar("SELECT GET_LOCK(%s, 30)", [lock])
        except gevent.Timeout:
            timeouts.append(i)
        finally:
            connection.close()

    for wave in range(7):  # 3 at a time: each gets a connection before its time is up
        gevent.joinall([gevent.spawn(stuck, 3 * wave + i) for i in range(3)], raise_error=True)
    stats = pool_stats()
    get_pool().check_invariants()
    # Every session killed mid-statement is ended on the server (KILL from a
    # side connection, in the background), not left waiting on the lock.
    start, left = time.monotonic(), None
    while time.monotonic() - start < 5:
        with holder.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE USER = %s AND INFO LIKE 'SELECT GET_LOCK%%'", [params["user"]]
            )
            left = cur.fetchone()[0]
        if not left:
            break
        gevent.sleep(0.05)
    ended_in = time.monotonic() - start
    after = []

    def fresh(_):
        after.append((scalar("SELECT 1"), scalar("SELECT @dgp_stuck")))
        connection.close()

    gevent.joinall([gevent.spawn(fresh, i) for i in range(20)], raise_error=True)
    holder.close()
    print(json.dumps({
        "timeouts": len(timeouts), "in_use": stats["pool_in_use"], "size": stats["pool_size"],
        "left": left, "ended_in": ended_in, "after": after,
    }))
    """
)


def test_greenlets_killed_mid_statement_leave_the_pool_whole_and_the_server_clean(
    params: dict[str, Any],
) -> None:
    """21 greenlets killed by ``gevent.Timeout`` at each point of a statement, 3 at a time.

    The sessions killed while the server ran their statement are ended there
    (``KILL`` from a side connection) within 2.5 s, none is lent again, and
    the next 20 requests are served with no state of the killed ones.
    """
    child = run_child(KILLED, "gevent", params, {"MAX_CONNS": 3, "POOL_MODE": "transaction"})
    got = result(child)
    assert got["timeouts"] == 21
    assert got["in_use"] == 0
    assert got["left"] == 0 and got["ended_in"] < 2.5, got
    assert got["after"] == [[1, None]] * 20


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SET @a = 1", "set"),
        ("set session sql_mode = ''", "set"),
        ("SET NAMES utf8mb4", "set"),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set"),  # the session's next one
        ("SET GLOBAL max_connections = 10", "set"),  # errs on the safe side
        ("SET STATEMENT max_statement_time = 1 FOR SELECT 1", None),  # one statement's
        ("USE test", "set"),
        ("SELECT @a := 1", "set"),
        ("SELECT 1 INTO @x", "set"),
        ("SELECT 1 INTO OUTFILE '/tmp/x'", None),
        ("SELECT @x", None),
        ("select sql_calc_found_rows * from t limit 1", "set"),
        ("SELECT LAST_INSERT_ID(5)", "set"),
        ("SELECT LAST_INSERT_ID()", None),
        ("SELECT GET_LOCK('a', 1)", "advisory_lock"),
        ("SELECT RELEASE_LOCK('a'), IS_FREE_LOCK('a'), IS_USED_LOCK('a')", None),
        ("LOCK TABLES t WRITE", "table_lock"),
        ("lock table t read", "table_lock"),
        ("UNLOCK TABLES", None),
        ("FLUSH TABLES WITH READ LOCK", "table_lock"),
        ("FLUSH TABLES t FOR EXPORT", "table_lock"),
        ("FLUSH PRIVILEGES", None),
        ("BACKUP STAGE START", "table_lock"),
        ("LOCK INSTANCE FOR BACKUP", "table_lock"),
        ("CREATE TEMPORARY TABLE t (a INT)", "temp_table"),
        ("create or replace temporary table t (a int)", "temp_table"),
        ("CREATE TABLE t (a INT)", None),
        ("PREPARE s FROM 'SELECT 1'", "prepare"),
        ("EXECUTE s", None),
        ("HANDLER t OPEN", "cursor"),
        ("HANDLER t READ FIRST", None),
        ("LOAD DATA LOCAL INFILE 'x' INTO TABLE t", None),  # no LOAD pin on MySQL
        ("LISTEN x", None),  # PostgreSQL's, not MySQL's
        ("XA START 'x'", None),  # a transaction: its status keeps the connection
        ("/*!40101 SET NAMES utf8 */", "set"),  # MySQL runs what /*! holds
        ("/*M!100100 SET @x = 1 */", "set"),
        ("# a comment\nSET @x = 1", "set"),
        ("/* a comment */ LOCK TABLES t WRITE", "table_lock"),
        ("-- a comment\nPREPARE s FROM 'SELECT 1'", "prepare"),
        ("SELECT 1; SET @x = 1", "set"),
        (b"SET @x = 1", "set"),
        ("SELECT `a`.`id` FROM `a` WHERE `a`.`id` = %s", None),
        ("INSERT INTO `a` (`v`) VALUES (%s) RETURNING `a`.`id`", None),
        ("SET FOREIGN_KEY_CHECKS = 0; TRUNCATE `a`; SET FOREIGN_KEY_CHECKS = 1", "set"),
    ],
)
def test_mysql_pin_reasons_from_the_statement_text(sql: Any, reason: str | None) -> None:
    from django_gevent_pool.pinning import pin_reason

    assert pin_reason(sql, "mysql") == reason
    assert pin_reason(sql, "mysql") == reason  # remembered, apart from PostgreSQL's answers


ORPHAN = TX + textwrap.dedent(
    """
    import gevent
    seen = {}

    def pins_and_ends(_):
        seen["id"] = scalar("SELECT CONNECTION_ID()")
        scalar("SET @dgp_orphan = 1")  # pins; the greenlet ends holding the connection

    def unpinned_and_ends(_):
        scalar("SELECT 1")  # gave it back already: nothing to return at the end

    gevent.joinall([gevent.spawn(pins_and_ends, 0), gevent.spawn(unpinned_and_ends, 1)])
    gevent.sleep(0.2)  # the greenlet-end return runs in a greenlet of its own
    stats = pool_stats()
    next_one = []

    def next_request(_):
        next_one.append([scalar("SELECT CONNECTION_ID()"), scalar("SELECT @dgp_orphan")])
        connection.close()

    gevent.joinall([gevent.spawn(next_request, 0)])
    get_pool().check_invariants()
    print(json.dumps({
        "id": seen["id"], "in_use": stats["pool_in_use"], "next": next_one[0],
        "opened": pool_stats()["connections_num"],
    }))
    """
)


def test_a_greenlet_ending_pinned_gives_its_session_back_reset(params: dict[str, Any]) -> None:
    got = result(run_child(ORPHAN, "gevent", params, {"MAX_CONNS": 1, "POOL_MODE": "transaction"}))
    assert got["in_use"] == 0
    assert got["next"] == [got["id"], None]  # the same session, its user variable gone
    assert got["opened"] == 1
