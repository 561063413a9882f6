"""From raw records to medians, ratios, targets, a terminal table, reStructuredText and a chart.

Every ratio is taken round by round -- a competitor's result divided by the
raw-connection limit measured in the same round, a few seconds apart -- and
the median of those per-round ratios is reported, so slow drifts of a shared
machine cancel out. Noise is the spread of the rounds: (max - min) / median.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchapp.competitors import (
    BY_KEY,
    MICRO_BARE,
    MYSQL_CONFIGS,
    MYSQL_GEVENTPOOL,
    MYSQL_OURS,
    MYSQL_OURS_TRANSACTION,
    MYSQL_VIEWS,
    OURS_PSYCOPG3,
    OURS_TRANSACTION,
    PG_REAL_POOL,
    QUEUE_PER_STATEMENT,
    RAW_PER_QUERY,
    SKEW_CONFIGS,
    SKEW_HOST,
    SKEW_STATIC,
    SLEEP_SECONDS,
    VIEWS,
    WAIT_SECONDS,
)

VIEW_TITLES = {
    "item": "primary key (/item/<pk>/)",
    "sleep": "pg_sleep 50 ms (/sleep/)",
    "tx": "transaction (/tx/)",
    "wait": "query, 50 ms wait on another service, query (/wait/)",
}
MICRO_LABELS = {
    "raw": "raw psycopg2 (limit)",
    MICRO_BARE: "our bare ConnectionPool",
    "ours": "django-gevent-pool (ours, psycopg2)",
    OURS_PSYCOPG3: "django-gevent-pool (ours, psycopg 3)",
    OURS_TRANSACTION: "django-gevent-pool (ours, transaction mode)",
    "django-pool": "Django native pool (psycopg 3)",
    "geventpool": "django-db-geventpool 4.0.8",
    PG_REAL_POOL: "django-pg-real-pool 1.1.0",
    "django-queue": "Django on a bare queue (no pool)",
    QUEUE_PER_STATEMENT: "Django ORM + bare conn. per statement (ref.)",
}

# The targets of the issue.
PK_VS_GEVENTPOOL = 1.3
TX_VS_GEVENTPOOL = 1.3
SLEEP_OF_CEILING = 0.98
MICRO_VS_GEVENTPOOL = 1.4
#: Wait view: ours in transaction mode against the reference (the same ORM view, a
#: bare connection per statement; the raw-SQL one is reported beside it)...
WAIT_OF_REFERENCE = 0.8
#: ... against every pool that lends a connection per request...
WAIT_VS_OTHERS = 3.0
#: ... and ahead of every other one that gives it back per statement or transaction.
WAIT_VS_PER_STATEMENT = 1.0
#: The other competitors that give a connection back per statement or transaction.
PER_STATEMENT_PEERS = (PG_REAL_POOL, "pgbouncer")
#: Transaction mode on the views that hold one connection anyway: at most 5 % below session.
TRANSACTION_OF_SESSION = 0.95
#: Not among the wait view's "every other competitor": the raw limit, the references, itself.
NOT_COMPARED_ON_WAIT = ("raw", RAW_PER_QUERY, QUEUE_PER_STATEMENT, OURS_TRANSACTION)


def label(key: str) -> str:
    """A competitor's name in tables."""
    if key in MICRO_LABELS:
        return MICRO_LABELS[key]
    return BY_KEY[key].label


