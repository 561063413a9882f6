"""Who holds the pool's connections: borrower stacks, leak warnings, holder reports.

Only paid for when asked: a borrower's stack is recorded when ``LEAK_TIMEOUT``
is set; a checkout that timed out says who holds the connections (at most
every :data:`HOLDERS_LOG_EVERY` seconds per pool). Nothing here takes the
pool's lock; the pool passes in what it read under it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from . import sync
from .drivers.base import Status

logger = logging.getLogger("django_gevent_pool")

STACK_DEPTH = 25
#: A checkout timeout logs who holds the connections at most this often per pool.
HOLDERS_LOG_EVERY = 10.0
HOLDERS_MAX = 20

_ACTIVITY = {
    Status.IDLE: "not in a query or transaction",
    Status.ACTIVE: "running a query",
    Status.INTRANS: "idle in a transaction",
    Status.INERROR: "in a failed transaction",
    Status.CLOSED: "closed",
}


def borrower_stack(skip_file: str) -> str:
    """The current greenlet's or thread's name and stack, without ``skip_file``'s frames."""
    frames = traceback.extract_stack(limit=STACK_DEPTH + 4)[:-1]  # not this frame
    while frames and frames[-1].filename == skip_file:
        frames.pop()
    return f"{sync.current_name()}\n" + "".join(traceback.format_list(frames[-STACK_DEPTH:]))


def warn_held(name: str, held: float, limit: float, borrower: str | None) -> None:
    """Say that a connection is held past LEAK_TIMEOUT, and by whom."""
    logger.warning(
        "pool %r: a connection has been held for %.1f s (LEAK_TIMEOUT=%s) by %s",
        name,
        held,
        limit,
        borrower,
    )


def warn_came_back(name: str, held: float, borrower: str | None) -> None:
    """Say that a connection reported held too long came back at last."""
    logger.warning(
        "pool %r: the connection held too long came back after %.1f s; borrowed by %s",
        name,
        held,
        borrower,
    )


def log_holders(
    name: str,
    waited: float,
    holders: list[tuple[float, Any, str | None, Status]],
    counts: str,
) -> None:
    """Say who holds the connections a checkout just timed out waiting for.

    ``holders`` are ``(seconds held, sync.current_holder() of the borrower,
    borrower stack or None, the connection's status)``.
    """
    holders.sort(key=lambda h: h[0], reverse=True)
    lines = []
    for held, holder, _borrower, status in holders[:HOLDERS_MAX]:
        who = sync.describe_holder(holder) if holder is not None else "a caller"
        lines.append(f"  {who} for {held:.2f} s, {_ACTIVITY.get(status, 'state unknown')}")
    if len(holders) > HOLDERS_MAX:
        lines.append(f"  ... and {len(holders) - HOLDERS_MAX} more")
    longest = holders[0][2] if holders else None
    if longest:
        where = f"The longest holder borrowed it here:\n{longest}"
    else:
        where = "Set OPTIONS['LEAK_TIMEOUT'] to also record where each was borrowed."
    logger.warning(
        "pool %r: a checkout timed out after %.2f s %s; the %d connection(s) in use "
        "are held by (longest first):\n%s\n%s",
        name,
        waited,
        counts,
        len(holders),
        "\n".join(lines) or "  nobody (all slots are opening connections)",
        where,
    )
