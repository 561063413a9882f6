"""The Django layer: translates a connection's lifecycle into pool checkout and return.

No locks and no pool logic live here. Django calls ``connect()`` ->
``get_new_connection()`` when code first needs the database: we borrow from the
alias's pool. ``close()`` -> ``_close()``, and ``close_if_unusable_or_obsolete()``
at request start and finish: we give the connection back, discarding it when
Django judged it broken (errors occurred and ``is_usable()`` failed, or
autocommit was left changed).

Every *physical* connection goes through Django's own ``get_new_connection``
and ``init_connection_state`` exactly once, when the pool opens it, so
``isolation_level``, ``assume_role``, the time zone, the JSON adapters and
PostGIS's adapters are set up as by the stock backend.
"""

from __future__ import annotations

import _thread
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper

from .. import checks, sync
from ..copying import guarded
from ..drivers import get_driver
from ..errors import PoolConfigError
from ..options import PoolOptions
from ..pool import ConnectionPool
from ..registry import PoolRegistry

logger = logging.getLogger("django_gevent_pool")

#: Every pool of this process, one per database alias.
registry = PoolRegistry()

# Without "django_gevent_pool" in INSTALLED_APPS, the checks are registered only
# once this module is imported: during django.setup() when a model of an
# installed app builds the default alias's wrapper (contrib.auth does), or at
# the first use of a pooled alias. Installing the app registers them always.
checks.register()

# alias -> (settings key, pool, isolation level): lets a connect with unchanged
# settings skip validation and the pool lookup. Replaced whole, never mutated.
_resolved: dict[str, tuple[tuple[Any, ...], ConnectionPool, Any]] = {}

# The key of what get_connection_params() returns inside connect() when the
# alias's pool is known and open: get_new_connection() does not need parameters
# then. A fresh dict each time (a subclass may add to it, say a token), told
# apart by this key, never handed to psycopg2.
_SKIPPED = "__django_gevent_pool_params_skipped__"

# Cursors a checkout may have made before the closed ones are forgotten.
_CURSORS_KEPT = 64


def get_pool(alias: str = DEFAULT_DB_ALIAS) -> ConnectionPool | None:
    """The pool currently serving ``alias`` in this process, or None if none was made yet."""
    return registry.pools().get(alias)


def all_stats() -> dict[str, dict[str, float]]:
    """``get_stats()`` of every pool of this process, by alias."""
    return {str(alias): pool.get_stats() for alias, pool in registry.pools().items()}


def close_pools(alias: str | None = None) -> int:
    """Close the pool of ``alias`` (or all pools); the next use makes a new one."""
    return registry.close(alias)


def drain_pools(timeout: float = 30.0) -> bool:
    """Drain every pool of this process (see ``ConnectionPool.drain``); True if all emptied.

    The deadline is shared: all pools stop lending at once, then each waits
    for what remains of ``timeout``. Meant for gunicorn's ``worker_exit`` hook.
    """
    pools = registry.pools()
    for pool in pools.values():
        pool.close()  # stop lending everywhere first
    deadline = time.monotonic() + timeout
    drained = True
    for pool in pools.values():
        drained = pool.drain(max(0.0, deadline - time.monotonic())) and drained
    registry.close()
    return drained


def pool_options_for(
    alias: str, options: dict[str, Any], driver: str | None = None
) -> tuple[PoolOptions, dict[str, Any]]:
    """Validate ``OPTIONS`` of ``alias``; ``ImproperlyConfigured`` names the alias and key.

    Django's own ``isolation_level`` is checked here too, before any pool is
    made from these options (the stock backend checks it when connecting),
    against the values of ``driver`` (the engine's; by default the one Django
    picks).
    """
    try:
        validated = PoolOptions.from_mapping(options, name=f"DATABASES[{alias!r}]")
    except PoolConfigError as exc:
        raise ImproperlyConfigured(str(exc)) from exc
    _isolation_level(alias, options, driver)
    return validated


