"""Randomised operation sequences against the pool's invariants (hypothesis stateful).

No server: connections are fakes whose socket is one end of a real socketpair,
so the pool's non-blocking look at the socket is the real system call, and
"the server closed it" is a byte (or EOF) really arriving. Time is a fake clock.

The same state machine runs three times:

- over a psycopg2-like fake, through the real psycopg2 driver;
- over a psycopg 3-like fake, through the real psycopg 3 driver;
- over a fake that is nothing like libpq (PyMySQL-like: its state is the
  in-transaction bit of the last OK packet), through a fake driver written
  here against :class:`~django_gevent_pool.drivers.base.Driver` alone. Its
  connection refuses every attribute the protocol does not let the pool touch:
  the pool core needs nothing beyond the protocol.

And once more with a host budget (``HOST_MAX_CONNS``): a real lock file, and a
neighbour (a second descriptor of it, which the kernel treats as another
process) taking and giving back slots between the pool's steps.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from typing import Any, ClassVar

import psycopg
import psycopg2
import psycopg2.extensions as ext
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import pq

from django_gevent_pool import ConnectionPool, PoolTimeout, PoolUnavailable
from django_gevent_pool.drivers import Driver, Status
from django_gevent_pool.errors import flavoured
from django_gevent_pool.hostbudget import HostBudget

STATES = ("ACTIVE", "IDLE", "INERROR", "INTRANS", "UNKNOWN")

STATUSES = {
    "IDLE": ext.TRANSACTION_STATUS_IDLE,
    "INTRANS": ext.TRANSACTION_STATUS_INTRANS,
    "INERROR": ext.TRANSACTION_STATUS_INERROR,
    "ACTIVE": ext.TRANSACTION_STATUS_ACTIVE,
    "UNKNOWN": ext.TRANSACTION_STATUS_UNKNOWN,
}

SETTINGS = settings(max_examples=300, stateful_step_count=40, deadline=None)


# ------------------------------------------------------- a psycopg2-like fake


class FakeInfo:
    def __init__(self) -> None:
        self.transaction_status = ext.TRANSACTION_STATUS_IDLE


class FakeCursor:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, sql: str) -> None:
        self.conn.queries.append(sql)
        if self.conn.server_gone:
            self.conn.closed = 2
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        if sql == ";":
            raise psycopg2.ProgrammingError("can't execute an empty query")


class FakeConn:
    """Just enough of a psycopg2 connection for the pool, over a real socketpair."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.closed = 0
        self.autocommit = False
        self.info = FakeInfo()
        self.sock, self.server = socket.socketpair()
        self.server_gone = False
        self.fail_rollback = False
        self.queries: list[str] = []
        self.cancelled = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def get_transaction_status(self) -> int:
        return self.info.transaction_status

    def cursor(self) -> FakeCursor:
        if self.closed:
            raise psycopg2.InterfaceError("connection already closed")
        return FakeCursor(self)

    def rollback(self) -> None:
        if self.fail_rollback or self.server_gone:
            self.closed = 2
            raise psycopg2.OperationalError("rollback failed")
        self.info.transaction_status = ext.TRANSACTION_STATUS_IDLE

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        if not self.closed:
            self.closed = 1
        self.sock.close()
        self.server.close()

    def kill_on_server(self) -> None:
        """The server ends the session: it sends an error and closes its end."""
        self.server_gone = True
        self.server.sendall(b"E")
        self.server.close()

    # What the state machine does with a fake, whatever the driver.

    def set_state(self, state: str) -> None:
        """The transaction status the client will report (set by the borrower's work)."""
        self.info.transaction_status = STATUSES[state]

    def is_idle(self) -> bool:
        return bool(self.info.transaction_status == ext.TRANSACTION_STATUS_IDLE)

    def query_failed(self) -> None:
        """What the greenlet running a cut query does when it fails: it closes it."""
        self.close()

    def dispose(self) -> None:
        self.close()


# ------------------------------------------------------ a psycopg 3-like fake


class FakeCancelConn:
    """psycopg 3's ``PGcancelConn`` (libpq 17+): delivered as soon as started."""

    def __init__(self, conn: FakePsycopgConn) -> None:
        self.conn = conn
        self.socket = -1

    def start(self) -> None:
        self.conn.cancelled = True

    def poll(self) -> int:
        return int(pq.PollingStatus.OK)

    def get_error_message(self) -> str:
        return ""

    def finish(self) -> None:
        pass


