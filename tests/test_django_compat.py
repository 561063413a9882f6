"""What Django's own test suite (``make test-django``) and reviews found in the backend, kept fixed.

One test (or a few) per fix; each failed before it. They use wrappers of
aliases of their own on the suite's test database, straight to the server:
none of this depends on what is between the wrapper and the server, so unlike
tests/test_django.py they do not run again through PgBouncer.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections

from django_gevent_pool import CopyBlocksTheHub, blocking_copy, devserver, is_psycopg2_cooperative
from django_gevent_pool.backends.base import close_pools, get_pool

from .support import DRIVER, ENGINE, is_gevent, wait_until

pooled_backend = importlib.import_module(f"{ENGINE}.base")

pytestmark = pytest.mark.django_db(transaction=True)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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


# ------------------------------------------- session state and credentials


def test_a_time_zone_set_by_one_borrower_does_not_reach_the_next(
    make_wrapper: MakeWrapper,
) -> None:
    """Django's ensure_timezone() on every checkout: free unless the zone changed."""
    first = make_wrapper("tz", MAX_CONNS=1)
    with first.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        backend = cur.fetchone()[0]
        cur.execute("SET TIME ZONE 'Asia/Tokyo'")
    first.close()  # back to the pool with the session's zone changed
    second = make_wrapper("tz", MAX_CONNS=1)
    try:
        with second.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('TimeZone')")
            assert cur.fetchone() == (backend, "UTC"), "same session, zone set back"
    finally:
        second.close()


def test_connection_parameters_are_taken_afresh_for_each_physical_connection(
    make_wrapper: MakeWrapper, admin: Any
) -> None:
    """A subclass returning a new IAM token or rotated password per connect (RDS IAM auth)."""
    import itertools

    issued = itertools.count()
    base_class = pooled_backend.DatabaseWrapper

    class RotatingWrapper(base_class):  # type: ignore[misc, valid-type]
        def get_connection_params(self) -> dict[str, Any]:
            params: dict[str, Any] = super().get_connection_params()
            # Observable on the server; a real subclass would set "password".
            params["application_name"] = f"dgp-rotating-{next(issued)}"
            return params

    settings_dict = make_wrapper("rotating", MAX_CONNS=2).settings_dict
    wrappers = [RotatingWrapper(settings_dict, alias="rotating") for _ in range(2)]
    try:
        names = []
        for wrapper in wrappers:  # both held: two physical connections
            with wrapper.cursor() as cur:
                cur.execute("SELECT current_setting('application_name')")
                names.append(cur.fetchone()[0])
        assert len(set(names)) == 2, names
        assert all(name.startswith("dgp-rotating-") for name in names)
    finally:
        for wrapper in wrappers:
            wrapper.close()


# ------------------------------------------------------- one borrower at a time


def test_a_cursor_kept_past_close_fails_instead_of_joining_the_next_borrower(
    make_wrapper: MakeWrapper,
) -> None:
    """A stale cursor used to run inside the next borrower's transaction."""
    from django.db import InterfaceError

    first = make_wrapper("stale", MAX_CONNS=1)
    with first.cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS dgp_stale (v int)")  # warm up
    stale = first.cursor()
    stale.execute("SELECT pg_backend_pid()")
    backend = stale.fetchone()[0]
    first.close()  # back to the pool; the cursor is kept
    second = make_wrapper("stale", MAX_CONNS=1)
    try:
        second.set_autocommit(False)  # what atomic() does: the next borrower's transaction
        with second.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] == backend, "the same physical connection"
            cur.execute("CREATE TEMP TABLE dgp_stale2 (v int)")
            cur.execute("INSERT INTO dgp_stale2 VALUES (1)")
        # psycopg2's message, and psycopg 3's.
        with pytest.raises(InterfaceError, match=r"cursor already closed|the cursor is closed"):
            stale.execute("INSERT INTO dgp_stale2 VALUES (2)")
        with second.cursor() as cur:
            cur.execute("SELECT count(*) FROM dgp_stale2")
            assert cur.fetchone()[0] == 1, "nothing of the stale cursor's reached this session"
        second.rollback()
        second.set_autocommit(True)
    finally:
        second.close()


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


# ---------------------------------------------------------------- COPY


@pytest.fixture
def copy_table() -> Iterator[str]:
    """An empty table ``copy_item (name, price)`` in the test database, dropped afterwards."""
    conn = connections["default"]
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS copy_item")
        cur.execute("CREATE TABLE copy_item (name text NOT NULL, price numeric NOT NULL)")
    yield "copy_item"
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS copy_item")
    conn.close()


