"""The bare queue (``benchapp.queuebackend``), given back after each statement: the ORM reference.

The reference of transaction mode on the ``/wait/`` view that runs the same
ORM code as every other competitor: Django's psycopg2 backend on MAX_CONNS
connections in a plain gevent queue, each connection given back as soon as
its statement's cursor is closed outside ``atomic()`` and after each
transaction. The giving back is django-pg-real-pool's own mixin, so it costs
Django's ``connect()`` and ``close()`` per statement and nothing more: no
pool logic, no pinning (session state would reach the next borrower), no
fairness, no checks. What ours in transaction mode pays on top of it is the
price of doing that safely.
"""

from __future__ import annotations

from django_pg_real_pool import ConnectionReleaseMixin

from benchapp.queuebackend import base


class DatabaseWrapper(ConnectionReleaseMixin, base.DatabaseWrapper):  # type: ignore[misc]
    """The bare-queue wrapper, giving its connection back after every statement."""