class PooledDatabaseWrapperMixin:
    """Mix in front of a PostgreSQL ``DatabaseWrapper`` to pool its connections."""

    #: The driver of the connections the stock wrapper opens: set by each engine.
    pool_driver = "psycopg2"

    # Provided by BaseDatabaseWrapper; declared for type checkers.
    alias: str
    settings_dict: dict[str, Any]
    connection: Any
    errors_occurred: bool
    health_check_done: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool: ConnectionPool | None = None  # where the current connection came from
        self._pool_discard = False  # Django judged the current connection broken
        self._pool_unwatch: Callable[[], None] | None = None  # cancels the greenlet-end return
        # Identifies the current greenlet-end return: one that fires after it
        # was cancelled (its callback already scheduled) finds another token.
        self._pool_watch: object | None = None
        # The driver cursors made during the current checkout: closed when the
        # connection goes back, so a cursor kept past the return fails loudly
        # instead of running in the next borrower's session.
        self._pool_cursors: list[Any] = []
        self._pool_lease = 0  # the pool's number for the current checkout
        self._checked_key: tuple[Any, ...] | None = None  # settings key from check_settings
        # OPTIONS are not validated here but in check_settings(), at connect
        # time, as Django does with its own settings: model classes build the
        # default alias's wrapper while django.setup() imports them, and a
        # misconfigured alias must still let `manage.py check` report E001.

    # ----------------------------------------------------------- settings

    def check_settings(self) -> None:
        """Django's settings checks, then the pool OPTIONS; ``ImproperlyConfigured`` if wrong.

        ``connect()`` calls this first, so a misconfigured alias fails at its
        first connection, naming the alias, the key and what is allowed.
        """
        super().check_settings()  # type: ignore[misc]
        if self.alias != NO_DB_ALIAS:
            # get_new_connection, called next by connect(), reuses the key.
            self._checked_key = self._validated_settings_key()

    def _validated_settings_key(self) -> tuple[Any, ...]:
        """The settings key, after validating OPTIONS unless the alias's pool uses them already.

        A wrapper per request greenlet connects with unchanged settings: while
        the alias's pool was built from this same key, validation is skipped.
        Raises ``ImproperlyConfigured`` when OPTIONS are refused.
        """
        key = self._settings_key()
        resolved = _resolved.get(self.alias)
        if resolved is None or resolved[0] != key:
            # Raises if wrong.
            pool_options_for(self.alias, self.settings_dict["OPTIONS"], self.pool_driver)
        return key

    def _settings_key(self) -> tuple[Any, ...]:
        """What the alias's pool depends on, cheap to build and compare on every connect."""
        sd = self.settings_dict
        return (
            sd["NAME"],
            sd["USER"],
            sd["PASSWORD"],
            sd["HOST"],
            sd["PORT"],
            sd["TIME_ZONE"],
            sd["AUTOCOMMIT"],
            tuple(sd["OPTIONS"].items()),
            settings.USE_TZ,
            settings.TIME_ZONE,
        )

    def get_connection_params(self) -> dict[str, Any]:
        key = self._checked_key
        if key is not None:
            # Inside connect(), right after check_settings(): with the alias's
            # pool already built from these settings, the parameters (validated
            # then) are not needed again. Building them is a good part of a
            # checkout's cost.
            resolved = _resolved.get(self.alias)
            if resolved is not None and resolved[0] == key and not resolved[1].closed:
                if self.pool_driver == "psycopg":
                    # Cached on the wrapper by the stock parameters (its adapters'
                    # time zone); code and tests read or reset it.
                    self.timezone  # type: ignore[attr-defined]  # noqa: B018
                return {_SKIPPED: True}
        params: dict[str, Any] = super().get_connection_params()  # type: ignore[misc]
        for name in PoolOptions.names():
            params.pop(name, None)
        return params

    # --------------------------------------------------------- checkout

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if self.alias == NO_DB_ALIAS:
            # Django's short-lived connections to the 'postgres' database (test
            # database creation and such) are not pooled.
            return super().get_new_connection(conn_params)  # type: ignore[misc]
        key, self._checked_key = self._checked_key or self._settings_key(), None
        resolved = _resolved.get(self.alias)
        if resolved is not None and resolved[0] == key and not resolved[1].closed:
            # The fast path: same settings as last time, pool still open.
            pool, isolation_level = resolved[1], resolved[2]
        else:
            if conn_params.get(_SKIPPED):  # the pool was closed in between
                self._checked_key = None
                conn_params = self.get_connection_params()
            isolation_level = _isolation_level(
                self.alias, self.settings_dict["OPTIONS"], self.pool_driver
            )
            pool = self._pool_for(conn_params)
            _resolved[self.alias] = (key, pool, isolation_level)
        conn, self._pool_lease = pool.checkout()
        self._pool = pool
        self._pool_discard = False
        # allow_thread_sharing, without its lock: an int read, on every checkout.
        if not self._thread_sharing_count:  # type: ignore[attr-defined]
            self._watch(pool, conn)
        self.isolation_level = isolation_level
        return conn

    def _watch(self, pool: ConnectionPool, conn: Any) -> None:
        """Give ``conn`` back to ``pool`` when the current greenlet ends holding it.

        A greenlet that ends holding the connection (a spawned ORM job, a
        Celery task, a killed request) gives it back without any decorator.
        Does nothing in an OS thread or the main greenlet, which have no end
        to watch.
        """
        token = object()
        unwatch = sync.on_greenlet_exit(
            functools.partial(
                _return_orphan, weakref.ref(self), pool, conn, self._pool_lease, token
            )
        )
        self._pool_unwatch = unwatch
        self._pool_watch = None if unwatch is None else token

    # ----------------------------------------------------- thread sharing

    def inc_thread_sharing(self) -> None:
        """Django's ``inc_thread_sharing()``; the connection then stays with whoever uses it.

        Other threads or greenlets may now use this wrapper (Django's ticket
        17258, ``LiveServerTestCase``), so the end of the greenlet that borrowed
        the connection says nothing about whether it is still in use: the
        greenlet-end return is cancelled, and the connection goes back to the
        pool when the wrapper is closed. A connection borrowed while sharing is
        on is not watched either.
        """
        super().inc_thread_sharing()  # type: ignore[misc]
        self._stop_watching()

    def dec_thread_sharing(self) -> None:
        """Django's ``dec_thread_sharing()``; the last one watches the owner's greenlet again.

        Once nobody shares the wrapper, only the greenlet (or thread) that
        owns it may use it: if that is the caller and it holds a pooled
        connection, the connection comes back to the pool when it ends.
        Raises ``RuntimeError`` (Django's) when sharing was not on.
        """
        super().dec_thread_sharing()  # type: ignore[misc]
        pool, conn = self._pool, self.connection
        if (
            pool is not None
            and conn is not None
            and self._pool_unwatch is None
            and not self.allow_thread_sharing  # type: ignore[attr-defined]
            and self._thread_ident == _thread.get_ident()  # type: ignore[attr-defined]
        ):
            self._watch(pool, conn)

    def _set_autocommit(self, autocommit: bool) -> None:
        # connect() sets it on every checkout; a pooled connection comes back
        # with the alias's AUTOCOMMIT already (or is discarded), so this is
        # mostly a no-op that still takes psycopg2's connection lock.
        if self._pool is None or self.connection.autocommit != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def init_connection_state(self) -> None:
        if self._pool is None:
            super().init_connection_state()  # type: ignore[misc]
            return
        # The PostgreSQL part (time zone, role) ran once when the pool opened
        # this connection; only Django's once-per-alias version check is left.
        BaseDatabaseWrapper.init_connection_state(self)  # type: ignore[arg-type]
        # What the stock setup leaves cached on the wrapper, as it leaves it
        # (code and tests read or reset it: `del connection.timezone_name`).
        timezone_name = self.timezone_name  # type: ignore[attr-defined]
        # A borrower may have changed the session's time zone (SET TIME ZONE):
        # the server reported it (ParameterStatus), so this look costs no round
        # trip, and only a changed zone is set back, as Django's own
        # ensure_timezone() does.
        conn = self.connection
        if timezone_name and conn.info.parameter_status("TimeZone") != timezone_name:
            with conn.cursor() as cursor:
                cursor.execute(self.ops.set_time_zone_sql(), [timezone_name])  # type: ignore[attr-defined]
            if not self.get_autocommit():  # type: ignore[attr-defined]
                conn.commit()

    def _pool_for(self, conn_params: dict[str, Any]) -> ConnectionPool:
        pool_options, _ = pool_options_for(
            self.alias, self.settings_dict["OPTIONS"], self.pool_driver
        )
        # psycopg 3's adapters map ("context") is a new object per call, made
        # from the time zone settings that are in the fingerprint already.
        params = {k: v for k, v in conn_params.items() if k != "context"}
        fingerprint = (
            self.pool_driver,
            repr(sorted(params.items(), key=lambda kv: kv[0])),
            pool_options,
            self.timezone_name,  # type: ignore[attr-defined]
            settings.USE_TZ,
            self.settings_dict["AUTOCOMMIT"],
            repr(self.settings_dict["OPTIONS"].get("isolation_level")),
            self.settings_dict["OPTIONS"].get("assume_role"),
        )
        return registry.get(
            self.alias,
            fingerprint,
            functools.partial(self._make_pool, pool_options),
            tags={"dbname": conn_params.get("dbname")},
        )

    def _make_pool(self, pool_options: PoolOptions) -> ConnectionPool:
        driver = get_driver(self.pool_driver)  # the pool makes it cooperative
        # A snapshot: the test runner mutates settings_dict in place later, and
        # this pool must keep connecting where its fingerprint says.
        settings_dict = {**self.settings_dict, "OPTIONS": dict(self.settings_dict["OPTIONS"])}
        connect = functools.partial(_open_physical, type(self), settings_dict, self.alias)
        return ConnectionPool(
            connect,
            driver=driver,
            name=self.alias,
            options=pool_options,
            after_reset=functools.partial(_setup_session, type(self), settings_dict, self.alias),
        )

    # ----------------------------------------------------------- cursors

    def make_cursor(self, cursor: Any) -> Any:
        """Django's ``CursorWrapper``; with psycopg2, its COPY under gevent says to use
        ``blocking_copy()`` (psycopg 3's COPY is cooperative: no guard)."""
        if self.pool_driver != "psycopg2":
            return super().make_cursor(cursor)  # type: ignore[misc]
        return _GuardedCursorWrapper(cursor, self)

    def make_debug_cursor(self, cursor: Any) -> Any:
        """The stock debug wrapper (it logs COPY), with psycopg2's COPY guard in front."""
        wrapped = super().make_debug_cursor(cursor)  # type: ignore[misc]
        if self.pool_driver == "psycopg2":
            wrapped.__class__ = guarded(type(wrapped))
        return wrapped

    # ---------------------------------------------------------- return

    def _close(self) -> None:
        pool = self._pool
        if pool is None or self.connection is None:
            super()._close()  # type: ignore[misc]
            return
        conn, discard = self.connection, self._pool_discard
        self._pool, self._pool_discard = None, False
        self._stop_watching()
        # The connection is the pool's again: this wrapper must not touch it,
        # even when close() was called inside an atomic block.
        self.connection = None
        self._close_lease_cursors()
        with self.wrap_database_errors:  # type: ignore[attr-defined]
            pool.putconn(conn, discard=discard, lease=self._pool_lease)

    def create_cursor(self, name: str | None = None) -> Any:
        """Django's cursor, remembered until the connection goes back to the pool."""
        cursor = super().create_cursor(name)  # type: ignore[misc]
        if self._pool is not None and name is None:
            cursors = self._pool_cursors
            cursors.append(cursor)
            if len(cursors) >= _CURSORS_KEPT:
                # A long checkout (a script, a command) makes cursors without
                # end: forget the ones closed already.
                cursors[:] = [c for c in cursors if not c.closed]
        return cursor

    def _close_lease_cursors(self) -> None:
        """Close this checkout's client-side cursors: no round trip, no driver lock.

        A cursor kept past ``close()`` then raises ``InterfaceError: cursor
        already closed``, as with Django's own backend, instead of running in
        the session of whoever borrows the connection next. Named (server-side)
        cursors are Django's to close: closing one is a round trip.
        """
        cursors = self._pool_cursors
        if not cursors:
            return
        self._pool_cursors = []
        for cursor in cursors:
            try:
                cursor.close()
            except Exception:  # best effort: a cursor already broken is dead anyway
                logger.debug("closing a cursor at return failed", exc_info=True)

    def _stop_watching(self) -> None:
        unwatch, self._pool_unwatch = self._pool_unwatch, None
        self._pool_watch = None
        if unwatch is not None:
            unwatch()

    def is_usable(self) -> bool:
        usable: bool = super().is_usable()  # type: ignore[misc]
        if not usable and self._pool is not None:
            self._pool_discard = True
        return usable

    def close_if_unusable_or_obsolete(self) -> None:
        """At request start and finish: give the connection back, or discard it if broken.

        Django's own judgement decides what is broken: autocommit left changed,
        or errors occurred and ``is_usable()`` fails. Whatever ``CONN_MAX_AGE``
        says, a pooled connection goes back to the pool here: the pool, not the
        greenlet that happened to serve a request, keeps connections alive.
        """
        if self._pool is None or self.connection is None:
            super().close_if_unusable_or_obsolete()  # type: ignore[misc]
            return
        self.health_check_done = False
        if self.get_autocommit() != self.settings_dict["AUTOCOMMIT"]:  # type: ignore[attr-defined]
            self._pool_discard = True
        elif self.errors_occurred and self.is_usable():
            self.errors_occurred = False
        self.close()  # type: ignore[attr-defined]


