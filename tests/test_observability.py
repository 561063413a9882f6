"""Observability: pool_stats, the periodic log, settings, the JSON view, Prometheus, Server-Timing.

Real PostgreSQL, real pools through Django. Waiting is made real: a pool's
only connections are held by another greenlet or thread while a checkout
queues, and released once the pool says someone waits.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.test import Client, override_settings
from django.urls import path

from django_gevent_pool import hostbudget, timing
from django_gevent_pool.backends.base import all_stats, close_pools, get_pool
from django_gevent_pool.observability import (
    ServerTimingMiddleware,
    configure_from_settings,
    pool_stats,
    start_stats_log,
    stop_stats_log,
)

from .support import DRIVER, ENGINE, Workers, connect, sleep, wait_until

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

MIDDLEWARE = "django_gevent_pool.observability.ServerTimingMiddleware"
SERVER_TIMING = re.compile(
    r'db-pool;dur=(\d+\.\d{3});desc="(\d+) checkouts?", db-held;dur=\d+\.\d{3};desc="\d+ pins?"'
)
TINY = "obs_tiny"  # MAX_CONNS=1: the request views below wait on it
TIMING_OUT = "obs_timeout"  # MAX_CONNS=1, POOL_TIMEOUT=0.3: its checkouts time out
BUDGETED = "obs_budget"  # HOST_MAX_CONNS=3 in a lock directory of the test's own
OUR_ALIASES = ("obs_stats", "obs_view", "obs_log", "obs_prom", BUDGETED, TINY, TIMING_OUT)


# ----------------------------------------------------------------- helpers


def make_wrapper(alias: str, **options: Any) -> Any:
    """A DatabaseWrapper for ``alias`` with default's settings and extra OPTIONS."""
    base = connections["default"].settings_dict
    settings_dict = {**base, "OPTIONS": {**base["OPTIONS"], **options}}
    return type(connections["default"])(settings_dict, alias=alias)


def tiny_wrapper() -> Any:
    return make_wrapper(TINY, MAX_CONNS=1, POOL_TIMEOUT=10)


def timing_out_wrapper() -> Any:
    return make_wrapper(TIMING_OUT, MAX_CONNS=1, POOL_TIMEOUT=0.3)


def checkouts(wrapper: Any, n: int) -> None:
    """``n`` checkouts (each one a query, then the connection goes back)."""
    for _ in range(n):
        with wrapper.cursor() as cur:
            cur.execute("SELECT 1")
        wrapper.close()


@pytest.fixture
def fresh_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's host budgets start afresh (a budget made by another test stays there)."""
    if not hostbudget.OFD_LOCKS:
        pytest.skip("a second holder in this process needs open-file-description locks")
    monkeypatch.setattr(hostbudget, "_BUDGETS", {})


def neighbour_of(budget: hostbudget.HostBudget) -> hostbudget.HostBudget:
    """Another holder of ``budget``'s slots, as another process of the host would be.

    Its own open file description of the lock file: with OFD locks, its slots
    conflict with this process's as another process's do.
    """
    return hostbudget.HostBudget(budget.key, budget.size, budget.directory)


def stat(alias: str, key: str) -> float:
    return pool_stats(alias).get(alias, {}).get(key, 0)


