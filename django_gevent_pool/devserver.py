"""Find a PostgreSQL server for tests, the demo and benchmarks; start an embedded one if none.

Order: an explicit DSN in the environment (``DGP_DSN``) wins; else a server on
127.0.0.1:5432 (user ``postgres``, trust auth); else a throwaway embedded
PostgreSQL from the ``pgserver`` package (the ``embedded`` or ``test`` extra),
started in a temporary directory and deleted when the process exits.
``DGP_EMBEDDED=1`` (or ``prefer_embedded=True``) skips the local server.

Not used by the pool itself.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import psycopg2
from psycopg2.extensions import parse_dsn

ENV_DSN = "DGP_DSN"
ENV_EMBEDDED = "DGP_EMBEDDED"
LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

_embedded: Any = None


def _reachable(dsn: str) -> bool:
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.Error:
        return False
    conn.close()
    return True


def server_dsn(*, prefer_embedded: bool = False) -> tuple[str, str]:
    """Return ``(dsn, where)`` of a usable server; ``where`` says which one was picked.

    Raises RuntimeError when there is no DSN, no local server and ``pgserver``
    is not installed.
    """
    explicit = os.environ.get(ENV_DSN)
    if explicit:
        return explicit, f"${ENV_DSN}"
    prefer_embedded = prefer_embedded or os.environ.get(ENV_EMBEDDED) == "1"
    if not prefer_embedded and _reachable(LOCAL_DSN):
        return LOCAL_DSN, "127.0.0.1:5432"
    return _start_embedded(), "embedded pgserver"


def _start_embedded() -> str:
    global _embedded
    if _embedded is None:
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                f"no PostgreSQL: set ${ENV_DSN}, run a server on 127.0.0.1:5432, "
                "or install the embedded one: pip install 'django-gevent-pool[embedded]'"
            ) from exc
        datadir = tempfile.mkdtemp(prefix="dgp-pg-")
        with warnings.catch_warnings():
            # platformdirs complains when XDG_RUNTIME_DIR is unset (CI, containers).
            warnings.simplefilter("ignore")
            # "delete": stopped and its directory removed when this process exits.
            _embedded = pgserver.get_server(datadir, cleanup_mode="delete")
    params = parse_dsn(_embedded.get_uri())
    params.setdefault("dbname", "postgres")
    return " ".join(f"{k}={v}" for k, v in params.items() if v != "")


def django_settings(dsn: str, dbname: str | None = None) -> dict[str, Any]:
    """The ``DATABASES`` entry fields (NAME, USER, PASSWORD, HOST, PORT) for ``dsn``."""
    params = parse_dsn(dsn)
    return {
        "NAME": dbname or params.get("dbname", "postgres"),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
    }


def ensure_database(dsn: str, dbname: str) -> str:
    """Create ``dbname`` on the server of ``dsn`` if missing; return a DSN pointing at it."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname])
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        conn.close()
    params = parse_dsn(dsn)
    params["dbname"] = dbname
    return " ".join(f"{k}={v}" for k, v in params.items())


if __name__ == "__main__":  # pragma: no cover
    dsn, where = server_dsn()
    print(f"{where}: {dsn}")
