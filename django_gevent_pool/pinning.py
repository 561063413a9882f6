"""Which statements leave session state behind: the pin reasons of ``POOL_MODE = "transaction"``.

In transaction mode a connection goes back to the pool between statements, so
state a statement leaves in the *session* (not in a transaction) would reach
the next borrower, or be lost under its owner. :func:`pin_reason` finds such
statements from their text, cheaply, before they run; the Django layer then
keeps the connection with its borrower until the request ends, and resets it
(``RESET_QUERY``, or a discard when none is set) before anyone else gets it.

The checklist is PgBouncer's transaction-mode feature map: ``SET``/``RESET``
(not ``SET LOCAL``, ``SET TRANSACTION``, ``SET CONSTRAINTS``), ``set_config(...,
false)``, ``LISTEN``, session advisory locks, temporary tables, SQL
``PREPARE``, ``DECLARE ... WITH HOLD``, ``LOAD``. Named (server-side) cursors
opened through the driver pin their connection until they are closed; that is
the Django layer's to see, not the text's.

Detection errs on the safe side: a statement that merely mentions one of these
in a string literal pins too (a pin costs only the early release).
No Django and no driver here.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["REASONS", "pin_reason"]

#: Every pin reason, as counted in the stats (``pins_<reason>``).
REASONS = (
    "set",
    "listen",
    "advisory_lock",
    "temp_table",
    "prepare",
    "cursor",
    "load",
    "explicit",
)

# Comments and blanks before a statement's first keyword.
_LEAD = re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*", re.DOTALL)

# Statements whose first keyword says it all (matched on the lower-cased text).
# SET LOCAL / SET TRANSACTION / SET CONSTRAINTS last until the transaction
# ends, so they do not pin.
_START = re.compile(
    r"""(?:
        (?P<set>(?:set|reset)\b(?!\s+(?:local|transaction|constraints)\b))
      | (?P<listen>(?:un)?listen\b)
      | (?P<prepare>prepare\b(?!\s+transaction\b))
      | (?P<cursor>declare\b[^;]*?\bwith\s+hold\b)
      | (?P<temp_table>create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b)
      | (?P<load>load\b)
    )""",
    re.VERBOSE | re.DOTALL,
)
_FIRST_WORDS = ("set", "reset", "listen", "unlisten", "prepare", "declare", "create", "load")

# Anywhere in a statement (a SELECT calls them), each looked for only when a
# plain substring test found its key word: session advisory locks (not the
# _xact_ ones), session-level set_config, SELECT ... INTO TEMP.
_ANYWHERE = (
    ("advisory_lock", re.compile(r"\bpg_(?:try_)?advisory_lock"), "advisory_lock"),
    (
        "set_config",
        re.compile(r"\bset_config\s*\((?![^()]*,\s*(?:true|'t'|'true'|'on')\s*\))"),
        "set",
    ),
    ("temp", re.compile(r"\binto\s+temp(?:orary)?\b"), "temp_table"),
)


def pin_reason(sql: Any) -> str | None:
    """The reason ``sql`` leaves session state behind (one of :data:`REASONS`), or None.

    ``sql`` is what a cursor's ``execute`` got: ``str``, ``bytes``, or a
    psycopg 3 ``sql.Composable`` (rendered without a connection where it can
    be; one that cannot be rendered is not looked at). Every statement of a
    multi-statement string is looked at.

    An ORM sends the same texts again and again: the answers for short ones
    are remembered (a dict lookup); others cost a lower-casing and a few
    substring tests (no regular expression runs unless a key word is in the
    text).
    """
    if not isinstance(sql, str):
        sql = _text(sql)
        if sql is None:
            return None
    if len(sql) > _CACHED_LENGTH:
        return _reason(sql)
    try:
        return _seen[sql]
    except KeyError:
        pass
    reason = _reason(sql)
    if len(_seen) >= _CACHED_TEXTS:
        _seen.clear()  # a crude bound: ORMs repeat a few hundred texts at most
    _seen[sql] = reason
    return reason


# Answers for texts up to this long, at most this many (dict operations are
# atomic under the GIL: threads and greenlets share it safely).
_CACHED_LENGTH = 4096
_CACHED_TEXTS = 2048
_seen: dict[str, str | None] = {}


def _reason(sql: str) -> str | None:
    low = sql.lower()
    for word, pattern, reason in _ANYWHERE:
        if word in low and pattern.search(low) is not None:
            return reason
    if ";" in low:
        for statement in low.split(";"):
            reason = _first_keyword_reason(statement)
            if reason is not None:
                return reason
        return None
    return _first_keyword_reason(low)


def _first_keyword_reason(low: str) -> str | None:
    start = 0
    if low[:1].isspace() or low[:2] in ("--", "/*"):
        start = _LEAD.match(low).end()  # type: ignore[union-attr]  # always matches
    if not low.startswith(_FIRST_WORDS, start):
        return None
    match = _START.match(low, start)
    return None if match is None else match.lastgroup


def _text(sql: Any) -> str | None:
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace")
    as_string = getattr(sql, "as_string", None)
    if as_string is None:
        return None
    try:
        text = as_string(None)
    except Exception:  # needs a connection to render: not ours to open one here
        return None
    return text if isinstance(text, str) else None