class Records(logging.Handler):
    """Keeps the records of one logger (which stops propagating them)."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, alias: str) -> list[logging.LogRecord]:
        return [r for r in list(self.records) if getattr(r, "pool_alias", None) == alias]

    def __enter__(self) -> Records:
        self._saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._saved[0])
        self.logger.propagate = self._saved[1]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    for conn in connections.all(initialized_only=True):
        conn.close()
    yield
    stop_stats_log()
    for conn in connections.all(initialized_only=True):
        conn.close()
    for alias in OUR_ALIASES:
        close_pools(alias)
    assert timing.current_tally() is None, "a tally leaked out of a test"


def use_default() -> None:
    """Make sure the default alias has a pool, and give its connection back."""
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
    connection.close()


# ------------------------------------------------------- views (ROOT_URLCONF)


def tiny_view(request: HttpRequest) -> HttpResponse:
    checkouts(tiny_wrapper(), int(request.GET.get("n", "1")))
    return HttpResponse("ok")


def timing_out_view(request: HttpRequest) -> HttpResponse:
    checkouts(timing_out_wrapper(), 1)
    return HttpResponse("ok")


def default_view(request: HttpRequest) -> HttpResponse:
    use_default()
    response = HttpResponse("ok")
    if request.GET.get("timing"):
        response["Server-Timing"] = 'app;dur=1.5;desc="view"'
    return response


def failing_view(request: HttpRequest) -> HttpResponse:
    use_default()
    raise RuntimeError("the view failed")


def streaming_view(request: HttpRequest) -> StreamingHttpResponse:
    use_default()

    def body() -> Iterator[bytes]:
        use_default()  # after the headers: not in the metric
        yield b"streamed"

    return StreamingHttpResponse(body())


urlpatterns = [
    path("tiny/", tiny_view),
    path("timeout/", timing_out_view),
    path("default/", default_view),
    path("fail/", failing_view),
    path("stream/", streaming_view),
]

with_middleware = override_settings(MIDDLEWARE=[MIDDLEWARE], ROOT_URLCONF=__name__)


# ------------------------------------------------------------- pool_stats


def test_pool_stats_follow_the_pool_in_use_idle_and_waiting(workers: Workers) -> None:
    alias = "obs_stats"
    holders = [make_wrapper(alias, MAX_CONNS=2, POOL_TIMEOUT=10) for _ in range(2)]
    for wrapper in holders:
        wrapper.ensure_connection()
    stats = pool_stats(alias)
    assert list(stats) == [alias]
    now = stats[alias]
    assert set(now) == set(get_pool(alias).get_stats())  # type: ignore[union-attr]
    assert (now["pool_in_use"], now["pool_available"], now["pool_size"]) == (2, 0, 2)
    assert (now["pool_max"], now["requests_waiting"], now["requests_queued"]) == (2, 0, 0)
    assert now["requests_num"] == 2 and now["connections_num"] == 2
    assert set(pool_stats()) == set(all_stats()) and alias in pool_stats()
    assert pool_stats("obs_never_used") == {}, "no pool made yet: absent"

    def third() -> None:
        checkouts(make_wrapper(alias, MAX_CONNS=2, POOL_TIMEOUT=10), 1)

    workers.spawn(third)
    wait_until(lambda: stat(alias, "requests_waiting") == 1, what="the third checkout to queue")
    assert stat(alias, "pool_in_use") == 2
    holders[0].close()  # handed straight to the waiter
    workers.join()
    assert workers.errors == []
    holders[1].close()
    after = pool_stats(alias)[alias]
    assert (after["pool_in_use"], after["pool_available"], after["requests_waiting"]) == (0, 2, 0)
    assert after["requests_num"] == 3 and after["requests_queued"] == 1
    assert after["requests_wait_ms"] > 0 and after["requests_wait_max_ms"] > 0
    # The waiter's checkout is the slowest of the three: p99 covers its queueing.
    assert after["requests_wait_p99_ms"] >= after["requests_wait_max_ms"] > 0
    assert after["connections_num"] == 2, "the waiter got a returned connection"


# ------------------------------------------------------------ JSON view


def test_the_json_view_shows_this_process_pools_and_refuses_post() -> None:
    use_default()
    held = make_wrapper("obs_view", MAX_CONNS=2)
    held.ensure_connection()
    try:
        client = Client()
        response = client.get("/pool-stats/")
        assert response.status_code == 200
        assert response["Content-Type"] == "application/json"
        assert "no-store" in response["Cache-Control"] and "max-age=0" in response["Cache-Control"]
        body = response.json()
        assert set(body) == {"pid", "time", "pools"}
        assert body["pid"] == os.getpid()
        assert isinstance(body["time"], float) and body["time"] <= time.time()
        assert {"default", "obs_view"} <= set(body["pools"])
        view_stats = body["pools"]["obs_view"]
        assert set(view_stats) == set(get_pool("obs_view").get_stats())  # type: ignore[union-attr]
        assert view_stats["pool_in_use"] == 1 and view_stats["pool_max"] == 2

        one = client.get("/pool-stats/?alias=obs_view").json()
        assert list(one["pools"]) == ["obs_view"]
        assert client.get("/pool-stats/?alias=obs_nothing").json()["pools"] == {}

        refused = client.post("/pool-stats/")
        assert refused.status_code == 405
        assert refused["Allow"] == "GET"
        assert client.put("/pool-stats/").status_code == 405
    finally:
        held.close()


# ---------------------------------------------------------- periodic log


def test_the_stats_log_writes_one_line_per_pool_per_tick_and_stops() -> None:
    alias = "obs_log"
    wrapper = make_wrapper(alias, MAX_CONNS=2)
    checkouts(wrapper, 1)
    use_default()
    pool = get_pool(alias)
    assert pool is not None
    before = pool.get_stats()["requests_num"]
    with Records("dgp.tests.stats") as out:
        stop = start_stats_log(0.05, logger_name="dgp.tests.stats")
        checkouts(wrapper, 5)

        def counted() -> float:
            return sum(r.pool_deltas["requests_num"] for r in out.of(alias))  # type: ignore[attr-defined]

        wait_until(lambda: counted() == 5, what="the lines to count the 5 checkouts")
        wait_until(lambda: len(out.of(alias)) >= 3, what="three lines for the pool")
        stop()
        written = len(out.records)
        sleep(0.3)  # six intervals: nothing more after stop()
        assert len(out.records) == written
        stop()  # idempotent

    assert counted() == 5, "no checkout counted twice"
    assert pool.get_stats()["requests_num"] == before + 5, "the pool's counters were not reset"
    per_pool = Counter(r.pool_alias for r in out.records)  # type: ignore[attr-defined]
    assert set(per_pool) == set(pool_stats()), "a line for every pool"
    assert len(set(per_pool.values())) == 1, f"one line per pool per tick: {per_pool}"
    record = out.of(alias)[-1]
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message.startswith(f"pool '{alias}': size=1/2 in_use=0 idle=1 opening=0 waiting=0 |")
    for part in ("checkouts=", "queued=", "timeouts=", "wait_p50_ms=", "wait_p99_ms="):
        assert part in message
    assert record.pool_stats["pool_max"] == 2  # type: ignore[attr-defined]
    assert record.pool_elapsed > 0  # type: ignore[attr-defined]


def test_the_stats_log_survives_pop_stats_resets_without_negative_counts() -> None:
    alias = "obs_log"
    wrapper = make_wrapper(alias, MAX_CONNS=2)
    checkouts(wrapper, 1)
    pool = get_pool(alias)
    assert pool is not None
    with Records("dgp.tests.stats") as out:
        start_stats_log(0.05, logger_name="dgp.tests.stats")

        def counted() -> float:
            return sum(r.pool_deltas["requests_num"] for r in out.of(alias))  # type: ignore[attr-defined]

        checkouts(wrapper, 3)
        wait_until(lambda: counted() == 3, what="the lines to count 3 checkouts")
        pool.pop_stats()  # another consumer resets the pool's counters
        checkouts(wrapper, 2)
        wait_until(lambda: counted() == 5, what="the lines to count 2 more after the reset")
        stop_stats_log()
    assert all(
        value >= 0
        for r in out.of(alias)
        for value in r.pool_deltas.values()  # type: ignore[attr-defined]
    )


def test_the_stats_log_shows_the_host_budget_of_the_pools_that_have_one(
    fresh_budgets: None, tmp_path: Any
) -> None:
    budgeted = make_wrapper(BUDGETED, MAX_CONNS=2, HOST_MAX_CONNS=3, HOST_LOCK_DIR=str(tmp_path))
    budgeted.ensure_connection()  # held for the whole test
    plain = make_wrapper("obs_log", MAX_CONNS=2)
    checkouts(plain, 1)
    pool = get_pool(BUDGETED)
    assert pool is not None
    (budget,) = hostbudget._BUDGETS.values()
    neighbour = neighbour_of(budget)
    assert neighbour.take() is not None  # another process of the host holds one slot
    try:
        with Records("dgp.tests.stats") as out:
            start_stats_log(0.05, logger_name="dgp.tests.stats")
            wait_until(
                lambda: bool(out.of(BUDGETED)) and bool(out.of("obs_log")),
                what="a line for each pool",
            )
            stop_stats_log()
    finally:
        budgeted.close()
    record = out.of(BUDGETED)[-1]
    message = record.getMessage()
    assert message.startswith(
        f"pool '{BUDGETED}': size=1/2 in_use=1 idle=0 opening=0 waiting=0 host=2/3 held=1 |"
    ), message
    assert " host_waits=0 given_back=0 stepped_aside=0 | wait_p50_ms=" in message
    assert record.pool_stats["host_in_use"] == 2  # type: ignore[attr-defined]
    # Gauges, not counters: never in the deltas (a gauge going down is no counter reset).
    assert not {"host_max", "host_in_use", "host_held"} & set(record.pool_deltas)  # type: ignore[attr-defined]
    assert record.pool_deltas["host_waits"] == 0  # type: ignore[attr-defined]
    without = out.of("obs_log")[-1].getMessage()
    assert "host=" not in without and "host_waits=" not in without


def test_a_second_start_replaces_the_first() -> None:
    use_default()
    with Records("dgp.tests.first") as first, Records("dgp.tests.second") as second:
        stop_first = start_stats_log(0.05, logger_name="dgp.tests.first")
        wait_until(lambda: len(first.records) >= 1, what="a line from the first log")
        stop_second = start_stats_log(0.05, logger_name="dgp.tests.second")
        written = len(first.records)
        wait_until(lambda: len(second.records) >= 3, what="lines from the second log")
        assert len(first.records) == written, "the first log stopped when replaced"
        stop_first()  # does nothing now
        grown = len(second.records)
        wait_until(lambda: len(second.records) > grown, what="the second log to go on")
        stop_second()
    assert stop_stats_log() is False


@pytest.mark.parametrize("interval", [0, -1, True, "60", float("nan")])
def test_a_bad_interval_is_refused(interval: Any) -> None:
    with pytest.raises(ValueError, match="interval must be a number of seconds > 0"):
        start_stats_log(interval)
    assert stop_stats_log() is False


FORK_SCRIPT = textwrap.dedent(
    """
    import sys
    if sys.argv[2] == "gevent":
        from gevent import monkey
        monkey.patch_all()

    import json, logging, os, time
    import django
    from django.conf import settings
    from django_gevent_pool.devserver import django_settings

    dsn, trigger, engine = sys.argv[1], sys.argv[3], sys.argv[4]
    settings.configure(DATABASES={"default": {
        "ENGINE": engine,
        **django_settings(dsn), "OPTIONS": {"MAX_CONNS": 2},
    }})
    django.setup()
    from django.core.signals import request_started
    from django.db import connection
    from django_gevent_pool.observability import start_stats_log

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.process, record.thread, record.pool_alias))

    log = logging.getLogger("dgp.fork")
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(Keep())

    def wait_for(predicate, timeout=10.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    connection.ensure_connection()
    connection.close()
    start_stats_log(0.05, logger_name="dgp.fork")
    assert wait_for(lambda: len(records) >= 2)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        me = os.getpid()
        if trigger == "request":
            request_started.send(sender=None)  # what a worker's first request does
        connection.ensure_connection()
        connection.close()
        ok = wait_for(lambda: sum(1 for p, _, _ in records if p == me) >= 3)
        mine = [(t, alias) for p, t, alias in records if p == me]
        loops, aliases = {t for t, _ in mine}, sorted({a for _, a in mine})
        out = {"ok": ok, "loops": len(loops), "aliases": aliases}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.waitpid(child, 0)
    got = json.loads(os.read(r, 65536))
    n = len(records)
    parent_ok = wait_for(lambda: len(records) >= n + 2)
    pids = sorted({p for p, _, _ in records})
    print(json.dumps({"child": got, "parent_ok": parent_ok, "pids": pids, "me": os.getpid()}))
    """
)


@pytest.mark.parametrize(
    ("mode", "trigger"), [("plain", "request"), ("gevent", "request"), ("gevent", "none")]
)
def test_a_forked_child_gets_its_own_stats_log(dsn: str, mode: str, trigger: str) -> None:
    """plain: the parent's thread is gone, the first request restarts it; gevent: the
    greenlet survives the fork and either adopts the child or gives way to the restart."""
    out = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, dsn, mode, trigger, ENGINE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["child"]["ok"], "the child logged its own pools"
    assert result["child"]["loops"] == 1, "exactly one loop in the child"
    assert result["child"]["aliases"] == ["default"]
    assert result["parent_ok"], "the parent's log goes on"
    assert result["pids"] == [result["me"]], "the child's lines stayed in the child"


# --------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"STATS_LOG_INTERVAL": 0}, "DJANGO_GEVENT_POOL['STATS_LOG_INTERVAL'] must be a number"),
        ({"STATS_LOG_INTERVAL": "60"}, "seconds > 0 or None, got '60'"),
        ({"STATS_LOG_INTERVAL": True}, "DJANGO_GEVENT_POOL['STATS_LOG_INTERVAL']"),
        (
            {"PROMETHEUS": "yes"},
            "DJANGO_GEVENT_POOL['PROMETHEUS'] must be True or False, got 'yes'",
        ),
        (
            {"STATS_INTERVAL": 5},
            "DJANGO_GEVENT_POOL['STATS_INTERVAL'] is not a known key; "
            "allowed: PROMETHEUS, STATS_LOG_INTERVAL",
        ),
        ([("PROMETHEUS", True)], "DJANGO_GEVENT_POOL must be a dict with the keys"),
    ],
)
def test_configure_from_settings_refuses_bad_settings(value: Any, message: str) -> None:
    with override_settings(DJANGO_GEVENT_POOL=value), pytest.raises(ImproperlyConfigured) as err:
        configure_from_settings()
    assert message in str(err.value)
    assert stop_stats_log() is False, "nothing started"


def test_configure_from_settings_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "django_gevent_pool.prometheus", raising=False)
    with override_settings(DJANGO_GEVENT_POOL={"PROMETHEUS": True}):
        with pytest.raises(ImproperlyConfigured) as err:
            configure_from_settings()
    assert "DJANGO_GEVENT_POOL['PROMETHEUS']" in str(err.value)
    assert "pip install django-gevent-pool[prometheus]" in str(err.value)


def test_configure_from_settings_starts_the_log_and_the_collector_then_stops_the_log() -> None:
    from prometheus_client import REGISTRY

    from django_gevent_pool.prometheus import register_collector

    use_default()
    configure_from_settings()  # no setting at all: nothing
    assert stop_stats_log() is False
    with Records("django_gevent_pool.stats") as out:
        settings = {"STATS_LOG_INTERVAL": 0.05, "PROMETHEUS": True}
        with override_settings(DJANGO_GEVENT_POOL=settings):
            configure_from_settings()
            configure_from_settings()  # again (ready() twice): still one log, one collector
        wait_until(lambda: len(out.of("default")) >= 2, what="lines on django_gevent_pool.stats")
        collector = register_collector()
        assert register_collector() is collector
        max_conns = get_pool("default").max_conns  # type: ignore[union-attr]
        exported = metric_values(REGISTRY)
        assert (
            exported[("django_gevent_pool_connections_max", (("alias", "default"),))] == max_conns
        )
        with override_settings(DJANGO_GEVENT_POOL={"STATS_LOG_INTERVAL": None}):
            configure_from_settings()  # stops the log it started
        written = len(out.records)
        sleep(0.3)
        assert len(out.records) == written
    assert stop_stats_log() is False


def test_configure_from_settings_leaves_a_log_started_by_hand() -> None:
    with Records("dgp.tests.manual") as out:
        stop = start_stats_log(0.05, logger_name="dgp.tests.manual")
        use_default()
        with override_settings(DJANGO_GEVENT_POOL={}):
            configure_from_settings()
        written = len(out.records)
        wait_until(lambda: len(out.records) > written, what="the hand-started log to go on")
        stop()


# ------------------------------------------------------------- prometheus


def metric_values(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_prometheus_collector_exports_gauges_and_monotonic_counters_by_alias() -> None:
    from prometheus_client import CollectorRegistry

    from django_gevent_pool.prometheus import register_collector

    registry = CollectorRegistry()
    collector = register_collector(registry)
    assert register_collector(registry) is collector, "idempotent per registry"
    alias = "obs_prom"
    held = make_wrapper(alias, MAX_CONNS=3)
    held.ensure_connection()
    other = make_wrapper(alias, MAX_CONNS=3)
    checkouts(other, 3)
    pool = get_pool(alias)
    assert pool is not None
    stats = pool.get_stats()
    values = metric_values(registry)
    label = (("alias", alias),)

    def value(name: str, **labels: str) -> float:
        return values[
            (f"django_gevent_pool_{name}", tuple(sorted({"alias": alias, **labels}.items())))
        ]

    assert value("connections_in_use") == 1 == stats["pool_in_use"]
    assert value("connections_idle") == stats["pool_available"] == 1
    assert value("connections") == stats["pool_size"] == 2
    assert value("connections_max") == 3 and value("connections_min") == 0
    assert value("requests_waiting") == 0 and value("connections_opening") == 0
    assert value("requests_total") == stats["requests_num"] == 4
    assert value("connections_opened_total") == stats["connections_num"] == 2
    assert value("requests_timeouts_total") == 0
    assert value("checkout_seconds", quantile="0.99") == pytest.approx(
        stats["requests_wait_p99_ms"] / 1000.0
    )
    assert ("django_gevent_pool_requests_total", label) in values
    assert any(name == "django_gevent_pool_connections" for name, _ in values)

    pool.pop_stats()  # resets the pool's counters: ours must not go down
    checkouts(other, 2)
    values = metric_values(registry)
    assert pool.get_stats()["requests_num"] == 2
    assert value("requests_total") == 6, "4 before the reset + 2 after"
    assert value("connections_opened_total") == 2
    held.close()
    values = metric_values(registry)
    assert value("connections_in_use") == 0 and value("connections_idle") == 2


def test_a_collector_over_bare_pools_and_the_multiprocess_warning(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from prometheus_client import CollectorRegistry

    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.prometheus import PoolCollector, register_collector

    pool = ConnectionPool(
        lambda: connect(dsn), driver=DRIVER, name="jobs", options={"MAX_CONNS": 2}
    )
    try:
        conn = pool.getconn()
        registry = CollectorRegistry()
        registry.register(PoolCollector(lambda: {"jobs": pool}))
        values = metric_values(registry)
        assert values[("django_gevent_pool_connections_in_use", (("alias", "jobs"),))] == 1
        assert values[("django_gevent_pool_requests_total", (("alias", "jobs"),))] == 1
        pool.putconn(conn)
    finally:
        pool.close()

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    with caplog.at_level(logging.WARNING, logger="django_gevent_pool"):
        fresh = CollectorRegistry()
        register_collector(fresh)
        register_collector(fresh)
    warnings = [r for r in caplog.records if "multiprocess mode" in r.getMessage()]
    assert len(warnings) == 1, "said once, at the first registration"


def test_the_prometheus_collector_exports_the_host_budget_by_alias(
    dsn: str, fresh_budgets: None, tmp_path: Any
) -> None:
    """Gauges for the alias with a budget only; its waits and give-backs, made real, counted."""
    from prometheus_client import CollectorRegistry, generate_latest

    from django_gevent_pool import ConnectionPool
    from django_gevent_pool.errors import PoolTimeout
    from django_gevent_pool.prometheus import PoolCollector

    key = hostbudget.budget_key("127.0.0.1", 5432, "obs-prometheus", "postgres")
    budget = hostbudget.budget_for(key, 4, str(tmp_path), name="jobs")
    jobs = ConnectionPool(
        lambda: connect(dsn),
        driver=DRIVER,
        name="jobs",
        options={"MAX_CONNS": 2, "HOST_MAX_CONNS": 4, "POOL_TIMEOUT": 10},
        host_budget=budget,
    )
    plain = ConnectionPool(lambda: connect(dsn), driver=DRIVER, name="plain")
    neighbour = neighbour_of(budget)
    registry = CollectorRegistry()
    registry.register(PoolCollector(lambda: {"jobs": jobs, "plain": plain}))

    def value(name: str, alias: str = "jobs") -> float | None:
        return metric_values(registry).get((f"django_gevent_pool_{name}", (("alias", alias),)))

    try:
        held = jobs.getconn()
        theirs = [neighbour.take() for _ in range(3)]  # the host's other slots
        assert None not in theirs
        assert value("host_max_connections") == 4
        assert value("host_connections_in_use") == 4, "the whole host's"
        assert value("host_connections_held") == 1, "this process's"
        assert value("host_waits_total") == 0 and value("host_given_back_total") == 0
        with pytest.raises(PoolTimeout):
            jobs.getconn(timeout=0.2)  # a pool slot is free, no host slot is
        assert value("host_waits_total") == 1
        for slot in theirs:
            assert slot is not None
            neighbour.give(slot)
        jobs.putconn(held)  # idle now, and another process of the host wants a slot:
        neighbour.want(True)
        # The slot is freed once the connection is closed, just after it left the pool.
        wait_until(lambda: value("host_connections_held") == 0, what="the idle one given back")
        neighbour.want(False)
        assert value("host_given_back_total") == 1
        assert value("connections") == 0
        # Without a budget: no host gauges, counters at 0.
        plain.putconn(plain.getconn())
        assert value("connections", "plain") == 1
        for name in ("host_max_connections", "host_connections_in_use", "host_connections_held"):
            assert value(name, "plain") is None, name
        assert value("host_waits_total", "plain") == 0
        assert value("host_given_back_total", "plain") == 0
        assert value("host_stepped_aside_total", "plain") == 0
    finally:
        jobs.close()
        plain.close()
    text = generate_latest(registry).decode()
    assert "# HELP django_gevent_pool_host_connections_in_use Slots of the host budget" in text
    assert "# TYPE django_gevent_pool_host_waits_total counter" in text


def test_importing_the_prometheus_module_without_prometheus_client_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "django_gevent_pool.prometheus", raising=False)
    with pytest.raises(ImportError, match=re.escape("pip install django-gevent-pool[prometheus]")):
        importlib.import_module("django_gevent_pool.prometheus")


# ---------------------------------------------------- Server-Timing middleware


def parse_server_timing(header: str) -> tuple[float, int]:
    match = SERVER_TIMING.fullmatch(header)
    assert match, f"malformed Server-Timing: {header!r}"
    return float(match.group(1)), int(match.group(2))


@with_middleware
def test_server_timing_counts_the_wait_of_a_request_behind_a_busy_pool(
    workers: Workers,
) -> None:
    checkouts(tiny_wrapper(), 1)  # the pool exists, its one connection idle
    queued_before = stat(TINY, "requests_queued")
    waited_before = stat(TINY, "requests_wait_ms")

    def hold_until_someone_waits() -> None:
        wrapper = tiny_wrapper()
        wrapper.ensure_connection()
        try:
            wait_until(lambda: stat(TINY, "requests_waiting") >= 1, what="the request to queue")
        finally:
            wrapper.close()

    workers.spawn(hold_until_someone_waits)
    wait_until(lambda: stat(TINY, "pool_in_use") == 1, what="the holder to hold it")
    response = Client().get("/tiny/?n=2")
    workers.join()
    assert workers.errors == []
    assert response.status_code == 200
    duration_ms, count = parse_server_timing(response["Server-Timing"])
    assert count == 2, "two checkouts in the request"
    assert stat(TINY, "requests_queued") == queued_before + 1, "the request really queued"
    waited_ms = stat(TINY, "requests_wait_ms") - waited_before
    assert waited_ms > 0
    assert duration_ms > 0 and duration_ms >= round(waited_ms, 3) - 0.001


@with_middleware
def test_server_timing_counts_the_whole_wait_of_a_checkout_that_timed_out() -> None:
    holder = timing_out_wrapper()
    holder.ensure_connection()  # the pool's only connection, held through the request
    try:
        response = Client(raise_request_exception=False).get("/timeout/")
    finally:
        holder.close()
    assert response.status_code == 500, "PoolTimeout became a server error"
    duration_ms, count = parse_server_timing(response["Server-Timing"])
    assert count == 1, "the failed checkout is counted"
    assert duration_ms >= 300, "with all the time it waited (POOL_TIMEOUT=0.3)"
    assert stat(TIMING_OUT, "requests_timeouts") == 1
    assert stat(TIMING_OUT, "requests_wait_p99_ms") >= 300, "and in the pool's percentiles"


@with_middleware
def test_server_timing_appends_to_an_existing_header_and_counts_each_request() -> None:
    client = Client()
    plain = client.get("/default/")
    assert parse_server_timing(plain["Server-Timing"])[1] == 1
    kept = client.get("/default/?timing=1")
    first, ours = kept["Server-Timing"].split(", ", 1)
    assert first == 'app;dur=1.5;desc="view"'
    assert parse_server_timing(ours)[1] == 1, "a fresh tally per request"


@with_middleware
def test_server_timing_on_a_failing_view_and_cleans_up() -> None:
    response = Client(raise_request_exception=False).get("/fail/")
    assert response.status_code == 500
    assert parse_server_timing(response["Server-Timing"])[1] == 1
    assert timing.current_tally() is None


def test_the_middleware_stops_its_tally_when_the_inner_handler_raises() -> None:
    def explode(request: HttpRequest) -> HttpResponse:
        use_default()
        raise KeyboardInterrupt  # escapes Django's exception-to-response conversion

    middleware = ServerTimingMiddleware(explode)
    with timing.tally_waits() as outer:
        with pytest.raises(KeyboardInterrupt):
            middleware(HttpRequest())
        assert timing.current_tally() is outer, "the tally before the request is back"
        assert outer.checkouts == 0, "the request's checkout went to its own tally"
    assert ServerTimingMiddleware.sync_capable and not ServerTimingMiddleware.async_capable


@with_middleware
def test_server_timing_on_a_streaming_response_counts_until_the_view_returned() -> None:
    response = Client().get("/stream/")
    assert b"".join(response.streaming_content) == b"streamed"  # type: ignore[attr-defined]
    assert parse_server_timing(response["Server-Timing"])[1] == 1, "the body's checkout is later"


def test_without_the_middleware_there_is_no_header_and_no_tally() -> None:
    with override_settings(ROOT_URLCONF=__name__):
        response = Client().get("/default/")
    assert "Server-Timing" not in response
    assert timing.current_tally() is None
