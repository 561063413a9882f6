"""A Celery app on the host-budget test project, for a worker with the gevent pool.

Run from this directory with the repository on ``PYTHONPATH``::

    celery -A celeryapp worker --pool gevent --concurrency 20

The broker and result store are folders under ``$DGP_CELERY_DIR``
(``examples/fsbroker.py``); the database settings are ``settings.py``'s.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from celery import Celery

# Before the app: Celery's Django fix-up gives each task's connection back after it.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.budgetapp.settings")
# Appended, not prepended: examples/ has a celeryapp module of its own.
sys.path.append(str(Path(__file__).resolve().parents[2] / "examples"))
from fsbroker import filesystem_broker

app = Celery("budgetapp")
app.conf.update(
    **filesystem_broker(Path(os.environ["DGP_CELERY_DIR"])),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@app.task
def hold(seconds: float) -> dict[str, Any]:
    """Borrow a connection and keep it ``seconds`` in ``pg_sleep``; when it was asked and got."""
    from django.db import connection

    asked = time.monotonic()
    connection.ensure_connection()
    got = time.monotonic()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid() FROM pg_sleep(%s)", [seconds])
        backend = int(cursor.fetchone()[0])
    return {"asked": asked, "got": got, "backend": backend, "pid": os.getpid()}


@app.task
def pool_stats() -> dict[str, Any]:
    """This worker's pools by alias (``all_stats()``); touches no database."""
    from django_gevent_pool.backends.base import all_stats

    return {"pid": os.getpid(), "pools": all_stats()}
