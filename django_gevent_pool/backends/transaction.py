"""``POOL_MODE = "transaction"``: the cursor side.

In transaction mode the wrapper (``base.PooledDatabaseWrapperMixin``) gives
its connection back to the pool after each statement outside ``atomic()``, in
autocommit, and takes one again for the next. Django's ``CursorWrapper`` holds a
driver cursor bound to one physical connection, so the cursor classes made
here:

- before a statement, take a connection again if the wrapper gave its own
  back, and open a fresh driver cursor on it (``_pool_live``); tell the
  wrapper when the statement leaves session state behind
  (:func:`~django_gevent_pool.pinning.pin_reason`): it then keeps the
  connection;
- after it, when the wrapper may give the connection back, keep the results
  client-side (:class:`Result`: every row, the description, the row count,
  the status) so ``fetch*`` and iteration go on without a connection, close
  the driver cursor, and let the wrapper give it back;
- count a named (server-side) cursor as a pin until it is closed;
- refuse a cursor kept past the end of its wrapper's session (its request),
  as a closed cursor does with Django's own backend, with the driver's own
  error (psycopg's ``InterfaceError: cursor already closed``, PyMySQL's
  ``ProgrammingError: Cursor closed``).

No locks: a wrapper and its cursors belong to one greenlet or thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..copying import in_front
from ..drivers.base import Status
from ..pinning import pin_reason

__all__ = ["Result", "TransactionCursorMixin", "transactional"]


class Result:
    """A statement's results, read out of its driver cursor, which is closed.

    Stands in for the driver cursor in a transaction-mode ``CursorWrapper``
    once the connection went back to the pool: psycopg2, psycopg 3 and PyMySQL
    client cursors have every row in the client when ``execute`` returns, so
    reading them now costs what reading them later would (PyMySQL reads the
    further result sets of a multi-statement string on ``nextset()``: they
    are read here, each kept). ``mysql`` answers as PyMySQL's cursor does: a
    fetch after a statement without rows gets ``None``, ``()`` or ``[]``
    rather than psycopg's ``ProgrammingError``, and a closed cursor raises
    ``ProgrammingError`` rather than ``InterfaceError``.
    """

    __slots__ = (
        "_closed_cursor",
        "_errors",
        "_multi",
        "_mysql",
        "_pos",
        "_rows",
        "_sets",
        "arraysize",
        "closed",
        "description",
        "lastrowid",
        "rowcount",
        "statusmessage",
    )

    #: Attributes of the driver cursor still read after the statement, for
    #: ``last_executed_query`` (psycopg2's ``query``, psycopg 3's ``_query``,
    #: PyMySQL's ``_executed``): read from the closed driver cursor, which
    #: keeps them.
    FORWARDED = frozenset({"query", "_query", "_executed"})

    def __init__(
        self,
        cursor: Any,
        errors: Any,
        *,
        multi: bool,
        failed: bool = False,
        mysql: bool = False,
    ) -> None:
        self._errors = errors
        self._multi = multi
        self._mysql = mysql
        self._closed_cursor = cursor
        self.arraysize = cursor.arraysize
        self.lastrowid = getattr(cursor, "lastrowid", None)
        self._sets: list[tuple[Any, int, list[Any] | None, Any]] = []
        if failed:
            self._load((None, -1, None, None))
        else:
            self._load(self._read(cursor))
            if multi:
                while cursor.nextset():
                    self._sets.append(self._read(cursor))
        self.closed = False
        cursor.close()

    @staticmethod
    def _read(cursor: Any) -> tuple[Any, int, list[Any] | None, Any]:
        description = cursor.description
        rows = cursor.fetchall() if description is not None else None
        return description, cursor.rowcount, rows, getattr(cursor, "statusmessage", None)

    def _load(self, result: tuple[Any, int, list[Any] | None, Any]) -> None:
        self.description, self.rowcount, self._rows, self.statusmessage = result
        self._pos = 0

    @classmethod
    def answers(cls, name: str) -> bool:
        """True if ``name`` is read from the kept results, not from a live cursor."""
        return name in _ANSWERED

    def __getattr__(self, name: str) -> Any:
        if name in Result.FORWARDED:
            return getattr(self._closed_cursor, name, None)
        raise AttributeError(name)

    # ------------------------------------------------------ DB-API reads

    def _rows_or_fail(self) -> list[Any]:
        if self.closed:
            raise closed_cursor_error(self._errors, mysql=self._mysql)
        if self._rows is None:
            if self._mysql:
                return ()
            raise self._errors.ProgrammingError("no results to fetch")
        return self._rows

    def fetchone(self) -> Any:
        rows = self._rows_or_fail()
        if self._pos >= len(rows):
            return None
        self._pos += 1
        return rows[self._pos - 1]

    def fetchmany(self, size: int | None = None) -> list[Any]:
        rows = self._rows_or_fail()
        end = self._pos + (self.arraysize if size is None else size)
        chunk = rows[self._pos : end]
        self._pos += len(chunk)
        return chunk

    def fetchall(self) -> list[Any]:
        rows = self._rows_or_fail()
        if self._rows is None:  # PyMySQL's answer
            return []
        rest = rows[self._pos :] if self._pos else rows
        self._pos = len(rows)
        return rest

    def __iter__(self) -> Iterator[Any]:
        while True:
            row = self.fetchone()
            if row is None:
                return
            yield row

    def scroll(self, value: int, mode: str = "relative") -> None:
        rows = self._rows_or_fail()
        if mode == "relative":
            target = self._pos + value
        elif mode == "absolute":
            target = value
        else:
            raise self._errors.ProgrammingError(f"bad scroll mode: {mode!r}")
        if not 0 <= target <= len(rows):
            raise IndexError("scroll destination out of bounds")
        self._pos = target

    @property
    def rownumber(self) -> int:
        return self._pos

    def nextset(self) -> bool | None:
        if not self._multi:
            raise self._errors.NotSupportedError("not supported by PostgreSQL")
        if not self._sets:
            return None
        self._load(self._sets.pop(0))
        return True

    def close(self) -> None:
        self.closed = True
        self._rows = None
        self._sets = []


def closed_cursor_error(errors: Any, *, mysql: bool) -> Exception:
    """What the driver raises for a closed cursor (``errors``: its DB-API module)."""
    if mysql:
        return errors.ProgrammingError("Cursor closed")  # PyMySQL's
    return errors.InterfaceError("cursor already closed")  # psycopg2's and psycopg 3's


_ANSWERED = frozenset(
    {name for name in dir(Result) if not name.startswith("__")} | Result.FORWARDED
) - {"answers"}


class TransactionCursorMixin:
    """In front of Django's ``CursorWrapper`` (or a subclass) of a transaction-mode wrapper."""

    # Provided by CursorWrapper.
    cursor: Any
    db: Any

    # Set by _pool_bind().
    _pool_session: int
    _pool_lease: int
    _pool_named: bool
    _pool_closed: bool

    def _pool_bind(self) -> None:
        """Tie this cursor to the wrapper's current session and checkout."""
        db = self.db
        self._pool_closed = False
        self._pool_session = db._pool_session
        self._pool_lease = db._pool_lease
        self._pool_named = getattr(self.cursor, "name", None) is not None
        if self._pool_named:
            db._pool_pin("cursor", sticky=False)

    def _pool_live(self) -> None:
        """Make ``self.cursor`` a driver cursor on the wrapper's current connection."""
        db = self.db
        mysql = db.pool_dialect == "mysql"
        if self._pool_closed or self._pool_session != db._pool_session:
            # Closed by its owner, or kept past the end of its session.
            with db.wrap_database_errors:
                raise closed_cursor_error(db.Database, mysql=mysql)
        if db.connection is not None and self._pool_lease == db._pool_lease:
            if type(self.cursor) is Result:
                # Its results were read out (a multi-statement string's
                # further result sets) and the connection stayed.
                self.cursor = db.create_cursor(None)
            return
        if self._pool_named:
            # Pinned while open, so its connection never went back; closed, it
            # stays closed.
            with db.wrap_database_errors:
                raise closed_cursor_error(db.Database, mysql=mysql)
        db.ensure_connection()
        old, self.cursor = self.cursor, db.create_cursor(None)
        self._pool_lease = db._pool_lease
        if type(old) is not Result:
            try:
                old.close()  # on a connection gone back: a client cursor, no round trip
            except Exception:  # best effort: it is dead either way
                pass

    def _pool_statement(self, sql: Any, run: Any, reason: str | None = None) -> Any:
        self._pool_live()
        db = self.db
        if not db._pool_hold:
            if reason is None:
                reason = pin_reason(sql, db.pool_dialect)
            if reason is not None:
                db._pool_pin(reason)
        driver_cursor = self.cursor
        # While it runs, nothing gives the connection back: not a cursor that
        # an execute wrapper or last_executed_query() (psycopg 3's mogrify)
        # opens and closes inside it.
        db._pool_busy += 1
        try:
            try:
                result = run()
            finally:
                db._pool_busy -= 1
        except Exception:
            self._pool_after(failed=True)
            raise
        except BaseException:
            # Killed or timed out mid-statement: the connection may still be
            # running it; outside a transaction it goes back discarded.
            if db._pool_may_release(check_status=False):
                db._pool_detach(discard=True)
            raise
        self._pool_after()
        # psycopg 3's execute() returns its cursor: hand out this wrapper
        # instead, which still reads the results once that cursor is closed.
        return self if result is driver_cursor and result is not None else result

    def _pool_after(self, *, failed: bool = False) -> None:
        db = self.db
        if not db._pool_may_release(check_status=False):
            return
        state = db._pool_status()
        mysql = db.pool_dialect == "mysql"
        if state is Status.UNKNOWN and mysql and not failed and type(self.cursor) is not Result:
            # PyMySQL read only the first result set of a multi-statement
            # string: the rest are read now, and an error of a later statement
            # is raised from execute(), as psycopg raises it.
            try:
                self.cursor = Result(self.cursor, db.Database, multi=True, mysql=True)
            except Exception:
                self._pool_after(failed=True)
                raise
            state = db._pool_status()
        if state is Status.IDLE:
            if type(self.cursor) is not Result:
                self.cursor = Result(
                    self.cursor,
                    db.Database,
                    multi=db.pool_driver != "psycopg2",
                    failed=failed,
                    mysql=mysql,
                )
            db._pool_detach()
        elif failed and (state is Status.CLOSED or state is Status.UNKNOWN):
            # Lost (the server went away): back at once, discarded.
            self.cursor = Result(self.cursor, db.Database, multi=False, failed=True, mysql=mysql)
            db._pool_detach(discard=True)
        # Else a transaction the statement opened by hand (BEGIN): kept until
        # it ends.

    # ------------------------------------------------------ statements

    def execute(self, sql: Any, params: Any = None) -> Any:
        return self._pool_statement(
            sql, lambda: super(TransactionCursorMixin, self).execute(sql, params)
        )

    def executemany(self, sql: Any, param_list: Any) -> Any:
        return self._pool_statement(
            sql, lambda: super(TransactionCursorMixin, self).executemany(sql, param_list)
        )

    def callproc(self, procname: str, params: Any = None, kparams: Any = None) -> Any:
        # PyMySQL passes the arguments in user variables (SET @_name_0=...),
        # read back with SELECT after the CALL: session state.
        return self._pool_statement(
            "",
            lambda: super(TransactionCursorMixin, self).callproc(procname, params, kparams),
            "set" if self.db.pool_dialect == "mysql" else None,
        )

    def _copy(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # psycopg2's COPY guard calls this: COPY needs a live cursor; the
        # connection is then held until the cursor is closed.
        self._pool_live()
        return super()._copy(name, args, kwargs)  # type: ignore[misc]

    def __getattr__(self, attr: str) -> Any:
        # Only for what the class and instance lack: the driver cursor's own.
        cursor = self.__dict__.get("cursor")
        if type(cursor) is Result and not Result.answers(attr):
            # Anything but the kept results (a COPY, the connection, a
            # driver-specific method) needs a live cursor: take a connection.
            self._pool_live()
        return super().__getattr__(attr)  # type: ignore[misc]

    def close(self) -> None:
        db = self.db
        self._pool_closed = True
        try:
            self.cursor.close()
        finally:
            if self._pool_session == db._pool_session:
                if self._pool_named:
                    self._pool_named = False
                    db._pool_unpin_cursor()
                if db._pool_may_release():
                    db._pool_detach()


def transactional(wrapper_class: type) -> type:
    """``wrapper_class`` (a Django ``CursorWrapper`` class) with the mixin in front; cached."""
    return in_front(TransactionCursorMixin, wrapper_class)