_GuardedCursorWrapper = guarded(CursorWrapper)


def _return_orphan(
    wrapper_ref: weakref.ref[Any], pool: ConnectionPool, conn: Any, lease: int, token: object
) -> None:
    """Give back a connection whose greenlet ended without closing it.

    Runs in a fresh greenlet after the borrower's greenlet is dead, so the
    borrower's wrapper (greenlet-local, and not shared: sharing cancels this)
    can no longer be used by anyone; it is only told that its connection is
    gone. A connection killed mid-query was already closed by psycopg2 (and
    its query cancelled): the pool discards it.
    """
    wrapper = wrapper_ref()
    if wrapper is not None:
        if wrapper.connection is not conn or wrapper._pool_watch is not token:
            return  # given back, replaced, or shared (inc_thread_sharing) meanwhile
        wrapper.connection = None
        wrapper._pool = None
        wrapper._pool_unwatch = None
        wrapper._pool_watch = None
        wrapper._close_lease_cursors()
        discard = wrapper._pool_discard
    else:
        discard = False
    logger.debug("pool %r: a greenlet ended holding a connection; giving it back", pool.name)
    try:
        pool.putconn(conn, discard=discard, lease=lease)
    except pool.driver.errors.ProgrammingError:
        pass  # it was returned meanwhile (and perhaps lent again: not ours to take)


