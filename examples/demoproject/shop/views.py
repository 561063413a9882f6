"""The demo's endpoints: plain Django views returning JSON, kept small for benchmarks.

None of them knows about the pool: the first query of a request borrows a
connection, and Django gives it back when the request finishes.
"""

from __future__ import annotations

import os
import random

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse

from django_gevent_pool import is_cooperative
from django_gevent_pool.backends.base import all_stats

from .models import Item, Order

#: Seconds the ``/sleep/`` query holds its connection on the server.
SLEEP_SECONDS = 0.05


def item(request: HttpRequest, pk: int) -> JsonResponse:
    """``/item/<pk>/``: one primary-key lookup."""
    try:
        row = Item.objects.values("id", "name", "price", "stock").get(pk=pk)
    except Item.DoesNotExist:
        return JsonResponse({"error": f"no item {pk}"}, status=404)
    return JsonResponse(row)


def sleep(request: HttpRequest) -> JsonResponse:
    """``/sleep/``: a slow query, holding a connection for SLEEP_SECONDS."""
    sleep_sql = "SELECT SLEEP(%s)" if connection.vendor == "mysql" else "SELECT pg_sleep(%s)"
    with connection.cursor() as cursor:
        cursor.execute(sleep_sql, [SLEEP_SECONDS])
    return JsonResponse({"slept": SLEEP_SECONDS})


def tx(request: HttpRequest) -> JsonResponse:
    """``/tx/``: a transaction that takes one unit of a random item's stock and records an order.

    The item's row is locked by the UPDATE only until the commit; with
    ``settings.SHOP_ITEMS`` items to pick from, requests rarely wait on each other.
    """
    pk = random.randint(1, settings.SHOP_ITEMS)
    with transaction.atomic():
        updated = Item.objects.filter(pk=pk).update(stock=F("stock") - 1)
        if not updated:
            return JsonResponse({"error": f"no item {pk}"}, status=404)
        order = Order.objects.create(item_id=pk, quantity=1)
    return JsonResponse({"order": order.pk, "item": pk})


def stats(request: HttpRequest) -> JsonResponse:
    """``/stats/``: this process's pool statistics, by alias, and its PID.

    Demo only: in a real application put this behind authentication (or
    export the numbers to your metrics system instead of over HTTP).
    """
    return JsonResponse(
        {
            "pid": os.getpid(),
            "driver": connection.pool_driver,
            "cooperative": is_cooperative(connection.pool_driver),
            "pools": all_stats(),
        }
    )