class FakePGconn:
    """psycopg 3's ``conn.pgconn``: libpq's view, read with no lock and no round trip."""

    def __init__(self, conn: FakePsycopgConn) -> None:
        self._conn = conn
        self.transaction_status = pq.TransactionStatus.IDLE

    @property
    def socket(self) -> int:
        if self._conn.closed:
            raise psycopg.OperationalError("the connection is closed")
        return self._conn.sock.fileno()

    def cancel_conn(self) -> FakeCancelConn:
        return FakeCancelConn(self._conn)


class FakePsycopgInfo:
    def __init__(self, pgconn: FakePGconn) -> None:
        self._pgconn = pgconn

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        return self._pgconn.transaction_status


class FakePsycopgCursor:
    """What ``psycopg.Connection.execute`` returns: one command tag per statement."""

    def __init__(self, sql: str) -> None:
        statements = [" ".join(part.split()).upper() for part in sql.split(";")]
        self._tags = [tag for tag in statements if tag] or [None]
        self.statusmessage = self._tags[0]

    def nextset(self) -> bool | None:
        self._tags.pop(0)
        if not self._tags:
            return None
        self.statusmessage = self._tags[0]
        return True


class FakePrepared:
    """psycopg's PrepareManager, as far as the driver's RESET_QUERY touches it."""

    def __init__(self) -> None:
        self.names = ["_pg3_0"]  # the session prepared something
        self.clears = 0
        self._maint_commands: list[bytes] = []

    def clear(self) -> bool:
        self.clears += 1
        had, self.names = bool(self.names), []
        if had:
            self._maint_commands.append(b"DEALLOCATE ALL")
        return had


class FakePsycopgConn:
    """Just enough of a ``psycopg.Connection`` for the pool, over a real socketpair."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.closed = False
        self.autocommit = False
        self.pgconn = FakePGconn(self)
        self.info = FakePsycopgInfo(self.pgconn)
        self.sock, self.server = socket.socketpair()
        self.server_gone = False
        self.fail_rollback = False
        self.queries: list[str] = []
        self.cancelled = False
        self._prepared = FakePrepared()
        self.server_prepared = True  # the server holds the session's prepared statements

    def fileno(self) -> int:
        return self.pgconn.socket

    def execute(self, sql: str, prepare: bool | None = None) -> FakePsycopgCursor:
        if self.closed:
            raise psycopg.OperationalError("the connection is closed")
        self.queries.append(sql)
        if self.server_gone:
            self.closed = True
            raise psycopg.OperationalError("consuming input failed: server closed the connection")
        # psycopg 3 runs the empty query (";") without complaint.
        cursor = FakePsycopgCursor(sql)
        if "DISCARD ALL" in cursor._tags:
            # The server dropped them; the driver must make psycopg forget them
            # too (checked in check_prepared_forgotten), and sends nothing more.
            self.server_prepared = False
        return cursor

    def rollback(self) -> None:
        if self.fail_rollback or self.server_gone:
            self.closed = True
            raise psycopg.OperationalError("rollback failed")
        self.pgconn.transaction_status = pq.TransactionStatus.IDLE

    def close(self) -> None:
        self.closed = True
        self.sock.close()
        self.server.close()

    def kill_on_server(self) -> None:
        self.server_gone = True
        self.server.sendall(b"E")
        self.server.close()

    def set_state(self, state: str) -> None:
        self.pgconn.transaction_status = pq.TransactionStatus[state]

    def is_idle(self) -> bool:
        return self.pgconn.transaction_status is pq.TransactionStatus.IDLE

    def query_failed(self) -> None:
        self.close()

    def dispose(self) -> None:
        self.close()


# ---------------------------------------- a fake with no libpq, and its driver


class FakeMySQLError(Exception):
    """The fake driver's base error (as ``pymysql.err.Error``)."""


class FakeMySQLOperationalError(FakeMySQLError):
    pass


class FakeMySQLProgrammingError(FakeMySQLError):
    pass


SERVER_STATUS_IN_TRANS = 1  # PyMySQL's constants.SERVER_STATUS.SERVER_STATUS_IN_TRANS
SERVER_STATUS_AUTOCOMMIT = 2