def _forget_connections_after_fork() -> None:
    """In a forked child, wrappers drop the connections they held in the parent.

    The pool has already pointed those sockets at /dev/null (see
    ``ConnectionPool._after_fork_in_child``); without this, the child's first
    query would run on one of them and fail. The next use borrows afresh.
    """
    from django.db import connections

    for wrapper in connections.all(initialized_only=True):
        if isinstance(wrapper, PooledDatabaseWrapperMixin) and wrapper._pool is not None:
            wrapper.connection = None
            wrapper._pool = None
            wrapper._pool_unwatch = None
            wrapper._pool_watch = None


os.register_at_fork(after_in_child=_forget_connections_after_fork)


_PSYCOPG_ANY = "django.db.backends.postgresql.psycopg_any"


def _isolation_level(alias: str, options: dict[str, Any], driver: str | None = None) -> Any:
    """The wrapper's ``isolation_level`` attribute, as Django's get_new_connection sets it.

    Raises ``ImproperlyConfigured`` for a value that is not one of
    ``IsolationLevel``'s, with Django's own message after the alias's name.
    """
    # Through import_stock: this may run before the backend module (manage.py
    # check validates OPTIONS first), and a plain import would bind Django's
    # PostgreSQL backend to whichever driver it finds for the whole process.
    from .stock import default_driver, import_stock

    IsolationLevel = import_stock(_PSYCOPG_ANY, driver or default_driver()).IsolationLevel

    value = options.get("isolation_level")
    if value is None:
        return IsolationLevel.READ_COMMITTED
    try:
        return IsolationLevel(value)
    except ValueError as exc:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['isolation_level']: Invalid transaction "
            f"isolation level {value} specified. Use one of the psycopg.IsolationLevel values."
        ) from exc


