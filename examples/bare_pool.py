"""The pool without Django: 50 greenlets of a monkey-patched script share 5 connections.

    python examples/bare_pool.py

The server comes from ``$DGP_DSN``, else 127.0.0.1:5432, else an embedded
PostgreSQL (see ``django_gevent_pool.devserver``). Prints one JSON line: the
results' sum and the pool's stats; exits 1 if a result is wrong or more than
MAX_CONNS connections were opened.
"""

# First, before anything imports socket, threading or ssl.
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import psycopg2  # noqa: E402

from django_gevent_pool import ConnectionPool, devserver  # noqa: E402

DSN = devserver.server_dsn()[0]  # $DGP_DSN, 127.0.0.1:5432, or an embedded server


def connect() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(DSN, application_name="bare-pool-example")
    conn.autocommit = True  # each statement commits: nothing is left open on return
    return conn


pool = ConnectionPool(connect, name="jobs", options={"MAX_CONNS": 5, "POOL_TIMEOUT": 10})


def job(n: int) -> int:
    with pool.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT %s * 2 FROM pg_sleep(0.01)", [n])
        return int(cur.fetchone()[0])


greenlets = [gevent.spawn(job, n) for n in range(50)]
gevent.joinall(greenlets, raise_error=True, timeout=60)
total = sum(g.value for g in greenlets)
stats = pool.get_stats()
pool.close()

print(json.dumps({"sum": total, "stats": stats}))
sys.exit(0 if total == 2 * sum(range(50)) and stats["connections_num"] <= 5 else 1)
