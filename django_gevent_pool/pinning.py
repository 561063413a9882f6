"""Which statements leave session state behind: the pin reasons of ``POOL_MODE = "transaction"``.

In transaction mode a connection goes back to the pool between statements, so
state a statement leaves in the *session* (not in a transaction) would reach
the next borrower, or be lost under its owner. :func:`pin_reason` finds such
statements from their text, cheaply, before they run; the Django layer then
keeps the connection with its borrower until the request ends, and resets it
(``RESET_QUERY``, or a discard when none is set) before anyone else gets it.

Two dialects. PostgreSQL's checklist is PgBouncer's transaction-mode feature
map: ``SET``/``RESET`` (not ``SET LOCAL``, ``SET TRANSACTION``, ``SET
CONSTRAINTS``), ``set_config(..., false)``, ``LISTEN``, session advisory
locks, temporary tables, SQL ``PREPARE``, ``DECLARE ... WITH HOLD``, ``LOAD``.
MySQL's (and MariaDB's): ``SET`` (also ``SET TRANSACTION``, which holds for
the session's *next* transaction; not MariaDB's ``SET STATEMENT ... FOR``),
``USE``, user variables assigned in a statement (``:=``, ``INTO @``),
``SQL_CALC_FOUND_ROWS`` and ``LAST_INSERT_ID(expr)`` (read back by the next
statement), ``GET_LOCK``, ``LOCK TABLES`` and the other locks a session holds
(``FLUSH TABLES ... WITH READ LOCK`` / ``FOR EXPORT``, ``LOCK INSTANCE``,
``BACKUP``), temporary tables, ``PREPARE``, ``HANDLER ... OPEN``; statements
inside ``/*! ... */`` comments run on MySQL, so they are read too. ``LOAD
DATA`` leaves nothing behind there.

Named (server-side) cursors opened through the driver pin their connection
until they are closed; that is the Django layer's to see, not the text's.
Detection errs on the safe side: a statement that merely mentions one of these
in a string literal pins too (a pin costs only the early release).
No Django and no driver here.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["DIALECTS", "REASONS", "pin_reason"]

#: Every pin reason, as counted in the stats (``pins_<reason>``).
REASONS = (
    "set",
    "listen",
    "advisory_lock",
    "temp_table",
    "prepare",
    "cursor",
    "load",
    "table_lock",
    "explicit",
)

#: The dialects :func:`pin_reason` reads.
DIALECTS = ("postgresql", "mysql")


class _Dialect:
    """How one dialect's statements leave session state: what ``_reason`` reads."""

    __slots__ = ("anywhere", "first_words", "lead", "seen", "start")

    def __init__(
        self,
        lead: re.Pattern[str],
        start: re.Pattern[str],
        first_words: tuple[str, ...],
        anywhere: tuple[tuple[str, re.Pattern[str], str], ...],
    ) -> None:
        self.lead = lead  # comments and blanks before a statement's first keyword
        self.start = start  # statements whose first keyword says it all
        self.first_words = first_words  # the keywords ``start`` can match
        # (key word, pattern, reason): looked for anywhere in a statement (a
        # SELECT calls them), each only when a substring test found its key word.
        self.anywhere = anywhere
        # Answers for texts up to _CACHED_LENGTH long, at most _CACHED_TEXTS of
        # them (dict operations are atomic under the GIL: threads and greenlets
        # share it safely).
        self.seen: dict[str, str | None] = {}


_POSTGRESQL = _Dialect(
    lead=re.compile(r"\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*", re.DOTALL),
    # SET LOCAL / SET TRANSACTION / SET CONSTRAINTS last until the transaction
    # ends, so they do not pin.
    start=re.compile(
        r"""(?:
            (?P<set>(?:set|reset)\b(?!\s+(?:local|transaction|constraints)\b))
          | (?P<listen>(?:un)?listen\b)
          | (?P<prepare>prepare\b(?!\s+transaction\b))
          | (?P<cursor>declare\b[^;]*?\bwith\s+hold\b)
          | (?P<temp_table>create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b)
          | (?P<load>load\b)
        )""",
        re.VERBOSE | re.DOTALL,
    ),
    first_words=("set", "reset", "listen", "unlisten", "prepare", "declare", "create", "load"),
    # Session advisory locks (not the _xact_ ones), session-level set_config,
    # SELECT ... INTO TEMP.
    anywhere=(
        ("advisory_lock", re.compile(r"\bpg_(?:try_)?advisory_lock"), "advisory_lock"),
        (
            "set_config",
            re.compile(r"\bset_config\s*\((?![^()]*,\s*(?:true|'t'|'true'|'on')\s*\))"),
            "set",
        ),
        ("temp", re.compile(r"\binto\s+temp(?:orary)?\b"), "temp_table"),
    ),
)