def csv_rows(rows: int) -> io.StringIO:
    return io.StringIO("".join(f"item {i},{i % 100}.25\n" for i in range(rows)))


psycopg2_only = pytest.mark.skipif(
    DRIVER != "psycopg2",
    reason="psycopg2's COPY cannot run with a wait callback; psycopg 3's is cooperative "
    "(test_psycopg3_copy_through_django_keeps_the_hub_running)",
)


@pytest.mark.gevent_only
@pytest.mark.skipif(DRIVER != "psycopg", reason="psycopg 3's COPY API")
@pytest.mark.parametrize("debug", [False, True], ids=["cursor", "debug-cursor"])
def test_psycopg3_copy_through_django_keeps_the_hub_running(copy_table: str, debug: bool) -> None:
    """psycopg 3's COPY goes through its (cooperative) waits: no blocking_copy() needed."""
    import gevent

    conn = connections["default"]
    conn.force_debug_cursor = debug
    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        for _ in range(2000):  # bounded: 20 s at most
            gevent.sleep(0.01)
            ticks += 1

    rows = 50_000
    ticking = gevent.spawn(ticker)
    try:
        with conn.cursor() as cur:
            with cur.copy(f"COPY {copy_table} FROM STDIN") as copy:
                for i in range(rows):
                    copy.write_row((f"item {i}", f"{i % 100}.25"))
            before = ticks
            out = []
            with cur.copy(
                f"COPY (SELECT name, price, pg_sleep(0.3) IS NULL FROM {copy_table} LIMIT 1) "
                "TO STDOUT"
            ) as copy:
                out.extend(copy.rows())
            assert ticks >= before + 10, "the hub ran during a 0.3 s COPY TO"
            cur.execute(f"SELECT count(*), sum(price) FROM {copy_table}")
            count, total = cur.fetchone()
    finally:
        ticking.kill()
        conn.force_debug_cursor = False
        conn.close()
    assert count == rows
    assert total == sum(Decimal(i % 100) + Decimal("0.25") for i in range(rows))
    assert len(out) == 1


@psycopg2_only
@pytest.mark.gevent_only
@pytest.mark.parametrize("debug", [False, True], ids=["cursor", "debug-cursor"])
def test_copy_under_gevent_says_to_use_blocking_copy(copy_table: str, debug: bool) -> None:
    """Django's ``test_copy_to_expert_cursors``: psycopg2's message said nothing useful."""
    conn = connections["default"]
    conn.force_debug_cursor = debug
    try:
        with conn.cursor() as cur:
            calls: list[Callable[[], Any]] = [
                lambda: cur.copy_expert(f"COPY {copy_table} FROM STDIN (FORMAT csv)", csv_rows(1)),
                lambda: cur.copy_from(io.StringIO("a\t1\n"), copy_table),
                lambda: cur.copy_to(io.StringIO(), copy_table),
            ]
            for call in calls:
                with pytest.raises(CopyBlocksTheHub, match=r"blocking_copy\(\)") as caught:
                    call()
                assert isinstance(caught.value, psycopg2.ProgrammingError), "as psycopg2's was"
                assert "blocks the gevent hub" in str(caught.value)
            cur.execute(f"SELECT count(*) FROM {copy_table}")
            assert cur.fetchone()[0] == 0, "refused before anything reached the server"
    finally:
        conn.force_debug_cursor = False


@psycopg2_only
@pytest.mark.parametrize("debug", [False, True], ids=["cursor", "debug-cursor"])
def test_blocking_copy_loads_and_unloads_real_data(copy_table: str, debug: bool) -> None:
    """In both modes; under gevent the callback is lifted for the block and restored after."""
    conn = connections["default"]
    conn.force_debug_cursor = debug
    cooperative = is_psycopg2_cooperative()
    assert cooperative is is_gevent()
    rows = 20_000
    try:
        with conn.cursor() as cur:
            with blocking_copy():
                assert psycopg2.extensions.get_wait_callback() is None
                cur.copy_expert(f"COPY {copy_table} FROM STDIN (FORMAT csv)", csv_rows(rows))
                cur.copy_from(io.StringIO("extra\t1000\n"), copy_table)
                out = io.StringIO()
                cur.copy_to(out, copy_table)
            assert is_psycopg2_cooperative() is cooperative, "restored"
            cur.execute(f"SELECT count(*), sum(price) FROM {copy_table}")
            count, total = cur.fetchone()
    finally:
        conn.force_debug_cursor = False
    assert count == rows + 1
    assert total == sum(Decimal(i % 100) + Decimal("0.25") for i in range(rows)) + 1000
    lines = out.getvalue().splitlines()
    assert len(lines) == rows + 1
    assert lines[0] == "item 0\t0.25" and lines[-1] == "extra\t1000"
    if debug:
        assert any("COPY" in q["sql"] for q in conn.queries), "the debug wrapper still logs"


