"""Views for the request-cycle tests."""

from __future__ import annotations

from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, JsonResponse
from django.urls import path

from django_gevent_pool.observability import stats_view

from .models import Item


def create_then_fail(request: HttpRequest) -> JsonResponse:
    """Write an Item on ``?using=`` (default: the default alias), then fail if ``?fail=``."""
    using = request.GET.get("using", DEFAULT_DB_ALIAS)
    Item.objects.using(using).create(name="from-request")
    if request.GET.get("fail"):
        raise RuntimeError("the view failed after writing")
    return JsonResponse({"in_atomic_block": connections[using].in_atomic_block})


def backend_pid(request: HttpRequest) -> JsonResponse:
    with connections[DEFAULT_DB_ALIAS].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return JsonResponse({"pid": cur.fetchone()[0]})


urlpatterns = [
    path("create/", create_then_fail),
    path("pid/", backend_pid),
    path("pool-stats/", stats_view),
]
