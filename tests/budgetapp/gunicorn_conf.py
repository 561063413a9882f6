"""gunicorn for the host-budget tests: gevent workers, each with its own application_name.

``DGP_HB_BIND`` and ``DGP_HB_WORKERS`` from the environment; each worker's
connections carry ``<DGP_HB_APPNAME>-<its pid>``, set in ``post_fork``
before the worker loads Django.
"""

from __future__ import annotations

import os
from typing import Any

import django_gevent_pool

pythonpath = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
wsgi_app = "tests.budgetapp.wsgi:application"
bind = os.environ["DGP_HB_BIND"]
workers = int(os.environ.get("DGP_HB_WORKERS", "4"))
worker_class = "gevent"
worker_connections = 1000
keepalive = 0
timeout = 30
graceful_timeout = 5
control_socket_disable = True
errorlog = "-"
loglevel = "warning"


def post_fork(server: Any, worker: Any) -> None:
    """Name this worker's connections after its pid; make the driver yield to gevent."""
    os.environ["DGP_HB_APPNAME"] = f"{os.environ['DGP_HB_APPNAME']}-{os.getpid()}"
    django_gevent_pool.patch_drivers()


def worker_exit(server: Any, worker: Any) -> None:
    """Close this worker's connections cleanly when it stops."""
    from django_gevent_pool.backends.base import drain_pools

    drain_pools(timeout=graceful_timeout)
