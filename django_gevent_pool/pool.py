"""The connection pool: slots, idle connections, waiters, lifetimes, stats.

No Django here, and no direct gevent import: the primitives come from
:mod:`django_gevent_pool.sync`, chosen when the pool is built or when a caller
has to wait.

The state machine, guarded by one OS lock whose critical sections never do I/O::

    open connections = idle + in use + opening <= MAX_CONNS

- A checkout takes the most recently returned idle connection; failing that it
  *reserves a slot* (``opening += 1``) under the lock and connects outside it,
  giving the slot back on any failure (a refused connect, ``gevent.Timeout``,
  ``GreenletExit``); failing that it queues, FIFO, until a returning connection
  or a freed slot is handed to it, or its deadline passes.
- A returned connection is handed straight to the first waiter, or kept idle
  (up to ``REUSE_CONNS``), or closed. A discarded connection's slot goes to the
  first waiter, who opens a new connection with it.
- Every idle connection is checked without a round trip on checkout (closed
  flag, transaction status, a non-blocking look at its socket); a real ping
  only after ``PING_AFTER`` seconds idle, or when it is older than a lost
  connection seen since (the server may have restarted).
- While connects fail, the pool is *failing*: one connect attempt at a time
  (single flight), spaced by a short backoff; checkouts that need a new
  connection wait for their turn at most 2 s, so a server that is back is
  served within a second and a server that is down is not stampeded.
- With a host budget (``HOST_MAX_CONNS``, :mod:`.hostbudget`) each open
  connection also holds one of the host's slots, taken (never waiting) just
  before connecting and freed once the server has let go of the closed
  connection. A checkout that finds every host slot taken gives its local
  slot back and queues like any waiter; the housekeeping polls the budget
  every ~10 ms for them, and a returned connection still goes to the first
  waiter. While any process of the host waits, idle connections above
  ``MIN_CONNS`` are given back after 0.5 s idle instead of ``IDLE_TIMEOUT``;
  a process holding more than its fair share (the budget divided among the
  processes that wait) closes a returned connection every 20 ms instead of
  lending it again, and one at or above its share leaves a free slot to those
  below theirs: no process keeps the slots for as long as its load lasts.
- On a silent network (packets dropped, no error) nothing waits without a
  bound: a ping gets ``min(1.5 s, the checkout's deadline)``, a return's
  rollback or ``RESET_QUERY`` 2 s, after which a watchdog cuts the socket; a
  query returned while running is cut and its cancel sent in the background
  (:mod:`django_gevent_pool.cancel`); the gevent hub never waits at all.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from . import health, leaks, stats, sync, timing
from .backoff import Backoff
from .drivers import Driver, Status, get_driver
from .errors import PoolClosed, PoolConfigError, PoolTimeout, PoolUnavailable
from .hostbudget import HostBudget
from .options import PoolOptions

logger = logging.getLogger("django_gevent_pool")

# What a waiter can be handed besides a connection entry.
_SLOT = "slot"  # a reserved slot: the waiter opens a connection with it
_CLOSED = "closed"  # the pool was closed while it waited
_FORKED = "forked"  # queued in the parent: the process forked while it waited
# While connects fail, a checkout that needs a new connection waits for its
# turn to try at most this long (or its own timeout, if shorter), then fails
# with PoolUnavailable chained from the last connect error.
_OUTAGE_WAIT = 2.0
# With MIN_CONNS, housekeeping looks at idle connections at least this often.
_MIN_CONNS_LOOK_EVERY = 0.5
_EXPIRED = "it reached MAX_LIFETIME"  # a retirement, not a fault: no warning, not "bad"
_BY_CALLER = "discarded by the caller"
_SEVERED = "it was returned while a query was running on it (ACTIVE): cancelled and cut"
# While checkouts wait for a host slot, the housekeeping tries to take one this
# often (jittered, so the processes of a host poll in no fixed order).
_HOST_POLL = (0.005, 0.015)
# With a host budget, housekeeping looks for another process's demand this often,
# and then gives back idle connections above MIN_CONNS idle at least this long.
_HOST_LOOK_EVERY = 0.25
_HOST_GIVE_BACK_AFTER = 0.5
# While another process waits for a slot, a busy process closes one returned
# connection this often instead of lending it again: slots change hands.
_HOST_STEP_ASIDE_EVERY = 0.02
# A process holding one of the slots a budget that does not divide evenly among
# the waiting processes leaves over gives it up this often.
_HOST_ROTATE_EVERY = 0.1
# A closed connection's host slot is freed once the server closed its end (its
# backend has exited, so the server counts it no more), or after this long.
_GONE_WITHIN = 0.5


class _HostSlot:
    """What a host-starved waiter is handed: a reserved local slot and host slot ``slot``."""

    __slots__ = ("slot",)

    def __init__(self, slot: int) -> None:
        self.slot = slot


class _ConnectDeadline(Exception):
    """Raised inside a connect that ran past the checkout deadline (gevent only)."""


class _Entry:
    """A pooled connection and the times the pool keeps about it."""

    __slots__ = (
        "borrowed_at",
        "borrower",
        "conn",
        "created_at",
        "expires_at",
        "generation",
        "holder",
        "host_slot",
        "last_used",
        "leak_warned",
        "lease",
        "probe",
        "returning",
        "verified_at",
    )

    def __init__(
        self,
        conn: Any,
        now: float,
        lifetime: float | None,
        generation: int,
        host_slot: int | None = None,
    ) -> None:
        self.conn = conn
        self.generation = generation  # the pool's, when opened: a fork starts a new one
        self.host_slot = host_slot  # the host budget's slot it holds, if there is a budget
        self.created_at = now
        # Jittered down by up to 10% so connections opened together retire apart.
        self.expires_at = None if lifetime is None else now + lifetime * random.uniform(0.9, 1.0)
        self.last_used = now
        self.verified_at = now  # last time the server was seen answering on it
        self.returning = False
        self.borrowed_at = now
        self.borrower: str | None = None  # who borrowed it and where (LEAK_TIMEOUT only)
        self.holder: tuple[Any, int] | None = None  # sync.current_holder() of the borrower
        self.leak_warned = False
        self.lease = 0  # which checkout holds it: a return must name the current one
        self.probe: Callable[[], bool] | None = None  # is its socket readable? (made on first use)


class _Waiter:
    """A queued checkout. ``item`` is set, under the pool lock, by whoever serves it."""

    __slots__ = ("generation", "item", "signal")

    def __init__(self, generation: int) -> None:
        self.signal = sync.new_signal()
        self.item: _Entry | _HostSlot | str | None = None
        self.generation = generation


class ConnectionPool:
    """A bounded, greenlet- and thread-safe pool of database connections.

    ``connect`` is called with no argument to open a new connection; it runs
    outside the pool's lock, in the caller's greenlet or thread, and whatever it
    raises reaches that caller after the reserved slot has been given back.
    ``driver`` says what kind of connection ``connect`` returns: a name
    (``"psycopg2"``, the default, or ``"psycopg"`` for psycopg 3) or a
    :class:`~django_gevent_pool.drivers.Driver`. The pool's errors subclass
    that driver's ``OperationalError``.

    ``options`` is a :class:`PoolOptions` or a mapping of the same upper-case
    names (``MAX_CONNS``, ``REUSE_CONNS``, ``POOL_TIMEOUT``, ...).
    ``after_reset`` is called with a connection after ``RESET_QUERY`` ran on it,
    to restore the session state its creator set up (a failure discards it).
    ``clock`` returns monotonic seconds; tests replace it. ``background=False``
    leaves :meth:`maintain` to the caller (tests with a fake clock).
    ``host_budget`` (:func:`~django_gevent_pool.hostbudget.budget_for`) makes
    every open connection hold one of the host's slots as well.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        driver: Driver | str = "psycopg2",
        name: str = "pool",
        options: PoolOptions | Mapping[str, Any] | None = None,
        after_reset: Callable[[Any], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        host_budget: HostBudget | None = None,
    ) -> None:
        if options is None:
            options = PoolOptions()
        elif not isinstance(options, PoolOptions):
            options, rest = PoolOptions.from_mapping(options, name=f"pool {name!r}")
            if rest:
                raise PoolConfigError(
                    f"pool {name!r}: unknown options {sorted(rest)!r}; allowed: "
                    + ", ".join(PoolOptions.names())
                )
        self.name = name
        self.options = options
        self.max_conns = options.MAX_CONNS
        self.reuse_conns = options.reuse_conns
        self.timeout = options.POOL_TIMEOUT
        self._connect = connect
        self._driver: Driver = get_driver(driver) if isinstance(driver, str) else driver
        self._errors = self._driver.errors
        self._after_reset = after_reset
        self._clock = clock
        if host_budget is None and options.HOST_MAX_CONNS is not None:
            raise PoolConfigError(
                f"pool {name!r}: HOST_MAX_CONNS needs the budget itself: pass "
                "host_budget=hostbudget.budget_for(budget_key(host, port, dbname, user), "
                "HOST_MAX_CONNS, HOST_LOCK_DIR, name=...)"
            )
        if host_budget is not None and self.max_conns > host_budget.size:
            raise PoolConfigError(
                f"pool {name!r}: MAX_CONNS ({self.max_conns}) cannot be larger than the "
                f"host budget ({host_budget.size})"
            )
        self._budget = host_budget
        # In a process where gevent patched socket, the driver must yield too.
        self._driver.ensure_cooperative()

        self._lock = sync.allocate_lock()
        # --- state below is changed only under self._lock ---
        self._idle: list[_Entry] = []  # a stack: the most recently returned is reused first
        self._in_use: dict[int, _Entry] = {}
        self._opening = 0
        self._nconns = 0  # idle + in use + opening
        self._waiting: deque[_Waiter] = deque()
        self._closed = False
        self._invalidated_at = float("-inf")  # connections created before this get pinged
        # Checkouts wait for a host slot (the budget is told, and housekeeping polls).
        self._host_wanted = False
        self._host_step_aside_at = float("-inf")
        self._host_below_share = False  # as last seen by the poll: it polls faster
        self._counters = stats.new_counters()
        # Seconds each of the latest checkouts took (appends are atomic: no lock).
        self._wait_samples = stats.new_samples()
        self._holders_logged_at = float("-inf")
        # Failed connect rounds in a row and when the next attempt may go.
        self._backoff = Backoff()
        # Connect attempts running, failing or not. While failing, a new one
        # starts only when this is 0: that is the single flight.
        self._in_flight = 0
        self._turn_waiters: list[sync.Signal] = []
        # Cuts the housekeeping loop's sleep short (MIN_CONNS to refill).
        self._wakeup = sync.Wakeup()
        self._leases = itertools.count(1)
        # Bumped in a forked child: what the parent's generation still does there
        # (a queued or connecting checkout) fails fast and never touches the counts.
        self._generation = 0
        # Connections inherited through os.fork(): never used or closed by the child.
        self._inherited: set[int] = set()
        self._forked_leftovers: list[Any] = []
        # True once the background housekeeping started (or when there is none),
        # and its greenlet (None for an OS thread).
        self._maintaining = not background
        self._maintainer: Any = None
        self._background = background
        _ALL_POOLS.add(self)

    # ------------------------------------------------------------------ api

    def getconn(self, timeout: float | None = None) -> Any:
        """Borrow a connection, waiting at most ``timeout`` (default ``POOL_TIMEOUT``) seconds.

        Raises :class:`PoolTimeout` when no connection is had in time (the
        message names the pool, the wait and its counts), :class:`TooManyRequests`
        at once when ``MAX_WAITING`` checkouts already wait, :class:`PoolClosed`
        after :meth:`close`, or the connect error when opening a connection fails.
        """
        return self.checkout(timeout)[0]

    def checkout(self, timeout: float | None = None, *, session: bool = False) -> tuple[Any, int]:
        """Like :meth:`getconn`, with this checkout's lease number: ``(conn, lease)``.

        ``session=True`` also counts a unit of work (a request, a task) in
        ``sessions_num``: the Django layer says so on a session's first
        checkout, so ``requests_num / sessions_num`` is the checkouts per
        request (1 in session mode, one per statement or transaction in
        transaction mode). Both are counted when asked, in one critical section.

        ``putconn(conn, lease=lease)`` then gives back exactly this checkout: a
        second return, or one after the connection was lent again, raises the
        driver's ``ProgrammingError`` instead of taking it from its next
        borrower. Same errors as :meth:`getconn`.
        """
        if not self._maintaining:
            self._start_maintenance()
        start = self._clock()
        entry = None
        try:
            entry = self._checkout(start, self.timeout if timeout is None else timeout, session)
        finally:
            # A checkout that failed (timed out, refused, killed) waited too: its
            # time goes into the percentiles and the caller's tally, or an
            # exhausted pool would look fast exactly when it is not.
            waited = (self._clock() if entry is None else entry.borrowed_at) - start
            self._wait_samples.append(waited)
            timing.record(waited)
        try:
            logger.debug("pool %r: checkout %s", self.name, self)
        except BaseException:
            # A log handler that yields, and a kill or timeout there: the caller
            # never gets the connection, so it goes back now.
            self.putconn(entry.conn, lease=entry.lease)
            raise
        return entry.conn, entry.lease

    def _checkout(self, start: float, timeout: float, session: bool = False) -> _Entry:
        """The checkout itself; :meth:`getconn` records how long it took, failed or not."""
        deadline = start + timeout
        generation = self._generation
        item, waiter = self._take_or_reserve(session)
        # A slot may be used with no time left only when none was given
        # (timeout=0 still opens a free slot; libpq's connect_timeout bounds it).
        waited = waiter is not None and timeout > 0
        if waiter is not None:
            item = self._wait(waiter, start, deadline)
        while True:
            if item is _SLOT or isinstance(item, _HostSlot):
                host = item.slot if isinstance(item, _HostSlot) else None
                if waited and self._clock() >= deadline:
                    # Handed a slot as the wait ended, or the checks of idle
                    # connections took the rest of it (a ping that got no
                    # answer): no time is left to connect, and a connect with
                    # no bound would never end on a silent network.
                    self._give_host(host)
                    self._give_back_slot(opening=True)
                    raise self._timed_out(start, "no time was left to connect")
                if self._budget is not None and host is None:
                    try:
                        host = self._budget.take()  # never waits
                    except BaseException:
                        self._give_back_slot(opening=True)  # a lock file we may not use
                        raise
                    if host is None:
                        # The host's budget is spent: wait in line like any
                        # checkout of a full pool, for a returned connection or
                        # for the host slot housekeeping finds.
                        item, waiter = self._host_starved()
                        if waiter is not None:
                            item = self._wait(waiter, start, deadline)
                        waited = timeout > 0
                        continue
                try:
                    entry = self._open(start, deadline, generation, host)
                except BaseException:
                    # The local slot is settled by _open; the host slot is ours
                    # to free (a no-op after a fork: the parent's).
                    self._give_host(host)
                    raise
                break
            assert isinstance(item, _Entry)
            # With timeout=0 ("don't wait for a busy pool") a ping still gets
            # its own bound, as a connect gets libpq's connect_timeout.
            if self._usable(item, deadline if timeout > 0 else float("inf")):
                entry = item
                break
            waited = timeout > 0
            item = self._replace_bad(item)
        entry.returning = False
        entry.leak_warned = False
        entry.borrowed_at = self._clock()
        entry.holder = sync.current_holder()
        entry.lease = next(self._leases)  # atomic under the GIL
        if self.options.LEAK_TIMEOUT is not None:
            # Only paid for when asked: where this checkout came from, for the warning.
            # The pool's own frames (getconn, checkout, _checkout) are left out.
            entry.borrower = leaks.borrower_stack(__file__)
        return entry

    def putconn(
        self,
        conn: Any,
        *,
        discard: bool = False,
        lease: int | None = None,
        reset: bool | None = None,
    ) -> None:
        """Give ``conn`` back. ``discard=True`` closes it instead of reusing it.

        ``reset`` says whether ``RESET_QUERY`` runs on it (when one is set):
        None, the default, runs it on every return; False skips it (a borrower
        that knows it left no session state: transaction mode's early
        returns); True runs it (one that knows it did), after the driver's
        own session reset where the protocol has one (MySQL's
        ``COM_RESET_CONNECTION``; then even with no ``RESET_QUERY``).

        The connection is kept only if its transaction status is IDLE; INTRANS
        and INERROR are rolled back first (and discarded if the rollback fails);
        ACTIVE, UNKNOWN and closed connections are discarded. Either way its
        slot is free when this returns.

        A return is tied to its checkout: with ``lease`` (from :meth:`checkout`)
        it must be that checkout's; without, a greenlet other than the borrower
        may not return it while the borrower still runs in the same thread (a
        second return after the connection was lent again looks just like
        that). Raises the driver's ``ProgrammingError`` for a connection this
        pool did not lend, one already returned, or another checkout's.
        """
        now = self._clock()
        held = 0.0
        with self._lock:  # critical section: find and flag the entry
            entry = self._in_use.get(id(conn))
            if entry is None and id(conn) in self._inherited:
                self._inherited.discard(id(conn))
            elif entry is None or entry.conn is not conn or entry.returning:
                raise self._errors.ProgrammingError(
                    f"pool {self.name!r}: can't return a connection the pool did not lend "
                    "or that was already returned"
                )
            elif (lease is not None and lease != entry.lease) or (
                lease is None and not _may_return(entry.holder)
            ):
                raise self._errors.ProgrammingError(
                    f"pool {self.name!r}: can't return a connection another checkout holds "
                    "(returned already, then lent again); a return must come from its "
                    "borrower, or name the checkout with putconn(conn, lease=...)"
                )
            else:
                entry.returning = True
                entry.holder = None
                held = now - entry.borrowed_at
                self._counters["usage_ms"] += held * 1000.0
        if held:
            timing.record_held(held)
        if entry is None:
            # Lent before a fork and returned in the child: its socket points at
            # /dev/null already, so closing it cannot end the parent's session.
            self._close_quietly(conn)
            return
        try:
            # Inside the guard: a log handler may yield, and a kill or timeout
            # land there, with the entry flagged as returning.
            if entry.leak_warned:
                leaks.warn_came_back(self.name, now - entry.borrowed_at, entry.borrower)
            if discard:
                reason = _BY_CALLER
                if self._driver.status(conn) is Status.ACTIVE:
                    # Another greenlet or thread is mid-query on it and holds
                    # the driver's connection lock: close() would wait for it
                    # (for ever, if it is a greenlet of this thread). Cut it.
                    self._driver.sever(conn)
                    reason = _SEVERED
            else:
                reason = self._clean_for_reuse(entry, reset)
        except BaseException:
            # Killed (GreenletExit, gevent.Timeout) in the middle of a rollback or
            # a log call: the connection's state is unknown; drop it and free the
            # slot, then re-raise.
            self._drop(entry, "interrupted while being returned")
            raise
        if reason is not None:
            self._drop(entry, reason)
        else:
            self._release(entry)

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """``with pool.connection() as conn:`` borrow a connection and always give it back."""
        conn, lease = self.checkout(timeout)
        try:
            yield conn
        finally:
            self.putconn(conn, lease=lease)

    def close(self) -> None:
        """Stop lending: close idle connections, fail waiters with :class:`PoolClosed`.

        Connections in use are closed when they are returned. Idempotent.
        """
        with self._lock:  # critical section: flip to closed, take idle and waiters
            self._closed = True
            idle, self._idle = self._idle, []
            self._nconns -= len(idle)
            waiters = list(self._waiting)
            self._waiting.clear()
            for waiter in waiters:
                waiter.item = _CLOSED
            self._counters["connections_closed"] += len(idle)
            # Housekeeping stops with the pool: the host must not see it wanting on.
            unwant, self._host_wanted = self._host_wanted, False
        for waiter in waiters:
            waiter.signal.set()
        if unwant and self._budget is not None:
            self._budget.want(False)
        for entry in idle:
            self._close_entry(entry)

    def drain(self, timeout: float = 30.0) -> bool:
        """Stop lending, wait up to ``timeout`` s for lent connections, then close all.

        For a graceful shutdown (gunicorn's ``worker_exit``): new checkouts and
        waiters get :class:`PoolClosed` at once, idle connections close now, and
        each lent connection closes as it comes back. Returns True if all came
        back in time; those still out at the deadline close when returned.
        """
        self.close()
        deadline = self._clock() + timeout
        sleep = sync.cooperative_sleep()
        while True:
            with self._lock:  # critical section: read
                out = len(self._in_use) + self._opening
            if out == 0:
                return True
            if self._clock() >= deadline:
                logger.warning(
                    "pool %r: drained for %.1f s, %d connection(s) still lent",
                    self.name,
                    timeout,
                    out,
                )
                return False
            sleep(0.01)

    def _after_fork_in_child(self) -> None:
        """Start afresh in a forked child, leaving the parent's connections alone.

        A connection closed in the child would send a Terminate message on the
        socket it shares with the parent, ending the parent's session.
        So every inherited socket is first pointed at /dev/null: whatever the
        child does with those objects later (close, garbage collection) goes
        nowhere. The lock is new too: another thread of the parent may have
        held the old one at the moment of the fork.
        """
        inherited = [e.conn for e in self._idle] + [e.conn for e in self._in_use.values()]
        for conn in inherited:
            self._driver.detach(conn)
        parent_waiters = [w.signal for w in self._waiting] + self._turn_waiters
        self._generation += 1
        self._lock = sync.allocate_lock()
        self._inherited = set(self._in_use)  # keys are id(conn)
        self._idle = []
        self._in_use = {}
        self._opening = 0
        self._nconns = 0
        self._waiting = deque()
        self._invalidated_at = float("-inf")
        self._host_wanted = False  # the budget forgot the parent's wants too
        self._counters = stats.new_counters()
        self._wait_samples.clear()
        self._backoff = Backoff()
        self._in_flight = 0
        self._turn_waiters = []
        self._wakeup = sync.Wakeup()
        # The parent's greenlet or thread did not come along: start one on first use.
        self._maintaining = not self._background
        # The objects go when the child drops them: their sockets are detached.
        self._forked_leftovers = inherited
        # Checkouts queued in the parent (their greenlets came along) fail now
        # instead of waiting out their timeout for a connection that never comes.
        for signal in parent_waiters:
            with contextlib.suppress(Exception):  # a parent thread's lock: nobody waits
                signal.set()

    def _forked(self) -> PoolClosed:
        """The error of a checkout that began before this process forked."""
        return self._errors.PoolClosed(
            f"pool {self.name!r}: this checkout began before the process forked; the "
            "child's pool starts afresh: check out again"
        )

    def maintain(self) -> bool:
        """One round of housekeeping; True if it opened a connection.

        Closes idle connections the server closed (the zero-round-trip socket
        look of a checkout), those past ``MAX_LIFETIME`` and those idle longer
        than ``IDLE_TIMEOUT`` above ``MIN_CONNS``; opens one connection, at
        most, when fewer than ``MIN_CONNS`` are open and nobody is opening one
        (never above ``MAX_CONNS``; while the server fails, only when the
        backoff allows the pool's one attempt). A background greenlet, or a
        daemon thread outside gevent, runs it from the first checkout on, so
        idle connections close even when no request ever comes again; it runs
        again at once after a connect or a lost connection while below
        ``MIN_CONNS``. A failed connect, or one that did not finish within
        ``POOL_TIMEOUT`` (under gevent), is logged and retried on a later round.
        """
        now = self._clock()
        self._warn_leaks(now)
        given_back = False
        if self._budget is not None:
            try:
                self._serve_host_waiters()
                # Another process of the host waits for a slot: idle ones go back sooner.
                given_back = self._budget.wanted()
            except PoolConfigError:
                # The lock file cannot be used: checkouts raise it, with the alias.
                logger.debug("pool %r: host budget unusable", self.name, exc_info=True)
        dead = self._dead_idle()
        with self._lock:  # critical section: pick what to close, reserve what to open
            if self._closed:
                return False
            # Dead ones only if still idle and not lent and returned meanwhile.
            lost = [e for e in self._idle if dead.get(id(e)) == e.last_used]
            expired = [e for e in self._idle if e.expires_at is not None and now >= e.expires_at]
            gone = {id(e) for e in lost} | {id(e) for e in expired}
            if gone:
                self._idle = [e for e in self._idle if id(e) not in gone]
                self._nconns -= len(gone)
                self._counters["connections_closed"] += len(gone)
            if lost:
                self._counters["connections_lost"] += len(lost)
                self._invalidated_at = now
            leaving = {id(e): e for e in lost + expired}.values()
            to_close = [*leaving, *self._trim_idle(given_back)]
            grow = (
                self._nconns < self.options.MIN_CONNS
                and self._opening == 0
                and not self._waiting
                # (no opening: no attempt in flight, so while failing, the one)
                and self._backoff.may_try(now)
            )
            if grow:
                self._nconns += 1
                self._opening += 1
                self._in_flight += 1
        try:
            if lost:
                logger.warning(
                    "pool %r: %d idle connection(s) closed by the server; discarded",
                    self.name,
                    len(lost),
                )
            for entry in to_close:
                self._close_entry(entry)
        except BaseException:
            # Killed in a log handler that yields, or while closing: the slot
            # reserved to grow is given back, and the turn with it.
            if grow:
                self._end_turn()
                self._give_back_slot(opening=True)
            raise
        if not grow:
            return False
        started = self._clock()
        generation = self._generation
        host = None
        if self._budget is not None:
            try:
                host = self._budget.take()  # never waits
            except BaseException:
                self._end_turn()
                self._give_back_slot(opening=True)
                raise
            if host is None:
                # The host's budget is spent: MIN_CONNS waits for a later round.
                self._end_turn()
                self._give_back_slot(opening=True)
                return False
        try:
            try:
                # Bounded under gevent like a checkout's (a connect on a silent
                # network would stall the housekeeping for good); in a plain
                # thread by libpq's connect_timeout.
                conn = self._connect_before(started + self.timeout)
            except _ConnectDeadline:
                raise self._errors.PoolUnavailable(
                    f"pool {self.name!r}: a connect for MIN_CONNS did not finish within "
                    f"{self.timeout:.2f} s (POOL_TIMEOUT)"
                ) from None
        except BaseException as exc:
            if self._generation != generation:
                # The parent's housekeeping, carried into a forked child: the
                # child's counts never knew of this connect.
                if not isinstance(exc, Exception):
                    raise
                return False
            # BaseException on purpose: the housekeeping greenlet killed in the
            # middle of a connect must give its slot and its turn back too.
            if isinstance(exc, Exception):
                self._connect_failed(exc, started)
            else:
                self._end_turn()
            self._give_host(host)
            self._give_back_slot(opening=True)
            if not isinstance(exc, Exception):
                raise
            self._log_connect_failure(exc)
            return False
        if self._generation != generation:
            self._forget_inherited(conn)  # opened by the parent's housekeeping: not ours
            return False
        waiter = None
        with self._lock:  # critical section: the new connection goes idle or to a waiter
            woken = self._take_turn_waiters()
            entry = self._opened(conn, started, host)
            closed = entry is None
            if entry is None:
                entry = _Entry(conn, started, None, generation, host)
            elif self._waiting:
                waiter = self._waiting.popleft()
                waiter.item = entry
                self._in_use[id(conn)] = entry
            else:
                self._idle.append(entry)
        if waiter is not None:
            waiter.signal.set()
        for signal in woken:
            signal.set()
        if closed:
            self._close_entry(entry)  # the pool closed while it connected
        return True

    def _serve_host_waiters(self) -> None:
        """Housekeeping's poll for checkouts that wait for a host slot: one each, if free.

        A slot found goes, with a local slot reserved for it, to the first
        waiter (who connects with both). Once no checkout waits with a local
        slot free, the budget is told this pool no longer wants any.
        """
        budget = self._budget
        assert budget is not None
        while True:
            with self._lock:  # critical section: does anyone still wait for the host?
                wanting = not self._closed and bool(self._waiting)
                if not wanting or self._nconns >= self.max_conns:
                    # Nobody waits, or they wait for a returned connection.
                    stop = self._host_wanted
                    self._host_wanted = False
                    break
            if budget.wanted_elsewhere():
                low, high = budget.share()
                if budget.held() >= high:
                    return  # a free slot is for a process below its share
                self._host_below_share = budget.held() < low
            else:
                self._host_below_share = False
            slot = budget.take()  # never waits; no switch before the hand-off
            if slot is None:
                return
            waiter = None
            with self._lock:  # critical section: reserve a local slot and hand both over
                if not self._closed and self._waiting and self._nconns < self.max_conns:
                    waiter = self._waiting.popleft()
                    waiter.item = _HostSlot(slot)
                    self._nconns += 1
                    self._opening += 1
            if waiter is None:
                budget.give(slot)
            else:
                waiter.signal.set()
        if stop:
            budget.want(False)

    def _dead_idle(self) -> dict[int, float]:
        """Idle entries the server closed, by id, with their ``last_used`` when looked at.

        The same look as a checkout's (closed flag, a readable idle socket; a
        poll with no wait, never a round trip), made outside the lock on a copy
        of the idle list.
        """
        with self._lock:  # critical section: copy
            idle = list(self._idle)
        dead: dict[int, float] = {}
        for entry in idle:
            last_used = entry.last_used
            if health.closed_while_idle(self._driver, entry.conn):
                dead[id(entry)] = last_used
        return dead

    def _warn_leaks(self, now: float) -> None:
        """Log, once per checkout, each connection held longer than LEAK_TIMEOUT."""
        limit = self.options.LEAK_TIMEOUT
        if limit is None:
            return
        with self._lock:  # critical section: pick the newly overdue ones
            overdue = [
                e
                for e in self._in_use.values()
                if not e.leak_warned and not e.returning and now - e.borrowed_at >= limit
            ]
            for entry in overdue:
                entry.leak_warned = True
        for entry in overdue:
            leaks.warn_held(self.name, now - entry.borrowed_at, limit, entry.borrower)

    def _maintenance_interval(self) -> float:
        spans = [
            t
            for t in (
                self.options.IDLE_TIMEOUT,
                self.options.MAX_LIFETIME,
                self.options.LEAK_TIMEOUT,
            )
            if t
        ]
        interval = min(5.0, max(0.05, min(spans, default=20.0) / 4))
        if self.options.MIN_CONNS:
            # Idle connections the server closed are found, and replaced, soon.
            interval = min(interval, _MIN_CONNS_LOOK_EVERY)
        if self._budget is not None:
            # Another process's demand for host slots is seen soon.
            interval = min(interval, _HOST_LOOK_EVERY)
        return interval

    def _start_maintenance(self) -> None:
        with self._lock:  # critical section: start it once
            if self._maintaining or self._closed:
                return
            self._maintaining = True
        ref = weakref.ref(self)
        interval = self._maintenance_interval()
        pid = os.getpid()

        def tick() -> float | None:
            pool = ref()
            if pool is None or pool._closed or not pool._maintaining or os.getpid() != pid:
                # Gone, closed, or forked away from: a greenlet survives a fork,
                # and the child starts its own loop at its first checkout.
                return None
            if pool.maintain():
                return 0.0  # MIN_CONNS: the next one back to back
            return pool._next_round_in(interval)

        def died() -> None:
            # Killed (GreenletExit) or broken: the next checkout starts another,
            # or idle timeouts, retirements and MIN_CONNS would stop for good.
            pool = ref()
            if pool is not None and os.getpid() == pid:
                with pool._lock:  # critical section: let the next checkout start one
                    pool._maintaining = False

        self._maintainer = sync.run_periodically(
            tick,
            name=f"django_gevent_pool maintenance {self.name!r}",
            wakeup=self._wakeup,
            on_death=died,
        )

    def _next_round_in(self, interval: float) -> float:
        """Seconds until the next housekeeping round: sooner while MIN_CONNS is short.

        Below MIN_CONNS with the server failing, the round comes when the
        backoff allows the next attempt. A connect or a lost connection ends
        the wait early (:meth:`_poke`). While checkouts wait for a host slot,
        every ~10 ms.
        """
        if self._host_wanted:
            # Below its share, a process asks more often: freed slots go to it first.
            low, high = _HOST_POLL
            if self._host_below_share:
                low, high = low / 3, high / 3
            return random.uniform(low, high)
        with self._lock:  # critical section: read
            if self._nconns < self.options.MIN_CONNS and self._backoff.failing:
                return max(0.0, min(interval, self._backoff.retry_at - self._clock()))
        return interval

    def _poke(self) -> None:
        """Wake the housekeeping now if the pool is below MIN_CONNS (a racy read: a hint)."""
        if self._nconns < self.options.MIN_CONNS and self._maintaining and self._background:
            self._wakeup.wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def note_pin(self, reason: str) -> None:
        """Count a connection pinned to its borrower for ``reason`` (``pinning.REASONS``)."""
        key = "pins_" + reason
        with self._lock:  # critical section: count
            self._counters[key] += 1

    @property
    def driver(self) -> Driver:
        """The driver of this pool's connections."""
        return self._driver

    def get_stats(self) -> dict[str, float]:
        """Counts now and counters since creation (or the last :meth:`pop_stats`).

        Keys follow psycopg_pool where they fit: ``pool_min``, ``pool_max``,
        ``pool_size`` (open: idle + in use + opening), ``pool_available`` (idle),
        ``pool_in_use``, ``pool_opening``, ``requests_waiting``; counters
        ``requests_num`` (checkouts), ``requests_queued``, ``requests_wait_ms``,
        ``requests_wait_max_ms``, ``requests_timeouts``, ``requests_too_many``,
        ``requests_errors``, ``connections_num`` (opened), ``connections_ms``
        (time spent connecting, failed attempts included), ``connections_errors``,
        ``connections_lost``, ``connections_closed``, ``returns_bad``,
        ``returns_rolled_back``, ``pings``, ``usage_ms`` (time connections spent
        lent, counted when they come back), ``sessions_num`` (units of work
        the Django layer served: requests, tasks), ``pins_<reason>`` (a
        transaction-mode connection kept by its borrower, by reason: see
        :data:`~django_gevent_pool.pinning.REASONS`); and ``requests_wait_p50_ms``,
        ``requests_wait_p95_ms``, ``requests_wait_p99_ms``: percentiles of the
        time the latest checkouts (up to 2048) took to get their connection or
        to fail, waiting or not (0 when there were none).
        """
        with self._lock:  # critical section: a consistent snapshot
            snap = self._snapshot()
        self._host_stats(snap)
        return stats.with_percentiles(snap, snap.pop("_samples"))  # type: ignore[arg-type]

    stats = get_stats

    def _host_stats(self, snap: dict[str, float]) -> None:
        """With a host budget: ``host_max``, ``host_in_use`` (the host's), ``host_held`` (ours)."""
        budget = self._budget
        if budget is None:
            return
        snap["host_max"] = budget.size
        snap["host_held"] = budget.held()
        try:
            snap["host_in_use"] = budget.in_use()
        except Exception:  # stats never fail; the lock file error shows on checkout
            snap["host_in_use"] = -1

    def pop_stats(self) -> dict[str, float]:
        """Like :meth:`get_stats`, then reset the counters to zero."""
        with self._lock:  # critical section: snapshot and reset
            snap = self._snapshot()
            self._counters = stats.new_counters()
            self._wait_samples.clear()
        self._host_stats(snap)
        return stats.with_percentiles(snap, snap.pop("_samples"))  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} max={self.max_conns} size={self._nconns} "
            f"in_use={len(self._in_use)} idle={len(self._idle)} "
            f"waiting={len(self._waiting)}{' closed' if self._closed else ''}>"
        )

    # --------------------------------------------------------- checkout path

    def _take_or_reserve(self, session: bool = False) -> tuple[_Entry | str | None, _Waiter | None]:
        """Under the lock: an idle entry, or a reserved slot, or a queued waiter."""
        with self._lock:  # critical section: pick what this checkout gets
            if self._closed:
                raise self._errors.PoolClosed(f"pool {self.name!r} is closed")
            self._counters["requests_num"] += 1
            if session:
                self._counters["sessions_num"] += 1
            if not self._waiting:
                if self._idle:
                    entry = self._idle.pop()
                    self._in_use[id(entry.conn)] = entry
                    return entry, None
                if self._nconns < self.max_conns:
                    self._nconns += 1
                    self._opening += 1
                    return _SLOT, None
            max_waiting = self.options.MAX_WAITING
            if max_waiting and len(self._waiting) >= max_waiting:
                self._counters["requests_too_many"] += 1
                self._counters["requests_errors"] += 1
                raise self._errors.TooManyRequests(
                    f"pool {self.name!r}: {len(self._waiting)} checkouts already waiting "
                    f"(MAX_WAITING={max_waiting}) {self._counts()}"
                )
            waiter = _Waiter(self._generation)
            self._waiting.append(waiter)
            self._counters["requests_queued"] += 1
            return None, waiter

    def _host_starved(self) -> tuple[_Entry | None, _Waiter | None]:
        """A reserved slot found no host slot: give it back; an idle entry, or a queued waiter.

        The waiter goes first in line (it was, or nobody waited when it
        reserved). Housekeeping is told to poll the budget for it.
        """
        with self._lock:  # critical section: swap the slot for what is idle, or queue
            self._opening -= 1
            self._nconns -= 1
            if self._idle and not self._waiting:
                entry = self._idle.pop()
                self._in_use[id(entry.conn)] = entry
                return entry, None
            waiter = _Waiter(self._generation)
            self._waiting.appendleft(waiter)
            self._counters["requests_queued"] += 1
            self._counters["host_waits"] += 1
            first = not self._host_wanted
            self._host_wanted = True
        if first:
            self._want_host()
        return None, waiter

    def _want_host(self) -> None:
        """This pool's checkouts now wait for a host slot: say so, and start polling."""
        assert self._budget is not None
        try:
            self._budget.want(True)
        finally:
            self._wakeup.wake()  # housekeeping polls from now on

    def _should_step_aside(self) -> bool:
        """Close a returned connection, to give its slot up, instead of lending it again?

        Yes, at most once per ``_HOST_STEP_ASIDE_EVERY`` s, while another
        process of the host waits for a slot and this one holds more than its
        fair share (:meth:`HostBudget.share`): without it, a process whose
        connections never go idle would keep every slot for as long as its
        load lasts. Looked at most every 10 ms otherwise (one lock query).
        """
        budget = self._budget
        assert budget is not None
        now = self._clock()
        held = budget.held()
        if now < self._host_step_aside_at or held <= 1:
            return False
        # Racy updates (no lock): a hint, not a count.
        if not budget.wanted_elsewhere():
            self._host_step_aside_at = now + 0.01
            return False
        low, high = budget.share()
        if held > high:
            self._host_step_aside_at = now + _HOST_STEP_ASIDE_EVERY
            return True
        if held > low:
            # The budget does not divide evenly: the odd slots change hands slowly.
            self._host_step_aside_at = now + _HOST_ROTATE_EVERY
            return True
        self._host_step_aside_at = now + 0.01
        return False

    def _wait(self, waiter: _Waiter, start: float, deadline: float) -> _Entry | _HostSlot | str:
        """Block until ``waiter`` is served or ``deadline``; return what it was handed."""
        try:
            remaining = deadline - self._clock()
            if remaining > 0:
                waiter.signal.wait(remaining)
        except BaseException:
            # A killed greenlet or an outer gevent.Timeout (BaseExceptions both):
            # whatever was handed to us meanwhile goes on to the next waiter.
            item = self._leave_queue(waiter, start)
            if isinstance(item, _Entry):
                self._release(item)
            elif isinstance(item, _HostSlot):
                self._give_host(item.slot)
                self._give_back_slot(opening=True)
            elif item == _SLOT:
                self._give_back_slot(opening=True)
            raise
        item = self._leave_queue(waiter, start)
        if item is None:
            now = self._clock()
            waited = now - start
            with self._lock:  # critical section: count and read the state for the message
                self._counters["requests_timeouts"] += 1
                self._counters["requests_errors"] += 1
                counts = self._counts()
                holders = None
                if now - self._holders_logged_at >= leaks.HOLDERS_LOG_EVERY:
                    self._holders_logged_at = now
                    holders = [
                        (now - e.borrowed_at, e.holder, e.borrower, e.conn)
                        for e in self._in_use.values()
                    ]
            if holders is not None:
                status = self._driver.status
                leaks.log_holders(
                    self.name, waited, [(h, w, b, status(c)) for h, w, b, c in holders], counts
                )
            raise self._errors.PoolTimeout(
                f"pool {self.name!r}: no connection available after {waited:.2f} s "
                f"({self._limits()}) {counts}"
            )
        if item == _CLOSED:
            raise self._errors.PoolClosed(
                f"pool {self.name!r} was closed while waiting for a connection"
            )
        if item == _FORKED:
            raise self._forked()
        return item

    def _leave_queue(self, waiter: _Waiter, start: float) -> _Entry | _HostSlot | str | None:
        """Under the lock: take what the waiter was handed, or unqueue it if nothing."""
        waited_ms = (self._clock() - start) * 1000.0
        with self._lock:  # critical section: either served or removed, never both
            if waiter.generation != self._generation:
                return _FORKED  # the parent's queue: nothing here is ours to touch
            item = waiter.item
            if item is None:
                self._waiting.remove(waiter)
            self._counters["requests_wait_ms"] += waited_ms
            if waited_ms > self._counters["requests_wait_max_ms"]:
                self._counters["requests_wait_max_ms"] = waited_ms
        return item

    def _open(
        self, start: float, deadline: float, generation: int, host: int | None = None
    ) -> _Entry:
        """Connect with the slot already reserved; give the slot back on any failure.

        While the server is failing (the last connect round failed), connects
        are single flight: one attempt at a time per pool, spaced by a short
        backoff. A checkout that needs a new connection then waits for its
        turn, woken as soon as the attempt in flight ends, at most
        ``min(deadline, start + 2 s)``; past that it fails with
        :class:`PoolUnavailable` chained from the last connect error. A
        checkout whose own attempt fails raises that attempt's error.
        """
        try:
            probing, connect_deadline = self._take_turn(start, deadline, generation)
        except BaseException:
            # PoolUnavailable, PoolClosed, or killed while waiting for the turn.
            if self._generation == generation:  # after a fork the slot was the parent's
                self._give_back_slot(opening=True)
            raise
        now = self._clock()
        try:
            conn = self._connect_before(connect_deadline)
        except BaseException as exc:
            if self._generation != generation:
                # Began in the parent, failed in the forked child (its socket was
                # detached at the fork): the child's counts never knew of it.
                raise self._forked() from exc
            # BaseException on purpose: GreenletExit and gevent.Timeout must give
            # the slot back (and the turn, if this was the one attempt in flight)
            # too, or the pool shrinks for good or never connects again. The
            # failure is recorded first, so the freed slot's next taker waits
            # for its turn instead of connecting alongside.
            if isinstance(exc, _ConnectDeadline) and probing:
                # The failing server did not even answer in time: a failed round.
                last = self._backoff.last_error
                err = self._errors.PoolUnavailable(
                    f"pool {self.name!r}: connecting did not finish within "
                    f"{connect_deadline - now:.2f} s while the server is failing"
                )
                self._connect_failed(err, now)
                self._give_back_slot(opening=True)
                self._log_connect_failure(err)
                raise err from last
            failed = isinstance(exc, Exception) and not isinstance(exc, _ConnectDeadline)
            if failed:
                self._connect_failed(exc, now)
            else:
                self._end_turn()
            self._give_back_slot(opening=True)
            if failed:
                self._log_connect_failure(exc)  # the slot is settled: a yield is harmless
            if isinstance(exc, _ConnectDeadline):
                # Not the server's fault (no backoff): this checkout ran out of time.
                spent = self._clock() - now
                with self._lock:  # critical section: count
                    self._counters["connections_ms"] += spent * 1000.0
                raise self._timed_out(
                    start,
                    "connecting took longer than the checkout timeout allowed: "
                    f"{now - start:.2f} s went to waiting for a free slot (a full pool) and "
                    f"checking idle connections, {spent:.2f} s to the connect",
                ) from None
            if probing and isinstance(exc, Exception):
                # The pool was failing already: say so, the attempt's error chained.
                raise self._unavailable(start) from exc
            raise
        with self._lock:  # critical section: the reserved slot becomes a connection in use
            forked = self._generation != generation
            if forked:
                entry = None
                woken = []
            else:
                entry = self._opened(conn, now, host)
                if entry is not None:
                    self._in_use[id(conn)] = entry
                woken = self._take_turn_waiters()
        if forked:
            # Connected in the parent, finished in the child: the socket may be
            # the parent's too (detached at the fork, or not yet made then).
            self._forget_inherited(conn)
            raise self._forked()
        for signal in woken:
            signal.set()
        if entry is None:
            self._close_quietly(conn)
            raise self._errors.PoolClosed(f"pool {self.name!r} was closed while connecting")
        self._poke()
        return entry

    def _take_turn(self, start: float, deadline: float, generation: int) -> tuple[bool, float]:
        """May this checkout connect now? Wait for the turn while the server is failing.

        Returns ``(probing, connect_deadline)``: ``probing`` when this is the
        one attempt in flight of a failing pool, whose connect is then bounded
        by the outage wait too. Raises :class:`PoolUnavailable` (chained from
        the last connect error) when the wait ends without a turn, and
        :class:`PoolClosed` if the pool closes meanwhile.
        """
        give_up_at = min(deadline, start + _OUTAGE_WAIT)
        signal: sync.Signal | None = None
        while True:
            now = self._clock()
            if signal is None and self._backoff.failing:
                signal = sync.new_signal()  # made outside the lock: a hub call
            with self._lock:  # critical section: connect, take the turn, or queue for it
                if self._generation != generation:
                    raise self._forked()
                if self._closed:
                    raise self._errors.PoolClosed(f"pool {self.name!r} is closed")
                if not self._backoff.failing:
                    self._in_flight += 1
                    return False, deadline
                # Failing: the one attempt, once the backoff passed and every
                # attempt of the round that found the failure has ended.
                if self._in_flight == 0 and self._backoff.may_try(now):
                    self._in_flight += 1
                    return True, give_up_at
                if now >= give_up_at:
                    self._counters["requests_errors"] += 1
                    raise self._unavailable(start, now) from self._backoff.last_error
                if signal is None:
                    continue  # turned failing since the look above: make a signal first
                self._turn_waiters.append(signal)
                busy = self._in_flight > 0
                wake_at = give_up_at if busy else min(self._backoff.retry_at, give_up_at)
            try:
                woke = signal.wait(wake_at - now)
            except BaseException:
                # Killed or timed out from outside while waiting: leave the line.
                with self._lock:  # critical section: unqueue
                    if signal in self._turn_waiters:
                        self._turn_waiters.remove(signal)
                raise
            if woke:
                signal = None  # a one-shot signal: used up
            else:
                with self._lock:  # critical section: unqueue after a timeout
                    if signal in self._turn_waiters:
                        self._turn_waiters.remove(signal)
                    else:
                        signal = None  # set meanwhile: used up

    def _timed_out(self, start: float, why: str) -> PoolTimeout:
        """Count a checkout that ran out of time for ``why``; the error to raise."""
        waited = self._clock() - start
        with self._lock:  # critical section: count and read the state for the message
            self._counters["requests_timeouts"] += 1
            self._counters["requests_errors"] += 1
            counts = self._counts()
        return self._errors.PoolTimeout(
            f"pool {self.name!r}: no connection available after {waited:.2f} s: {why} "
            f"({self._limits()}) {counts}"
        )

    def _unavailable(self, start: float, now: float | None = None) -> PoolUnavailable:
        """The error of a checkout given up on while the server fails (reads without lock)."""
        now = self._clock() if now is None else now
        backoff = self._backoff
        last = backoff.last_error
        return self._errors.PoolUnavailable(
            f"pool {self.name!r}: the server is failing ({backoff.failures} connect "
            f"round(s) failed in {max(0.0, now - backoff.failing_since):.2f} s); no connection "
            f"after {now - start:.2f} s (last error: {str(last).strip() if last else 'unknown'})"
        )

    def _take_turn_waiters(self) -> list[sync.Signal]:
        """Under the lock: everyone waiting for a turn to connect, to be woken outside it."""
        woken, self._turn_waiters = self._turn_waiters, []
        return woken

    def _end_turn(self) -> None:
        """An attempt ended without a verdict (killed, out of time): let the next one try."""
        with self._lock:  # critical section: free the turn
            self._in_flight -= 1
            woken = self._take_turn_waiters()
        for signal in woken:
            signal.set()

    def _opened(self, conn: Any, started: float, host: int | None = None) -> _Entry | None:
        """Under the lock: a reserved slot now holds ``conn``; None if the pool closed meanwhile.

        ``started`` is when the connect began. A success ends any connect
        backoff (the caller wakes the checkouts waiting for a turn). When
        None, the slot is already freed and the caller closes ``conn``.
        """
        now = self._clock()
        self._backoff.succeeded()
        self._in_flight -= 1
        self._opening -= 1
        self._counters["connections_num"] += 1
        self._counters["connections_ms"] += (now - started) * 1000.0
        if self._closed:
            self._nconns -= 1
            return None
        return _Entry(conn, now, self.options.MAX_LIFETIME, self._generation, host)

    def _connect_failed(self, exc: BaseException, started: float) -> None:
        """Record a failed connect that began at ``started``; wake who waits for a turn.

        Attempts that began before the last recorded failure belong to the same
        round (concurrent connects when the outage began): they count as errors
        but do not grow the backoff. The attempt's turn ends here.
        """
        now = self._clock()
        with self._lock:  # critical section: grow the backoff, end the turn
            self._counters["connections_ms"] += (now - started) * 1000.0
            self._counters["connections_errors"] += 1
            self._backoff.failed(exc, started, now)
            self._in_flight -= 1
            woken = self._take_turn_waiters()
        for signal in woken:
            signal.set()

    def _log_connect_failure(self, exc: BaseException) -> None:
        """Logged once the attempt's slot is settled (a log handler may yield)."""
        logger.warning("pool %r: connecting failed: %s", self.name, str(exc).strip())

    def _connect_before(self, deadline: float) -> Any:
        remaining = deadline - self._clock()
        if remaining <= 0 or not (sync.hub_in_this_thread() or self._driver.is_cooperative()):
            # A thread whose waits never go through a gevent hub cannot be
            # interrupted, and a checkout with no time left (timeout=0: "don't
            # wait for a busy pool") still may open a free slot: the driver's
            # connect timeout bounds these. With a cooperative driver, even a
            # thread with no hub yet waits in one (made on its first wait), so
            # the deadline holds there too.
            return self._connect()
        import gevent

        with gevent.Timeout(remaining, _ConnectDeadline):
            return self._connect()

    def _usable(self, entry: _Entry, deadline: float) -> bool:
        """Check an idle entry just taken; on failure drop nothing yet, return False.

        A ping, if one is due, ends by ``deadline`` (the checkout's) or
        ``health.PING_TIMEOUT``, whichever is sooner.
        """
        try:
            reason = self._checkout_problem(entry, deadline)
            if reason is None:
                return True
            if reason is not _EXPIRED:
                logger.warning(
                    "pool %r: discarding a connection on checkout: %s", self.name, reason
                )
        except BaseException:
            # Killed during a ping, or in a log handler that yields: the entry
            # is lent to nobody, and its state is unknown; free its slot.
            self._drop(entry, "interrupted during its checkout check")
            raise
        return False

    def _checkout_problem(self, entry: _Entry, deadline: float) -> str | None:
        """Why an idle entry just taken must not be lent (:mod:`.health`), or None."""
        conn = entry.conn
        now = self._clock()
        status = self._driver.status(conn)
        if status is not Status.CLOSED and entry.expires_at is not None and now >= entry.expires_at:
            return _EXPIRED
        unfit = health.look(self._driver, entry, status)
        if unfit is None:
            ping_after = self.options.PING_AFTER
            if entry.verified_at < self._invalidated_at or (
                ping_after is not None and now - entry.last_used >= ping_after
            ):
                with self._lock:  # critical section: count
                    self._counters["pings"] += 1
                unfit = health.ping(self._driver, conn, health.ping_bound(deadline - now))
                if unfit is None:
                    entry.last_used = entry.verified_at = now
        if unfit is None:
            return None
        if unfit.lost:
            self._lost(now)
        return unfit.reason

    def _lost(self, now: float) -> None:
        """A connection died under us: connections opened before now get pinged before reuse."""
        with self._lock:  # critical section: count and move the invalidation mark
            self._counters["connections_lost"] += 1
            self._invalidated_at = now

    def _replace_bad(self, entry: _Entry) -> _Entry | str:
        """Drop a bad entry taken on checkout, keeping its slot for this caller.

        Returns another idle entry (the slot is given back) or ``_SLOT``.
        Raises :class:`PoolClosed` for an entry of the parent's, after a fork.
        """
        if entry.generation != self._generation:
            self._forget_inherited(entry.conn)
            raise self._forked()
        with self._lock:  # critical section: swap the bad entry for what is next
            del self._in_use[id(entry.conn)]
            self._counters["connections_closed"] += 1
            if self._idle and not self._waiting:
                nxt = self._idle.pop()
                self._in_use[id(nxt.conn)] = nxt
                self._nconns -= 1
                item: _Entry | str = nxt
            else:
                self._opening += 1
                item = _SLOT
        try:
            self._close_entry(entry)
        except BaseException:
            # Killed while closing (a log handler that yields): what this
            # checkout was to get next goes back, slot or connection.
            if item is _SLOT:
                self._give_back_slot(opening=True)
            else:
                assert isinstance(item, _Entry)
                self._release(item)
            raise
        return item

    # ----------------------------------------------------------- return path

    def _clean_for_reuse(self, entry: _Entry, reset: bool | None = None) -> str | None:
        """Bring a returned connection back to IDLE; return why not, or None.

        The rollback and ``RESET_QUERY`` each get ``health.RETURN_TIMEOUT``
        seconds: past that the connection's socket is cut (a silent network)
        and it is discarded, so a return never waits for ever.
        """
        conn = entry.conn
        driver = self._driver
        status = driver.status(conn)
        unfit = None
        if status is Status.CLOSED:
            return "it is closed"
        if status is Status.INTRANS or status is Status.INERROR:
            logger.warning(
                "pool %r: rolling back a connection returned in a transaction (%s)",
                self.name,
                status.value,
            )
            with self._lock:  # critical section: count
                self._counters["returns_rolled_back"] += 1
            unfit = health.roll_back(driver, conn, status)
        elif status is Status.ACTIVE:
            # A query is still running on it (in another greenlet or thread
            # that holds the driver's connection lock: close() would block on
            # that lock, for ever if the holder is a greenlet of this thread;
            # or left running by a psycopg 3 wait that was interrupted).
            driver.sever(conn)
            return _SEVERED
        elif status is not Status.IDLE:
            return f"it was returned with transaction status {status.value}"
        reset_query = self.options.RESET_QUERY
        # A borrower that knows it left session state (reset=True) gets the
        # protocol's own reset where there is one (MySQL), RESET_QUERY after it.
        protocol = reset is True and driver.resets_sessions
        if unfit is None and (protocol or (reset_query is not None and reset is not False)):
            unfit = health.reset(driver, conn, reset_query, self._after_reset, protocol=protocol)
        now = self._clock()
        if unfit is not None:
            if unfit.lost:
                self._lost(now)
            return unfit.reason
        entry.last_used = now
        if entry.expires_at is not None and now >= entry.expires_at:
            return _EXPIRED
        return None

    def _release(self, entry: _Entry) -> None:
        """Hand a clean in-use entry to the first waiter, keep it idle, or close it."""
        if entry.generation != self._generation:
            self._forget_inherited(entry.conn)
            return
        to_close: list[_Entry] = []
        waiter = None
        step_aside = self._budget is not None and self._should_step_aside()
        first_want = False
        with self._lock:  # critical section: decide where a clean connection goes
            self._in_use.pop(id(entry.conn), None)
            if self._closed:
                self._nconns -= 1
                self._counters["connections_closed"] += 1
                to_close.append(entry)
            elif step_aside:
                # Another process of the host waits for a slot while this one
                # holds more than its share: close this one, its slot goes to
                # a process below its share (ours wait for theirs, if any).
                self._nconns -= 1
                self._counters["connections_closed"] += 1
                self._counters["host_stepped_aside"] += 1
                to_close.append(entry)
                if self._waiting:
                    # Its first waiter now waits for a slot of the host.
                    self._counters["host_waits"] += 1
                    first_want = not self._host_wanted
                    self._host_wanted = True
            elif self._waiting:
                waiter = self._waiting.popleft()
                waiter.item = entry
                self._in_use[id(entry.conn)] = entry
            else:
                if len(self._idle) < self.reuse_conns:
                    self._idle.append(entry)
                else:
                    self._nconns -= 1
                    self._counters["connections_closed"] += 1
                    to_close.append(entry)
                # Only here can idle connections be past IDLE_TIMEOUT (nobody waits
                # while one is idle): a hand-off to a waiter skips the look.
                to_close.extend(self._trim_idle())
        if waiter is not None:
            waiter.signal.set()
        if first_want:
            self._want_host()
        for closing in to_close:
            self._close_entry(closing)

    def _trim_idle(self, given_back: bool = False) -> list[_Entry]:
        """Under the lock: pop idle connections above MIN_CONNS idle past IDLE_TIMEOUT.

        ``given_back``: another process of the host waits for a slot, so the
        bound is 0.5 s idle instead (counted in ``host_given_back``).
        """
        idle_timeout = self.options.IDLE_TIMEOUT
        if given_back:
            idle_timeout = min(idle_timeout or _HOST_GIVE_BACK_AFTER, _HOST_GIVE_BACK_AFTER)
        if idle_timeout is None:
            return []
        now = self._clock()
        out = []
        # The stack's bottom holds the connections idle the longest.
        while (
            len(self._idle) > self.options.MIN_CONNS
            and now - self._idle[0].last_used >= idle_timeout
        ):
            out.append(self._idle.pop(0))
            self._nconns -= 1
            self._counters["connections_closed"] += 1
            if given_back:
                self._counters["host_given_back"] += 1
        return out

    def _drop(self, entry: _Entry, reason: str) -> None:
        """Close an in-use entry and free its slot (handing it to the first waiter).

        A severed connection (returned while a query ran on it) is not closed
        here: its socket is already shut, and the greenlet or thread running the
        query gets the error and lets go of it.
        """
        if entry.generation != self._generation:
            self._forget_inherited(entry.conn)
            return
        with self._lock:  # critical section: forget the entry
            self._in_use.pop(id(entry.conn), None)
            self._counters["connections_closed"] += 1
            if reason is not _EXPIRED:
                self._counters["returns_bad"] += 1
        try:
            if reason is not _SEVERED:
                self._close_entry(entry)
            else:
                # Its socket is shut: the server ends its session on its own.
                self._give_host(entry.host_slot)
        finally:
            # Also if the close is interrupted: the slot is settled whatever happens.
            self._give_back_slot(opening=False)
        # Logged last: a handler that yields cannot leave the slot unsettled.
        if reason is not _EXPIRED and reason is not _BY_CALLER:
            logger.warning("pool %r: discarding a returned connection: %s", self.name, reason)

    def _give_back_slot(self, *, opening: bool) -> None:
        """Free one slot; if someone waits, reserve it for them and wake them."""
        waiter = None
        with self._lock:  # critical section: free a slot or pass it on
            if opening:
                self._opening -= 1
            if self._waiting and not self._closed:
                waiter = self._waiting.popleft()
                waiter.item = _SLOT
                self._opening += 1
            else:
                self._nconns -= 1
        if waiter is not None:
            waiter.signal.set()
        else:
            self._poke()

    # ------------------------------------------------------------- helpers

    def _close_entry(self, entry: _Entry) -> None:
        """Close an entry's connection, then free its host slot (if any), whatever happens.

        With a host budget the slot is freed only once the server closed its
        end of the connection (its backend exited: the server no longer
        counts it), waiting at most ``_GONE_WITHIN`` s, cooperatively: the
        next process to take the slot never pushes the server past the budget.
        """
        host, entry.host_slot = entry.host_slot, None
        if host is None or self._budget is None or entry.generation != self._generation:
            self._close_quietly(entry.conn)
            return
        try:
            self._close_and_wait_gone(entry.conn)
        finally:
            # Also when killed while waiting: the slot is settled whatever happens.
            self._budget.give(host)

    def _close_and_wait_gone(self, conn: Any) -> None:
        """Close ``conn``; wait until the server closed its end too (bounded)."""
        twin = None
        try:
            if self._driver.status(conn) is not Status.CLOSED:
                # A second descriptor of the socket keeps it open past the driver's
                # close: its end-of-file says the backend is gone.
                twin = os.dup(self._driver.fileno(conn))
        except Exception:  # no socket to look at: freed once closed
            twin = None
        try:
            self._close_quietly(conn)
            if twin is not None:
                sync.wait_fd(twin, write=False, timeout=_GONE_WITHIN)
        finally:
            if twin is not None:
                os.close(twin)

    def _give_host(self, host: int | None) -> None:
        """Free host slot ``host`` (None: nothing to free)."""
        if host is not None and self._budget is not None:
            self._budget.give(host)

    def _close_quietly(self, conn: Any) -> None:
        try:
            self._driver.close(conn)
        except Exception:  # closing is best effort: the slot is already accounted for
            logger.debug("error closing a connection", exc_info=True)

    def _forget_inherited(self, conn: Any) -> None:
        """Let go of a connection the parent lent, in a forked child: detached, then closed."""
        self._driver.detach(conn)
        self._close_quietly(conn)

    def _limits(self) -> str:
        """The limits for a timeout's message; with a host budget, also the host's use."""
        if self._budget is None:
            return f"MAX_CONNS={self.max_conns}"
        budget = self._budget
        try:
            used = f"{budget.in_use()} in use on this host"
        except Exception:  # the message must not fail: the lock file went away
            used = "host use unknown"
        return (
            f"MAX_CONNS={self.max_conns}, HOST_MAX_CONNS={budget.size}: {used}, "
            f"{budget.held()} by this process"
        )

    def _counts(self) -> str:
        """Under the lock: the state, HikariCP style, for error messages."""
        return (
            f"(size={self._nconns}, in use={len(self._in_use)}, idle={len(self._idle)}, "
            f"opening={self._opening}, waiting={len(self._waiting)})"
        )

    def _snapshot(self) -> dict[str, float]:
        snap: dict[str, float] = {
            "pool_min": self.options.MIN_CONNS,
            "pool_max": self.max_conns,
            "pool_size": self._nconns,
            "pool_available": len(self._idle),
            "pool_in_use": len(self._in_use),
            "pool_opening": self._opening,
            "requests_waiting": len(self._waiting),
        }
        snap.update(self._counters)
        snap["_samples"] = list(self._wait_samples)  # type: ignore[assignment]
        return snap

    def check_invariants(self) -> None:
        """Raise AssertionError if the slot accounting is off (for tests and debugging)."""
        with self._lock:  # critical section: read everything at once
            idle_ids = {id(e.conn) for e in self._idle}
            problems = []
            if self._nconns != len(self._idle) + len(self._in_use) + self._opening:
                problems.append("size != idle + in use + opening")
            if self._nconns > self.max_conns:
                problems.append("size > MAX_CONNS")
            if len(self._idle) > self.reuse_conns:
                problems.append("idle > REUSE_CONNS")
            if idle_ids & set(self._in_use):
                problems.append("a connection both idle and in use")
            if len(idle_ids) != len(self._idle):
                problems.append("a connection idle twice")
            if self._opening < 0:
                problems.append("opening < 0")
            if not 0 <= self._in_flight <= self._opening:
                problems.append("connect attempts in flight not within 0..opening")
            if self._waiting and (
                self._idle or (self._nconns < self.max_conns and not self._host_wanted)
            ):
                problems.append("a waiter waits while a connection or slot is free")
            if self._budget is not None:
                slots = [e.host_slot for e in [*self._idle, *self._in_use.values()]]
                if None in slots:
                    problems.append("an open connection without a host slot")
                elif len(set(slots)) != len(slots):
                    problems.append("two connections with one host slot")
            if problems:
                raise AssertionError(f"{self!r}: {'; '.join(problems)}")


def _may_return(holder: tuple[Any, int] | None) -> bool:
    """May the current greenlet or thread return a connection ``holder`` borrowed?

    Yes for the borrower itself, from another OS thread (a thread's end is not
    tracked here), and once the borrowing greenlet has ended (the greenlet-end
    return). No for another greenlet of the same thread while the borrower
    runs: that is a stale second return. Two C attribute reads, under the lock.
    """
    if holder is None:
        return True
    borrower, ident = holder
    current, current_ident = sync.current_holder()
    return borrower is current or ident != current_ident or bool(getattr(borrower, "dead", True))


_ALL_POOLS: weakref.WeakSet[ConnectionPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_ALL_POOLS):
        pool._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