class FakeMySQLConn:
    """A PyMySQL-like connection: no libpq, no transaction status, no ``fileno()``.

    What it knows of its session is the status flags of the server's last OK
    packet (``server_status``); a query in flight is a result not read yet;
    a packet out of sequence leaves it out of sync. Any attribute that is not
    its own is recorded and refused: the pool may reach it only through the
    fake driver.
    """

    def __init__(self, serial: int) -> None:
        self.thread_id = 100 + serial  # the server's id of the session: KILL QUERY <id>
        self._sock: socket.socket | None
        self._sock, self.server = socket.socketpair()
        self.server_status = SERVER_STATUS_AUTOCOMMIT
        self.executing = False  # a query sent, its result not read (another borrower)
        self.out_of_sync = False  # "Packet sequence number wrong": state unknown
        self.server_gone = False
        self.fail_rollback = False
        self.sent: list[str] = []  # commands sent, in order
        self.cancelled = False  # KILL QUERY sent for it from a second connection

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__"):
            REACHED_PAST_THE_DRIVER.append(name)
        raise AttributeError(f"the pool reached past the driver: conn.{name}")

    @property
    def open(self) -> bool:
        return self._sock is not None

    @property
    def closed(self) -> bool:
        """For the state machine's accounting (PyMySQL itself has ``open`` only)."""
        return not self.open

    def _command(self, what: str) -> None:
        if self._sock is None:
            raise FakeMySQLError("Already closed")
        self.sent.append(what)
        if self.server_gone:
            self._force_close()
            raise FakeMySQLOperationalError("Lost connection to MySQL server during query")

    def ping(self, reconnect: bool = True) -> None:
        assert reconnect is False, "a pool never reconnects behind its own back"
        self._command("COM_PING")

    def query(self, sql: str) -> None:
        self._command(sql)
        self.server_status &= ~SERVER_STATUS_IN_TRANS

    def reset_connection(self) -> None:
        self._command("COM_RESET_CONNECTION")
        self.server_status = SERVER_STATUS_AUTOCOMMIT

    def rollback(self) -> None:
        self._command("ROLLBACK")
        if self.fail_rollback:
            self._force_close()
            raise FakeMySQLOperationalError("rollback failed")
        self.server_status &= ~SERVER_STATUS_IN_TRANS

    def close(self) -> None:
        self._command("COM_QUIT")
        self._force_close()

    def _force_close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.server.close()

    def kill_on_server(self) -> None:
        self.server_gone = True
        self.server.sendall(b"\xff")  # an error packet, then EOF
        self.server.close()

    def set_state(self, state: str) -> None:
        if state == "ACTIVE":
            self.executing = True
        elif state == "UNKNOWN":
            self.out_of_sync = True
        elif state == "IDLE":
            self.server_status &= ~SERVER_STATUS_IN_TRANS
        else:
            # INTRANS, and INERROR: MySQL keeps the transaction open after a
            # failed statement, and the last OK packet's bit still says so.
            self.server_status |= SERVER_STATUS_IN_TRANS

    def is_idle(self) -> bool:
        return (
            not self.executing
            and not self.out_of_sync
            and not self.server_status & SERVER_STATUS_IN_TRANS
        )

    def query_failed(self) -> None:
        """The borrower's read fails on the cut socket: PyMySQL force-closes."""
        self._force_close()

    def dispose(self) -> None:
        self._force_close()


#: Attributes the pool asked of a FakeMySQLConn directly (must stay empty).
REACHED_PAST_THE_DRIVER: list[str] = []
#: The fake driver's methods the pool called.
FAKE_DRIVER_CALLS: set[str] = set()


