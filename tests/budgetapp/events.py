"""What the management commands report: one JSON object per line on stdout."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from django_gevent_pool.backends.base import get_pool


def emit(event: str, **fields: Any) -> None:
    """Print ``event`` with this process's pid, a monotonic time and the pool's stats."""
    pool = get_pool("default")
    line = {
        "event": event,
        "pid": os.getpid(),
        "t": time.monotonic(),  # CLOCK_MONOTONIC: comparable across the host's processes
        "stats": pool.get_stats() if pool is not None else None,
        **fields,
    }
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
