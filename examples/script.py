"""A gevent monkey-patched script: many greenlets, a small pool, never more connections.

    python examples/script.py [--greenlets 200] [--max-conns 5]
                              [--pool-mode session|transaction] [--wait SECONDS]

It configures the demo project's Django settings (``demoproject.settings``),
migrates and seeds the database if needed, then spawns the greenlets at once.
Each does a few ORM queries and a small transaction through the pool; its body
is decorated with ``close_connection``, so its connection goes back to the
pool as soon as it is done (the way Celery tasks and spawned greenlets should
do it). Meanwhile a sampler counts, in ``pg_stat_activity``, the server
connections that carry this run's ``application_name``.

``--wait`` makes each visit wait that long on "another service" (a
cooperative sleep, as an HTTP call would) between its first queries and its
transaction. In session mode it holds its connection meanwhile; with
``--pool-mode transaction`` it does not, so the greenlets share the few
connections while they wait. In transaction mode the script also waits for a
``NOTIFY`` on a connection of its own, inside ``pinned()`` (the ``LISTEN``
goes through the driver, where the pool cannot see it).

The server comes from ``$DGP_DSN``, else 127.0.0.1:5432, else an embedded
PostgreSQL (see ``django_gevent_pool.devserver``); the database from
``$DGP_DBNAME`` (default ``dgp_demo``).

Exits 1 if a greenlet failed, if a connection was still lent afterwards, or
if the server ever saw more than MAX_CONNS connections (or none at all, which
would mean the sampler measured nothing).
"""

# First, before anything imports socket, threading or ssl.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.select  # noqa: E402

import django_gevent_pool  # noqa: E402
from django_gevent_pool import devserver  # noqa: E402
from django_gevent_pool.decorators import close_connection  # noqa: E402

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from pgwatch import ServerConnectionSampler  # noqa: E402

#: Seconds all greenlets together may take before the stragglers are killed.
RUN_LIMIT = 120.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options, with defaults from the environment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--greenlets",
        type=int,
        default=int(os.environ.get("DGP_SCRIPT_GREENLETS", "200")),
        help="greenlets spawned at once (200)",
    )
    parser.add_argument(
        "--max-conns",
        type=int,
        default=int(os.environ.get("DGP_MAX_CONNS", "5")),
        help="MAX_CONNS of the pool (5)",
    )
    parser.add_argument(
        "--pool-mode",
        choices=("session", "transaction"),
        default=os.environ.get("DGP_POOL_MODE", "session"),
        help="POOL_MODE of the pool (session)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds each visit waits on another service between its queries (0)",
    )
    parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def configure_django(
    db_dsn: str, dbname: str, max_conns: int, appname: str, pool_mode: str = "session"
) -> None:
    """Point the demo project's settings at ``db_dsn`` and set Django up."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "demoproject.settings"
    os.environ["DGP_POOL_MODE"] = pool_mode
    os.environ["DGP_DSN"] = db_dsn
    os.environ["DGP_DBNAME"] = dbname
    os.environ["DGP_MAX_CONNS"] = str(max_conns)
    os.environ["DGP_APPNAME"] = appname
    import django

    django.setup()


def prepare_database() -> tuple[list[int], int]:
    """Migrate, seed if the shop is empty; return the items' primary keys and the order count."""
    from demoproject.shop.models import Item, Order
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    if not Item.objects.exists():
        call_command("seed", items=settings.SHOP_ITEMS, verbosity=0)
    item_ids = list(Item.objects.values_list("pk", flat=True))
    orders = Order.objects.count()
    # Give this greenlet's connection back to the pool, or it would hold one
    # of the few connections for the whole run.
    connections.close_all()
    return item_ids, orders


@close_connection
def shop_visit(item_id: int, wait: float = 0.0) -> None:
    """A few queries as one unit of work; its connection goes back to the pool at the end."""
    from demoproject.shop.models import Item, Order
    from django.db import connection, transaction
    from django.db.models import F

    Item.objects.get(pk=item_id)
    Item.objects.filter(price__lt=10).count()
    with connection.cursor() as cursor:
        # Hold the connection a little, as real work would, so that the
        # greenlets really have to queue for the pool's few connections.
        cursor.execute("SELECT pg_sleep(0.01)")
    if wait:
        gevent.sleep(wait)  # another service: in transaction mode, no connection held
    with transaction.atomic():
        Item.objects.filter(pk=item_id).update(stock=F("stock") - 1)
        Order.objects.create(item_id=item_id, quantity=1)


@close_connection
def listen_once(channel: str, notify: Any, timeout: float) -> str | None:
    """LISTEN on ``channel``, call ``notify()``, return the first payload (None: none came)."""
    from django_gevent_pool import pinned

    with pinned() as connection:  # one connection for the whole block
        raw = connection.connection
        with raw.cursor() as cursor:  # the driver's own cursor: the pool cannot see it
            cursor.execute(f"LISTEN {channel}")
        notify()
        return next_notification(raw, timeout)
    # Out of the block, the connection went back closed (no RESET_QUERY):
    # its LISTEN reaches nobody else.