class FakeMySQLDriver:
    """The :class:`~django_gevent_pool.drivers.base.Driver` protocol over FakeMySQLConn."""

    name = "fake-mysql"
    Error = FakeMySQLError
    errors = flavoured(FakeMySQLOperationalError, FakeMySQLProgrammingError)
    resets_sessions = True

    def status(self, conn: FakeMySQLConn) -> Status:
        FAKE_DRIVER_CALLS.add("status")
        if not conn.open:
            return Status.CLOSED
        if conn.out_of_sync:
            return Status.UNKNOWN
        if conn.executing:
            return Status.ACTIVE
        if conn.server_status & SERVER_STATUS_IN_TRANS:
            return Status.INTRANS
        return Status.IDLE

    def fileno(self, conn: FakeMySQLConn) -> int:
        FAKE_DRIVER_CALLS.add("fileno")
        if conn._sock is None:
            raise FakeMySQLError("Already closed")
        return conn._sock.fileno()

    def ping(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("ping")
        conn.ping(reconnect=False)

    def rollback(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("rollback")
        conn.rollback()

    def execute(self, conn: FakeMySQLConn, sql: str) -> None:
        FAKE_DRIVER_CALLS.add("execute")
        conn.query(sql)

    def reset_session(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("reset_session")
        conn.reset_connection()

    def cut(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("cut")
        sock = conn._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def sever(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("sever")
        # A real driver sends KILL QUERY <thread_id> from a second connection.
        conn.cancelled = True
        self.cut(conn)

    def close(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("close")
        conn.close()

    def detach(self, conn: FakeMySQLConn) -> None:
        FAKE_DRIVER_CALLS.add("detach")
        sock = conn._sock
        if sock is None:
            return
        devnull = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(devnull, sock.fileno())
        finally:
            os.close(devnull)

    def ensure_cooperative(self) -> bool:
        FAKE_DRIVER_CALLS.add("ensure_cooperative")
        return self.is_cooperative()

    def is_cooperative(self) -> bool:
        # Pure Python over ``socket``: cooperative once gevent patched it.
        monkey = sys.modules.get("gevent.monkey")
        return monkey is not None and bool(monkey.is_module_patched("socket"))


# ----------------------------------------------------------- the state machine


class PoolMachine(RuleBasedStateMachine):
    """The pool over fakes of one driver; subclasses say which."""

    held = Bundle("held")
    #: What the pool is given as ``driver``, and what the fakes are.
    driver: ClassVar[Driver | str] = "psycopg2"
    make_conn: ClassVar[Any] = FakeConn
    OperationalError: ClassVar[type[Exception]] = psycopg2.OperationalError

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.made: list[Any] = []
        self.refuse = False
        self.pool: ConnectionPool | None = None

    def _connect(self) -> Any:
        if self.refuse:
            raise self.OperationalError("connection refused")
        conn = type(self).make_conn(len(self.made))
        self.made.append(conn)
        return conn

    @rule(
        max_conns=st.integers(1, 5),
        reuse=st.integers(0, 5),
        ping_after=st.sampled_from([None, 0.0, 5.0]),
        lifetime=st.sampled_from([None, 30.0]),
        idle_timeout=st.sampled_from([None, 20.0]),
        min_conns=st.integers(0, 2),
        reset_query=st.sampled_from([None, "DISCARD ALL"]),
    )
    @precondition(lambda self: self.pool is None)
    def make_pool(
        self,
        max_conns: int,
        reuse: int,
        ping_after: float | None,
        lifetime: float | None,
        idle_timeout: float | None,
        min_conns: int,
        reset_query: str | None,
    ) -> None:
        self.pool = ConnectionPool(
            self._connect,
            driver=self.driver,
            name="model",
            options={
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max(min(reuse, max_conns), min(min_conns, max_conns)),
                "MIN_CONNS": min(min_conns, max_conns),
                "PING_AFTER": ping_after,
                "MAX_LIFETIME": lifetime,
                "IDLE_TIMEOUT": idle_timeout,
                "RESET_QUERY": reset_query,
            },
            clock=lambda: self.now,
            background=False,
        )

    @rule(target=held)
    @precondition(lambda self: self.pool is not None)
    def checkout(self) -> Any:
        assert self.pool is not None
        try:
            conn = self.pool.getconn(timeout=0)
        except PoolTimeout:
            stats = self.pool.get_stats()
            assert stats["pool_available"] == 0
            # A full pool, or (with a host budget) a host whose slots are all taken.
            assert stats["pool_size"] == stats["pool_max"] or (
                stats.get("host_in_use") == stats.get("host_max")
            )
            return None
        except PoolUnavailable:
            # Backing off after a refused connect: only until the clock moves on.
            assert self.pool._backoff.failures > 0
            return None
        except self.OperationalError:
            assert self.refuse
            return None
        # Never hand out a closed, busy or server-closed connection.
        assert not conn.closed
        assert conn.is_idle()
        assert not conn.server_gone
        return conn

    @rule(
        conn=consumes(held),
        state=st.sampled_from(STATES),
        bad_rollback=st.booleans(),
        reset=st.sampled_from([None, False, True]),
    )
    def give_back(self, conn: Any, state: str, bad_rollback: bool, reset: bool | None) -> None:
        if conn is None or self.pool is None:
            return
        conn.set_state(state)
        conn.fail_rollback = bad_rollback
        size = self.pool.get_stats()["pool_size"]
        self.pool.putconn(conn, reset=reset)
        after = self.pool.get_stats()
        if reset is True and state == "IDLE" and self.pool.driver.resets_sessions:
            # A borrower that made session state: the protocol's reset ran.
            assert "COM_RESET_CONNECTION" in conn.sent
        if state in ("ACTIVE", "UNKNOWN") or (state in ("INTRANS", "INERROR") and bad_rollback):
            assert after["pool_size"] == size - 1, "a bad connection's slot is freed at once"
            assert conn not in self._idle()
        if state == "ACTIVE":
            assert conn.cancelled
            conn.query_failed()  # what the greenlet running the query does when it fails

    @rule(conn=consumes(held))
    def close_then_give_back(self, conn: Any) -> None:
        if conn is None or self.pool is None:
            return
        conn.close()
        self.pool.putconn(conn)
        assert conn not in self._idle()

    @rule(data=st.data())
    @precondition(lambda self: self.pool is not None and self._alive_idle())
    def server_kills_an_idle_connection(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(self._alive_idle()))
        victim.kill_on_server()

    def _alive_idle(self) -> list[Any]:
        return [conn for conn in self._idle() if not conn.server_gone]

    @rule(seconds=st.sampled_from([0.5, 6.0, 25.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    @precondition(lambda self: self.pool is not None)
    def housekeeping(self) -> None:
        assert self.pool is not None
        before = self.pool.get_stats()
        opened = self.pool.maintain()
        after = self.pool.get_stats()
        if opened:
            # Only up to MIN_CONNS, one at a time, and only when connecting works.
            assert not self.refuse
            assert after["pool_size"] <= after["pool_min"]
            assert after["connections_num"] == before["connections_num"] + 1
        else:
            assert after["pool_size"] <= before["pool_size"]

    @rule()
    def toggle_refusal(self) -> None:
        self.refuse = not self.refuse

    def _idle(self) -> list[Any]:
        assert self.pool is not None
        return [entry.conn for entry in self.pool._idle]

    @invariant()
    def accounting_holds(self) -> None:
        if self.pool is None:
            return
        self.pool.check_invariants()
        stats = self.pool.get_stats()
        open_conns = [c for c in self.made if not c.closed]
        assert stats["pool_opening"] == 0  # single-threaded: nobody is mid-connect
        # Every connection the pool counts is open, and the pool counts every open one.
        assert len(open_conns) == stats["pool_size"]
        assert stats["pool_size"] <= stats["pool_max"]

    def teardown(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for conn in self.made:
            conn.dispose()


class PsycopgMachine(PoolMachine):
    driver = "psycopg"
    make_conn = FakePsycopgConn
    OperationalError = psycopg.OperationalError

    @invariant()
    def psycopg_forgets_what_the_server_dropped(self) -> None:
        """After a DISCARD ALL reset, psycopg must not bind a statement the server dropped."""
        for conn in self.made:
            if not conn.closed and not conn.server_prepared:
                assert conn._prepared.names == [], "psycopg still knows dropped statements"
                assert conn._prepared._maint_commands == [], "nothing left to send"


class FakeDriverMachine(PoolMachine):
    driver = FakeMySQLDriver()
    make_conn = FakeMySQLConn
    OperationalError = FakeMySQLOperationalError

    def __init__(self) -> None:
        super().__init__()
        REACHED_PAST_THE_DRIVER.clear()  # each example on its own

    @invariant()
    def only_through_the_driver(self) -> None:
        assert REACHED_PAST_THE_DRIVER == []


class BudgetMachine(PoolMachine):
    """The psycopg2-like pool with a host budget, and a neighbour using the same one."""

    def __init__(self) -> None:
        super().__init__()
        self.lock_dir = tempfile.TemporaryDirectory()
        self.budget: HostBudget | None = None
        self.neighbour: HostBudget | None = None
        self.theirs: list[int] = []

    @rule(
        max_conns=st.integers(1, 4),
        size=st.integers(1, 4),
        min_conns=st.sampled_from([0, 0, 1]),
        idle_timeout=st.sampled_from([None, 20.0]),
    )
    @precondition(lambda self: self.pool is None)
    def make_budget_pool(
        self, max_conns: int, size: int, min_conns: int, idle_timeout: float | None
    ) -> None:
        max_conns = min(max_conns, size)
        key = "postgres@model:5432/model"
        self.budget = HostBudget(key, size, self.lock_dir.name)
        self.neighbour = HostBudget(key, size, self.lock_dir.name)
        self.pool = ConnectionPool(
            self._connect,
            driver=self.driver,
            name="model",
            options={
                "MAX_CONNS": max_conns,
                "MIN_CONNS": min(min_conns, max_conns),
                "HOST_MAX_CONNS": size,
                "IDLE_TIMEOUT": idle_timeout,
                "PING_AFTER": None,
            },
            clock=lambda: self.now,
            background=False,
            host_budget=self.budget,
        )

    # The parent's pool without a budget is not made here.
    make_pool = None  # type: ignore[assignment]

    @rule(n=st.integers(1, 3))
    @precondition(lambda self: self.pool is not None)
    def a_burst_comes_and_goes(self, n: int) -> None:
        """``n`` checkouts at once, all given back clean: idle connections to give back."""
        assert self.pool is not None
        lent = []
        for _ in range(n):
            try:
                lent.append(self.pool.getconn(timeout=0))
            except (PoolTimeout, PoolUnavailable, self.OperationalError):
                break
        for conn in lent:
            self.pool.putconn(conn)

    @rule()
    @precondition(lambda self: self.neighbour is not None)
    def neighbour_takes(self) -> None:
        assert self.neighbour is not None
        slot = self.neighbour.take()
        if slot is not None:
            self.theirs.append(slot)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.theirs))
    def neighbour_gives_back(self, data: st.DataObject) -> None:
        assert self.neighbour is not None
        slot = data.draw(st.sampled_from(self.theirs))
        self.theirs.remove(slot)
        self.neighbour.give(slot)

    @rule()
    @precondition(
        lambda self: self.pool is not None and len(self.pool._idle) > self.pool.options.MIN_CONNS
    )
    def neighbour_waits(self) -> None:
        """The neighbour wants a slot: idle connections go back after 0.5 s idle."""
        assert self.neighbour is not None and self.pool is not None
        before = self.pool.get_stats()
        self.neighbour.want(True)
        self.now += 1.0
        self.pool.maintain()
        stats = self.pool.get_stats()
        assert stats["pool_available"] <= stats["pool_min"], "idle ones given back"
        # Given back, or found lost or expired first: closed either way.
        assert stats["connections_closed"] > before["connections_closed"]
        self.neighbour.want(False)

    @invariant()
    def the_budget_holds(self) -> None:
        if self.pool is None:
            return
        assert self.budget is not None
        stats = self.pool.get_stats()
        # One slot per open connection, never one more, and the host never over.
        assert self.budget.held() == stats["pool_size"]
        assert stats["host_in_use"] == self.budget.held() + len(self.theirs) <= self.budget.size

    def teardown(self) -> None:
        lent = 0 if self.pool is None else len(self.pool._in_use)
        super().teardown()
        if self.budget is not None:
            # Closing the pool frees every idle connection's slot; lent ones keep theirs.
            assert self.budget.held() == lent, "every idle slot back once the pool closed"
        self.lock_dir.cleanup()


PoolMachine.TestCase.settings = SETTINGS
test_pool_state_machine = PoolMachine.TestCase
BudgetMachine.TestCase.settings = SETTINGS
test_pool_state_machine_host_budget = BudgetMachine.TestCase
PsycopgMachine.TestCase.settings = SETTINGS
test_pool_state_machine_psycopg = PsycopgMachine.TestCase


def test_the_fake_driver_implements_exactly_the_protocol() -> None:
    protocol = {n for n in vars(Driver) if not n.startswith("_")} | set(Driver.__annotations__)
    fake = {n for n in vars(FakeMySQLDriver) if not n.startswith("_")}
    assert fake == protocol


def test_pool_state_machine_through_a_fake_driver() -> None:
    """The pool core over a connection that is nothing like libpq's, through the protocol."""
    REACHED_PAST_THE_DRIVER.clear()
    FAKE_DRIVER_CALLS.clear()
    run_state_machine_as_test(FakeDriverMachine, settings=SETTINGS)
    assert REACHED_PAST_THE_DRIVER == []
    # The run went through every part of the protocol a single thread can reach
    # (cut needs a silent network, detach a fork).
    reached = {
        "status",
        "fileno",
        "ping",
        "rollback",
        "execute",
        "reset_session",
        "sever",
        "close",
    }
    assert reached <= FAKE_DRIVER_CALLS, reached - FAKE_DRIVER_CALLS
    assert "ensure_cooperative" in FAKE_DRIVER_CALLS
