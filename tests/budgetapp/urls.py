"""The views gunicorn's workers serve: each answer names the process that served it."""

from __future__ import annotations

import os
import time

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.urls import path

from django_gevent_pool.backends.base import all_stats


def _sleep_in_db(seconds: float) -> int:
    """Hold this request's connection ``seconds`` in the server; its backend pid."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid() FROM pg_sleep(%s)", [seconds])
        return int(cursor.fetchone()[0])


def db(request: HttpRequest) -> JsonResponse:
    """Every worker uses the database here (phase 1)."""
    return JsonResponse({"pid": os.getpid(), "db": _sleep_in_db(0.05)})


def work(request: HttpRequest) -> JsonResponse:
    """Only the worker whose pid is in the busy file uses the database (phase 2)."""
    try:
        with open(settings.BUSY_FILE) as busy:
            busy_pid = int(busy.read().strip() or 0)
    except FileNotFoundError:
        busy_pid = 0
    backend = _sleep_in_db(0.1) if busy_pid == os.getpid() else None
    return JsonResponse({"pid": os.getpid(), "db": backend})


def hold(request: HttpRequest) -> JsonResponse:
    """Hold a connection, idle in the server, for ``?seconds=`` (a request that waits on
    something else with its connection: time.sleep is gevent's in a gevent worker)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = int(cursor.fetchone()[0])
    time.sleep(float(request.GET.get("seconds", "1")))
    return JsonResponse({"pid": os.getpid(), "db": backend})


def stats(request: HttpRequest) -> JsonResponse:
    """This worker's pools (``get_stats()`` by alias), without touching the database."""
    return JsonResponse({"pid": os.getpid(), "pools": all_stats()})


urlpatterns = [
    path("db/", db),
    path("work/", work),
    path("hold/", hold),
    path("stats/", stats),
]