def next_notification(raw: Any, timeout: float) -> str | None:
    """The payload of the next notification on ``raw`` (psycopg2 or psycopg 3), or None."""
    if hasattr(raw, "poll"):  # psycopg2: wait for the socket, then read
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gevent.select.select([raw], [], [], deadline - time.monotonic())
            raw.poll()
            if raw.notifies:
                return str(raw.notifies.pop(0).payload)
        return None
    for notification in raw.notifies(timeout=timeout, stop_after=1):  # psycopg 3
        return str(notification.payload)
    return None


@close_connection
def notify(channel: str, payload: str) -> None:
    """NOTIFY through the ORM's connection (any one of the pool's)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set everything up, run the greenlets, return what was measured."""
    from django.db import DEFAULT_DB_ALIAS

    from django_gevent_pool.backends.base import get_pool

    # pgserver's platformdirs complains when XDG_RUNTIME_DIR is unset; harmless here.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    dsn, where = devserver.server_dsn()
    dbname = os.environ.get("DGP_DBNAME", "dgp_demo")
    db_dsn = devserver.ensure_database(dsn, dbname)
    appname = f"dgp-script-{os.getpid()}"
    configure_django(db_dsn, dbname, args.max_conns, appname, args.pool_mode)
    # The backend would also do it on its own (gevent has patched socket):
    # explicit is clearer in a script.
    django_gevent_pool.patch_drivers()
    item_ids, orders_before = prepare_database()

    pool = get_pool(DEFAULT_DB_ALIAS)
    assert pool is not None, "prepare_database() used the database: the pool exists"
    pool.pop_stats()  # count from here on: the run, not the migration

    from demoproject.shop.models import Order
    from django.db import connections

    rng = random.Random(0)
    sampler = ServerConnectionSampler(db_dsn, appname).start()
    try:
        started = time.perf_counter()
        greenlets = [
            gevent.spawn(shop_visit, rng.choice(item_ids), args.wait)
            for _ in range(args.greenlets)
        ]
        gevent.joinall(greenlets, timeout=RUN_LIMIT)
        elapsed = time.perf_counter() - started
        notified = None
        if args.pool_mode == "transaction":
            channel = f"dgp_script_{os.getpid()}"
            notified = listen_once(channel, lambda: gevent.spawn(notify, channel, "hello"), 10.0)
        stragglers = [g for g in greenlets if not g.dead]
        gevent.killall(stragglers, block=True, timeout=10)
        orders = Order.objects.count() - orders_before
        connections.close_all()
    finally:
        peak = sampler.stop()
    stats = pool.get_stats()
    failures = [g.exception for g in greenlets if g.exception is not None]
    return {
        "server": where,
        "database": dbname,
        "application_name": appname,
        "greenlets": args.greenlets,
        "done": sum(1 for g in greenlets if g.successful()),
        "errors": len(failures) + len(stragglers),
        "error_samples": sorted({repr(exc)[:300] for exc in failures})[:5],
        "elapsed": elapsed,
        "pool_mode": args.pool_mode,
        "wait": args.wait,
        "notified": notified,
        "orders": orders,
        "max_conns": args.max_conns,
        "peak": peak,
        "samples": sampler.samples,
        "pool_stats": stats,
    }


def report(result: dict[str, Any]) -> list[str]:
    """Print the results; return the reasons to fail, if any."""
    stats = result["pool_stats"]
    print(f"server:                {result['server']}, database {result['database']}")
    print(f"greenlets done:        {result['done']} / {result['greenlets']}")
    print(f"errors:                {result['errors']}")
    for sample in result["error_samples"]:
        print(f"    {sample}")
    print(f"elapsed:               {result['elapsed']:.2f} s")
    print(f"pool mode:             {result['pool_mode']} (each visit waits {result['wait']:g} s)")
    if result["pool_mode"] == "transaction":
        print(f"notification:          {result['notified']!r}")
    print(f"orders written:        {result['orders']}")
    print("pool stats:")
    for key, value in stats.items():
        print(f"    {key:22} {value:g}")
    print(
        f"peak server connections for application_name {result['application_name']!r}: "
        f"{result['peak']} (MAX_CONNS {result['max_conns']}, {result['samples']} samples)"
    )
    problems = []
    if result["errors"]:
        problems.append(f"{result['errors']} greenlets failed")
    if result["orders"] != result["done"]:
        problems.append(f"{result['orders']} orders written for {result['done']} greenlets")
    if stats["pool_in_use"]:
        problems.append(f"{stats['pool_in_use']:g} connections still lent after the run")
    if result["peak"] > result["max_conns"]:
        problems.append(f"the server saw {result['peak']} connections > MAX_CONNS")
    if result["peak"] == 0:
        problems.append("the sampler never saw a connection: nothing was measured")
    if result["pool_mode"] == "transaction" and result["notified"] != "hello":
        problems.append(f"the LISTEN inside pinned() got {result['notified']!r}, not 'hello'")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the script; 0 if every check passed, 1 otherwise."""
    args = parse_args(argv)
    result = run(args)
    problems = report(result)
    result["problems"] = problems
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(result, out, indent=2)
    print("FAILED: " + "; ".join(problems) if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
