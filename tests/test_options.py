"""Option validation: defaults, pass-through of libpq parameters, and precise refusals."""

from __future__ import annotations

import math

import pytest

from django_gevent_pool import PoolConfigError, PoolOptions


def parse(**options: object) -> tuple[PoolOptions, dict[str, object]]:
    return PoolOptions.from_mapping(options, name="DATABASES['default']")


def test_defaults_match_django_db_geventpool() -> None:
    opts, rest = parse()
    assert opts.MAX_CONNS == 4
    assert opts.reuse_conns == 4
    assert opts.MIN_CONNS == 0
    assert opts.POOL_TIMEOUT == 30.0
    assert opts.MAX_WAITING == 0
    assert opts.MAX_LIFETIME == 3600.0
    assert opts.IDLE_TIMEOUT == 600.0
    assert opts.LEAK_TIMEOUT is None
    assert opts.RESET_QUERY is None
    assert rest == {}


def test_reuse_defaults_to_max_conns() -> None:
    opts, _ = parse(MAX_CONNS=20)
    assert opts.reuse_conns == 20
    opts, _ = parse(MAX_CONNS=20, REUSE_CONNS=10)
    assert opts.reuse_conns == 10
    opts, _ = parse(MAX_CONNS=20, REUSE_CONNS=None)
    assert opts.reuse_conns == 20


def test_libpq_parameters_pass_through_untouched() -> None:
    libpq = {
        "sslmode": "disable",
        "connect_timeout": 5,
        "keepalives": 1,
        "options": "-c statement_timeout=1000",
        "application_name": "shop",
    }
    opts, rest = parse(MAX_CONNS=8, **libpq)
    assert opts.MAX_CONNS == 8
    assert rest == libpq


def test_django_db_geventpool_settings_block_is_accepted() -> None:
    """Its README asks for "pool": False on Django >= 5.1; that must still work."""
    opts, rest = parse(MAX_CONNS=20, REUSE_CONNS=10, pool=False)
    assert (opts.MAX_CONNS, opts.reuse_conns) == (20, 10)
    assert rest == {}


@pytest.mark.parametrize("value", [True, {"min_size": 2}])
def test_django_native_pool_request_is_refused(value: object) -> None:
    with pytest.raises(PoolConfigError, match=r"DATABASES\['default'\]: OPTIONS\['pool'\]"):
        parse(pool=value)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("MAX_CONNS", 0, "an integer >= 1"),
        ("MAX_CONNS", "10", "an integer >= 1"),
        ("MAX_CONNS", True, "an integer >= 1"),
        ("MAX_CONNS", 2.5, "an integer >= 1"),
        ("REUSE_CONNS", -1, "an integer from 0 to 4"),
        ("REUSE_CONNS", 5, "an integer from 0 to 4"),
        ("MIN_CONNS", 5, "an integer from 0 to 4"),
        ("POOL_TIMEOUT", 0, "a number of seconds > 0"),
        ("POOL_TIMEOUT", -1.0, "a number of seconds > 0"),
        ("POOL_TIMEOUT", None, "a number of seconds > 0"),
        ("POOL_TIMEOUT", math.inf, "a number of seconds > 0"),
        ("POOL_TIMEOUT", "30", "a number of seconds > 0"),
        ("MAX_WAITING", -1, "an integer >= 0"),
        ("MAX_LIFETIME", 0, "a number of seconds > 0 or None"),
        ("IDLE_TIMEOUT", math.nan, "a number of seconds > 0 or None"),
        ("PING_AFTER", -0.5, "a number of seconds >= 0 or None"),
        ("LEAK_TIMEOUT", 0, "a number of seconds > 0 or None"),
        ("RESET_QUERY", "", "a non-empty SQL string or None"),
        ("RESET_QUERY", 42, "a non-empty SQL string or None"),
    ],
)
def test_bad_values_name_alias_key_and_allowed(key: str, value: object, allowed: str) -> None:
    with pytest.raises(PoolConfigError) as err:
        parse(**{key: value})
    message = str(err.value)
    assert message.startswith(f"DATABASES['default']: OPTIONS['{key}'] must be {allowed}, got ")
    assert repr(value) in message


def test_min_above_reuse_is_refused() -> None:
    with pytest.raises(PoolConfigError, match=r"MIN_CONNS'\] \(3\) cannot be larger than"):
        parse(MAX_CONNS=4, REUSE_CONNS=2, MIN_CONNS=3)


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("MAX_CONN", "MAX_CONNS"),
        ("max_conns", "MAX_CONNS"),
        ("max_size", "MAX_CONNS"),
        ("pool_recycle", "MAX_LIFETIME"),
        ("CONN_MAX_AGE", "top-level DATABASES key"),
    ],
)
def test_foreign_pool_names_are_refused_with_a_hint(key: str, hint: str) -> None:
    with pytest.raises(PoolConfigError) as err:
        parse(**{key: 10})
    assert f"OPTIONS[{key!r}] is not a django-gevent-pool option" in str(err.value)
    assert hint in str(err.value)


def test_unknown_upper_case_key_is_refused_listing_the_allowed_ones() -> None:
    with pytest.raises(PoolConfigError) as err:
        parse(MAX_CONNECTIONS=10)
    assert "unknown pool option OPTIONS['MAX_CONNECTIONS']" in str(err.value)
    for name in PoolOptions.names():
        assert name in str(err.value)


def test_zero_ping_after_means_always_and_none_means_never() -> None:
    assert parse(PING_AFTER=0)[0].PING_AFTER == 0.0
    assert parse(PING_AFTER=None)[0].PING_AFTER is None
