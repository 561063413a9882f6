"""gunicorn configuration of every HTTP competitor; the orchestrator sets ``DGPB_*``.

gevent workers, no access log, no preload (so settings, pools and raw
connections are made in each worker after the fork).
"""

from __future__ import annotations

import os
from typing import Any

pythonpath = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
wsgi_app = os.environ.get("DGPB_WSGI_APP", "benchapp.wsgi:application")
bind = os.environ["DGPB_BIND"]
worker_class = "gevent"
workers = int(os.environ.get("DGPB_WORKERS", "2"))
worker_connections = int(os.environ.get("DGPB_WORKER_CONNECTIONS", "1000"))
backlog = 2048
keepalive = 30
timeout = 60
graceful_timeout = 5
control_socket_disable = True  # gunicorn >= 25.1: no ~/.gunicorn socket per run
errorlog = "-"
loglevel = "warning"


def post_fork(server: Any, worker: Any) -> None:
    """Make psycopg2 yield to gevent in the worker, as each competitor's users do."""
    from benchapp.competitors import make_psycopg2_cooperative

    make_psycopg2_cooperative(os.environ["DGPB_COMPETITOR"])
