"""Socket-level operations any driver's connection allows, given its ``fileno()``."""

from __future__ import annotations

import os
from typing import Any


def detach(conn: Any) -> None:
    """Point ``conn``'s socket descriptor at /dev/null, for a forked child.

    Whatever the child then does with the connection object (close, garbage
    collection, a wait that was in flight) goes nowhere, instead of onto a
    socket the parent still uses. A closed connection has nothing shared.
    Never raises for a connection without a socket.
    """
    try:
        fd = conn.fileno()
    except Exception:  # closed already, or no socket yet: nothing shared
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
