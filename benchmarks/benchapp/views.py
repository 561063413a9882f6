"""The demo's views (``examples/demoproject/shop/views.py``), without its pool-specific imports.

None of them knows about the pool: the first query of a request takes a
connection, and Django gives it back (or closes it) when the request finishes
(or, with our ``POOL_MODE = "transaction"``, after each statement).

``wait_raw`` and ``warm_raw`` replace ``wait`` and ``warm`` for the
``raw-per-query`` reference (``urls.py``): the same work on raw psycopg2
connections taken for each query only.

``skewed`` and ``pid`` serve the ``skewed`` scenario (``benchkit/skewed.py``):
every worker runs the same view; the skew is in the traffic each worker gets.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.http import HttpRequest, HttpResponse, JsonResponse

from benchapp.competitors import SKEW_HOLD_SECONDS, SLEEP_SECONDS, WAIT_SECONDS, env_settings
from benchapp.models import Item, Order

_ITEM_FIELDS = ("id", "name", "price", "stock")

#: Requests of the measured views this process began since the last ``/poolstats/``,
#: and those still running (``/inflight/``). Changed with no switch in between:
#: greenlet-safe, and the workers have one OS thread.
_served = 0
_running = 0

View = Callable[..., HttpResponse]


def measured(view: View) -> View:
    """Count ``view``'s requests: begun (``_served``) and running (``_running``)."""

    @functools.wraps(view)
    def counted(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        global _served, _running
        _served += 1
        _running += 1
        try:
            return view(request, *args, **kwargs)
        finally:
            _running -= 1

    return counted


@measured
def item(request: HttpRequest, pk: int) -> JsonResponse:
    """``/item/<pk>/``: one primary-key lookup."""
    try:
        row = Item.objects.values(*_ITEM_FIELDS).get(pk=pk)
    except Item.DoesNotExist:
        return JsonResponse({"error": f"no item {pk}"}, status=404)
    return JsonResponse(row)


@measured
def sleep(request: HttpRequest) -> JsonResponse:
    """``/sleep/``: a slow query, holding a connection for SLEEP_SECONDS."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [SLEEP_SECONDS])
    return JsonResponse({"slept": SLEEP_SECONDS})


@measured
def tx(request: HttpRequest) -> JsonResponse:
    """``/tx/``: take one unit of a random item's stock and record an order, atomically."""
    pk = random.randint(1, settings.SHOP_ITEMS)
    with transaction.atomic():
        updated = Item.objects.filter(pk=pk).update(stock=F("stock") - 1)
        if not updated:
            return JsonResponse({"error": f"no item {pk}"}, status=404)
        order = Order.objects.create(item_id=pk, quantity=1)
    return JsonResponse({"order": order.pk, "item": pk})


@measured
def wait(request: HttpRequest) -> JsonResponse:
    """``/wait/``: a query, WAIT_SECONDS waiting on another service, a second query.

    The wait is a cooperative sleep standing for an HTTP or LLM call: no
    query runs meanwhile, but a pool that lends a connection per request
    keeps it lent (idle in the server) for the whole wait.
    """
    import gevent

    first = Item.objects.values(*_ITEM_FIELDS).get(pk=random.randint(1, settings.SHOP_ITEMS))
    gevent.sleep(WAIT_SECONDS)
    second = Item.objects.values(*_ITEM_FIELDS).get(pk=random.randint(1, settings.SHOP_ITEMS))
    return JsonResponse({"first": first, "second": second, "waited": WAIT_SECONDS})


def _is_pool_timeout(exc: BaseException) -> bool:
    """Does ``exc`` come from our pool's checkout timeout (Django chains ours as the cause)?"""
    from django_gevent_pool.errors import PoolTimeout

    seen: BaseException | None = exc
    for _ in range(10):  # a chain is a few links long; never loop on a cycle
        if seen is None:
            return False
        if isinstance(seen, PoolTimeout):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _sized(response: HttpResponse) -> HttpResponse:
    """``response`` with its Content-Length (the scenario's client reads keep-alive responses)."""
    response["Content-Length"] = str(len(response.content))
    return response


@measured
def skewed(request: HttpRequest) -> HttpResponse:
    """``/skewed/``: hold a connection for SKEW_HOLD_SECONDS (``pg_sleep``) in this worker.

    A checkout that timed out (our pool's ``PoolTimeout``, through Django's
    ``OperationalError``) answers 503 with ``"error": "pool timeout"``, so the
    client tells it from any other failure (a 500).
    """
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s)", [SKEW_HOLD_SECONDS])
    except OperationalError as exc:
        if not _is_pool_timeout(exc):
            raise
        return _sized(JsonResponse({"pid": os.getpid(), "error": "pool timeout"}, status=503))
    return _sized(JsonResponse({"pid": os.getpid()}))


def pid(request: HttpRequest) -> HttpResponse:
    """``/pid/``: which worker answers this keep-alive connection; no database."""
    return _sized(JsonResponse({"pid": os.getpid()}))


@measured
def wait_raw(request: HttpRequest) -> JsonResponse:
    """``/wait/`` of the reference: each query on a raw connection taken for it alone.

    The same SQL as the ORM's, on MAX_CONNS psycopg2 connections in a plain
    gevent queue (``rawapp.FixedConnections``: no pool logic), given back as
    soon as the row is fetched, so none is held during the wait.
    """
    from benchapp import rawapp

    return JsonResponse(rawapp.wait())