@psycopg2_only
@pytest.mark.gevent_only
def test_blocking_copy_blocks_the_hub_for_the_copy_only() -> None:
    """What README.rst says: no other greenlet runs during the COPY, and all of them do after."""
    import gevent

    ticks = 0

    def ticker() -> None:
        nonlocal ticks
        for _ in range(1000):  # bounded: 10 s at most
            gevent.sleep(0.01)
            ticks += 1

    ticking = gevent.spawn(ticker)
    try:
        with connections["default"].cursor() as cur:
            gevent.sleep(0.05)
            assert ticks > 0, "the ticker runs while nothing blocks"
            before = ticks
            with blocking_copy():
                cur.copy_expert("COPY (SELECT pg_sleep(0.3)) TO STDOUT", io.StringIO())
            assert ticks == before, "a greenlet ran during the COPY"
            gevent.sleep(0.05)
            assert ticks > before, "the hub runs again once the COPY is over"
    finally:
        ticking.kill()
        connections["default"].close()


class _YieldingFile(io.StringIO):
    """A COPY source whose ``read()`` yields to the hub, so a kill or timeout lands there."""

    def read(self, size: int | None = -1) -> str:
        import gevent

        gevent.sleep(0.2)
        return super().read(size)


@psycopg2_only
@pytest.mark.gevent_only
def test_blocking_copy_restores_the_callback_on_every_exit(copy_table: str) -> None:
    import gevent

    callback = psycopg2.extensions.get_wait_callback()
    assert callback is not None

    def copy_in() -> None:
        with connections["default"].cursor() as cur:
            with blocking_copy():
                source = _YieldingFile("a,1\n")
                cur.copy_expert(f"COPY {copy_table} FROM STDIN (FORMAT csv)", source)

    # A gevent.Timeout while read() yields. psycopg2 ends the COPY (nothing is
    # written) and raises its own QueryCanceled in place of the Timeout.
    with pytest.raises(psycopg2.errors.QueryCanceled, match="Timeout"):
        with gevent.Timeout(0.05):
            copy_in()
    assert psycopg2.extensions.get_wait_callback() is callback
    # Killed (GreenletExit) the same way.
    job = gevent.spawn(copy_in)
    gevent.sleep(0.05)
    job.kill(block=True, timeout=5)
    assert job.dead
    assert psycopg2.extensions.get_wait_callback() is callback
    # An error of the caller's inside the block.
    with pytest.raises(ZeroDivisionError):
        with blocking_copy():
            1 / 0  # noqa: B018
    assert psycopg2.extensions.get_wait_callback() is callback
    # Overlapping blocks in two greenlets: lifted until the last one ends.
    first_in = gevent.event.Event()
    release = gevent.event.Event()

    def holder() -> None:
        with blocking_copy():
            first_in.set()
            release.wait(5)

    held = gevent.spawn(holder)
    first_in.wait(5)
    with blocking_copy():
        pass
    assert psycopg2.extensions.get_wait_callback() is None, "the holder is still inside"
    release.set()
    held.join(timeout=5)
    assert psycopg2.extensions.get_wait_callback() is callback
    # The connection the interrupted COPYs ran on still works; nothing was loaded.
    with connections["default"].cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {copy_table}")
        assert cur.fetchone()[0] == 0


def test_the_bulk_copy_example_loads_every_row(tmp_path: Path) -> None:
    """examples/bulk_copy.py, which README.rst quotes, in a gevent-patched process of its own."""
    dsn, _where = devserver.server_dsn()
    out = tmp_path / "copy.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DGP_", "DJANGO_"))}
    env.update(DGP_DSN=dsn, DGP_DBNAME="dgp_examples_copy")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "bulk_copy.py"), "--rows=50000", f"--json-out={out}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0 and out.exists(), done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["rows_loaded"] == 50_000
    assert result["callback_restored"] is True
    assert "blocking_copy()" in result["refused_without_it"]
    assert result["ticks_during_copy"] == 0, "the COPY blocked the hub, as documented"
    assert done.stdout.rstrip().endswith("OK")