def median(values: Iterable[float]) -> float:
    """Median of the values (0 for none)."""
    data = list(values)
    return float(statistics.median(data)) if data else 0.0


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, as a fraction (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mid = median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


# ------------------------------------------------------------------ summary


def _optional_median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    data = [v for v in values if v is not None]
    return median(data) if data else None


def pool_counters(mine: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Our pool's counters during one view's measurements (None: not ours, or not reported).

    ``checkouts_per_request``: pool checkouts over the requests the workers
    began in the same window (median of the rounds). The other counters are
    summed over the rounds.
    """
    rows = [r for r in mine if r.get("pool")]
    if not rows:
        return None
    per_request = [
        r["pool"].get("requests_num", 0.0) / r["pool"]["served"]
        for r in rows
        if r["pool"].get("served")
    ]
    totals: dict[str, float] = {}
    for row in rows:
        for name, value in row["pool"].items():
            if "_max_" in name or "_wait_p" in name:
                totals[name] = max(totals.get(name, 0.0), value)
            else:
                totals[name] = totals.get(name, 0.0) + value
    return {"checkouts_per_request": median(per_request), **totals}


def summarize(
    records: list[dict[str, Any]],
    config: dict[str, Any],
    skipped: dict[str, str] | None = None,
    mysql: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Medians, spreads and per-round ratios to ``raw``, by scenario, view and competitor."""
    http: dict[str, dict[str, Any]] = {}
    for view in VIEWS:
        rows = [r for r in records if r["scenario"] == "http" and r["view"] == view]
        raw_by_round = {r["round"]: r["rps"] for r in rows if r["competitor"] == "raw"}
        per_competitor: dict[str, Any] = {}
        for key in dict.fromkeys(r["competitor"] for r in rows):
            mine = [r for r in rows if r["competitor"] == key]
            rps = [r["rps"] for r in mine]
            ratios = [
                r["rps"] / raw_by_round[r["round"]] for r in mine if raw_by_round.get(r["round"])
            ]
            per_competitor[key] = {
                "label": label(key),
                "rounds": len(mine),
                "clients": mine[0]["clients"],
                "rps": median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "spread": spread(rps),
                "ratio_to_raw": median(ratios) if ratios else None,
                "p50_ms": median(r["p50_ms"] for r in mine),
                "p99_ms": median(r["p99_ms"] for r in mine),
                "p99_ms_max": max(r["p99_ms"] for r in mine),
                "errors": sum(r["errors"] for r in mine),
                "non2xx": sum(r["non2xx"] for r in mine),
                "socket_errors": sum(r["socket_errors"] for r in mine),
                "busy_share": median(r["busy_share"] for r in mine if r["busy_share"] is not None),
                "peak_server_conns": max(r["peak_total"] for r in mine),
                "peak_per_worker": (
                    None if BY_KEY[key].pgbouncer else max(r["peak_per_worker"] for r in mine)
                ),
                "pool": pool_counters(mine),
            }
        http[view] = per_competitor
    micro_rows = [r for r in records if r["scenario"] == "micro"]
    raw_micro = {r["round"]: r["query_ops_per_s"] for r in micro_rows if r["competitor"] == "raw"}
    raw_uncontended = {
        r["round"]: r["uncontended_ops_per_s"] for r in micro_rows if r["competitor"] == "raw"
    }
    micro: dict[str, Any] = {}
    for key in dict.fromkeys(r["competitor"] for r in micro_rows):
        mine = [r for r in micro_rows if r["competitor"] == key]
        ops = [r["query_ops_per_s"] for r in mine]
        ratios = [
            r["query_ops_per_s"] / raw_micro[r["round"]] for r in mine if raw_micro.get(r["round"])
        ]
        overhead = [
            1e6 / r["query_ops_per_s"] - 1e6 / raw_micro[r["round"]]
            for r in mine
            if raw_micro.get(r["round"]) and r["query_ops_per_s"]
        ]
        uncontended = [r["uncontended_ops_per_s"] for r in mine]
        uncontended_ratios = [
            r["uncontended_ops_per_s"] / raw_uncontended[r["round"]]
            for r in mine
            if raw_uncontended.get(r["round"])
        ]
        micro[key] = {
            "label": label(key),
            "rounds": len(mine),
            "uncontended_ops_per_s": median(uncontended),
            "uncontended_ratio_to_raw": median(uncontended_ratios) if uncontended_ratios else None,
            "ops_per_s": median(ops),
            "ops_min": min(ops),
            "ops_max": max(ops),
            "spread": spread(ops),
            "ratio_to_raw": median(ratios) if ratios else None,
            "us_per_op": 1e6 / median(ops) if median(ops) else None,
            "overhead_us_vs_raw": median(overhead) if overhead else None,
            "noop_us": median(r["noop_us"] for r in mine),
            "noop_spread": spread([r["noop_us"] for r in mine]),
            "statement_us": _optional_median(r.get("statement_us") for r in mine),
            "statement_busy_us": _optional_median(r.get("statement_busy_us") for r in mine),
            "released_us": _optional_median(r.get("released_us") for r in mine),
            "held_us": _optional_median(r.get("held_us") for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "peak_server_conns": max(r["peak_total"] for r in mine),
        }
    mysql_found = mysql_summary(records, mysql or {})
    spreads = [c["spread"] for v in http.values() for c in v.values()] + [
        c["spread"] for c in micro.values()
    ]
    spreads += [
        c["spread"]
        for v in mysql_found.get("views", {}).values()
        for c in v["competitors"].values()
    ]
    server_sleep = [r["sleep_rps"] for r in records if r["scenario"] == "server"]
    return {
        "http": http,
        "micro": micro,
        "psycopg3": psycopg3_comparison(http, micro),
        "pool_mode": pool_mode_comparison(http, micro, config["workers"]),
        "skewed": skewed_summary(records),
        "mysql": mysql_found,
        "skipped": dict(skipped or {}),
        "sleep_ceiling_rps": config["workers"] * config["max_conns"] / SLEEP_SECONDS,
        # What a pool lending one connection per request can serve on /wait/ at most.
        "wait_session_ceiling_rps": config["workers"] * config["max_conns"] / WAIT_SECONDS,
        "sleep_server_rps": median(server_sleep) if server_sleep else None,
        "noise": {
            "median_spread": median(spreads),
            "max_spread": max(spreads, default=0.0),
        },
    }


#: Ours on psycopg 3 against: Django's native pool (same driver), ours on psycopg2.
PSYCOPG3_BASELINES = ("django-pool", "ours")


def _ratio_of(records: dict[str, Any], a: str, b: str, field: str = "ratio_to_raw") -> float | None:
    ra = records.get(a, {}).get(field)
    rb = records.get(b, {}).get(field)
    if not ra or not rb:
        return None
    return float(ra / rb)


def psycopg3_comparison(http: dict[str, Any], micro: dict[str, Any]) -> dict[str, Any]:
    """Ours on psycopg 3 divided by each of PSYCOPG3_BASELINES, per view and micro loop.

    Throughput ratios are taken through the raw limit of each round (as every
    ratio here), so > 1 means ours on psycopg 3 served more; p99 ratios are of
    the medians, so < 1 means ours on psycopg 3 answered faster. Empty when
    ours on psycopg 3 was not run.
    """
    out: dict[str, Any] = {}
    for base in PSYCOPG3_BASELINES:
        rows: dict[str, Any] = {}
        for view in VIEWS:
            results = http.get(view, {})
            if OURS_PSYCOPG3 in results and base in results:
                rows[view] = {
                    "throughput": _ratio_of(results, OURS_PSYCOPG3, base),
                    "p99": _ratio_of(results, OURS_PSYCOPG3, base, "p99_ms"),
                }
        if OURS_PSYCOPG3 in micro and base in micro:
            rows["micro"] = {
                "throughput": _ratio_of(micro, OURS_PSYCOPG3, base),
                "uncontended": _ratio_of(micro, OURS_PSYCOPG3, base, "uncontended_ratio_to_raw"),
                "noop_us": _ratio_of(micro, OURS_PSYCOPG3, base, "noop_us"),
            }
        if rows:
            out[base] = rows
    return out


def psycopg3_lines(summary: dict[str, Any]) -> list[str]:
    """The psycopg 3 comparison as one line per baseline (none if not measured)."""

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = []
    for base, rows in summary.get("psycopg3", {}).items():
        parts = [
            f"{view} {fmt(row['throughput'])} req/s, p99 {fmt(row['p99'])}"
            for view, row in rows.items()
            if view != "micro"
        ]
        if "micro" in rows:
            row = rows["micro"]
            parts.append(
                f"micro {fmt(row['throughput'])} ops/s, uncontended {fmt(row['uncontended'])}, "
                f"checkout+return {fmt(row['noop_us'])} us"
            )
        lines.append(f"ours on psycopg 3 / {label(base)}: " + "; ".join(parts))
    return lines


def _versus(results: dict[str, Any], a: str, b: str) -> float | None:
    """``a`` / ``b`` in throughput: through the raw limit of each round when both have it."""
    through_raw = _ratio_of(results, a, b)
    if through_raw is not None:
        return through_raw
    return _ratio_of(results, a, b, "rps")


def pool_mode_comparison(
    http: dict[str, Any], micro: dict[str, Any], workers: int = 1
) -> dict[str, Any]:
    """Ours in transaction mode against ours in session mode (psycopg2 both).

    Per view: throughput (through the raw limit of each round) and p99,
    transaction / session, and the pool checkouts per request of each mode.
    Micro: microseconds per ORM statement of each mode, their ratio and the
    difference (the checkout + return transaction mode adds to a statement).
    ``wait_gap``: on /wait/, where both are CPU-bound, the worker time per
    request (workers / throughput) of the raw-SQL reference, of the ORM one
    (``orm_reference_ms``, when run) and of transaction mode,
    and the share of the difference that the checkout + return around each
    statement (micro, side by side) accounts for. Empty when ours in
    transaction mode was not run.
    """
    out: dict[str, Any] = {}
    for view in VIEWS:
        results = http.get(view, {})
        if OURS_TRANSACTION not in results:
            continue
        row: dict[str, Any] = {
            "transaction_rps": results[OURS_TRANSACTION]["rps"],
            "transaction_checkouts_per_request": (results[OURS_TRANSACTION]["pool"] or {}).get(
                "checkouts_per_request"
            ),
        }
        if "ours" in results:
            row.update(
                session_rps=results["ours"]["rps"],
                throughput=_versus(results, OURS_TRANSACTION, "ours"),
                p99=_ratio_of(results, OURS_TRANSACTION, "ours", "p99_ms"),
                session_checkouts_per_request=(results["ours"]["pool"] or {}).get(
                    "checkouts_per_request"
                ),
            )
        out[view] = row
    session, transaction = micro.get("ours", {}), micro.get(OURS_TRANSACTION, {})
    for loop in ("statement_us", "statement_busy_us"):
        a, b = session.get(loop), transaction.get(loop)
        if a and b:
            out.setdefault("micro", {})[loop] = {
                "session": a,
                "transaction": b,
                "ratio": b / a,
                "added_us": b - a,
            }
    # In one process, side by side: each statement given back, or held in atomic().
    for mode, row in (("transaction", transaction), ("session", session)):
        held, released = row.get("held_us"), row.get("released_us")
        if held and released:
            out.setdefault("micro", {}).setdefault("interleaved", {})[mode] = {
                "held": held,
                "released": released,
                "ratio": released / held,
                "added_us": released - held,
            }
    wait = http.get("wait", {})
    mine, reference = wait.get(OURS_TRANSACTION), wait.get(RAW_PER_QUERY)
    side_by_side = out.get("micro", {}).get("interleaved", {}).get("transaction")
    if mine and reference and mine["rps"] and reference["rps"]:
        gap = {
            "reference_ms": workers * 1000 / reference["rps"],
            "transaction_ms": workers * 1000 / mine["rps"],
        }
        statements = (mine["pool"] or {}).get("checkouts_per_request")
        if side_by_side and statements:
            gap["checkouts_ms"] = statements * side_by_side["added_us"] / 1000
            gap["statements"] = statements
        orm = wait.get(QUEUE_PER_STATEMENT)
        if orm and orm["rps"]:
            gap["orm_reference_ms"] = workers * 1000 / orm["rps"]
        out["wait_gap"] = gap
    return out


def pool_mode_lines(summary: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Transaction mode against session mode, in a few lines (none if not measured)."""
    found = summary.get("pool_mode", {})
    lines = []
    micro = found.get("micro", {})
    for loop, how in (
        ("statement_us", "one greenlet"),
        ("statement_busy_us", f"{config['max_conns']} greenlets, the process busy"),
    ):
        if loop in micro:
            row = micro[loop]
            lines.append(
                f"micro, one ORM pk lookup through Django ({how}): session {row['session']:.1f}"
                f" us, transaction {row['transaction']:.1f} us per statement = "
                f"{row['ratio']:.2f}x ({row['added_us']:+.1f} us; the two modes in two "
                "processes, one after the other)"
            )
    side_by_side = micro.get("interleaved", {})
    if "transaction" in side_by_side:
        row = side_by_side["transaction"]
        line = (
            "micro, the same statement in one greenlet, interleaved, medians: transaction mode "
            f"{row['released']:.1f} us given back after each, {row['held']:.1f} us held in "
            f"atomic() = {row['ratio']:.2f}x ({row['added_us']:+.1f} us per checkout + return)"
        )
        if "session" in side_by_side:
            line += f"; session mode, the control: {side_by_side['session']['added_us']:+.1f} us"
        lines.append(line)
    per_query = [
        f"{name} {summary['micro'][key]['statement_us']:.1f} us"
        for key, name in (
            ("raw", "from a plain queue (the reference's way)"),
            (MICRO_BARE, "from our bare pool"),
        )
        if summary["micro"].get(key, {}).get("statement_us")
    ]
    through_django = summary["micro"].get(OURS_TRANSACTION, {}).get("statement_us")
    if per_query and through_django:
        lines.append(
            "micro, one pk lookup in one greenlet, its SQL on a connection taken for it alone: "
            + ", ".join(per_query)
            + f"; through the ORM in transaction mode {through_django:.1f} us"
        )
    gap = found.get("wait_gap")
    if gap:
        difference = gap["transaction_ms"] - gap["reference_ms"]
        line = (
            f"wait view, worker time per request ({config['workers']} / throughput, both "
            f"CPU-bound): raw-SQL reference {gap['reference_ms']:.2f} ms, transaction mode "
            f"{gap['transaction_ms']:.2f} ms ({difference:+.2f} ms)"
        )
        if "orm_reference_ms" in gap:
            line += (
                f"; the same ORM view on a bare connection per statement "
                f"{gap['orm_reference_ms']:.2f} ms"
            )
        if "checkouts_ms" in gap:
            line += (
                f"; the checkout + return around its {gap['statements']:.2f} statements "
                f"(micro, side by side) is about {gap['checkouts_ms']:.2f} ms of it, the rest "
                "is what the raw-SQL reference does not run: the ORM, Django's cursor and "
                "connection handling, the rest of our backend"
            )
        lines.append(line)
    parts = []
    for view in VIEWS:
        row = found.get(view)
        if not row:
            continue
        text = f"{view} {row['transaction_rps']:.0f} req/s"
        if row.get("throughput") is not None:
            text += f" = {row['throughput']:.3f}x session's {row['session_rps']:.0f}"
        if row.get("p99") is not None:
            text += f" (p99 {row['p99']:.2f}x)"
        parts.append(text)
    if parts:
        lines.append("ours, transaction mode / session mode: " + "; ".join(parts))
    checkouts = []
    for view in VIEWS:
        row = found.get(view)
        if not row or row.get("transaction_checkouts_per_request") is None:
            continue
        text = f"{view} {row['transaction_checkouts_per_request']:.2f}"
        if row.get("session_checkouts_per_request") is not None:
            text += f" (session {row['session_checkouts_per_request']:.2f})"
        checkouts.append(text)
    if checkouts:
        lines.append("pool checkouts per request, transaction mode: " + "; ".join(checkouts))
    pins: dict[str, float] = {}
    for view in VIEWS:
        pool = summary["http"].get(view, {}).get(OURS_TRANSACTION, {}).get("pool") or {}
        for name, value in pool.items():
            if name.startswith("pins_") and value:
                pins[f"{view} {name[5:]}"] = value
    if found and any(view in found for view in VIEWS):
        lines.append(
            "transaction mode, connections pinned to a request (session state): "
            + (", ".join(f"{k} {v:.0f}" for k, v in pins.items()) or "none")
        )
    return lines


def skipped_lines(summary: dict[str, Any]) -> list[str]:
    """Competitors (and the mysql scenario) left out of the run, and why."""
    lines = [f"{key} skipped: {why}" for key, why in summary.get("skipped", {}).items()]
    why = ((summary.get("mysql") or {}).get("server") or {}).get("skipped")
    if why:
        lines.append(f"mysql scenario skipped: {why}")
    return lines


# ------------------------------------------------------------------ skewed


def _timeout_share(served: float, timeouts: float) -> float:
    return timeouts / (served + timeouts) if served + timeouts else 0.0


def _phase_summary(rows: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    """One configuration's phase over the rounds: medians of rates, sums of counts."""
    out: dict[str, Any] = {"rounds": len(rows)}
    groups = ("busy", "light") if phase == "skewed" else ("even",)
    for group in groups:
        tallies = [r["groups"].get(group, {}) for r in rows]
        served = sum(t.get("served", 0) for t in tallies)
        timeouts = sum(t.get("timeouts", 0) for t in tallies)
        out[group] = {
            "rps": median(t.get("rps", 0.0) for t in tallies),
            "p50_ms": _optional_median(t.get("p50_ms") for t in tallies),
            "p99_ms": _optional_median(t.get("p99_ms") for t in tallies),
            "served": served,
            "timeouts": timeouts,
            "timeout_share": _timeout_share(served, timeouts),
            "errors": sum(t.get("errors", 0) for t in tallies),
        }
    pools = [w for r in rows for w in r["pool"].values()]
    out["pool"] = {
        name: sum(w.get(name, 0.0) for w in pools)
        for name in (
            "requests_timeouts",
            "host_waits",
            "host_given_back",
            "connections_num",
            "connections_closed",
        )
    }
    out["peak_server_conns"] = max(r["peak_total"] for r in rows)
    out["peak_per_worker"] = max(max(r["peak_per_worker"].values(), default=0) for r in rows)
    if phase == "even":
        spreads = []
        for row in rows:
            served = [w["served"] for w in row["workers"].values()]
            spreads.append(min(served) / max(served) if served and max(served) else 0.0)
        out["min_max"] = median(spreads)
        out["min_max_worst"] = min(spreads, default=0.0)
        out["per_worker_served"] = [
            sorted(w["served"] for w in row["workers"].values()) for row in rows
        ]
    return out


def skewed_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The skewed scenario: each configuration per phase, and host budget / static split.

    Ratios are taken round by round (the two configurations run one after the
    other in each round) and the median reported: throughput > 1 and p99 < 1
    mean the host budget did better. Empty when the scenario was not run.
    """
    rows = [r for r in records if r["scenario"] == "skewed"]
    if not rows:
        return {}
    first = rows[0]
    out: dict[str, Any] = {
        "setup": {
            "workers": first["worker_count"],
            "budget": first["budget"],
            "pool_timeout": first["pool_timeout"],
            "plans": {r["phase"]: r["plan"] for r in rows},
        },
        "configs": {},
    }
    for key in (SKEW_STATIC, SKEW_HOST):
        mine = [r for r in rows if r["competitor"] == key]
        if mine:
            out["configs"][key] = {
                "label": SKEW_CONFIGS[key].label,
                "max_conns": mine[0]["max_conns"],
                "host_max_conns": mine[0]["host_max_conns"],
                **{
                    phase: _phase_summary([r for r in mine if r["phase"] == phase], phase)
                    for phase in ("skewed", "even")
                    if any(r["phase"] == phase for r in mine)
                },
            }
    ratios: dict[str, list[float]] = {}
    for round_no in sorted({r["round"] for r in rows}):
        for phase, group in (("skewed", "busy"), ("skewed", "light"), ("even", "even")):
            pair = {
                r["competitor"]: r["groups"].get(group, {})
                for r in rows
                if r["round"] == round_no and r["phase"] == phase
            }
            static, host = pair.get(SKEW_STATIC), pair.get(SKEW_HOST)
            if not static or not host:
                continue
            for field in ("rps", "p50_ms", "p99_ms"):
                if static.get(field) and host.get(field) is not None:
                    ratios.setdefault(f"{group}_{field}", []).append(host[field] / static[field])
    out["host_over_static"] = {name: median(values) for name, values in ratios.items()}
    return out


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


SKEW_HEADER = (
    "configuration",
    "MAX_CONNS",
    "busy req/s",
    "busy p50 ms",
    "busy p99 ms",
    "busy timeouts",
    "light p99 ms",
    "light timeouts",
    "even req/s",
    "even p99 ms",
    "even timeouts",
    "per worker min/max",
    "server conns",
)


def _fmt_timeouts(group: dict[str, Any]) -> str:
    if not group:
        return "-"
    return f"{group['timeouts']} ({group['timeout_share'] * 100:.0f}%)"


def skewed_rows(found: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per configuration of the skewed scenario."""
    rows = []
    for row in found["configs"].values():
        skewed, even = row.get("skewed", {}), row.get("even", {})
        busy, light = skewed.get("busy", {}), skewed.get("light", {})
        all_even = even.get("even", {})

        peak = max(skewed.get("peak_server_conns", 0), even.get("peak_server_conns", 0))
        rows.append(
            (
                row["label"],
                str(row["max_conns"]),
                f"{busy.get('rps', 0):.0f}",
                _fmt_ms(busy.get("p50_ms")),
                _fmt_ms(busy.get("p99_ms")),
                _fmt_timeouts(busy),
                _fmt_ms(light.get("p99_ms")),
                _fmt_timeouts(light),
                f"{all_even.get('rps', 0):.0f}",
                _fmt_ms(all_even.get("p99_ms")),
                _fmt_timeouts(all_even),
                "-" if "min_max" not in even else f"{even['min_max']:.2f}",
                str(peak),
            )
        )
    return rows


def skewed_title(found: dict[str, Any], config: dict[str, Any]) -> str:
    """What the skewed scenario ran, in one sentence."""
    setup = found["setup"]
    workers, budget = setup["workers"], setup["budget"]
    return (
        f"skewed load: {workers} gunicorn workers sharing {budget} server connections, "
        f"POOL_TIMEOUT={setup['pool_timeout']:g} s, /skewed/ = pg_sleep({SLEEP_SECONDS}) on a "
        f"pooled connection; skewed phase: {config.get('skew_busy_clients', '?')} closed-loop "
        f"keep-alive clients pinned to one worker, one client per other worker sending a "
        f"request every {config.get('skew_light_pace', '?'):g} s (light); even phase, right "
        f"after: {config.get('skew_even_clients', '?')} clients pinned to each worker; "
        f"{config.get('skew_seconds', '?'):g} s measured per phase after "
        f"{config.get('skew_warmup', '?'):g} s of warm-up; every worker starts with "
        f"{budget // workers} connections open"
    )


def skewed_lines(found: dict[str, Any]) -> list[str]:
    """Host budget / static split, and the checks, as lines."""
    ratios = found.get("host_over_static", {})
    lines = []

    def fmt(name: str) -> str:
        value = ratios.get(name)
        return "-" if value is None else f"{value:.2f}x"

    if ratios:
        lines.append(
            "host budget / static split, same round (medians): busy worker "
            f"{fmt('busy_rps')} req/s, p50 {fmt('busy_p50_ms')}, p99 {fmt('busy_p99_ms')}; "
            f"light workers p99 {fmt('light_p99_ms')}; even phase {fmt('even_rps')} req/s, "
            f"p99 {fmt('even_p99_ms')}"
        )
    budget = found["setup"]["budget"]
    for key, row in found["configs"].items():
        peaks = [row[p]["peak_server_conns"] for p in ("skewed", "even") if p in row]
        pool = [row[p]["pool"] for p in ("skewed", "even") if p in row]
        line = (
            f"{row['label']}: peak server connections {max(peaks, default=0)} "
            f"(budget {budget}: {'kept' if max(peaks, default=0) <= budget else 'EXCEEDED'}); "
            f"pool timeouts counted by the workers {sum(p['requests_timeouts'] for p in pool):.0f}"
        )
        if key == SKEW_HOST:
            line += (
                f", host waits {sum(p['host_waits'] for p in pool):.0f}, idle connections "
                f"given back {sum(p['host_given_back'] for p in pool):.0f}, connections "
                f"opened {sum(p['connections_num'] for p in pool):.0f}"
            )
        even = row.get("even")
        if even:
            served = " ; ".join("/".join(str(n) for n in r) for r in even["per_worker_served"])
            line += (
                f"; even phase, requests served per worker (each round) {served}: min/max "
                f"{even['min_max']:.2f} (worst round {even['min_max_worst']:.2f})"
            )
        lines.append(line)
    return lines


# ------------------------------------------------------------------ mysql

#: The mysql scenario's pk-view target: ours against django-mysql-geventpool.
MYSQL_VS_GEVENTPOOL = 1.0
MYSQL_TARGET = "mysql pk view"
#: The mysql scenario's wait-view target: ours in transaction mode against every
#: pool lending a connection per request (all the other MySQL competitors), and
#: above the most any of them could serve (workers x MAX_CONNS / the wait). Not
#: PostgreSQL's 3x: on pure-Python PyMySQL the worker's CPU per request is the
#: bound there (session mode alone costs more than 3x would leave), while what
#: the pool decides, holding no connection through the wait, shows in passing
#: the per-request ceiling.
MYSQL_WAIT_VS_OTHERS = 1.5
MYSQL_WAIT_TARGET = "mysql wait view, transaction mode"
#: The targets of the mysql scenario (a run of that scenario alone shows only these).
MYSQL_TARGETS = (MYSQL_TARGET, MYSQL_WAIT_TARGET)
#: Per view, the competitor of ours the others are divided by ("ours / it"): the
#: first of these that ran. Session mode on the pk view (what it is compared
#: with django-mysql-geventpool in), transaction mode on the wait view.
MYSQL_LEADS = {
    "item": (MYSQL_OURS, MYSQL_OURS_TRANSACTION),
    "wait": (MYSQL_OURS_TRANSACTION, MYSQL_OURS),
}
MYSQL_MODES = {MYSQL_OURS: "session mode", MYSQL_OURS_TRANSACTION: "transaction mode"}
#: How the ratio columns name the competitor of ours the others are divided by.
MYSQL_SHORT = {MYSQL_OURS: "ours", MYSQL_OURS_TRANSACTION: "ours tx"}


def mysql_summary(records: list[dict[str, Any]], server: dict[str, Any]) -> dict[str, Any]:
    """The ``mysql`` scenario, per view: medians per competitor, and ours / each other one.

    Empty when the scenario was not asked for; only ``server`` (with
    ``skipped``, the reason) when it was skipped. ``views`` maps each view
    measured to its competitors (``competitors``), the competitor of ours the
    others are divided by (``ours``: see ``MYSQL_LEADS``) and the ratios
    (``ours_vs``). Ratios are taken round by round (ours and the other
    competitor a few seconds apart in the same round), then the median:
    ``rps`` > 1 and ``p99`` < 1 mean ours better.
    """
    if not server:
        return {}
    rows = [r for r in records if r["scenario"] == "mysql"]
    views: dict[str, Any] = {}
    for view in MYSQL_VIEWS:
        # Records of the first version of the scenario carry the pk view only.
        mine = [r for r in rows if r.get("view", "item") == view]
        if mine:
            views[view] = _mysql_view_summary(view, mine)
    return {"server": server, "views": views}


def _mysql_view_summary(view: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One view of the mysql scenario: medians per competitor, the lead's ratios to the others."""
    competitors: dict[str, Any] = {}
    for key in (k for k in MYSQL_CONFIGS if any(r["competitor"] == k for r in rows)):
        mine = [r for r in rows if r["competitor"] == key]
        rps = [r["rps"] for r in mine]
        competitors[key] = {
            "label": MYSQL_CONFIGS[key].label,
            "user": mine[0]["user"],
            "rounds": len(mine),
            "clients": mine[0]["clients"],
            "rps": median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "spread": spread(rps),
            "p50_ms": median(r["p50_ms"] for r in mine),
            "p99_ms": median(r["p99_ms"] for r in mine),
            "p99_ms_max": max(r["p99_ms"] for r in mine),
            "errors": sum(r["errors"] for r in mine),
            "non2xx": sum(r["non2xx"] for r in mine),
            "socket_errors": sum(r["socket_errors"] for r in mine),
            "busy_share": _optional_median(r["busy_share"] for r in mine),
            "peak_server_conns": max(r["peak_total"] for r in mine),
            "peak_life": max(r["peak_life"] for r in mine),
            "pool": pool_counters(mine),
        }
    lead = next((k for k in MYSQL_LEADS[view] if k in competitors), None)
    ours = {r["round"]: r for r in rows if r["competitor"] == lead}
    ratios: dict[str, Any] = {}
    for key in competitors:
        if key == lead:
            continue
        pairs = [
            (ours[r["round"]], r) for r in rows if r["competitor"] == key and r["round"] in ours
        ]
        rps = [a["rps"] / b["rps"] for a, b in pairs if b["rps"]]
        p99 = [a["p99_ms"] / b["p99_ms"] for a, b in pairs if b["p99_ms"]]
        ratios[key] = {
            "rps": median(rps) if rps else None,
            "rps_rounds": rps,
            "p99": median(p99) if p99 else None,
            "p99_rounds": p99,
        }
    return {"ours": lead, "competitors": competitors, "ours_vs": ratios}


def mysql_ran(found: dict[str, Any]) -> bool:
    """Did the mysql scenario measure anything (``found``: the summary's ``mysql``)?"""
    return any(v.get("competitors") for v in (found.get("views") or {}).values())


def mysql_header(found: dict[str, Any], view: str) -> tuple[str, ...]:
    """The header of one view's mysql table: ``ours`` named by its mode in the ratio columns."""
    ours = MYSQL_SHORT.get(found["views"][view]["ours"], "ours")
    return (
        "competitor",
        "clients",
        "req/s",
        "spread",
        "p50 ms",
        "p99 ms",
        "errors",
        "server conns",
        "busy",
        f"{ours} / it, req/s",
        f"{ours} / it, p99",
    )


def mysql_rows(found: dict[str, Any], view: str) -> list[tuple[str, ...]]:
    """One view's mysql table rows, as strings."""
    measured = found["views"][view]
    rows = []
    for key, row in measured["competitors"].items():
        ratio = measured["ours_vs"].get(key, {})
        busy = row["busy_share"]
        lead = key == measured["ours"]
        rows.append(
            (
                row["label"],
                str(row["clients"]),
                f"{row['rps']:.0f}",
                _fmt_spread(row),
                f"{row['p50_ms']:.1f}",
                f"{row['p99_ms']:.1f}",
                str(row["errors"]),
                f"{row['peak_server_conns']} (life {row['peak_life']})",
                "-" if busy is None else f"{busy * 100:.0f}%",
                "-" if lead else _fmt_x(ratio.get("rps")),
                "-" if lead else _fmt_x(ratio.get("p99")),
            )
        )
    return rows


def _fmt_x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _session_ceiling(config: dict[str, Any]) -> float:
    """Wait view: what a pool lending one connection per request can serve at most."""
    return float(config["workers"] * config["max_conns"] / WAIT_SECONDS)


def mysql_title(found: dict[str, Any], config: dict[str, Any], view: str) -> str:
    """One view's mysql table title."""
    server = found["server"]
    version = (server.get("version") or "?").removeprefix("5.5.5-")  # MariaDB's old prefix
    title = (
        f"MySQL: {VIEW_TITLES[view]} from MariaDB/MySQL {version} "
        f"at {server.get('server')}, {plural(config['workers'], 'gevent worker')}, "
        f"MAX_CONNS={config['max_conns']}, all on PyMySQL"
    )
    if view == "wait":
        title += (
            f"; at most {_session_ceiling(config):.0f} req/s for a pool lending a "
            "connection per request"
        )
    return title


def mysql_lines(found: dict[str, Any], view: str, config: dict[str, Any]) -> list[str]:
    """What one view's mysql table columns mean, ours' pool counters, the wait view's budget."""
    measured = found["views"][view]
    lead = measured["ours"]
    lines = [
        "server conns: peak sessions of the competitor's MySQL user in "
        "information_schema.PROCESSLIST (sampled every 20 ms) during the measured run; life: "
        "from its start to the end of this view's run, warm-up included; busy: share of the "
        "sampled session-time not Sleep; "
        + (
            "ours / it: "
            if lead is None
            else f"{MYSQL_SHORT[lead]} / it: ours in {MYSQL_MODES[lead]} divided by it, "
        )
        + "per-round ratios, median (req/s > 1x and p99 < 1x: ours better)",
    ]
    for key, mode in MYSQL_MODES.items():
        pool = measured["competitors"].get(key, {}).get("pool")
        if not pool:
            continue
        pins = {name[5:]: v for name, v in pool.items() if name.startswith("pins_") and v}
        line = (
            f"ours, {mode}: {pool['checkouts_per_request']:.2f} pool checkouts per request, "
            f"{pool.get('requests_timeouts', 0):.0f} checkout timeouts, "
            f"{pool.get('connections_num', 0):.0f} connections opened during the measured runs"
        )
        if key == MYSQL_OURS_TRANSACTION:
            line += ", connections pinned to a request (session state): " + (
                ", ".join(f"{k} {v:.0f}" for k, v in pins.items()) or "none"
            )
        lines.append(line)
    lines += _mysql_wait_budget(measured, config)
    return lines


def _mysql_wait_budget(measured: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Wait view: the lead's worker time per request, and what 3x the best other allows.

    Ours in transaction mode is CPU-bound there (it holds no connection through
    the wait), so ``workers / throughput`` is its CPU per request; serving 3x
    the best pool that lends a connection per request (PostgreSQL's wait
    target) would allow at most ``workers / (3 x its throughput)``: why the
    MySQL target is ``MYSQL_WAIT_VS_OTHERS`` and the per-request ceiling.
    """
    lead = measured["ours"]
    mine = measured["competitors"].get(lead or "")
    others = [r["rps"] for k, r in measured["competitors"].items() if k != lead and r["rps"]]
    if lead != MYSQL_OURS_TRANSACTION or mine is None or not mine["rps"] or not others:
        return []
    workers = config["workers"]
    return [
        f"worker time per request ({workers} / throughput): ours tx "
        f"{workers * 1000 / mine['rps']:.2f} ms; {WAIT_VS_OTHERS:g}x the best pool "
        f"lending a connection per request ({max(others):.0f} req/s) would need at most "
        f"{workers * 1000 / (WAIT_VS_OTHERS * max(others)):.2f} ms"
    ]


def mysql_target(summary: dict[str, Any], config: dict[str, Any]) -> Target:
    """Pk view: ours >= 1x django-mysql-geventpool's req/s, p99 no worse, within MAX_CONNS."""
    found = summary.get("mysql") or {}
    why = (found.get("server") or {}).get("skipped")
    if why:
        return Target(MYSQL_TARGET, None, f"scenario skipped: {why}")
    measured = (found.get("views") or {}).get("item") or {}
    rows = measured.get("competitors", {})
    ours, other = rows.get(MYSQL_OURS), rows.get(MYSQL_GEVENTPOOL)
    ratio = measured.get("ours_vs", {}).get(MYSQL_GEVENTPOOL, {}).get("rps")
    if measured.get("ours") != MYSQL_OURS or ours is None or other is None or ratio is None:
        return Target(MYSQL_TARGET, None, "ours or django-mysql-geventpool not run on the pk view")
    cap = config["workers"] * config["max_conns"]
    passed = (
        ratio >= MYSQL_VS_GEVENTPOOL
        and ours["p99_ms"] <= other["p99_ms"]
        and 0 < ours["peak_life"] <= cap
    )
    return Target(
        MYSQL_TARGET,
        passed,
        f"ours {ours['rps']:.0f} req/s = {ratio:.2f}x django-mysql-geventpool's "
        "(median of the per-round ratios) "
        f"{other['rps']:.0f} (target >= {MYSQL_VS_GEVENTPOOL}x); p99 {ours['p99_ms']:.1f} ms "
        f"vs {other['p99_ms']:.1f} ms (target: no worse); ours at most {ours['peak_life']} "
        f"server connections from start to stop (target <= {cap} = "
        f"{plural(config['workers'], 'worker')} x MAX_CONNS {config['max_conns']}), "
        f"{ours['errors']} errors",
    )


def mysql_wait_target(summary: dict[str, Any], config: dict[str, Any]) -> Target:
    """Wait view: ours in transaction mode past what any per-request pool can serve.

    On MySQL every other competitor lends one per request (ours in session
    mode, django-mysql-geventpool, the stock backend at both ages): ours in
    transaction mode must serve more than their ceiling (workers x MAX_CONNS
    / the wait) and ``MYSQL_WAIT_VS_OTHERS`` times each (per-round ratios of
    req/s, median), within workers x MAX_CONNS sessions over its whole life.
    Its errors are reported.
    """
    name = MYSQL_WAIT_TARGET
    found = summary.get("mysql") or {}
    why = (found.get("server") or {}).get("skipped")
    if why:
        return Target(name, None, f"scenario skipped: {why}")
    measured = (found.get("views") or {}).get("wait") or {}
    rows = measured.get("competitors", {})
    mine = rows.get(MYSQL_OURS_TRANSACTION)
    if mine is None or measured.get("ours") != MYSQL_OURS_TRANSACTION:
        return Target(name, None, _not_run(summary, MYSQL_OURS_TRANSACTION) + " on the wait view")
    ratios = {key: r["rps"] for key, r in measured["ours_vs"].items() if r.get("rps") is not None}
    if not ratios:
        return Target(name, None, "no other competitor measured on the wait view")
    cap = config["workers"] * config["max_conns"]
    ceiling = _session_ceiling(config)
    passed = (
        mine["rps"] > ceiling
        and all(vs >= MYSQL_WAIT_VS_OTHERS for vs in ratios.values())
        and 0 < mine["peak_life"] <= cap
    )
    missing = [k for k in MYSQL_CONFIGS if k not in rows]
    detail = (
        f"ours in transaction mode {mine['rps']:.0f} req/s (p99 {mine['p99_ms']:.1f} ms); "
        f"pools lending a connection per request, at most {ceiling:.0f} "
        f"req/s (workers x MAX_CONNS / {WAIT_SECONDS} s; target: more than that, and >= "
        f"{MYSQL_WAIT_VS_OTHERS}x each, median of the per-round ratios): "
        + ", ".join(
            f"{rows[key]['label']} {rows[key]['rps']:.0f} req/s: {vs:.2f}x"
            for key, vs in ratios.items()
        )
        + (f" ({', '.join(missing)} not run)" if missing else "")
        + f"; at most {mine['peak_life']} server connections from start to stop (target <= "
        f"{cap} = {plural(config['workers'], 'worker')} x MAX_CONNS {config['max_conns']}), "
        f"{mine['errors']} errors"
    )
    return Target(name, passed, detail)


# ------------------------------------------------------------------ targets


@dataclass
class Target:
    """One check of the issue, with what was measured."""

    name: str
    passed: bool | None  # None: could not be measured in this run
    detail: str

    @property
    def verdict(self) -> str:
        """PASS, MISS or N/A."""
        return "N/A" if self.passed is None else ("PASS" if self.passed else "MISS")

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON file."""
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail}


def _ratio_vs(http_view: dict[str, Any], a: str, b: str) -> float | None:
    return _ratio_of(http_view, a, b)


#: The competitor that costs nothing per checkout: Django on a bare gevent queue.
FREE_POOL = "django-queue"


def _ceiling(results: dict[str, Any], of: str = "ours") -> str:
    """How Django on a bare queue did, next to ``of``, both against django-db-geventpool.

    The bare queue is Django's own connect/close work around a checkout that
    costs next to nothing (no checks, no fairness, no accounting): where it
    is no faster than ours, the pool's cost is not what limits the ratio.
    """
    free = results.get(FREE_POOL, {}).get("ratio_to_raw")
    gp = results.get("geventpool", {}).get("ratio_to_raw")
    mine = results.get(of, {}).get("ratio_to_raw")
    if not free or not gp or not mine:
        return ""
    return (
        f"; Django on a bare queue (no pool logic) reached {free / gp:.2f}x, "
        f"ours {mine / free:.2f}x of it"
    )


def targets(summary: dict[str, Any], config: dict[str, Any]) -> list[Target]:
    """The issue's targets, each PASS, MISS or N/A (competitor not run)."""
    http, micro = summary["http"], summary["micro"]
    out: list[Target] = []

    item = http.get("item", {})
    vs = _ratio_vs(item, "ours", "geventpool")
    ours_p99 = item.get("ours", {}).get("p99_ms")
    native_p99 = item.get("django-pool", {}).get("p99_ms")
    if vs is None or ours_p99 is None or native_p99 is None:
        out.append(Target("pk view", None, "ours, django-db-geventpool or Django's pool not run"))
    else:
        out.append(
            Target(
                "pk view",
                vs >= PK_VS_GEVENTPOOL and ours_p99 <= native_p99,
                f"ours/raw {item['ours']['ratio_to_raw']:.3f} = {vs:.2f}x "
                f"django-db-geventpool's {item['geventpool']['ratio_to_raw']:.3f} "
                f"(target >= {PK_VS_GEVENTPOOL}x); p99 {ours_p99:.1f} ms vs Django pool "
                f"{native_p99:.1f} ms (target: no worse){_ceiling(item)}",
            )
        )

    tx = http.get("tx", {})
    vs = _ratio_vs(tx, "ours", "geventpool")
    if vs is None:
        out.append(Target("transaction view", None, "ours or django-db-geventpool not run"))
    else:
        out.append(
            Target(
                "transaction view",
                vs >= TX_VS_GEVENTPOOL,
                f"ours/raw {tx['ours']['ratio_to_raw']:.3f} = {vs:.2f}x "
                f"django-db-geventpool's {tx['geventpool']['ratio_to_raw']:.3f} "
                f"(target >= {TX_VS_GEVENTPOOL}x){_ceiling(tx)}",
            )
        )

    sleep = http.get("sleep", {}).get("ours")
    raw_sleep = http.get("sleep", {}).get("raw")
    ceiling = summary["sleep_ceiling_rps"]
    if sleep is None:
        out.append(Target("sleep view", None, "ours not run"))
    else:
        share = sleep["rps"] / ceiling
        limit = (
            f"; the raw limit reached {raw_sleep['rps'] / ceiling:.3f} of it" if raw_sleep else ""
        )
        server_rps = summary.get("sleep_server_rps")
        if server_rps:
            limit += (
                f"; the server alone, {config['workers'] * config['max_conns']} connections "
                f"doing nothing but pg_sleep({SLEEP_SECONDS}), ran {server_rps:.0f}/s = "
                f"{server_rps / ceiling:.3f} of it, and ours reached "
                f"{sleep['rps'] / server_rps:.3f} of that"
            )
        out.append(
            Target(
                "sleep view",
                share >= SLEEP_OF_CEILING and sleep["errors"] == 0,
                f"{sleep['rps']:.0f} req/s = {share:.3f} of the ceiling {ceiling:.0f} "
                f"(workers x MAX_CONNS / {SLEEP_SECONDS} s; target >= {SLEEP_OF_CEILING}{limit}), "
                f"{sleep['errors']} errors (target 0)",
            )
        )

    ours_m, gp_m = micro.get("ours"), micro.get("geventpool")
    if ours_m is None or gp_m is None or not gp_m["ratio_to_raw"]:
        out.append(Target("micro through Django", None, "ours or django-db-geventpool not run"))
    else:
        vs = ours_m["ratio_to_raw"] / gp_m["ratio_to_raw"]
        out.append(
            Target(
                "micro through Django",
                vs >= MICRO_VS_GEVENTPOOL,
                f"ours {ours_m['ops_per_s']:.0f} ops/s = {vs:.2f}x django-db-geventpool's "
                f"{gp_m['ops_per_s']:.0f} (target >= {MICRO_VS_GEVENTPOOL}x, "
                f"MAX_CONNS={config['max_conns']} both){_ceiling(micro)}",
            )
        )

    out.append(wait_target(summary))
    out += transaction_targets(summary)
    if "mysql" in config["scenarios"]:
        out.append(mysql_target(summary, config))
        out.append(mysql_wait_target(summary, config))

    ours_keys = ("ours", OURS_TRANSACTION)
    peaks = [view[k]["peak_per_worker"] for view in http.values() for k in ours_keys if k in view]
    peaks += [micro[k]["peak_server_conns"] for k in (*ours_keys, MICRO_BARE) if k in micro]
    if not peaks:
        out.append(Target("peak server connections", None, "ours not run"))
    else:
        out.append(
            Target(
                "peak server connections",
                max(peaks) <= config["max_conns"] and max(peaks) > 0,
                f"ours (session and transaction mode): at most {max(peaks)} per process "
                f"(MAX_CONNS={config['max_conns']}), sampled every 20 ms from "
                "pg_stat_activity by application_name",
            )
        )
    return out


def _not_run(summary: dict[str, Any], key: str) -> str:
    why = summary.get("skipped", {}).get(key)
    return f"{key} not run" + (f" ({why})" if why else "")


def wait_target(summary: dict[str, Any]) -> Target:
    """Wait view: ours in transaction mode near the reference and far ahead of everyone else.

    The reference runs the same ORM view on a bare queue, a connection per
    statement (``queue-per-statement``): what Django alone costs when it gives
    its connection back after each statement. The raw-SQL reference (no ORM)
    is reported beside it: the ORM's own CPU is most of the gap to that one.
    The pools that lend a connection per request must be left 3x behind;
    those that give it back per statement or transaction (django-pg-real-pool,
    PgBouncer in transaction mode) must be behind.
    """
    name = "wait view, transaction mode"
    wait = summary["http"].get("wait", {})
    mine = wait.get(OURS_TRANSACTION)
    if mine is None:
        return Target(name, None, _not_run(summary, OURS_TRANSACTION))
    of_reference = _versus(wait, OURS_TRANSACTION, QUEUE_PER_STATEMENT)
    if of_reference is None:
        return Target(name, None, _not_run(summary, QUEUE_PER_STATEMENT))
    measured = {
        key: vs
        for key in wait
        if key not in NOT_COMPARED_ON_WAIT
        and (vs := _versus(wait, OURS_TRANSACTION, key)) is not None
    }
    per_request = {k: vs for k, vs in measured.items() if k not in PER_STATEMENT_PEERS}
    per_statement = {k: vs for k, vs in measured.items() if k in PER_STATEMENT_PEERS}
    passed = (
        of_reference >= WAIT_OF_REFERENCE
        and all(vs >= WAIT_VS_OTHERS for vs in per_request.values())
        and all(vs >= WAIT_VS_PER_STATEMENT for vs in per_statement.values())
    )
    detail = (
        f"ours in transaction mode {mine['rps']:.0f} req/s = {of_reference:.3f} of the "
        f"reference's {wait[QUEUE_PER_STATEMENT]['rps']:.0f} (the same ORM view, a bare "
        f"connection per statement; target >= {WAIT_OF_REFERENCE})"
    )
    raw_sql = _versus(wait, OURS_TRANSACTION, RAW_PER_QUERY)
    if raw_sql is not None:
        detail += (
            f"; {raw_sql:.3f} of the raw-SQL reference's {wait[RAW_PER_QUERY]['rps']:.0f} "
            "(no ORM: no target)"
        )
    for group, target, what in (
        (per_request, WAIT_VS_OTHERS, "pools lending a connection per request"),
        (per_statement, WAIT_VS_PER_STATEMENT, "per statement or transaction"),
    ):
        if group:
            detail += f"; {what}: target >= {target}x each: " + ", ".join(
                f"{key} {vs:.2f}x" for key, vs in group.items()
            )
    if not measured:
        detail += "; no other competitor in this run"
    detail += f"; {mine['errors']} errors"
    return Target(name, passed, detail)


def transaction_targets(summary: dict[str, Any]) -> list[Target]:
    """pk, sleep and tx views: transaction mode no more than 5 % below session mode."""
    out = []
    for view in ("item", "sleep", "tx"):
        name = f"{'pk' if view == 'item' else view} view, transaction vs session mode"
        results = summary["http"].get(view, {})
        missing = [k for k in (OURS_TRANSACTION, "ours") if k not in results]
        if missing:
            out.append(Target(name, None, "; ".join(_not_run(summary, k) for k in missing)))
            continue
        vs = _versus(results, OURS_TRANSACTION, "ours")
        if vs is None:
            out.append(Target(name, None, "no throughput measured"))
            continue
        mine, session = results[OURS_TRANSACTION], results["ours"]
        out.append(
            Target(
                name,
                vs >= TRANSACTION_OF_SESSION,
                f"transaction {mine['rps']:.0f} req/s = {vs:.3f}x session's "
                f"{session['rps']:.0f} (target >= {TRANSACTION_OF_SESSION}: within "
                f"{(1 - TRANSACTION_OF_SESSION) * 100:.0f} %); p99 {mine['p99_ms']:.1f} ms vs "
                f"{session['p99_ms']:.1f} ms",
            )
        )
    return out


# ------------------------------------------------------------------ tables


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_spread(row: dict[str, Any]) -> str:
    return "-" if row["rounds"] < 2 else f"{row['spread'] * 100:.0f}%"


def plural(n: int, noun: str) -> str:
    """``1 round``, ``3 rounds``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _rounds(n: int) -> str:
    return plural(n, "round")


def _fmt_peak(row: dict[str, Any]) -> str:
    per_worker = row["peak_per_worker"]
    if per_worker is None:
        return f"{row['peak_server_conns']} (bouncer)"
    return f"{row['peak_server_conns']} ({per_worker}/w)"


HTTP_HEADER = (
    "competitor",
    "clients",
    "req/s",
    "spread",
    "x raw",
    "p50 ms",
    "p99 ms",
    "errors",
    "server conns",
    "busy",
)
MICRO_HEADER = (
    "competitor",
    "ops/s",
    "spread",
    "x raw",
    "us/op over raw",
    "uncontended ops/s",
    "x raw",
    "checkout+return us",
    "stmt us",
    "stmt us busy",
    "errors",
    "server conns",
)


def http_rows(summary: dict[str, Any], view: str) -> list[tuple[str, ...]]:
    """One view's table rows, as strings."""
    rows = []
    for row in summary["http"].get(view, {}).values():
        rows.append(
            (
                row["label"],
                str(row["clients"]),
                f"{row['rps']:.0f}",
                _fmt_spread(row),
                _fmt_ratio(row["ratio_to_raw"]),
                f"{row['p50_ms']:.1f}",
                f"{row['p99_ms']:.1f}",
                str(row["errors"]),
                _fmt_peak(row),
                f"{row['busy_share'] * 100:.0f}%",
            )
        )
    return rows


def micro_rows(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """The micro table's rows, as strings."""
    rows = []
    for row in summary["micro"].values():
        overhead = row["overhead_us_vs_raw"]
        rows.append(
            (
                row["label"],
                f"{row['ops_per_s']:.0f}",
                _fmt_spread(row),
                _fmt_ratio(row["ratio_to_raw"]),
                "-" if overhead is None else f"{overhead:.1f}",
                f"{row['uncontended_ops_per_s']:.0f}",
                _fmt_ratio(row["uncontended_ratio_to_raw"]),
                f"{row['noop_us']:.1f}",
                _fmt_us(row.get("statement_us")),
                _fmt_us(row.get("statement_busy_us")),
                str(row["errors"]),
                str(row["peak_server_conns"]),
            )
        )
    return rows


def _plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _rst_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [rule, line(header), rule, *(line(r) for r in rows), rule]


def noise_text(summary: dict[str, Any], config: dict[str, Any]) -> str:
    """How much the rounds disagreed."""
    if config["rounds"] < 2:
        return "one round only, so no spread measured (the full run repeats everything 3 times)"
    noise = summary["noise"]
    return (
        f"{_rounds(config['rounds'])} per measurement, medians shown; spread (max-min)/median "
        f"of a measurement: median {noise['median_spread'] * 100:.0f}%, worst "
        f"{noise['max_spread'] * 100:.0f}%"
    )


def _view_note(summary: dict[str, Any], view: str, sep: str) -> str:
    """A view's ceiling, after its title."""
    if view == "sleep":
        return f"{sep}ceiling {summary['sleep_ceiling_rps']:.0f} req/s"
    if view == "wait":
        return (
            f"{sep}at most {summary['wait_session_ceiling_rps']:.0f} req/s for a pool lending "
            "a connection per request"
        )
    return ""


def text_report(summary: dict[str, Any], found: list[Target], config: dict[str, Any]) -> str:
    """The terminal report: one table per view, the micro table, noise, targets."""
    out = []
    for view in VIEWS:
        if not summary["http"].get(view):
            continue
        title = f"HTTP {VIEW_TITLES[view]}{_view_note(summary, view, ' -- ')}"
        out += ["", title, *_plain_table(HTTP_HEADER, http_rows(summary, view))]
    if summary["micro"]:
        out += [
            "",
            f"micro: checkout + SELECT 1 + return in {config['micro_greenlets']} greenlets "
            f"(uncontended: {config['max_conns']}), MAX_CONNS={config['max_conns']}, one "
            "process, no HTTP; checkout+return: one greenlet, no query; stmt us: one pk "
            f"lookup, one greenlet (busy: {config['max_conns']} greenlets), through the ORM "
            "with the request kept open (raw, bare pool: its SQL on a connection taken for it)",
            *_plain_table(MICRO_HEADER, micro_rows(summary)),
        ]
    comparison = psycopg3_lines(summary)
    if comparison:
        out += ["", "psycopg 3 (throughput > 1x and p99 < 1x: ours on psycopg 3 better):"]
        out += ["  " + line for line in comparison]
    modes = pool_mode_lines(summary, config)
    if modes:
        out += ["", "POOL_MODE (transaction mode / session mode, ours on psycopg2):"]
        out += ["  " + line for line in modes]
    found_skew = summary.get("skewed")
    if found_skew:
        out += [
            "",
            skewed_title(found_skew, config),
            *_plain_table(SKEW_HEADER, skewed_rows(found_skew)),
            *("  " + line for line in skewed_lines(found_skew)),
        ]
    found_mysql = summary.get("mysql") or {}
    for view in found_mysql.get("views", {}):
        out += [
            "",
            mysql_title(found_mysql, config, view),
            *_plain_table(mysql_header(found_mysql, view), mysql_rows(found_mysql, view)),
            *("  " + line for line in mysql_lines(found_mysql, view, config)),
        ]
    skipped = skipped_lines(summary)
    if skipped:
        out += ["", *skipped]
    if ran_postgresql(summary):
        out += [
            "",
            "x raw: req/s / the raw limit's of the same round; server conns: peak in "
            "pg_stat_activity (per worker); busy: share of the server connections' time not "
            "idle",
        ]
    out += [
        "",
        f"noise: {noise_text(summary, config)}",
        "",
        "targets (ratios from this run, each divided by the raw limit of the same round):"
        if ran_postgresql(summary)
        else "targets:",
    ]
    out += [f"  {t.verdict:<4}  {t.name}: {t.detail}" for t in shown_targets(summary, found)]
    return "\n".join(out)


def ran_postgresql(summary: dict[str, Any]) -> bool:
    """Did the run measure anything on PostgreSQL (not only the mysql scenario)?"""
    return bool(
        any(summary["http"].values())
        or summary["micro"]
        or summary.get("skewed")
        or not mysql_ran(summary.get("mysql") or {})
    )


def shown_targets(summary: dict[str, Any], found: list[Target]) -> list[Target]:
    """The targets to print: a run of the mysql scenario alone lists its own only."""
    if ran_postgresql(summary):
        return found
    return [t for t in found if t.name in MYSQL_TARGETS]


def rst_report(
    summary: dict[str, Any], found: list[Target], config: dict[str, Any], meta: dict[str, Any]
) -> str:
    """``latest.md``'s content: the tables in reStructuredText, ready for README.rst."""
    machine = meta["machine"]
    postgresql = ran_postgresql(summary)
    found_mysql = summary.get("mysql") or {}
    servers = []
    if postgresql or not mysql_ran(found_mysql):
        servers.append(machine["postgresql"])
    if mysql_ran(found_mysql):
        version = str(found_mysql["server"].get("version")).removeprefix("5.5.5-")
        servers.append(f"MariaDB/MySQL {version}")
    out = [
        "Benchmarks",
        "----------",
        "",
        f"Measured {meta['date']} on {machine['nproc']} cores ({machine['cpu']}), "
        f"{', '.join(servers)}, Python {machine['python']}, shared with other work: "
        "absolute numbers are noisy, compare the ratios.",
        "",
        f"Command: ``{meta['command']}`` ({'quick' if config['quick'] else 'full'} run: "
        f"{_rounds(config['rounds'])} of {config['http_seconds']:g} s"
        + (
            f" per view ({config['sleep_seconds']:g} s for the sleep view)"
            if postgresql
            else f" per view ({config['sleep_seconds']:g} s for the wait view)"
        )
        + f", {meta['wall_seconds']:.0f} s in all).",
        "",
    ]
    out += [
        f"gunicorn, {plural(config['workers'], 'gevent worker')}, "
        f"MAX_CONNS={config['max_conns']} per "
        f"worker, wrk with {config['clients']} keep-alive connections (one thread). "
        "``x raw`` is req/s divided by the raw-psycopg2 limit of the same round (median "
        "of the rounds); ``spread`` is (max - min) / median over the rounds; ``server "
        "conns`` is the peak seen in ``pg_stat_activity`` (total, and per worker); ``busy`` "
        "the share of the server connections' sampled time not ``idle`` (running a query or "
        "inside a transaction): the rest is connection capacity the load left unused -- "
        "in the pool, in a hand-off, or held by a request between its queries.",
        "",
    ]
    if not postgresql:  # the mysql scenario alone: no raw limit, no pg_stat_activity
        out[-2] = (
            f"gunicorn, {plural(config['workers'], 'gevent worker')}, "
            f"MAX_CONNS={config['max_conns']} per worker, wrk with {config['clients']} "
            "keep-alive connections (one thread; MAX_CONNS for the stock backend, capped by "
            "gunicorn); ``spread`` is (max - min) / median over the rounds."
        )
    for view in VIEWS:
        if not summary["http"].get(view):
            continue
        title = VIEW_TITLES[view] + _view_note(summary, view, ", ")
        out += [f"**{title}**", "", *_rst_table(HTTP_HEADER, http_rows(summary, view)), ""]
    if summary["micro"]:
        out += [
            f"**micro: checkout + SELECT 1 + return in {config['micro_greenlets']} greenlets, "
            f"MAX_CONNS={config['max_conns']}, one process, no HTTP** (``uncontended``: "
            f"{config['max_conns']} greenlets, nobody waits; ``checkout+return us``: one "
            "greenlet, no query; ``stmt us``: one primary-key lookup, one greenlet, through "
            "the ORM with the request kept open (raw and the bare pool: its SQL on a "
            f"connection taken for it); ``busy``: {config['max_conns']} greenlets)",
            "",
            *_rst_table(MICRO_HEADER, micro_rows(summary)),
            "",
        ]
    comparison = psycopg3_lines(summary)
    if comparison:
        out += [
            "psycopg 3 (throughput > 1x and p99 < 1x: ours on psycopg 3 better):",
            "",
            *(f"- {line}" for line in comparison),
            "",
        ]
    modes = pool_mode_lines(summary, config)
    if modes:
        out += [
            "``POOL_MODE`` (transaction mode / session mode, ours on psycopg2):",
            "",
            *(f"- {line}" for line in modes),
            "",
        ]
    found_skew = summary.get("skewed")
    if found_skew:
        out += [
            f"**{skewed_title(found_skew, config)}** (busy/light timeouts: 503s answering "
            "the pool's checkout timeout, and their share of the responses; server conns: "
            "peak in ``pg_stat_activity``)",
            "",
            *_rst_table(SKEW_HEADER, skewed_rows(found_skew)),
            "",
            *(f"- {line}" for line in skewed_lines(found_skew)),
            "",
        ]
    for view in found_mysql.get("views", {}):
        out += [
            f"**{mysql_title(found_mysql, config, view)}**",
            "",
            *_rst_table(mysql_header(found_mysql, view), mysql_rows(found_mysql, view)),
            "",
            *(f"- {line}" for line in mysql_lines(found_mysql, view, config)),
            "",
        ]
    skipped = skipped_lines(summary)
    if skipped:
        out += [*(f"- {line}" for line in skipped), ""]
    out += ["Notes:", ""]
    notes = {c.label: c.notes for c in BY_KEY.values()} if postgresql else {}
    if mysql_ran(found_mysql):
        notes.update({c.label: c.notes for c in MYSQL_CONFIGS.values()})
    for name, note in notes.items():
        out.append(f"- {name}: {note}.")
    out += [
        f"- Django stock competitors have no connection cap: gunicorn's worker_connections "
        f"is set to MAX_CONNS for them and wrk opens {config['workers']} x MAX_CONNS "
        "connections, so they never queue (their most favourable load).",
        "",
        "Targets (each ratio divided by the raw limit of the same round):"
        if postgresql
        else "Targets:",
        "",
    ]
    out += [f"- {t.verdict}: {t.name}: {t.detail}" for t in shown_targets(summary, found)]
    out += ["", f"Noise: {noise_text(summary, config)}.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------ chart


def chart(summary: dict[str, Any], path: Path, title: str) -> None:
    """Throughput and p99 per competitor for each view, plus the micro loop, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = [v for v in VIEWS if summary["http"].get(v)]
    config_clients = max(
        (row["clients"] for v in views for row in summary["http"][v].values()), default=0
    )
    columns = len(views) + (1 if summary["micro"] else 0)
    if columns == 0:
        return
    fig, axes = plt.subplots(2, columns, figsize=(5.2 * columns, 8.5), squeeze=False)
    for col, view in enumerate(views):
        rows = list(summary["http"][view].items())
        names = [
            row["label"] + ("" if row["clients"] == config_clients else f" [{row['clients']} cl.]")
            for _, row in rows
        ]
        colors = [_color(key) for key, _ in rows]
        rps = [row["rps"] for _, row in rows]
        low = [row["rps"] - row["rps_min"] for _, row in rows]
        high = [row["rps_max"] - row["rps"] for _, row in rows]
        ax = axes[0][col]
        ax.barh(names, rps, xerr=[low, high], color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{VIEW_TITLES[view]}\nrequests/s (median, min-max)", fontsize=9)
        if view == "sleep":
            ax.axvline(summary["sleep_ceiling_rps"], color="black", linestyle="--", linewidth=1)
        if view == "wait":  # what a pool lending a connection per request can reach
            ax.axvline(
                summary["wait_session_ceiling_rps"], color="black", linestyle=":", linewidth=1
            )
        ax.tick_params(labelsize=8)
        ax = axes[1][col]
        ax.barh(names, [row["p99_ms"] for _, row in rows], color=colors)
        ax.invert_yaxis()
        ax.set_title("p99 latency, ms (median of rounds)", fontsize=9)
        ax.tick_params(labelsize=8)
    if summary["micro"]:
        rows = list(summary["micro"].items())
        names = [row["label"] for _, row in rows]
        colors = [_color(key) for key, _ in rows]
        ax = axes[0][columns - 1]
        ops = [row["ops_per_s"] for _, row in rows]
        low = [row["ops_per_s"] - row["ops_min"] for _, row in rows]
        high = [row["ops_max"] - row["ops_per_s"] for _, row in rows]
        ax.barh(names, ops, xerr=[low, high], color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title("micro: checkout + SELECT 1 + return\nops/s (median, min-max)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax = axes[1][columns - 1]
        ax.barh(names, [row["noop_us"] for _, row in rows], color=colors)
        ax.invert_yaxis()
        ax.set_title("micro: checkout + return, no query, us", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _color(key: str) -> str:
    if key in ("ours", OURS_PSYCOPG3, OURS_TRANSACTION, MICRO_BARE):
        return "tab:green"
    if key in ("raw", RAW_PER_QUERY, QUEUE_PER_STATEMENT):
        return "tab:gray"
    return "tab:blue"
