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

``POOL_MODE = "transaction"``: the wrapper stays logically connected for its
unit of work (a request, a task: Django's ``connect()`` ran once) while the
physical connection goes back to the pool after each statement outside
``atomic()``, in autocommit, and after the outermost ``atomic()`` ends
(``_pool_detach``); the next statement takes one again (``_pool_reattach``)
without Django's ``connect()``. Statements that leave session state behind,
named cursors and :func:`pinned` keep it (pins); a connection that comes back
pinned is reset (``RESET_QUERY``) or discarded. The cursor side is in
``transaction.py``.
"""

from __future__ import annotations

import _thread
import functools
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper

from .. import checks, sync, timing
from ..copying import guarded
from ..drivers import get_driver
from ..drivers.base import Status
from ..errors import PoolConfigError
from ..hostbudget import budget_for, budget_key_of, params_dbname
from ..options import PoolOptions
from ..pool import ConnectionPool
from ..registry import PoolRegistry
from .transaction import transactional

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


@contextmanager
def pinned(using: str | None = None) -> Iterator[Any]:
    """Keep the alias's connection with the caller for the block; for transaction mode.

    ``with pinned():`` takes a connection now and keeps it through every
    statement and transaction of the block, for session state that the
    statement text does not show (a driver's ``connection.connection``
    used directly, a ``LISTEN`` made through ``psycopg``, state a stored
    function sets). When the outermost block ends, the connection goes back
    reset (``RESET_QUERY``) or, with none set, closed: what the block set up
    reaches nobody else. Ending inside ``atomic()``, it is reset when the
    request ends instead. Nests; works as a decorator too. Yields the
    Django connection (``django.db.connections[using]``).

    In session mode the connection is the caller's until the request ends
    anyway: this only makes sure there is one.
    """
    from django.db import connections

    wrapper = connections[using or DEFAULT_DB_ALIAS]
    if not isinstance(wrapper, PooledDatabaseWrapperMixin):
        wrapper.ensure_connection()
        yield wrapper
        return
    wrapper._pool_enter_pinned()
    try:
        yield wrapper
    finally:
        wrapper._pool_exit_pinned()


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
    #: Whose statements transaction mode reads for session state (``pinning.DIALECTS``).
    pool_dialect = "postgresql"

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
        # Transaction mode (POOL_MODE "transaction"): see the module docstring.
        self._pool_tx = False  # the current session runs in transaction mode
        self._pool_home: ConnectionPool | None = None  # set while the session has no connection
        self._pool_session = 0  # the session's number: cursors of an ended one are dead
        self._pool_hold = 0  # > 0 inside connect() and connection_created: no early return
        self._pool_busy = 0  # > 0 while a statement runs: no early return
        # The sticky pin reasons of this session: its state must reach nobody else.
        self._pool_pins: set[str] = set()
        self._pool_cursor_pins = 0  # named cursors open
        self._pool_explicit_pins = 0  # pinned() blocks open
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
            try:
                pool = self._pool_for(conn_params)
            except PoolConfigError as exc:
                raise ImproperlyConfigured(str(exc)) from exc
            _resolved[self.alias] = (key, pool, isolation_level)
        try:
            conn, self._pool_lease = pool.checkout(session=True)
        except PoolConfigError as exc:
            # The host budget's lock file: not ours to open, or another budget in it.
            raise ImproperlyConfigured(f"DATABASES[{self.alias!r}]: {exc}") from exc
        self._pool = pool
        self._pool_discard = False
        self._pool_tx = pool.options.POOL_MODE == "transaction"
        if self._pool_tx:
            self._pool_session += 1
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

    # ---------------------------------------------------- transaction mode

    def connect(self) -> None:
        """Django's ``connect()``; a transaction-mode session between statements reattaches.

        A new session (a request's first statement) goes through Django's own
        ``connect()``, ``connection_created`` included, in either mode. In
        transaction mode a session between statements takes a connection
        again instead (``_pool_reattach``), and the signal fires there only
        for a physical connection no receiver has seen yet (so setup made per
        connection, such as ``register_hstore``, reaches each one), or whose
        session a reset wiped; receivers' statements are session setup: they
        neither pin nor give the connection back.
        """
        if self._pool_home is not None:
            # Django's ensure_connection() (in wrap_database_errors) asks for a
            # connection for the next statement.
            self._pool_reattach()
            return
        if (
            self.settings_dict["OPTIONS"].get("POOL_MODE") != "transaction"
            or self.alias == NO_DB_ALIAS
        ):
            super().connect()  # type: ignore[misc]
            return
        self._pool_hold += 1
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self._pool_hold -= 1
        if self.connection is not None and self._pool is not None:
            _greeted.add(self.connection)

    def _pool_greet(self) -> None:
        """Send ``connection_created`` for the current connection, which had none yet."""
        conn = self.connection
        self._pool_hold += 1
        try:
            connection_created.send(sender=self.__class__, connection=self)
        finally:
            self._pool_hold -= 1
        _greeted.add(conn)

    @contextmanager
    def temporary_connection(self) -> Iterator[Any]:
        """Django's; a transaction-mode session between statements is connected all the same.

        Django closes the wrapper afterwards when it had no connection: that
        would end the session of the request mid-way (its cursors dead).
        """
        if self.connection is not None or self._pool_home is None:
            with super().temporary_connection() as cursor:  # type: ignore[misc]
                yield cursor
            return
        with self.cursor() as cursor:  # type: ignore[attr-defined]
            yield cursor

    def ensure_timezone(self) -> bool:
        """Django's (after a TIME_ZONE or USE_TZ setting changed); a zone it sets pins.

        Django sets the new zone on the current connection directly: in
        transaction mode that is session state the pool cannot see, so the
        connection is pinned and reset (or closed) when the session ends.
        Between statements there is nothing to set: the next statement finds
        the settings changed and connects afresh.
        """
        changed: bool = super().ensure_timezone()  # type: ignore[misc]
        if changed and self._pool_tx and self._pool is not None and not self._pool_hold:
            self._pool_pin("set")
        return changed

    def get_autocommit(self) -> bool:
        """Django's; no connection is taken just to read it."""
        if self.connection is None and self._pool_home is not None:
            return bool(self.autocommit)  # type: ignore[attr-defined]
        return bool(super().get_autocommit())  # type: ignore[misc]

    def set_autocommit(
        self, autocommit: bool, force_begin_transaction_with_broken_autocommit: bool = False
    ) -> None:
        """Django's; back in autocommit after a transaction, the connection goes back."""
        if (
            autocommit
            and self.connection is None
            and self._pool_home is not None
            and self.autocommit  # type: ignore[attr-defined]
        ):
            return  # already in autocommit, and no connection to set it on
        super().set_autocommit(  # type: ignore[misc]
            autocommit, force_begin_transaction_with_broken_autocommit
        )
        if autocommit and self._pool_tx and self._pool_may_release():
            self._pool_detach()

    def _pool_reattach(self) -> None:
        """Take a connection from the session's pool for the next statement."""
        pool = self._pool_home
        assert pool is not None
        resolved = _resolved.get(self.alias)
        if (
            pool.closed
            or resolved is None
            or resolved[1] is not pool
            or resolved[0] != self._settings_key()
        ):
            # The pool was closed or replaced, or the settings changed (the
            # test database swapped in, override_settings of TIME_ZONE): a new
            # session, through connect().
            self._pool_end_session()
            self.connect()
            return
        conn, lease = pool.checkout()
        self.connection = conn
        self._pool = pool
        self._pool_lease = lease
        self._pool_home = None
        self._pool_discard = False
        self.errors_occurred = False  # another physical connection
        if not self._thread_sharing_count:  # type: ignore[attr-defined]
            self._watch(pool, conn)
        # No time zone check here (connect() made one): on a transaction-mode
        # pool a SET TIME ZONE pins, and a pinned connection comes back reset.
        if conn not in _greeted:
            self._pool_greet()

    def _pool_status(self) -> Status:
        """The current connection's transaction status, without a round trip."""
        assert self._pool is not None
        return self._pool.driver.status(self.connection)

    def _pool_may_release(self, *, check_status: bool = True) -> bool:
        """True when the connection may go back now: transaction mode, no transaction, no pin."""
        if (
            not self._pool_tx
            or self._pool is None
            or self.connection is None
            or self._pool_hold
            or self._pool_busy
            or self.in_atomic_block  # type: ignore[attr-defined]
            or not self.autocommit  # type: ignore[attr-defined]
            or self._pool_pins
            or self._pool_cursor_pins
            or self._pool_explicit_pins
            or self._thread_sharing_count  # type: ignore[attr-defined]
        ):
            return False
        # A BEGIN sent by hand leaves it in a transaction: kept until it ends.
        return not check_status or self._pool_status() is Status.IDLE

    def _pool_detach(self, *, discard: bool = False, reset: bool = False) -> None:
        """Give the connection back; the session goes on without one until the next statement."""
        self._pool_home = self._pool
        self._pool_give_back(discard=discard, reset=reset)

    def _pool_give_back(self, *, discard: bool, reset: bool | None) -> None:
        """Hand the current connection to its pool: this wrapper no longer touches it.

        Its greenlet-end return is cancelled and this checkout's cursors are
        closed first. Raises what ``putconn`` raises, as a Django error.
        """
        pool, conn, lease = self._pool, self.connection, self._pool_lease
        assert pool is not None
        self._pool = None
        self._stop_watching()
        self.connection = None
        self._close_lease_cursors()
        if reset:
            _greeted.discard(conn)  # what receivers set up is wiped
        with self.wrap_database_errors:  # type: ignore[attr-defined]
            pool.putconn(conn, discard=discard, lease=lease, reset=reset)

    def _pool_pin(self, reason: str, *, sticky: bool = True) -> None:
        """Keep the connection with this session: ``reason`` is one of ``pinning.REASONS``.

        A sticky pin (session state) lasts until the session ends, when the
        connection goes back reset or discarded; a named cursor's until it
        is closed; ``pinned()``'s until its block ends.
        """
        if reason == "cursor" and not sticky:
            self._pool_cursor_pins += 1
            count = True
        elif reason == "explicit":
            self._pool_explicit_pins += 1
            count = self._pool_explicit_pins == 1
        else:
            count = reason not in self._pool_pins
            self._pool_pins.add(reason)
        pool = self._pool or self._pool_home
        if count and pool is not None:
            pool.note_pin(reason)
            timing.record_pin()

    def _pool_unpin_cursor(self) -> None:
        if self._pool_cursor_pins:
            self._pool_cursor_pins -= 1

    def _pool_end_session(self) -> None:
        """Forget the session: its pins, its pool, its cursors (dead from now on)."""
        self._pool_home = None
        self._pool_busy = 0
        self._pool_pins = set()
        self._pool_cursor_pins = 0
        self._pool_explicit_pins = 0
        if self._pool_tx:
            self._pool_session += 1

    def _pool_return_kind(self) -> tuple[bool, bool | None]:
        """``(discard, reset)`` for ``putconn`` at the end of a session."""
        if not self._pool_tx:
            return False, None
        if not self._pool_pins and not self._pool_cursor_pins and not self._pool_explicit_pins:
            return False, False  # no session state: no RESET_QUERY either
        return self._pool_wipe()

    def _pool_wipe(self) -> tuple[bool, bool]:
        """``(discard, reset)`` for a connection whose session state must not reach anyone."""
        assert self._pool is not None
        return _wipe(self._pool, loaded="load" in self._pool_pins)

    def _pool_enter_pinned(self) -> None:
        self.ensure_connection()
        if self._pool_tx:
            self._pool_pin("explicit")

    def _pool_exit_pinned(self) -> None:
        if not self._pool_tx or not self._pool_explicit_pins:
            return
        self._pool_explicit_pins -= 1
        if self._pool_explicit_pins or self._pool is None or self.connection is None:
            return
        # What the block did to the session is unknown: it must reach nobody.
        if self._pool_may_release():  # no transaction, no other pin
            discard, reset = self._pool_wipe()
            self._pool_detach(discard=discard, reset=reset)
        else:
            self._pool_pins.add("explicit")  # reset when the session ends

    def _set_autocommit(self, autocommit: bool) -> None:
        # connect() sets it on every checkout; a pooled connection comes back
        # with the alias's AUTOCOMMIT already (or is discarded), so this is
        # mostly a no-op that still takes psycopg2's connection lock.
        if self._pool is None or _autocommit_of(self.connection) != autocommit:
            super()._set_autocommit(autocommit)  # type: ignore[misc]

    def init_connection_state(self) -> None:
        if self._pool is None:
            super().init_connection_state()  # type: ignore[misc]
            return
        # The PostgreSQL part (time zone, role) ran once when the pool opened
        # this connection; only Django's once-per-alias version check is left.
        # (MySQL's part, SQL_AUTO_IS_NULL and the isolation level, too; Django
        # sets no time zone on a MySQL session.)
        BaseDatabaseWrapper.init_connection_state(self)  # type: ignore[arg-type]
        if self.pool_driver == "pymysql":
            return
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
            functools.partial(self._make_pool, pool_options, params),
            tags={"dbname": params_dbname(conn_params)},
        )

    def _make_pool(self, pool_options: PoolOptions, params: dict[str, Any]) -> ConnectionPool:
        driver = get_driver(self.pool_driver)  # the pool makes it cooperative
        # A snapshot: the test runner mutates settings_dict in place later, and
        # this pool must keep connecting where its fingerprint says.
        settings_dict = {**self.settings_dict, "OPTIONS": dict(self.settings_dict["OPTIONS"])}
        connect = functools.partial(_open_physical, type(self), settings_dict, self.alias)
        budget = None
        if pool_options.HOST_MAX_CONNS is not None:
            # One budget per server, database and user on this host (no I/O yet).
            key = budget_key_of(params)
            budget = budget_for(
                key,
                pool_options.HOST_MAX_CONNS,
                pool_options.HOST_LOCK_DIR,
                name=f"DATABASES[{self.alias!r}]",
            )
        return ConnectionPool(
            connect,
            driver=driver,
            name=self.alias,
            options=pool_options,
            after_reset=functools.partial(_setup_session, type(self), settings_dict, self.alias),
            host_budget=budget,
        )

    # ----------------------------------------------------------- cursors

    def make_cursor(self, cursor: Any) -> Any:
        """Django's ``CursorWrapper``; with psycopg2, its COPY under gevent says to use
        ``blocking_copy()`` (psycopg 3's COPY is cooperative: no guard). In
        transaction mode, one that gives the connection back between statements."""
        tx = self._pool_tx and self._pool is not None
        if self.pool_driver == "psycopg2":
            cls = _GuardedTransactionCursorWrapper if tx else _GuardedCursorWrapper
        elif tx:
            cls = _TransactionCursorWrapper
        else:
            return super().make_cursor(cursor)  # type: ignore[misc]
        wrapped = cls(cursor, self)
        if tx:
            wrapped._pool_bind()
        return wrapped

    def make_debug_cursor(self, cursor: Any) -> Any:
        """The stock debug wrapper (it logs COPY), with psycopg2's COPY guard in front
        (and transaction mode's wrapper)."""
        wrapped = super().make_debug_cursor(cursor)  # type: ignore[misc]
        if self.pool_driver == "psycopg2":
            wrapped.__class__ = guarded(type(wrapped))
        if self._pool_tx and self._pool is not None:
            wrapped.__class__ = transactional(type(wrapped))
            wrapped._pool_bind()
        return wrapped

    # ---------------------------------------------------------- return

    def _close(self) -> None:
        pool = self._pool
        if pool is None or self.connection is None:
            super()._close()  # type: ignore[misc]
            return
        discard, self._pool_discard = self._pool_discard, False
        wipe, reset = self._pool_return_kind()
        self._pool_end_session()
        # The connection is the pool's again: this wrapper must not touch it,
        # even when close() was called inside an atomic block.
        self._pool_give_back(discard=discard or wipe, reset=reset)

    def close(self) -> None:
        """Django's ``close()``; also ends a transaction-mode session that has no connection."""
        if self.connection is None and self._pool_home is not None:
            self._pool_end_session()
        super().close()  # type: ignore[misc]

    def create_cursor(self, name: str | None = None) -> Any:
        """Django's cursor, remembered until the connection goes back to the pool."""
        if self.connection is None and self._pool_home is not None:
            # A statement ran between ensure_connection() and here (a hook
            # around it) and gave the connection back: take one again.
            self._pool_reattach()
        cursor = super().create_cursor(name)  # type: ignore[misc]
        if self._pool is not None and name is None:
            cursors = self._pool_cursors
            cursors.append(cursor)
            if len(cursors) >= _CURSORS_KEPT:
                # A long checkout (a script, a command) makes cursors without
                # end: forget the ones closed already.
                cursors[:] = [c for c in cursors if not _cursor_closed(c)]
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
            if self._pool_home is not None:  # a transaction-mode session ends
                self.health_check_done = False
                self.close()  # type: ignore[attr-defined]
                return
            super().close_if_unusable_or_obsolete()  # type: ignore[misc]
            return
        self.health_check_done = False
        if self.get_autocommit() != self.settings_dict["AUTOCOMMIT"]:  # type: ignore[attr-defined]
            self._pool_discard = True
        elif self.errors_occurred and self.is_usable():
            self.errors_occurred = False
        self.close()  # type: ignore[attr-defined]


def _autocommit_of(conn: Any) -> bool:
    """A driver connection's autocommit, as the client knows it (no round trip)."""
    autocommit = conn.autocommit
    if callable(autocommit):  # PyMySQL: a method; the last OK packet's flag
        return bool(conn.get_autocommit())
    return bool(autocommit)


def _cursor_closed(cursor: Any) -> bool:
    """Is a driver cursor closed? (PyMySQL's have no ``closed``: they drop their connection.)"""
    closed = getattr(cursor, "closed", None)
    if closed is None:
        return getattr(cursor, "connection", None) is None
    return bool(closed)


_GuardedCursorWrapper = guarded(CursorWrapper)
_TransactionCursorWrapper = transactional(CursorWrapper)
_GuardedTransactionCursorWrapper = transactional(_GuardedCursorWrapper)

# The physical connections connection_created was sent for (transaction mode),
# until a reset wipes what its receivers set up.
_greeted: weakref.WeakSet[Any] = weakref.WeakSet()


def _wipe(pool: ConnectionPool, *, loaded: bool) -> tuple[bool, bool]:
    """``(discard, reset)`` for ``putconn`` of a connection whose session state must go.

    Reset (the driver's protocol reset, MySQL's, and ``RESET_QUERY``) when it
    has one or one is set, else closed; closed anyway after a ``LOAD``
    (``loaded``), which no reset undoes (``DISCARD ALL`` leaves the library
    loaded).
    """
    if (pool.driver.resets_sessions or pool.options.RESET_QUERY is not None) and not loaded:
        return False, True
    return True, False  # nothing can wipe its state: closed, not reused


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
        wipe, reset = wrapper._pool_return_kind()
        wrapper.connection = None
        wrapper._pool = None
        wrapper._pool_unwatch = None
        wrapper._pool_watch = None
        wrapper._pool_end_session()
        wrapper._close_lease_cursors()
        discard = wrapper._pool_discard or wipe
    else:
        # The wrapper is gone with its greenlet: what its session did is
        # unknown; a transaction-mode connection may carry session state.
        discard, reset = False, None
        if pool.options.POOL_MODE == "transaction":
            discard, reset = _wipe(pool, loaded=False)
    if reset:
        _greeted.discard(conn)
    logger.debug("pool %r: a greenlet ended holding a connection; giving it back", pool.name)
    try:
        pool.putconn(conn, discard=discard, lease=lease, reset=reset)
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
        if isinstance(wrapper, PooledDatabaseWrapperMixin) and (
            wrapper._pool is not None or wrapper._pool_home is not None
        ):
            wrapper.connection = None
            wrapper._pool = None
            wrapper._pool_unwatch = None
            wrapper._pool_watch = None
            wrapper._pool_end_session()


os.register_at_fork(after_in_child=_forget_connections_after_fork)


_PSYCOPG_ANY = "django.db.backends.postgresql.psycopg_any"


def _isolation_level(alias: str, options: dict[str, Any], driver: str | None = None) -> Any:
    """The wrapper's ``isolation_level`` attribute, as Django's get_new_connection sets it.

    Raises ``ImproperlyConfigured`` for a value that is not one of
    ``IsolationLevel``'s, with Django's own message after the alias's name.
    """
    if driver == "pymysql":
        return _mysql_isolation_level(alias, options)
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


def _mysql_isolation_level(alias: str, options: dict[str, Any]) -> str | None:
    """Django's MySQL ``isolation_level`` (lower case; None: the server's), validated."""
    # Our MySQL engine first: it makes PyMySQL Django's MySQLdb.
    from .mysql.base import _stock

    value = options.get("isolation_level", "read committed")
    if not value:
        return None
    level = str(value).lower()
    allowed = _stock.DatabaseWrapper.isolation_levels
    if level not in allowed:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['isolation_level']: Invalid transaction "
            f"isolation level {value!r} specified. Use one of "
            + ", ".join(repr(v) for v in sorted(allowed))
            + ", or None."
        )
    return level


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
        if wrapper.pool_driver == "pymysql":
            # Django's MySQL setup reads what its get_connection_params() sets.
            wrapper.isolation_level = _mysql_isolation_level(alias, settings_dict["OPTIONS"])
    wrapper.connection = conn
    try:
        wrapper.set_autocommit(settings_dict["AUTOCOMMIT"])
        super(PooledDatabaseWrapperMixin, wrapper).init_connection_state()
    finally:
        wrapper.connection = None
