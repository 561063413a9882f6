"""The micro scenario for one competitor, in one process, no HTTP; prints one JSON line.

    .bench-venv/bin/python benchmarks/micro.py --competitor ours --greenlets 200 --seconds 2
    .bench-venv/bin/python benchmarks/micro.py --competitor ours-psycopg3 --seconds 2
    .bench-venv/bin/python benchmarks/micro.py --competitor ours-transaction --seconds 2

Run by ``benchmarks/run.py`` (which sets the ``DGPB_*`` environment and, for
psycopg2 competitors, ``PYTHONPATH=benchmarks/psycopg2_only``). Three loops,
and two more through Django:

``query``
    ``--greenlets`` greenlets, each repeating: check out a connection, run
    ``SELECT 1``, give it back -- through Django (``connection.cursor()``,
    then ``close_old_connections()`` as at the end of a request) for the
    Django-served competitors (``ours`` on psycopg2, ``ours-psycopg3`` and
    ``django-pool`` on psycopg 3...), through ``ConnectionPool.getconn``/``putconn``
    for ``ours-bare``, through a plain gevent queue of connections for ``raw``.
    Operations per second, all greenlets together.
``query_uncontended``
    The same with only MAX_CONNS greenlets: nobody ever waits for a
    connection, so the pool's queueing (and its fairness) costs nothing and
    what is left is its per-checkout cost.
``noop``
    One greenlet repeating checkout + return with no query
    (``connection.ensure_connection()`` then ``close_old_connections()``):
    the pool's own cost per checkout/return pair, in microseconds, with the
    whole Django connect/close path around it for the Django competitors.
    One greenlet, because a checkout of an idle connection does no I/O and so
    never yields: many greenlets would just run one after the other.
``statement``
    One greenlet repeating one ORM statement, a primary-key lookup
    (``Item.objects.values(...).get(pk=...)``), inside one long "request"
    (no ``close_old_connections()`` in between): microseconds per statement.
    A session-mode pool checks out once for all of them; ours with
    ``POOL_MODE = "transaction"`` checks out and gives back around each one,
    so the difference between the two is that per-statement cost. For
    ``raw`` and ``ours-bare``, no Django: the same SQL on a connection taken
    for each statement alone (the way of the wait view's reference, from a
    plain queue, and from our bare pool).
``statement_busy``
    The same in MAX_CONNS greenlets (nobody waits for a connection): the
    process is busy, so microseconds per statement (1 / throughput) are its
    CPU per statement, where the per-statement checkout weighs the most.
``interleaved`` (ours only)
    One greenlet alternating batches of ten of the same statement: as the
    mode runs them (``released``: in transaction mode, each given back), then
    inside one ``atomic()`` (``held``: no checkout per statement), each
    statement timed alone, medians. In transaction mode the difference is
    the checkout + return around each statement, measured with the two
    kinds side by side in one process, so a shared machine's drift and
    hiccups hit both alike; in session mode (nothing is given back either
    way) it is the control, about 0.

Before both, MAX_CONNS greenlets each hold a connection for 50 ms at once, so
every pool is full (MAX_CONNS open) before the load starts: django-db-geventpool
counts only finished connects and, hit by 200 greenlets while not yet full,
opens far more than MAX_CONNS connections (its issues 26, 45, 56, 96) -- on a
shared server with max_connections = 100, other users would get "too many
clients". A full pool never opens more, so it keeps to MAX_CONNS from then on.

Every greenlet stops at its deadline (checked after each operation), so the
process ends in ``warmup + seconds`` plus one operation, whatever happens.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from statistics import median  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchapp.competitors import (  # noqa: E402
    BY_KEY,
    DBNAME,
    ITEMS,
    MICRO_BARE,
    appname,
    env_settings,
    make_psycopg2_cooperative,
)

#: Operations one loop may count before it stops anyway (a bound on runaway loops).
MAX_OPS = 20_000_000

Op = Callable[[], None]


@dataclass
class Ops:
    """What one competitor's loops repeat.

    ``statement`` (None where there is no Django) runs one ORM statement with
    the connection left as the statement leaves it; ``finish`` ends the
    "request" of a greenlet that ran statements (gives its connection back).
    """

    query: Op
    noop: Op
    hold: Op
    extra: dict[str, Any]
    statement: Op | None = None
    finish: Op | None = None


@dataclass
class Loop:
    """Counts the operations finished inside ``[start, end)`` by all its greenlets."""

    start: float
    end: float
    ops: int = 0
    errors: int = 0
    first_error: str | None = None
    done: list[float] = field(default_factory=list)

    def run(self, op: Op, finish: Op | None = None) -> None:
        """One greenlet: repeat ``op`` until the deadline, counting those inside the window.

        ``finish``, if any, runs once at the end, whatever happened.
        """
        try:
            while True:
                try:
                    op()
                except Exception as exc:
                    self.errors += 1
                    if self.first_error is None:
                        self.first_error = repr(exc)
                    gevent.sleep(0.001)
                now = time.perf_counter()
                if now >= self.end or self.ops >= MAX_OPS:
                    return
                if now >= self.start:
                    self.ops += 1
        finally:
            if finish is not None:
                finish()


def measure(
    op: Op, greenlets: int, warmup: float, seconds: float, finish: Op | None = None
) -> dict[str, Any]:
    """Run ``op`` in ``greenlets`` greenlets; operations/s over ``seconds`` after ``warmup``."""
    start = time.perf_counter() + warmup
    loop = Loop(start=start, end=start + seconds)
    workers = [gevent.spawn(loop.run, op, finish) for _ in range(greenlets)]
    gevent.joinall(workers, timeout=warmup + seconds + 30)
    gevent.killall(workers, block=True, timeout=5)
    ops_per_s = loop.ops / seconds
    return {
        "greenlets": greenlets,
        "ops": loop.ops,
        "seconds": seconds,
        "ops_per_s": ops_per_s,
        "us_per_op": 1e6 / ops_per_s if ops_per_s else None,
        "errors": loop.errors,
        "first_error": loop.first_error,
    }


def connect_kwargs(key: str) -> dict[str, Any]:
    """psycopg2 connection parameters of the non-Django loops."""
    params = env_settings()
    return {
        "host": params["host"],
        "port": params["port"],
        "user": params["user"],
        "password": params["password"],
        "dbname": DBNAME,
        "application_name": appname(key),
    }


def autocommit_connect(**kwargs: Any) -> Any:
    """A psycopg2 connection in autocommit, as Django keeps its connections."""
    import psycopg2

    conn = psycopg2.connect(**kwargs)
    conn.autocommit = True
    return conn


def select_one(conn: Any) -> None:
    """``SELECT 1`` and fetch the row."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def warm(hold: Op, max_conns: int) -> None:
    """Fill the pool: ``max_conns`` greenlets, each holding one connection at the same time."""
    workers = [gevent.spawn(hold) for _ in range(max_conns)]
    gevent.joinall(workers, timeout=30, raise_error=True)