def warm_raw(request: HttpRequest) -> JsonResponse:
    """``/warm/`` of the reference: open its MAX_CONNS raw connections."""
    from benchapp import rawapp

    return JsonResponse({"pid": os.getpid(), "warmed": rawapp.warm()})


def warm(request: HttpRequest) -> JsonResponse:
    """``/warm/``: fill this worker's pool -- MAX_CONNS greenlets each hold a connection at once.

    Run by the orchestrator in every worker before the load, for every
    competitor alike. It matters for django-db-geventpool, which counts only
    finished connects: hit by 200 requests while not yet full it would open
    far more than MAX_CONNS connections (its issues 26, 45, 56, 96), and on a
    shared server with max_connections = 100 others would get "too many
    clients". Once full, it never opens more.

    ``?n=<count>`` holds that many instead of MAX_CONNS (the ``skewed``
    scenario starts every worker with its share of the host's budget).
    """
    import gevent

    # The mysql scenario's competitors hold theirs with MySQL's SLEEP().
    sleep_sql = "SELECT SLEEP(%s)" if connection.vendor == "mysql" else "SELECT pg_sleep(%s)"

    def hold() -> None:
        try:
            with connection.cursor() as cursor:  # this greenlet's own connection
                cursor.execute(sleep_sql, [SLEEP_SECONDS])
        finally:
            connection.close()

    count = int(request.GET.get("n") or env_settings()["max_conns"])
    greenlets = [gevent.spawn(hold) for _ in range(count)]
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    return JsonResponse({"pid": os.getpid(), "warmed": count})


def collect(request: HttpRequest) -> JsonResponse:
    """``/collect/``: ``gc.collect()`` in this worker, between two measurements.

    Under gevent, Django's connections are per greenlet; a persistent one
    (CONN_MAX_AGE > 0) left by a finished greenlet is closed only when the
    garbage collector frees its wrapper (a reference cycle). Without this, the
    connections of one wrk run's clients would still be open during the next.
    """
    import gc

    return JsonResponse({"pid": os.getpid(), "collected": gc.collect()})


def info(request: HttpRequest) -> JsonResponse:
    """``/info/``: what this worker really runs (checked by the orchestrator before a run)."""
    psycopg2 = sys.modules.get("psycopg2")
    callback = None
    if psycopg2 is not None:
        import psycopg2.extensions

        wait = psycopg2.extensions.get_wait_callback()
        callback = None if wait is None else f"{wait.__module__}.{wait.__qualname__}"
    # One connection first, as a request's first query takes it: a pool may
    # set its driver up only then (ours on psycopg 3 installs its wait there).
    connection.ensure_connection()
    # psycopg 3's wait function, as its connections look it up at call time.
    waiting = sys.modules.get("psycopg.waiting")
    psycopg_wait = None
    if waiting is not None:
        psycopg_wait = f"{waiting.wait.__module__}.{waiting.wait.__qualname__}"
    return JsonResponse(
        {
            "pid": os.getpid(),
            "competitor": settings.COMPETITOR,
            "engine": settings.DATABASES["default"]["ENGINE"],
            "driver": connection.Database.__name__,
            "psycopg2_wait_callback": callback,
            "psycopg_wait": psycopg_wait,
            "pool_mode": settings.DATABASES["default"]["OPTIONS"].get("POOL_MODE"),
            "lent_after_statement": lent_after_statement(),
        }
    )


def _our_pool() -> Any:
    """Our pool of the default alias in this process (None for the other competitors)."""
    if "django_gevent_pool" not in settings.DATABASES["default"]["ENGINE"]:
        return None
    from django_gevent_pool.backends.base import get_pool

    return get_pool()


def lent_after_statement() -> int | None:
    """Connections our pool has lent right after one ORM statement in autocommit.

    In session mode this request still holds its connection (1); in
    transaction mode it went back when the statement ended (0). None for the
    other competitors. Read from the pool's own counts, whatever the
    transaction mode is made of.
    """
    if "django_gevent_pool" not in settings.DATABASES["default"]["ENGINE"]:
        return None
    Item.objects.filter(pk=1).exists()
    pool = _our_pool()
    return None if pool is None else int(pool.get_stats()["pool_in_use"])


def in_flight(request: HttpRequest) -> JsonResponse:
    """``/inflight/``: requests of the measured views still running in this process.

    After wrk stops, the requests it gave up on still run in the worker; those
    of ``/wait/`` sleep off the server, where ``pg_stat_activity`` cannot see
    them. The orchestrator waits for 0 before the next measurement.
    """
    return JsonResponse({"pid": os.getpid(), "running": _running})


def pool_stats(request: HttpRequest) -> JsonResponse:
    """``/poolstats/``: since the last call, our pool's counters (``pop_stats()``) and requests.

    ``stats`` is None for the other competitors; ``served`` counts the
    requests of the measured views this process began, so checkouts per
    request come from one process's own counts over one window.
    """
    global _served
    pool = _our_pool()
    served, _served = _served, 0
    return JsonResponse(
        {
            "pid": os.getpid(),
            "stats": None if pool is None else pool.pop_stats(),
            "served": served,
        }
    )