def _open_physical(cls: type, settings_dict: dict[str, Any], alias: str) -> Any:
    """Open one physical connection through Django's own stock setup.

    A scratch wrapper of the same class takes the connection parameters
    afresh (``get_connection_params()``, so a subclass that returns a new IAM
    token or a rotated password is asked for each physical connection), runs
    the stock ``get_new_connection`` (isolation level, JSON adapters), then
    ``set_autocommit`` and the stock ``init_connection_state`` (time zone,
    ``assume_role``), exactly as Django's ``connect()`` would. The connection
    is closed if any of it fails.
    """
    wrapper = cls(settings_dict, alias)
    conn_params = wrapper.get_connection_params()
    conn = super(PooledDatabaseWrapperMixin, wrapper).get_new_connection(conn_params)
    try:
        _setup_session(cls, settings_dict, alias, conn, wrapper=wrapper)
    except BaseException:
        # Also on GreenletExit/gevent.Timeout: a half set-up connection is closed here,
        # the pool gives its slot back.
        conn.close()
        raise
    return conn


def _setup_session(
    cls: type,
    settings_dict: dict[str, Any],
    alias: str,
    conn: Any,
    *,
    wrapper: Any = None,
) -> None:
    """Run Django's per-connection session setup on ``conn`` (also after RESET_QUERY)."""
    if wrapper is None:
        wrapper = cls(settings_dict, alias)
    wrapper.connection = conn
    try:
        wrapper.set_autocommit(settings_dict["AUTOCOMMIT"])
        super(PooledDatabaseWrapperMixin, wrapper).init_connection_state()
    finally:
        wrapper.connection = None