def django_ops(key: str) -> Ops:
    """The operations through Django, with competitor ``key``'s backend."""
    os.environ["DGPB_COMPETITOR"] = key
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchapp.settings"
    import django

    django.setup()
    from benchapp.models import Item
    from django.db import close_old_connections, connection

    def query() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        close_old_connections()

    def noop() -> None:
        connection.ensure_connection()
        close_old_connections()

    def hold() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.05)")
        close_old_connections()

    def statement() -> None:
        Item.objects.values("id", "name", "price", "stock").get(pk=random.randint(1, ITEMS))

    return Ops(
        query,
        noop,
        hold,
        {
            "engine": connection.settings_dict["ENGINE"],
            "pool_mode": connection.settings_dict["OPTIONS"].get("POOL_MODE"),
        },
        statement=statement,
        finish=close_old_connections,
    )


def interleaved(
    statement: Op, finish: Op, warmup: float, seconds: float, batch: int = 10
) -> dict[str, Any]:
    """Microseconds per statement, given back one by one and held in ``atomic()``, interleaved.

    One greenlet (spawned: a checkout there watches its greenlet's end, as in
    a request) alternates a batch of statements as the mode runs them
    (``released``) and a batch inside one ``atomic()`` (``held``), timing
    each statement alone: the one that opens the transaction (and its BEGIN)
    and the COMMIT are not timed. Medians, so that the other work of a
    shared machine (a preemption now and then) does not weigh in; statements
    that began after ``warmup`` count, until ``seconds`` later.
    """
    from django.db import transaction

    took: dict[str, list[float]] = {"released": [], "held": []}
    errors: list[str] = []

    def timed(kind: str, counting: bool) -> None:
        began = time.perf_counter()
        statement()
        if counting:
            took[kind].append(time.perf_counter() - began)

    def loop() -> None:
        start = time.perf_counter() + warmup
        end = start + seconds
        try:
            while (now := time.perf_counter()) < end and len(errors) < 100:
                counting = now >= start
                try:
                    for _ in range(batch):
                        timed("released", counting)
                    with transaction.atomic():
                        statement()  # takes the connection and sends BEGIN: not timed
                        for _ in range(batch):
                            timed("held", counting)
                except Exception as exc:
                    errors.append(repr(exc))
        finally:
            finish()

    worker = gevent.spawn(loop)
    worker.join(timeout=warmup + seconds + 30)
    worker.kill(block=True, timeout=5)
    out: dict[str, Any] = {
        f"{kind}_us": median(values) * 1e6 if values else None for kind, values in took.items()
    }
    out.update(
        statements={kind: len(values) for kind, values in took.items()},
        errors=len(errors),
        first_error=errors[0] if errors else None,
    )
    return out


