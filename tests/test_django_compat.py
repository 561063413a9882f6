"""What Django's own test suite (``make test-django``) found in the backend, kept fixed.

One test (or a few) per fix; each failed before it. They use wrappers of
aliases of their own on the suite's test database, straight to the server:
none of this depends on what is between the wrapper and the server, so unlike
tests/test_django.py they do not run again through PgBouncer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_gevent_pool.backends.base import close_pools, get_pool
from django_gevent_pool.backends.postgresql_psycopg2 import base as pooled_backend

from .support import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MakeWrapper = Callable[..., Any]


@pytest.fixture
def make_wrapper() -> Iterator[MakeWrapper]:
    """``make_wrapper(alias, stock=False, **OPTIONS)``: a wrapper on the test database.

    Its own alias (so its own pool) and ``application_name``; ``stock=True``
    makes Django's stock psycopg2 wrapper instead, with no pool options. The
    aliases' pools are closed afterwards.
    """
    aliases: set[str] = set()

    def make(alias: str, *, stock: bool = False, **options: Any) -> Any:
        base = connections["default"].settings_dict
        opts: dict[str, Any] = {"application_name": f"dgp-compat-{alias}"}
        if not stock:
            opts.update(MAX_CONNS=2, POOL_TIMEOUT=5)
        opts.update(options)
        cls = pooled_backend._stock.DatabaseWrapper if stock else pooled_backend.DatabaseWrapper
        aliases.add(alias)
        return cls({**base, "OPTIONS": opts}, alias=alias)

    yield make
    for alias in aliases:
        close_pools(alias)


def in_use(alias: str) -> int:
    pool = get_pool(alias)
    return 0 if pool is None else int(pool.get_stats()["pool_in_use"])


# ------------------------------------------------------ isolation level


def test_an_invalid_isolation_level_is_improperly_configured(make_wrapper: MakeWrapper) -> None:
    """Django's ``test_connect_invalid_isolation_level``: not a bare ValueError."""
    wrapper = make_wrapper("bad_isolation", isolation_level=-1)
    with pytest.raises(ImproperlyConfigured) as caught:
        wrapper.ensure_connection()
    assert str(caught.value) == (
        "DATABASES['bad_isolation']['OPTIONS']['isolation_level']: Invalid transaction "
        "isolation level -1 specified. Use one of the psycopg.IsolationLevel values."
    )
    assert get_pool("bad_isolation") is None, "refused before any pool was made"
    assert wrapper.connection is None


# --------------------------------------------- what connect() leaves behind


def test_connect_leaves_the_attributes_the_stock_connect_leaves(make_wrapper: MakeWrapper) -> None:
    """Django's ``test_connect_and_rollback`` does ``del connection.timezone_name``.

    Compared on the second connect of each alias: the first also runs Django's
    once-per-alias version check, which caches ``pg_version``.
    """
    wrappers = {}
    for kind, stock in (("stock", True), ("pooled", False)):
        first = make_wrapper(f"attrs_{kind}", stock=stock)
        first.ensure_connection()
        first.close()
        wrappers[kind] = make_wrapper(f"attrs_{kind}", stock=stock)
        wrappers[kind].ensure_connection()
    try:
        missing = set(vars(wrappers["stock"])) - set(vars(wrappers["pooled"]))
        assert missing == set(), "left by the stock connect only"
        pooled = wrappers["pooled"]
        del pooled.timezone_name  # what Django's test does
        assert pooled.timezone_name == "UTC"
    finally:
        for wrapper in wrappers.values():
            wrapper.close()


# ------------------------------------------------------- thread sharing


@pytest.mark.gevent_only
def test_a_shared_connection_stays_when_the_greenlet_that_opened_it_ends(
    make_wrapper: MakeWrapper,
) -> None:
    """Django's ``ThreadTests.test_pass_connection_between_threads`` (ticket 17258), under gevent.

    Before the fix, the opener's end took the connection back (or cancelled
    the query this greenlet was running on it).
    """
    import gevent

    wrapper = make_wrapper("shared")
    wrapper.inc_thread_sharing()
    try:

        def opener() -> None:
            with wrapper.cursor() as cur:
                cur.execute("SELECT 1")

        gevent.spawn(opener).join(timeout=10)
        conn = wrapper.connection
        assert conn is not None, "taken back when its opener ended"
        with wrapper.cursor() as cur:
            cur.execute("SELECT pg_sleep(0.2), 42")  # the opener's end is processed meanwhile
            assert cur.fetchone()[1] == 42
        gevent.sleep(0.05)
        assert wrapper.connection is conn
        assert in_use("shared") == 1
    finally:
        wrapper.dec_thread_sharing()
    wrapper.close()
    assert in_use("shared") == 0


@pytest.mark.gevent_only
def test_sharing_a_connection_already_borrowed_keeps_it_with_its_users(
    make_wrapper: MakeWrapper,
) -> None:
    import gevent

    handed: list[Any] = []

    def owner() -> None:
        wrapper = make_wrapper("shared_later")  # made here: this greenlet owns it
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")  # borrowed by this greenlet, which then ends
        wrapper.inc_thread_sharing()
        handed.append(wrapper)

    gevent.spawn(owner).join(timeout=10)
    wrapper = handed[0]
    conn = wrapper.connection
    assert conn is not None, "taken back when its owner ended, though shared"
    with wrapper.cursor() as cur:
        cur.execute("SELECT pg_sleep(0.2), 42")
        assert cur.fetchone()[1] == 42
    assert wrapper.connection is conn
    wrapper.close()  # allowed from here: it is shared
    assert in_use("shared_later") == 0


@pytest.mark.gevent_only
def test_once_sharing_ends_the_owner_greenlet_end_gives_it_back(make_wrapper: MakeWrapper) -> None:
    import gevent

    seen: list[Any] = []

    def owner() -> None:
        wrapper = make_wrapper("shared_then_not")
        wrapper.inc_thread_sharing()

        def user() -> None:
            with wrapper.cursor() as cur:
                cur.execute("SELECT 1")

        gevent.spawn(user).join(timeout=10)  # it borrowed the connection and ended
        gevent.sleep(0.05)  # time for that end to be processed
        seen.append((wrapper.connection, in_use("shared_then_not")))
        wrapper.dec_thread_sharing()  # now this greenlet's alone: watched again

    gevent.spawn(owner).join(timeout=10)
    conn, lent = seen[0]
    assert conn is not None and lent == 1, "taken back when the greenlet that borrowed it ended"
    wait_until(lambda: in_use("shared_then_not") == 0, what="the owner's end to give it back")
