"""HOST_MAX_CONNS: one connection budget for every process of a host.

Another process of the host is a real one: a subprocess that takes, holds,
gives back or waits for slots of the same lock file (``Neighbour``), or that
is killed with SIGKILL while it holds them. Concurrency claims are proven on
the server side, counting the pool's backends in ``pg_stat_activity``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from django_gevent_pool import ConnectionPool, PoolTimeout
from django_gevent_pool.errors import PoolConfigError
from django_gevent_pool.hostbudget import HostBudget, budget_for, budget_key
from django_gevent_pool.options import PoolOptions

from .support import DRIVER, MODE, Workers, backends, connect, sleep, wait_until

# A noisy, shared 2-core machine: each 1 s promise is asserted with this slack.
SLACK = 0.5

NEIGHBOUR = textwrap.dedent(
    """
    import sys
    from django_gevent_pool.hostbudget import HostBudget
    budget = HostBudget(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    print("ready", flush=True)
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "take":
            got = [budget.take() for _ in range(int(arg))]
            print(" ".join("-" if s is None else str(s) for s in got), flush=True)
        elif word == "give":
            budget.give(int(arg))
            print("ok", flush=True)
        elif word == "want":
            budget.want(arg == "on")
            print("ok", flush=True)
        elif word == "wait":
            # Wait (polling, as a pool's housekeeping does) for int(arg) slots.
            import time
            want, held, deadline = int(arg), [], time.monotonic() + 10
            budget.want(True)
            started = time.monotonic()
            while len(held) < want and time.monotonic() < deadline:
                slot = budget.take()
                if slot is None:
                    time.sleep(0.01)
                else:
                    held.append(slot)
            budget.want(False)
            print(len(held), round(time.monotonic() - started, 3), flush=True)
        elif word == "exit":
            break
    """
)


class Neighbour:
    """Another process of the host, using the same budget through its own lock-file descriptor."""

    def __init__(self, budget: HostBudget, size: int | None = None) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                NEIGHBOUR,
                budget.key,
                str(size or budget.size),
                budget.directory,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"the neighbour died: {self.proc.stderr.read()[-2000:]}")
        return line.strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def take(self, n: int) -> list[int | None]:
        return [None if s == "-" else int(s) for s in self.ask(f"take {n}").split()]

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("exit")
            except (AssertionError, OSError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def budget(tmp_path: Path, request: pytest.FixtureRequest) -> HostBudget:
    """A budget of 4 slots of its own (a lock directory per test)."""
    key = budget_key("127.0.0.1", 5432, f"db-{request.node.name}", "postgres")
    return HostBudget(key, 4, str(tmp_path / "locks"))


@pytest.fixture
def neighbours() -> Iterator[list[Neighbour]]:
    made: list[Neighbour] = []
    yield made
    for neighbour in made:
        neighbour.stop()


def make_pool(dsn: str, app_name: str, budget: HostBudget, **options: Any) -> ConnectionPool:
    def opener() -> Any:
        conn = connect(dsn, application_name=app_name)
        conn.autocommit = True
        return conn

    return ConnectionPool(
        opener,
        driver=DRIVER,
        name=app_name,
        options={"MAX_CONNS": budget.size, "HOST_MAX_CONNS": budget.size, **options},
        host_budget=budget,
    )


def select_one(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.close()


# ------------------------------------------------------------------ the lock file


def test_slots_are_exclusive_across_processes(
    budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    neighbours.append(other := Neighbour(budget))
    theirs = other.take(3)
    assert None not in theirs
    ours = [budget.take(), budget.take()]
    assert ours[0] is not None and ours[1] is None, "one slot left for us"
    assert ours[0] not in theirs
    assert budget.in_use() == 4 and budget.held() == 1
    budget.give(ours[0])
    assert other.take(1) == [ours[0]], "a slot given back is free for the others at once"


def test_a_killed_process_frees_its_slots_at_once(
    budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    neighbours.append(other := Neighbour(budget))
    assert None not in other.take(4)
    assert budget.take() is None
    other.kill()
    # The kernel dropped its locks with the process: no wait, no daemon.
    assert budget.take() is not None
    assert budget.in_use() == 1


def test_different_budgets_for_one_server_are_refused(
    budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    neighbours.append(other := Neighbour(budget))
    other.take(1)  # a member now
    mine = HostBudget(budget.key, 6, budget.directory)
    with pytest.raises(PoolConfigError, match=r"HOST_MAX_CONNS = 6 .* use 4"):
        mine.take()
    other.stop()
    # Once nobody shares the old budget, the file is not a conflict: a redeploy
    # with another budget starts it afresh.
    assert mine.take() is not None


def test_aliases_of_one_process_must_agree_on_the_budget(tmp_path: Path) -> None:
    key = budget_key("127.0.0.1", 5432, "agree", "postgres")
    first = budget_for(key, 3, str(tmp_path), name="DATABASES['a']")
    assert budget_for(key, 3, str(tmp_path), name="DATABASES['b']") is first
    with pytest.raises(PoolConfigError, match=r"DATABASES\['c'\].*= 5.*uses 3"):
        budget_for(key, 5, str(tmp_path), name="DATABASES['c']")


def test_a_forked_child_neither_keeps_nor_frees_the_parents_slots(budget: HostBudget) -> None:
    mine = {budget.take(), budget.take()}
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            report = f"{budget.held()} {budget.in_use()} {budget.take()} {budget.take()} "
            report += str(budget.take())
        except BaseException as exc:
            report = repr(exc)
        os.write(write, report.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    held, in_use, *taken = os.read(read, 1024).decode().split()
    os.close(read)
    assert (held, in_use) == ("0", "2"), "the child holds nothing, and sees the parent's two"
    assert taken[2] == "None" and not {int(taken[0]), int(taken[1])} & mine
    # The child's slots went with it; the parent's stayed the parent's.
    assert budget.held() == 2 and budget.in_use() == 2


def test_demand_is_seen_by_every_process(budget: HostBudget, neighbours: list[Neighbour]) -> None:
    neighbours.append(other := Neighbour(budget))
    assert not budget.wanted()
    other.ask("want on")
    assert budget.wanted()
    other.ask("want off")
    assert not budget.wanted()
    other.ask("want on")
    other.kill()
    assert not budget.wanted(), "a dead process wants nothing"


def test_the_lock_file_is_private_to_its_user(budget: HostBudget) -> None:
    budget.take()
    assert os.stat(budget.path).st_mode & 0o777 == 0o600
    assert os.stat(budget.directory).st_mode & 0o777 == 0o700
    assert "HOST_MAX_CONNS=4" in Path(budget.path).read_text()


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"HOST_MAX_CONNS": 0}, r"HOST_MAX_CONNS'\] must be an integer >= 1"),
        ({"HOST_MAX_CONNS": "8"}, r"HOST_MAX_CONNS'\] must be an integer >= 1"),
        ({"HOST_MAX_CONNS": True}, r"HOST_MAX_CONNS'\] must be an integer >= 1"),
        ({"HOST_MAX_CONNS": 4, "MAX_CONNS": 5}, r"MAX_CONNS'\] \(5\) cannot be larger"),
        ({"HOST_MAX_CONNS": 4, "HOST_LOCK_DIR": "locks"}, r"an absolute directory path"),
        ({"HOST_LOCK_DIR": "/tmp/x"}, r"HOST_LOCK_DIR'\] is set but HOST_MAX_CONNS is not"),
        ({"host_max_conns": 4}, r"did you mean HOST_MAX_CONNS"),
    ],
)
def test_bad_budget_options_are_refused(options: dict[str, Any], match: str) -> None:
    with pytest.raises(PoolConfigError, match=match):
        PoolOptions.from_mapping(options, name="DATABASES['default']")


def test_max_conns_defaults_to_the_budget() -> None:
    options, _ = PoolOptions.from_mapping({"HOST_MAX_CONNS": 12}, name="x")
    assert options.MAX_CONNS == 12 and options.HOST_LOCK_DIR is None
    options, _ = PoolOptions.from_mapping({"HOST_MAX_CONNS": 12, "MAX_CONNS": 3}, name="x")
    assert options.MAX_CONNS == 3


def test_a_pool_with_host_max_conns_needs_its_budget() -> None:
    with pytest.raises(PoolConfigError, match="host_budget="):
        ConnectionPool(lambda: None, options={"HOST_MAX_CONNS": 2})


# ------------------------------------------------------------------ pools


def test_pools_sharing_a_budget_never_exceed_it(
    dsn: str, admin: Any, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    """24 workers on two pools of one budget while another process holds one slot."""
    neighbours.append(other := Neighbour(budget))
    assert None not in other.take(1)
    pools = [make_pool(dsn, app_name, budget, POOL_TIMEOUT=10) for _ in range(2)]
    workers = Workers()
    stop = time.monotonic() + 2.0
    seen: list[int] = []

    def work(pool: ConnectionPool) -> int:
        served = 0
        while time.monotonic() < stop:
            with pool.connection() as conn:
                select_one(conn)
                sleep(0.01)
            served += 1
        return served

    try:
        for i in range(24):
            workers.spawn(work, pools[i % 2])
        while time.monotonic() < stop:
            seen.append(backends(admin, app_name))
            sleep(0.01)
        workers.join(30)
        assert not workers.errors, workers.errors[:3]
        assert max(seen) == 3, f"the budget is 4, another process holds 1: saw {max(seen)}"
        assert sum(workers.results) > 48 and min(workers.results) > 0
        stats = [pool.get_stats() for pool in pools]
        assert sum(s["host_waits"] for s in stats) > 0, "the budget, not MAX_CONNS, was the limit"
        assert stats[0]["host_in_use"] == 1 + budget.held()
        for pool in pools:
            pool.check_invariants()
        assert budget.held() == sum(s["pool_size"] for s in stats)
    finally:
        for pool in pools:
            pool.close()
    assert budget.held() == 0


def test_a_checkout_waiting_for_the_host_is_served_when_a_slot_frees(
    dsn: str, app_name: str, budget: HostBudget, neighbours: list[Neighbour], workers: Workers
) -> None:
    neighbours.append(other := Neighbour(budget))
    slots = other.take(4)
    pool = make_pool(dsn, app_name, budget, POOL_TIMEOUT=10)
    got: list[float] = []

    def checkout() -> None:
        with pool.connection() as conn:
            got.append(time.monotonic())
            select_one(conn)

    try:
        for _ in range(20):
            workers.spawn(checkout)
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 20, what="20 waiting")
        assert pool.get_stats()["pool_size"] == 0
        freed = time.monotonic()
        other.ask(f"give {slots[0]}")
        workers.join(30)
        assert not workers.errors, workers.errors[:3]
        assert min(got) - freed < 1.0 + SLACK, f"served {min(got) - freed:.2f} s after"
        stats = pool.get_stats()
        assert stats["pool_size"] == 1, "one slot: every waiter served by the one connection"
        assert stats["requests_timeouts"] == 0
        pool.check_invariants()
    finally:
        pool.close()


def test_the_timeout_error_names_both_limits_and_the_hosts_use(
    dsn: str, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    neighbours.append(other := Neighbour(budget))
    other.take(3)
    pool = make_pool(dsn, app_name, budget, MAX_CONNS=3)
    try:
        held = pool.getconn()
        started = time.monotonic()
        with pytest.raises(PoolTimeout) as caught:
            pool.getconn(timeout=0.3)
        assert time.monotonic() - started < 0.3 + SLACK
        message = str(caught.value)
        assert "MAX_CONNS=3, HOST_MAX_CONNS=4: 4 in use on this host, 1 by this process" in (
            message
        ), message
        pool.putconn(held)
        pool.check_invariants()
    finally:
        pool.close()


def test_idle_connections_go_back_when_another_process_waits(
    dsn: str, admin: Any, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    """IDLE_TIMEOUT is 600 s; a neighbour's demand brings the idle ones back within a second."""
    pool = make_pool(dsn, app_name, budget, MIN_CONNS=1, REUSE_CONNS=4)
    try:
        held = [pool.getconn() for _ in range(4)]
        for conn in held:
            pool.putconn(conn)
        assert backends(admin, app_name) == 4
        neighbours.append(other := Neighbour(budget))
        count, seconds = other.ask("wait 3").split()
        assert count == "3", "MIN_CONNS=1 is kept, the other three are given back"
        assert float(seconds) < 0.25 + 0.5 + 1.0 + SLACK, seconds
        stats = pool.get_stats()
        assert stats["host_given_back"] == 3 and stats["pool_size"] == 1
        # Each slot was freed only once its backend had gone.
        assert backends(admin, app_name) == 1
        pool.check_invariants()
    finally:
        pool.close()


def test_a_freed_slot_never_lets_the_server_see_more_than_the_budget(
    dsn: str, admin: Any, app_name: str, tmp_path: Path
) -> None:
    """The slot of a closed connection is freed once its backend exited, not before."""
    budget = HostBudget(budget_key("127.0.0.1", 5432, app_name, "postgres"), 1, str(tmp_path))
    pool = make_pool(dsn, app_name, budget, REUSE_CONNS=0)
    try:
        for _ in range(20):
            with pool.connection() as conn:  # REUSE_CONNS=0: closed on return
                select_one(conn)
            assert budget.held() == 0
            assert backends(admin, app_name) == 0, "the slot was free before the backend went"
    finally:
        pool.close()


@pytest.mark.skipif(MODE != "gevent", reason="kills greenlets at their switch points")
def test_kills_at_every_switch_point_leave_the_budget_exact(
    dsn: str, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    """gevent.Timeout and GreenletExit while waiting for a host slot, connecting, and closing."""
    import gevent

    neighbours.append(other := Neighbour(budget))
    slots = other.take(4)
    pool = make_pool(dsn, app_name, budget, POOL_TIMEOUT=10, REUSE_CONNS=1)
    served: list[int] = []

    def checkout(hold: float) -> None:
        with pool.connection() as conn:
            select_one(conn)
            gevent.sleep(hold)
        served.append(1)

    try:
        waiting = [gevent.spawn(checkout, 0.01) for _ in range(20)]
        wait_until(lambda: pool.get_stats()["requests_waiting"] == 20, what="20 waiting")
        for greenlet in waiting[:5]:
            greenlet.kill(block=True)  # GreenletExit in the queue for the host
        for timeout in (0.0005, 0.002, 0.005, 0.01, 0.02):
            # gevent.Timeout wherever it lands: queued, connecting, closing (REUSE_CONNS=1).
            with gevent.Timeout(timeout, False):
                checkout(0.0)
        for slot in slots[:2]:
            other.ask(f"give {slot}")
        # Killed while connecting with a host slot just handed over.
        late = [gevent.spawn(checkout, 0.0) for _ in range(10)]
        gevent.sleep(0.002)
        gevent.killall(late[:3], block=True)
        gevent.joinall(waiting[5:] + late[3:], timeout=30)
        assert len(served) >= 22
        pool.check_invariants()
        stats = pool.get_stats()
        assert budget.held() == stats["pool_size"] <= 2
    finally:
        pool.close()
    assert budget.held() == 0, "every slot came back"


def test_min_conns_waits_for_the_host_and_fills_once_it_can(
    dsn: str, admin: Any, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    neighbours.append(other := Neighbour(budget))
    slots = other.take(4)
    pool = make_pool(dsn, app_name, budget, MIN_CONNS=2, REUSE_CONNS=2)
    try:
        pool.maintain()  # no slot: not an error, nothing opened
        assert pool.get_stats()["pool_size"] == 0 and pool.get_stats()["connections_errors"] == 0
        for slot in slots[:2]:
            other.ask(f"give {slot}")
        pool.maintain()
        pool.maintain()
        wait_until(lambda: backends(admin, app_name) == 2, what="MIN_CONNS once slots freed")
        assert budget.held() == 2
        pool.check_invariants()
    finally:
        pool.close()


def test_a_forked_child_pool_gets_its_own_slots(
    dsn: str, app_name: str, budget: HostBudget
) -> None:
    """The parent's connections keep their slots; the child's pool starts with none."""
    pool = make_pool(dsn, app_name, budget)
    try:
        a, b = pool.getconn(), pool.getconn()
        pool.putconn(a)
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through the pipe
            try:
                conns = [pool.getconn(timeout=2), pool.getconn(timeout=2)]
                try:
                    pool.getconn(timeout=0.2)
                    report = "third"
                except PoolTimeout:
                    report = f"ok {budget.held()} {pool.get_stats()['host_in_use']}"
                for conn in conns:
                    pool.putconn(conn)
                pool.close()
            except BaseException as exc:
                report = repr(exc)
            os.write(write, report.encode())
            os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        report = os.read(read, 1024).decode()
        os.close(read)
        assert report == "ok 2 4", report
        select_one(b)
        pool.putconn(b)
        with pool.connection() as conn:
            select_one(conn)
        assert budget.held() == 2 and budget.in_use() == 2
        pool.check_invariants()
    finally:
        pool.close()


BUSY = textwrap.dedent(
    """
    import sys
    if sys.argv[1] == "gevent":
        from gevent import monkey
        monkey.patch_all()
    import importlib, json, threading, time
    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.hostbudget import HostBudget

    mode, driver, dsn, app, key, size, directory, start, seconds = sys.argv[1:10]
    db = importlib.import_module(driver)
    budget = HostBudget(key, int(size), directory)

    def opener():
        conn = db.connect(dsn, application_name=app)
        conn.autocommit = True
        return conn

    pool = ConnectionPool(opener, driver=driver, name=app, host_budget=budget,
                          options={"HOST_MAX_CONNS": int(size), "POOL_TIMEOUT": 30})
    begin, end = float(start), float(start) + float(seconds)
    served = []

    def work():
        time.sleep(max(0.0, begin - time.time()))
        n = 0
        while time.time() < end:
            with pool.connection() as conn:
                cur = conn.cursor()
                cur.execute("SELECT pg_sleep(0.005)")
                cur.fetchall()
                cur.close()
            n += 1
        served.append(n)

    if mode == "gevent":
        import gevent
        gevent.joinall([gevent.spawn(work) for _ in range(10)])
    else:
        threads = [threading.Thread(target=work) for _ in range(10)]
        for t in threads: t.start()
        for t in threads: t.join()
    pool.check_invariants()
    stats = pool.get_stats()
    pool.close()
    print(json.dumps({"served": sum(served), "stepped_aside": stats["host_stepped_aside"],
                      "timeouts": stats["requests_timeouts"]}))
    """
)


def test_busy_processes_share_the_budget_and_none_starves(
    dsn: str, admin: Any, app_name: str, budget: HostBudget
) -> None:
    """Three processes, ten workers each, all busy on a budget of four: every one is served.

    Without stepping aside, the first process to take the four slots would
    keep them for as long as its load lasts (its connections never go idle).
    """
    start, seconds = time.time() + 1.5, 3.0
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-c", BUSY, MODE, DRIVER, dsn, app_name, budget.key),
                *(str(budget.size), budget.directory, str(start + 0.3 * i), str(seconds)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    seen = [0]
    try:
        while any(p.poll() is None for p in procs) and time.time() < start + seconds + 20:
            seen.append(backends(admin, app_name))
            sleep(0.01)
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    served = [r["served"] for r in results]
    print(f"served per process {served}, backends at most {max(seen)}")
    assert max(seen) <= budget.size, f"saw {max(seen)} backends on a budget of {budget.size}"
    assert all(r["timeouts"] == 0 for r in results), results
    assert min(served) >= 0.3 * max(served), f"a process starved: served {served}"
    assert sum(r["stepped_aside"] for r in results) > 0


def test_a_pool_closed_while_checkouts_wait_for_the_host_stops_wanting(
    dsn: str, app_name: str, budget: HostBudget, neighbours: list[Neighbour], workers: Workers
) -> None:
    neighbours.append(other := Neighbour(budget))
    other.take(4)
    pool = make_pool(dsn, app_name, budget, POOL_TIMEOUT=10)
    for _ in range(3):
        workers.spawn(pool.getconn)
    wait_until(lambda: pool.get_stats()["requests_waiting"] == 3, what="3 waiting for the host")
    assert budget.wanted(), "our checkouts wait for the host"
    assert other.ask("want on") == "ok" and budget.wanted_elsewhere()
    other.ask("want off")
    pool.close()
    workers.join(10)
    assert len(workers.errors) == 3  # PoolClosed, each
    # The closed pool's housekeeping is gone: nothing may keep advertising its demand.
    assert not budget.wanted()


@pytest.mark.skipif(MODE != "gevent", reason="the hub is gevent's")
def test_waiting_for_the_host_never_blocks_the_hub(
    dsn: str, app_name: str, budget: HostBudget, neighbours: list[Neighbour]
) -> None:
    """20 checkouts wait for a host slot while a 10 ms ticker keeps its rhythm."""
    import gevent

    neighbours.append(other := Neighbour(budget))
    slots = other.take(4)
    pool = make_pool(dsn, app_name, budget, POOL_TIMEOUT=1.0)
    gaps: list[float] = []
    running = [True]

    def ticker() -> None:
        last = time.monotonic()
        while running[0]:
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def checkout() -> str:
        try:
            with pool.connection() as conn:
                select_one(conn)
            return "served"
        except PoolTimeout:
            return "timeout"

    try:
        tick = gevent.spawn(ticker)
        waiting = [gevent.spawn(checkout) for _ in range(20)]
        gevent.sleep(0.5)
        other.ask(f"give {slots[0]}")  # one slot: all served through one connection
        gevent.joinall(waiting, timeout=10)
        running[0] = False
        tick.join(1)
        outcomes = [g.value for g in waiting]
        assert outcomes == ["served"] * 20, outcomes
        assert pool.get_stats()["connections_num"] == 1
        assert max(gaps) < 0.1, f"the hub stalled {max(gaps) * 1000:.0f} ms"
        pool.check_invariants()
    finally:
        pool.close()
