"""On ``PYTHONPATH`` for psycopg2 competitors: make ``import psycopg`` fail in this process.

Django's PostgreSQL backend picks psycopg 3 whenever it can import it; the
stock-backend competitors, PgBouncer's and django-db-geventpool's must run on
psycopg2, as their users do. A ``None`` entry in ``sys.modules`` makes every
``import psycopg`` raise ImportError, so Django falls back to psycopg2.
"""

import sys

sys.modules["psycopg"] = None  # type: ignore[assignment]
