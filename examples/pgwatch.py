"""Count, from the server's side, the connections a pool really has open.

A pool's own statistics say what it believes; ``pg_stat_activity`` says what
PostgreSQL sees. :class:`ServerConnectionSampler` polls it from its own plain
psycopg2 connection, in a greenlet, and keeps the peak number of backends
whose ``application_name`` is the pool's. Used by ``demo.py`` and
``script.py``, which run gevent monkey-patched. :class:`MySQLSessionSampler`
is the same for MySQL (``make demo DB=mysql``), which has no
``application_name``: it counts a user's sessions in
``information_schema.PROCESSLIST``.
"""

from __future__ import annotations

from typing import Any

import gevent
import psycopg2

import django_gevent_pool

#: What the sampler's own connection calls itself, so it never counts itself.
SAMPLER_APPNAME = "dgp-sampler"

_COUNT = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"


class ServerConnectionSampler:
    """Every ``interval`` seconds, count the server's backends named ``application_name``.

    ``start()`` connects (raising psycopg2's error if it cannot) and spawns
    the sampling greenlet; ``stop()`` ends it, closes the connection and
    returns the peak. A failed sample ends the sampling and is re-raised by
    ``stop()``: a peak that silently stopped being measured would prove nothing.
    """

    def __init__(self, dsn: str, application_name: str, interval: float = 0.02) -> None:
        self.dsn = dsn
        self.application_name = application_name
        self.interval = interval
        self.peak = 0
        self.last = 0
        self.samples = 0
        self._conn: Any = None
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False

    def start(self) -> ServerConnectionSampler:
        """Connect and begin sampling in a new greenlet; return self."""
        # Without gevent's wait callback each sample would block the whole process.
        django_gevent_pool.patch_psycopg2()
        self._conn = psycopg2.connect(self.dsn, application_name=SAMPLER_APPNAME)
        # Autocommit: each sample is its own transaction, so it sees fresh activity
        # (pg_stat_activity is a snapshot taken once per transaction).
        self._conn.autocommit = True
        self._greenlet = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        with self._conn.cursor() as cursor:
            while not self._stopping:
                cursor.execute(_COUNT, [self.application_name])
                self.last = int(cursor.fetchone()[0])
                self.samples += 1
                self.peak = max(self.peak, self.last)
                gevent.sleep(self.interval)

    def stop(self) -> int:
        """Stop sampling, close the connection, return the peak; re-raise a sampling error."""
        self._stopping = True
        try:
            if self._greenlet is not None:
                self._greenlet.join(timeout=5)
                if not self._greenlet.dead:
                    self._greenlet.kill(block=True, timeout=5)
                elif self._greenlet.exception is not None:
                    raise self._greenlet.exception
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        return self.peak


class MySQLSessionSampler(ServerConnectionSampler):
    """Every ``interval`` seconds, count ``user``'s sessions in ``information_schema.PROCESSLIST``.

    Connected as ``root`` (a dict of PyMySQL connect arguments), another user,
    so it never counts itself. ``start()`` raises PyMySQL's error if it cannot
    connect; ``stop()`` is the PostgreSQL sampler's.
    """

    def __init__(self, root: dict[str, Any], user: str, interval: float = 0.02) -> None:
        super().__init__("", user, interval)
        self.root = root

    def start(self) -> ServerConnectionSampler:
        import pymysql  # gevent-cooperative once socket is patched: pure Python

        self._conn = pymysql.connect(**self.root, autocommit=True)
        self._greenlet = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        with self._conn.cursor() as cursor:
            while not self._stopping:
                cursor.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = %s",
                    [self.application_name],
                )
                self.last = int(cursor.fetchone()[0])
                self.samples += 1
                self.peak = max(self.peak, self.last)
                gevent.sleep(self.interval)