def lent_after_statement() -> int | None:
    """Our pool's lent connections right after one ORM statement (None: not ours, or no Django).

    Run in the main greenlet after the pool is full; its connection, if it
    still has one, is given back before the loops start.
    """
    if "django" not in sys.modules:
        return None
    from benchapp.views import lent_after_statement as lent
    from django.db import connection

    try:
        return lent()
    finally:
        connection.close()


def raw_item(cursor: Any, pk: int) -> None:
    """The primary-key lookup's SQL (as the ORM sends it) on a driver cursor."""
    from benchapp.rawapp import item

    item(cursor, pk)


def bare_ops(max_conns: int) -> Ops:
    """The operations on our pool without Django (``getconn``/``putconn``)."""
    from django_gevent_pool import ConnectionPool

    pool = ConnectionPool(
        functools.partial(autocommit_connect, **connect_kwargs(MICRO_BARE)),
        name="bare",
        options={"MAX_CONNS": max_conns, "REUSE_CONNS": max_conns, "POOL_TIMEOUT": 10},
    )

    def query() -> None:
        conn = pool.getconn()
        try:
            select_one(conn)
        finally:
            pool.putconn(conn)

    def noop() -> None:
        pool.putconn(pool.getconn())

    def hold() -> None:
        with pool.connection() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.05)")

    def statement() -> None:
        # The ORM's SQL, on a connection taken for this statement alone.
        with pool.connection() as conn, conn.cursor() as cursor:
            raw_item(cursor, random.randint(1, ITEMS))

    return Ops(
        query, noop, hold, {"engine": "django_gevent_pool.ConnectionPool"}, statement=statement
    )


def raw_ops(max_conns: int) -> Ops:
    """The operations on MAX_CONNS connections in a plain gevent queue (no pool at all)."""
    import gevent.queue

    kwargs = connect_kwargs("raw")
    queue: gevent.queue.Queue[Any] = gevent.queue.Queue()
    opened = 0

    def get() -> Any:
        nonlocal opened
        if queue.empty() and opened < max_conns:
            opened += 1  # no switch between the test and this line
            return autocommit_connect(**kwargs)
        return queue.get()

    def query() -> None:
        conn = get()
        try:
            select_one(conn)
        finally:
            queue.put(conn)

    def noop() -> None:
        queue.put(get())

    def hold() -> None:
        conn = get()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_sleep(0.05)")
        finally:
            queue.put(conn)

    def statement() -> None:
        # The ORM's SQL, on a connection taken for this statement alone (the reference's way).
        conn = get()
        try:
            with conn.cursor() as cursor:
                raw_item(cursor, random.randint(1, ITEMS))
        finally:
            queue.put(conn)

    return Ops(
        query,
        noop,
        hold,
        {"engine": "gevent.queue.Queue of psycopg2 connections"},
        statement=statement,
    )


def main() -> int:
    """Parse the arguments, run the loops, print the results as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--competitor", required=True, choices=[*BY_KEY, MICRO_BARE])
    parser.add_argument("--greenlets", type=int, default=200)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    key = args.competitor
    max_conns = env_settings()["max_conns"]
    make_psycopg2_cooperative(key)
    if key == MICRO_BARE:
        ops = bare_ops(max_conns)
    elif key == "raw":
        ops = raw_ops(max_conns)
    else:
        ops = django_ops(key)
    warm(ops.hold, max_conns)
    waiting = sys.modules.get("psycopg.waiting")
    result = {
        "competitor": key,
        "max_conns": max_conns,
        "psycopg_importable": "psycopg" not in sys.modules or sys.modules["psycopg"] is not None,
        **ops.extra,
        # psycopg 3's wait function once the pool is made (None: psycopg 3 unused).
        "psycopg_wait": (
            None if waiting is None else f"{waiting.wait.__module__}.{waiting.wait.__qualname__}"
        ),
        # Ours: 0 in transaction mode (given back after the statement), 1 in session mode.
        "lent_after_statement": lent_after_statement(),
        "query": measure(ops.query, args.greenlets, args.warmup, args.seconds),
        "query_uncontended": measure(ops.query, max_conns, args.warmup / 2, args.seconds / 2),
        "noop": measure(ops.noop, 1, args.warmup / 2, args.seconds / 2),
    }
    if ops.statement is not None:
        half = (args.warmup / 2, args.seconds / 2)
        result["statement"] = measure(ops.statement, 1, *half, finish=ops.finish)
        result["statement_busy"] = measure(ops.statement, max_conns, *half, finish=ops.finish)
        if key in BY_KEY and BY_KEY[key].ours and ops.finish is not None:
            result["interleaved"] = interleaved(ops.statement, ops.finish, *half)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
