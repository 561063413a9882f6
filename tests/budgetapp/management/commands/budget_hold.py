"""Hold ``--conns`` connections of the default alias, each borrowed by a thread of its own.

Prints ``held`` once all are borrowed; gives them back (to the pool, which
keeps them idle) once ``--release-file`` exists and prints ``released``; exits
once ``--exit-file`` exists, printing ``exit``. Threads are greenlets when the
process is monkey-patched (``manage.py`` with ``DGP_HB_MODE=gevent``).
Fails after ``--max-seconds`` whatever happens, and with the first error a
thread met (``ImproperlyConfigured`` for a budget that does not agree).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection

from ...events import emit


class Command(BaseCommand):
    help = "Hold connections of the default alias until told to give them back."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--conns", type=int, required=True)
        parser.add_argument("--release-file", default="")
        parser.add_argument("--exit-file", default="")
        parser.add_argument("--max-seconds", type=float, default=60.0)

    def handle(self, *args: Any, **options: Any) -> None:
        deadline = time.monotonic() + options["max_seconds"]
        release = threading.Event()
        lock = threading.Lock()
        backends: list[int] = []
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_backend_pid()")
                    with lock:
                        backends.append(int(cursor.fetchone()[0]))
                release.wait(max(0.0, deadline - time.monotonic()))
            except BaseException as exc:  # reported by the main thread
                with lock:
                    errors.append(exc)
            finally:
                connection.close()  # back to the pool

        threads = [threading.Thread(target=hold, daemon=True) for _ in range(options["conns"])]
        for thread in threads:
            thread.start()
        while len(backends) < options["conns"] and not errors:
            self._tick(deadline, "the connections to be borrowed")
        if errors:
            release.set()
            raise errors[0]
        emit("held", backends=sorted(backends))
        self._wait_for(options["release_file"], deadline)
        release.set()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if errors:
            raise errors[0]
        emit("released")
        self._wait_for(options["exit_file"], deadline)
        emit("exit")

    def _wait_for(self, path: str, deadline: float) -> None:
        while path and not os.path.exists(path):
            self._tick(deadline, path)

    @staticmethod
    def _tick(deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise CommandError(f"gave up waiting for {what}")
        time.sleep(0.005)
