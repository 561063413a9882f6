"""gunicorn configuration for a Django app on django-gevent-pool: copy it and adapt.

Run from anywhere:  gunicorn -c examples/gunicorn.conf.py

Every value below can be overridden from the environment (the demo does), so
the file itself stays the one you would deploy. Each gevent worker is one
process with one pool per database alias: the server sees at most
``workers x MAX_CONNS`` connections from this service, however many requests
are in flight.
"""

from __future__ import annotations

import os
from typing import Any

import django_gevent_pool

# Where the project lives, so that "demoproject" is importable; in your own
# project this is usually the directory that holds manage.py.
pythonpath = os.path.dirname(os.path.abspath(__file__))

# The WSGI application (module:variable), as on gunicorn's command line.
wsgi_app = os.environ.get("DGP_WSGI_APP", "demoproject.wsgi:application")

# host:port to listen on. Put a reverse proxy in front in production.
bind = os.environ.get("DGP_BIND", "127.0.0.1:8000")

# Greenlet workers: each request runs in its own greenlet, and gevent
# monkey-patches the worker at start-up so sockets (and, through the pool's
# wait callback, psycopg2) yield instead of blocking the process.
worker_class = "gevent"

# Processes. With gevent one per CPU core is the usual start; each has its own
# pool, so size MAX_CONNS x workers against the server's max_connections.
workers = int(os.environ.get("DGP_WORKERS", "1"))

# Greenlets (concurrent requests) per worker. Far above MAX_CONNS is fine: a
# request waits in the pool's FIFO queue for at most POOL_TIMEOUT seconds.
worker_connections = int(os.environ.get("DGP_WORKER_CONNECTIONS", "1000"))

# Seconds an idle keep-alive client connection is kept open between requests.
keepalive = int(os.environ.get("DGP_KEEPALIVE", "5"))

# Seconds a worker may stay silent before the master restarts it. A gevent
# worker keeps notifying while requests wait, so this only catches a blocked hub.
timeout = int(os.environ.get("DGP_TIMEOUT", "30"))

# Seconds workers get to finish in-flight requests after SIGTERM.
graceful_timeout = int(os.environ.get("DGP_GRACEFUL_TIMEOUT", "10"))

# gunicorn >= 25.1 also opens a control socket (for gunicornc), by default in
# ~/.gunicorn; the demo turns it off so that runs side by side do not take each
# other's socket. Older gunicorn ignores this name.
control_socket_disable = os.environ.get("DGP_NO_CONTROL_SOCKET") == "1"

# Errors to stderr; no access log (turn it on with accesslog = "-").
errorlog = "-"
loglevel = os.environ.get("DGP_LOGLEVEL", "info")


def post_fork(server: Any, worker: Any) -> None:
    """In each new worker: make the drivers yield to gevent while they wait on the network.

    psycopg2 talks to the server in C, out of reach of gevent's socket
    patching, and psycopg 3 imported before the patching (``--preload``)
    waits in C too; either way one slow query would block every greenlet of
    the worker. The backend makes its driver cooperative by itself when
    gevent has patched ``socket``; calling it here makes it explicit and
    independent of import order. It is idempotent.
    """
    django_gevent_pool.patch_drivers()


def worker_exit(server: Any, worker: Any) -> None:
    """When a worker stops: stop lending, let in-flight requests give back, close all.

    New checkouts fail at once, connections still in use get up to
    ``graceful_timeout`` seconds to come back, then everything is closed, so the
    server sees the worker's sessions end cleanly instead of being cut.
    """
    from django_gevent_pool.backends.base import drain_pools

    drain_pools(timeout=graceful_timeout)
