"""Randomised operation sequences against the pool's invariants (hypothesis stateful).

No server: connections are fakes whose socket is one end of a real socketpair,
so the pool's non-blocking look at the socket is the real system call, and
"the server closed it" is a byte (or EOF) really arriving. Time is a fake clock.
"""

from __future__ import annotations

import socket
from typing import Any

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
)

from django_gevent_pool import ConnectionPool, PoolTimeout, PoolUnavailable

STATUSES = {
    "IDLE": ext.TRANSACTION_STATUS_IDLE,
    "INTRANS": ext.TRANSACTION_STATUS_INTRANS,
    "INERROR": ext.TRANSACTION_STATUS_INERROR,
    "ACTIVE": ext.TRANSACTION_STATUS_ACTIVE,
    "UNKNOWN": ext.TRANSACTION_STATUS_UNKNOWN,
}


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


class PoolMachine(RuleBasedStateMachine):
    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.made: list[FakeConn] = []
        self.refuse = False
        self.pool: ConnectionPool | None = None

    def _connect(self) -> FakeConn:
        if self.refuse:
            raise psycopg2.OperationalError("connection refused")
        conn = FakeConn(len(self.made))
        self.made.append(conn)
        return conn

    @rule(
        max_conns=st.integers(1, 5),
        reuse=st.integers(0, 5),
        ping_after=st.sampled_from([None, 0.0, 5.0]),
        lifetime=st.sampled_from([None, 30.0]),
        idle_timeout=st.sampled_from([None, 20.0]),
        min_conns=st.integers(0, 2),
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
    ) -> None:
        self.pool = ConnectionPool(
            self._connect,
            name="model",
            options={
                "MAX_CONNS": max_conns,
                "REUSE_CONNS": max(min(reuse, max_conns), min(min_conns, max_conns)),
                "MIN_CONNS": min(min_conns, max_conns),
                "PING_AFTER": ping_after,
                "MAX_LIFETIME": lifetime,
                "IDLE_TIMEOUT": idle_timeout,
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
            assert stats["pool_size"] == stats["pool_max"] and stats["pool_available"] == 0
            return None
        except PoolUnavailable:
            # Backing off after a refused connect: only until the clock moves on.
            assert self.pool._backoff.failures > 0
            return None
        except psycopg2.OperationalError:
            assert self.refuse
            return None
        # Never hand out a closed, busy or server-closed connection.
        assert not conn.closed
        assert conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE
        assert not conn.server_gone
        return conn

    @rule(conn=consumes(held), state=st.sampled_from(sorted(STATUSES)), bad_rollback=st.booleans())
    def give_back(self, conn: FakeConn | None, state: str, bad_rollback: bool) -> None:
        if conn is None or self.pool is None:
            return
        conn.info.transaction_status = STATUSES[state]
        conn.fail_rollback = bad_rollback
        size = self.pool.get_stats()["pool_size"]
        self.pool.putconn(conn)
        after = self.pool.get_stats()
        if state in ("ACTIVE", "UNKNOWN") or (state in ("INTRANS", "INERROR") and bad_rollback):
            assert after["pool_size"] == size - 1, "a bad connection's slot is freed at once"
            assert conn not in self._idle()
        if state == "ACTIVE":
            assert conn.cancelled
            conn.close()  # what the greenlet running the query does when it fails

    @rule(conn=consumes(held))
    def close_then_give_back(self, conn: FakeConn | None) -> None:
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

    def _alive_idle(self) -> list[FakeConn]:
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

    def _idle(self) -> list[FakeConn]:
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
            conn.close()


PoolMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase
