"""Borrow one connection of the default alias, reporting when it queues and when it got one.

Prints ``queued`` once the pool shows this checkout waiting (with the
pool's stats), then ``got`` with the monotonic time the checkout returned
and the backend's pid. Fails if nothing happens within ``--max-seconds``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection

from django_gevent_pool.backends.base import get_pool

from ...events import emit


class Command(BaseCommand):
    help = "Borrow one connection; report queueing and the time it was served."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-seconds", type=float, default=30.0)

    def handle(self, *args: Any, **options: Any) -> None:
        deadline = time.monotonic() + options["max_seconds"]
        done = threading.Event()

        def watch() -> None:
            # The checkout is waiting once the pool says so; reported once.
            while not done.is_set() and time.monotonic() < deadline:
                pool = get_pool("default")
                if pool is not None and pool.get_stats()["requests_waiting"] >= 1:
                    emit("queued")
                    return
                time.sleep(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        asked = time.monotonic()
        try:
            connection.ensure_connection()
        finally:
            got = time.monotonic()
            done.set()
            watcher.join(5)
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = int(cursor.fetchone()[0])
        emit("got", got=got, asked=asked, backend=backend)
        connection.close()