_MYSQL = _Dialect(
    # Also ``#`` comments; and the opening of a ``/*! ... */`` (``/*!50700``,
    # MariaDB's ``/*M!``) is skipped like a blank: MySQL runs what it holds.
    lead=re.compile(
        r"\s*(?:(?:--[^\n]*(?:\n|$)|\#[^\n]*(?:\n|$)|/\*(?:m?!\d*|(?!m?!).*?\*/))\s*)*",
        re.DOTALL,
    ),
    # SET TRANSACTION (no SESSION) sets the session's next transaction, which
    # may be the next borrower's: it pins. SET STATEMENT ... FOR is one
    # statement's.
    start=re.compile(
        r"""(?:
            (?P<set>set\b(?!\s+statement\b)|use\b)
          | (?P<table_lock>
                lock\s+(?:tables?|instance)\b
              | flush\b[^;]*?\b(?:read\s+lock|for\s+export)\b
              | backup\s+(?:stage|lock)\b
            )
          | (?P<prepare>prepare\b)
          | (?P<cursor>handler\b[^;]*?\bopen\b)
          | (?P<temp_table>create\s+(?:or\s+replace\s+)?temporary\b)
        )""",
        re.VERBOSE | re.DOTALL,
    ),
    first_words=("set", "use", "lock", "flush", "backup", "prepare", "handler", "create"),
    # User variables assigned in any statement; what the next statement reads
    # back from this one (FOUND_ROWS() after SQL_CALC_FOUND_ROWS,
    # LAST_INSERT_ID() after LAST_INSERT_ID(expr)); GET_LOCK.
    anywhere=(
        (":=", re.compile(r":="), "set"),
        ("@", re.compile(r"\binto\s+@"), "set"),
        ("sql_calc_found_rows", re.compile(r"\bsql_calc_found_rows\b"), "set"),
        ("last_insert_id", re.compile(r"\blast_insert_id\s*\(\s*[^)\s]"), "set"),
        ("get_lock", re.compile(r"\bget_lock\s*\("), "advisory_lock"),
    ),
)

_DIALECTS = {"postgresql": _POSTGRESQL, "mysql": _MYSQL}

# Answers are remembered for texts up to this long, at most this many per dialect.
_CACHED_LENGTH = 4096
_CACHED_TEXTS = 2048


def pin_reason(sql: Any, dialect: str = "postgresql") -> str | None:
    """The reason ``sql`` leaves session state behind (one of :data:`REASONS`), or None.

    ``sql`` is what a cursor's ``execute`` got: ``str``, ``bytes``, or a
    psycopg 3 ``sql.Composable`` (rendered without a connection where it can
    be; one that cannot be rendered is not looked at). Every statement of a
    multi-statement string is looked at. ``dialect`` is one of
    :data:`DIALECTS`.

    An ORM sends the same texts again and again: the answers for short ones
    are remembered (a dict lookup); others cost a lower-casing and a few
    substring tests (no regular expression runs unless a key word is in the
    text).
    """
    rules = _DIALECTS[dialect]
    if not isinstance(sql, str):
        sql = _text(sql)
        if sql is None:
            return None
    if len(sql) > _CACHED_LENGTH:
        return _reason(rules, sql)
    seen = rules.seen
    try:
        return seen[sql]
    except KeyError:
        pass
    reason = _reason(rules, sql)
    if len(seen) >= _CACHED_TEXTS:
        seen.clear()  # a crude bound: ORMs repeat a few hundred texts at most
    seen[sql] = reason
    return reason


def _reason(rules: _Dialect, sql: str) -> str | None:
    low = sql.lower()
    for word, pattern, reason in rules.anywhere:
        if word in low and pattern.search(low) is not None:
            return reason
    if ";" in low:
        for statement in low.split(";"):
            reason = _first_keyword_reason(rules, statement)
            if reason is not None:
                return reason
        return None
    return _first_keyword_reason(rules, low)


def _first_keyword_reason(rules: _Dialect, low: str) -> str | None:
    start = 0
    if low[:1].isspace() or low[:2] in ("--", "/*") or low[:1] == "#":
        start = rules.lead.match(low).end()  # type: ignore[union-attr]  # always matches
    if not low.startswith(rules.first_words, start):
        return None
    match = rules.start.match(low, start)
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
