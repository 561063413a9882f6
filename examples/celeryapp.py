"""A Celery app for the demo project on django-gevent-pool, run by gevent workers: copy it.

Run a worker from this directory, then send it tasks from anywhere that can
import this module::

    cd examples
    python manage.py migrate && python manage.py seed --items 100
    celery -A celeryapp worker --pool gevent --concurrency 50 --loglevel info
    python -c "import celeryapp; print(celeryapp.item_name.delay(1).get(timeout=10))"

How the pieces fit together:

Monkey-patching
    ``celery`` itself calls ``gevent.monkey.patch_all()`` as its very first
    step when its command line says ``--pool gevent``, ``--pool=gevent`` or
    ``-P gevent``, before it imports this module, Django or psycopg2. That is
    the right place, so there is no patching in this file. Choosing the pool
    any other way (``worker_pool = "gevent"`` in the configuration,
    ``-Pgevent`` written as one word, ``app.worker_main()``) starts a gevent
    pool in an unpatched process, which takes tasks without running them and
    would have all its greenlets share one Django connection;
    :func:`check_gevent_patched` refuses to start such a worker.
psycopg2
    Its network waits happen in C, out of gevent's reach. The pool installs
    a gevent wait callback by itself when it is created in a process where
    gevent has patched ``socket``; :func:`check_gevent_patched` also does it
    explicitly at worker start-up (``celeryd_init``). ``psycogreen`` is not
    needed.
Connections
    Every task runs in a greenlet of its own, with a Django connection of
    its own (Django keeps them in thread-locals, which are greenlet-local
    once patched). Celery's Django fix-up calls ``close()`` on it before and
    after every task, which gives it back to the pool at once, whatever
    ``CONN_MAX_AGE`` says (leave it at 0). Without the fix-up the connection
    still comes back when the task's greenlet ends. A task killed by its time
    limit in the middle of a query has that query cancelled on the server
    and its connection discarded. No ``close_old_connections()`` and no
    decorator are needed.
Sizing
    One worker process has one pool per database alias: at most
    ``MAX_CONNS`` server connections however high ``--concurrency`` is.
    Greenlets beyond that wait for a connection, first come first served, for
    at most ``POOL_TIMEOUT`` seconds. See the settings in
    ``demoproject/settings.py`` (``DGP_MAX_CONNS`` sets ``MAX_CONNS``).

The broker and the result store are, *for the example only*, folders under
``$DGP_CELERY_DIR`` (default: ``dgp-celery`` in the system's temporary
directory; see ``fsbroker.py``), so that nothing has to be installed or
started. In production use Redis or RabbitMQ: set ``broker_url`` and
``result_backend`` instead of calling ``filesystem_broker()``; nothing else
here changes.

The database is the demo project's (``DGP_DSN``, ``DGP_DBNAME``,
``DGP_MAX_CONNS``, ``DGP_APPNAME``: see ``demoproject/settings.py``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from celery import Celery, signals
from fsbroker import filesystem_broker

import django_gevent_pool

# Before the app is created: Celery's Django fix-up is installed only when this
# is set, and it gives each task's connection back to the pool as soon as the
# task is done.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demoproject.settings")

app = Celery("demoproject")
app.conf.update(
    # For the example: folders instead of a broker server (see fsbroker.py).
    # In production: broker_url="redis://...", result_backend="redis://...".
    **filesystem_broker(
        Path(os.environ.get("DGP_CELERY_DIR") or Path(tempfile.gettempdir()) / "dgp-celery")
    ),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
)


@signals.celeryd_init.connect
def check_gevent_patched(options: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """At worker start-up: refuse a gevent pool without monkey-patching; make the driver yield.

    Runs in the worker process before it takes any task, whatever its pool.
    Under ``--pool gevent`` (patched by ``celery`` itself) it installs the
    gevent wait callback on psycopg2 and psycopg 3's cooperative waits, which the
    pool would also do on its own.
    Prefork and solo workers are left alone.
    """
    pool = (options or {}).get("pool") or app.conf.worker_pool  # a name or a class
    wants_gevent = "gevent" in (pool if isinstance(pool, str) else pool.__module__)
    monkey = sys.modules.get("gevent.monkey")
    patched = monkey is not None and monkey.is_module_patched("socket")
    if wants_gevent and not patched:
        raise SystemExit(
            "the gevent pool needs gevent's monkey-patching, which celery applies only when "
            "the pool is on its command line: celery -A celeryapp worker --pool gevent"
        )
    if patched:
        django_gevent_pool.patch_drivers()


@signals.worker_shutdown.connect
def close_pools(**kwargs: Any) -> None:
    """When the worker stops, after its running tasks: close the pools' connections cleanly.

    The server sees each session end instead of a cut socket. A connection
    somehow still lent gets up to 10 seconds to come back.
    """
    from django_gevent_pool.backends.base import drain_pools

    drain_pools(timeout=10)


class OrderRejected(Exception):
    """Raised by :func:`place_order` when asked to fail, after writing inside the transaction."""


@app.task
def item_name(pk: int) -> str:
    """The name of item ``pk``: one query on a connection borrowed for this task."""
    from demoproject.shop.models import Item

    return Item.objects.get(pk=pk).name


@app.task
def place_order(item_id: int, quantity: int = 1, fail: bool = False) -> int:
    """Take ``quantity`` from the item's stock and record the order, in one transaction.

    With ``fail``, raise :class:`OrderRejected` inside the transaction after
    both writes: the transaction is rolled back and the task fails, and the
    connection still goes back to the pool, clean.
    """
    from demoproject.shop.models import Item, Order
    from django.db import transaction
    from django.db.models import F

    with transaction.atomic():
        Item.objects.filter(pk=item_id).update(stock=F("stock") - quantity)
        order = Order.objects.create(item_id=item_id, quantity=quantity)
        if fail:
            raise OrderRejected(f"order {order.pk} rejected; its transaction is rolled back")
    return int(order.pk)


@app.task
def sleep_in_db(seconds: float) -> int:
    """Hold a connection for ``seconds`` in the server (``pg_sleep``); return its backend pid.

    Other greenlets go on meanwhile: psycopg2 yields to gevent while it waits.
    """
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid() FROM pg_sleep(%s)", [seconds])
        return int(cursor.fetchone()[0])


@app.task
def pool_stats() -> dict[str, Any]:
    """This worker process's pools, by alias (``all_stats()``), with its pid and patch state."""
    from django.db import connection

    from django_gevent_pool.backends.base import all_stats

    monkey = sys.modules.get("gevent.monkey")
    return {
        "pid": os.getpid(),
        "gevent_patched": monkey is not None and bool(monkey.is_module_patched("socket")),
        "driver": connection.pool_driver,
        "pool_mode": connection.settings_dict["OPTIONS"].get("POOL_MODE", "session"),
        "cooperative": django_gevent_pool.is_cooperative(connection.pool_driver),
        "pools": all_stats(),
    }
