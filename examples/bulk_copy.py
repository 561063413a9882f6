"""Bulk-load rows with COPY in a gevent monkey-patched process: ``blocking_copy()``.

    python examples/bulk_copy.py [--rows 100000] [--json-out PATH]

psycopg2 refuses COPY while its gevent wait callback is installed, and under
gevent the pool installs one. ``django_gevent_pool.blocking_copy()`` lifts it
for the COPY only: the COPY then blocks the gevent hub, so no other greenlet
of the process runs until it ends. This script shows both sides: the plain
``copy_expert()`` refused with the error that says so, then the load through
``blocking_copy()``, while a ticker greenlet that wants to run every 10 ms
counts how often it could run during the COPY (0: the hub was blocked).

The server comes from ``$DGP_DSN``, else 127.0.0.1:5432, else an embedded
PostgreSQL (see ``django_gevent_pool.devserver``); the database from
``$DGP_DBNAME`` (default ``dgp_demo``), where the table ``bulk_item`` is
(re)created.

Exits 1 if the rows loaded are not the rows sent, or the wait callback was not
restored afterwards.
"""

# First, before anything imports socket, threading or ssl.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

import django_gevent_pool  # noqa: E402
from django_gevent_pool import devserver  # noqa: E402


def configure_django(db_dsn: str) -> None:
    """One pooled alias on ``db_dsn``; no project needed."""
    import django
    from django.conf import settings

    settings.configure(
        DATABASES={
            "default": {
                "ENGINE": "django_gevent_pool.backends.postgresql_psycopg2",
                **devserver.django_settings(db_dsn),
                "OPTIONS": {"MAX_CONNS": 2, "application_name": f"dgp-copy-{os.getpid()}"},
            }
        },
        USE_TZ=True,
    )
    django.setup()


def csv_rows(rows: int) -> io.StringIO:
    """``rows`` lines of ``name,price`` in CSV, as a file object for COPY."""
    return io.StringIO("".join(f"item {i},{i % 100}.50\n" for i in range(rows)))


def load(rows: int) -> dict[str, Any]:
    """Refused without blocking_copy(), then loaded with it; what was seen."""
    from django.db import connection

    from django_gevent_pool import CopyBlocksTheHub, blocking_copy

    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        while True:
            gevent.sleep(0.01)
            ticks += 1

    ticking = gevent.spawn(ticker)
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bulk_item")
        cursor.execute("CREATE TABLE bulk_item (name text NOT NULL, price numeric NOT NULL)")
        try:
            cursor.copy_expert("COPY bulk_item (name, price) FROM STDIN (FORMAT csv)", csv_rows(1))
            refused = ""
        except CopyBlocksTheHub as exc:
            refused = str(exc)
        data = csv_rows(rows)
        gevent.sleep(0.05)  # the ticker runs freely here
        ticks_before, started = ticks, time.perf_counter()
        # The cursor (and its checkout) came first, cooperatively: only the
        # COPY itself blocks the hub.
        with blocking_copy():
            cursor.copy_expert("COPY bulk_item (name, price) FROM STDIN (FORMAT csv)", data)
        copy_seconds = time.perf_counter() - started
        ticks_during = ticks - ticks_before
        cursor.execute("SELECT count(*), sum(price) FROM bulk_item")
        count, total = cursor.fetchone()
    connection.close()  # back to the pool
    ticking.kill()
    return {
        "rows_sent": rows,
        "rows_loaded": count,
        "price_sum": float(total or 0),
        "price_sum_sent": sum(i % 100 + 0.5 for i in range(rows)),
        "copy_seconds": copy_seconds,
        "ticks_during_copy": ticks_during,
        "refused_without_it": refused,
        "callback_restored": django_gevent_pool.is_psycopg2_cooperative(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the load; 0 if every row arrived and the callback is back, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows to load (100000)")
    parser.add_argument("--json-out", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    dsn, where = devserver.server_dsn()
    db_dsn = devserver.ensure_database(dsn, os.environ.get("DGP_DBNAME", "dgp_demo"))
    configure_django(db_dsn)
    result = load(args.rows)
    print(f"server:                {where}")
    print(f"without blocking_copy: {result['refused_without_it'] or 'not refused'}")
    print(f"rows loaded:           {result['rows_loaded']} / {result['rows_sent']}")
    print(f"COPY took:             {result['copy_seconds'] * 1000:.0f} ms")
    print(f"ticker runs meanwhile: {result['ticks_during_copy']} (the hub was blocked)")
    problems = []
    if result["rows_loaded"] != result["rows_sent"]:
        problems.append("rows lost")
    if abs(result["price_sum"] - result["price_sum_sent"]) > 0.001:
        problems.append("prices differ")
    if not result["callback_restored"]:
        problems.append("psycopg2 is not cooperative any more")
    result["problems"] = problems
    if args.json_out:
        with open(args.json_out, "w") as out:
            json.dump(result, out, indent=2)
    print("FAILED: " + "; ".join(problems) if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
