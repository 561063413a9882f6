"""The demo's views (``examples/demoproject/shop/views.py``), without its pool-specific imports.

None of them knows about the pool: the first query of a request takes a
connection, and Django gives it back (or closes it) when the request finishes.
"""

from __future__ import annotations

import os
import random
import sys

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse

from benchapp.competitors import SLEEP_SECONDS, env_settings
from benchapp.models import Item, Order


def item(request: HttpRequest, pk: int) -> JsonResponse:
    """``/item/<pk>/``: one primary-key lookup."""
    try:
        row = Item.objects.values("id", "name", "price", "stock").get(pk=pk)
    except Item.DoesNotExist:
        return JsonResponse({"error": f"no item {pk}"}, status=404)
    return JsonResponse(row)


def sleep(request: HttpRequest) -> JsonResponse:
    """``/sleep/``: a slow query, holding a connection for SLEEP_SECONDS."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [SLEEP_SECONDS])
    return JsonResponse({"slept": SLEEP_SECONDS})


def tx(request: HttpRequest) -> JsonResponse:
    """``/tx/``: take one unit of a random item's stock and record an order, atomically."""
    pk = random.randint(1, settings.SHOP_ITEMS)
    with transaction.atomic():
        updated = Item.objects.filter(pk=pk).update(stock=F("stock") - 1)
        if not updated:
            return JsonResponse({"error": f"no item {pk}"}, status=404)
        order = Order.objects.create(item_id=pk, quantity=1)
    return JsonResponse({"order": order.pk, "item": pk})


def warm(request: HttpRequest) -> JsonResponse:
    """``/warm/``: fill this worker's pool -- MAX_CONNS greenlets each hold a connection at once.

    Run by the orchestrator in every worker before the load, for every
    competitor alike. It matters for django-db-geventpool, which counts only
    finished connects: hit by 200 requests while not yet full it would open
    far more than MAX_CONNS connections (its issues 26, 45, 56, 96), and on a
    shared server with max_connections = 100 others would get "too many
    clients". Once full, it never opens more.
    """
    import gevent

    def hold() -> None:
        try:
            with connection.cursor() as cursor:  # this greenlet's own connection
                cursor.execute("SELECT pg_sleep(%s)", [SLEEP_SECONDS])
        finally:
            connection.close()

    count = env_settings()["max_conns"]
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
        }
    )
