"""``manage.py pool_connections``: who holds the server's connections, as the server sees them.

Answers "too many connections" from the server's side: ``pg_stat_activity``
counts the connections of every process of the app (all gunicorn and Celery
workers, on every host), which no single process's pool statistics can. Rows
are grouped by application_name, client host, user, database and state; each
pooled alias's rows (same database and user, and same application_name when
the alias sets one in OPTIONS) are put next to its caps: MAX_CONNS per
process and, with ``--workers N``, ``N x MAX_CONNS`` per client host; with
a host budget (``HOST_MAX_CONNS``) at most that many per client host.

For the aliases with a host budget, the budget's use on the host the command
runs on is read from its lock file (no server involved): the slots held by
all processes of this host, and those held by the command's own process
(none, unless it has pools of its own). Other hosts' budgets are not visible
from here; their connections are in ``pg_stat_activity`` all the same.

The command uses its own short-lived psycopg2 connection per alias (never the
pool), in one read-only transaction, and leaves it out of every count. For a
MySQL alias (``django_gevent_pool.backends.mysql``) it reads
``information_schema.PROCESSLIST`` through a PyMySQL connection instead: MySQL
has no ``application_name`` nor connect time, so an alias's sessions are those
of its user and database, and their age is not shown. It
exits non-zero, naming the alias, when a server cannot be reached or does not
answer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg2
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...hostbudget import budget_key_of, held_here, observe
from ...serverinfo import (
    ServerLimits,
    ServerUnreachable,
    alias_pool_options,
    brief_connection,
    configured_databases,
    connection_params,
    is_mysql_engine,
    mysql_connection_params,
    mysql_server_label,
    pooled_databases,
    server_label,
    server_limits,
)

#: This command's own connections are called this in pg_stat_activity.
APPLICATION_NAME = "django_gevent_pool pool_connections"

_ACTIVITY_SQL = """
SELECT pid, datname, usename, application_name, host(client_addr), client_hostname,
       client_port, backend_start,
       GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - backend_start))::float8,
       state,
       GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - state_change))::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend'
ORDER BY backend_start
"""


#: MySQL's client sessions (``information_schema.PROCESSLIST``; no connect time there).
_MYSQL_ACTIVITY_SQL = """
SELECT ID, DB, USER, HOST, COMMAND, TIME
FROM information_schema.PROCESSLIST
WHERE COMMAND NOT IN ('Daemon', 'Binlog Dump', 'Binlog Dump GTID', 'Slave_IO', 'Slave_SQL',
                      'Slave_worker')
  AND USER NOT IN ('system user', 'event_scheduler')
ORDER BY ID
"""


def _driver_errors() -> tuple[type[BaseException], ...]:
    """The errors a look at a server may raise: psycopg2's, and PyMySQL's when installed."""
    try:
        import pymysql
    except ImportError:
        return (psycopg2.Error,)
    return (psycopg2.Error, pymysql.MySQLError)


@contextmanager
def _mysql_connection(params: dict[str, Any], label: str) -> Iterator[Any]:
    """A plain PyMySQL connection for a look at a MySQL server; ServerUnreachable if none."""
    import pymysql

    try:
        conn = pymysql.connect(**params, autocommit=True)
    except pymysql.MySQLError as exc:
        raise ServerUnreachable(f"{label}: {_one_line(exc)}") from exc
    try:
        yield conn
    finally:
        try:
            conn.close()
        except pymysql.MySQLError:
            pass  # closing a look-only connection is best effort


@dataclass
class _Alias:
    """A pooled alias and, once connected, who the server says it is."""

    alias: str
    params: dict[str, Any]
    max_conns: int
    application_name: str | None
    label: str
    host_max_conns: int | None = None
    host_lock_dir: str | None = None
    database: str = ""
    user: str = ""
    own_pid: int = 0
    mysql: bool = False  # a MySQL alias: PROCESSLIST instead of pg_stat_activity


@dataclass
class _Row:
    """One client backend of pg_stat_activity."""

    pid: int
    datname: str
    usename: str
    application_name: str
    client: str
    backend_start: datetime | None
    backend_age: float | None
    state: str
    state_seconds: float | None
    owner: str | None = None


@dataclass
class _Group:
    """Client backends with the same owner, application_name, client, user, database, state."""

    owner: str | None
    application_name: str
    client: str
    usename: str
    datname: str
    state: str
    pids: list[int] = field(default_factory=list)
    oldest_backend_start: datetime | None = None
    oldest_backend_age: float | None = None
    longest_in_state: float | None = None

    def add(self, row: _Row) -> None:
        self.pids.append(row.pid)
        if row.backend_age is not None and (
            self.oldest_backend_age is None or row.backend_age > self.oldest_backend_age
        ):
            self.oldest_backend_age = row.backend_age
            self.oldest_backend_start = row.backend_start
        if row.state_seconds is not None and (
            self.longest_in_state is None or row.state_seconds > self.longest_in_state
        ):
            self.longest_in_state = row.state_seconds

    def as_json(self) -> dict[str, Any]:
        return {
            "this_app": self.owner is not None,
            "alias": self.owner,
            "application_name": self.application_name,
            "client": self.client,
            "usename": self.usename,
            "datname": self.datname,
            "state": self.state,
            "count": len(self.pids),
            "pids": self.pids,
            "oldest_backend_start": _iso(self.oldest_backend_start),
            "oldest_backend_age_seconds": _round(self.oldest_backend_age),
            "longest_in_state_seconds": _round(self.longest_in_state),
        }


class Command(BaseCommand):
    help = (
        "Show, from the server's side (pg_stat_activity), the connections the pooled aliases "
        "hold across all processes of the app, next to their caps and the server's limit. "
        "This command's own connection is excluded."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--database",
            action="append",
            dest="databases",
            metavar="ALIAS",
            help="A pooled alias to look at (repeatable). Default: every pooled alias.",
        )
        parser.add_argument(
            "--json", action="store_true", help="Print one JSON document instead of tables."
        )
        parser.add_argument(
            "--workers",
            type=int,
            metavar="N",
            help="Processes per client host (e.g. gunicorn workers): the expected maximum "
            "per host is N x MAX_CONNS.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=5.0,
            metavar="SECONDS",
            help="Seconds to wait for each server (connect and queries). Default: 5.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        workers: int | None = options["workers"]
        if workers is not None and workers < 1:
            raise CommandError(f"--workers must be at least 1, got {workers}")
        timeout: float = options["timeout"]
        if not timeout > 0:
            raise CommandError(f"--timeout must be a positive number of seconds, got {timeout}")
        aliases = self._aliases(options["databases"], timeout)
        report: dict[str, Any] = {
            "workers": workers,
            "aliases": {},
            "servers": [],
            "unreachable": {},
            "host_budgets": {
                entry.alias: _host_budget(entry)
                for entry in aliases
                if entry.host_max_conns is not None
            },
        }
        with ExitStack() as stack:
            servers: dict[tuple[Any, ...], list[tuple[_Alias, Any]]] = {}
            errors = _driver_errors()
            for entry in aliases:
                try:
                    conn = stack.enter_context(
                        _mysql_connection(entry.params, entry.label)
                        if entry.mysql
                        else brief_connection(entry.params, timeout=timeout)
                    )
                except ServerUnreachable as exc:
                    report["unreachable"][entry.alias] = str(exc)
                    continue
                try:
                    key = _identify(entry, conn)
                except errors as exc:
                    report["unreachable"][entry.alias] = f"{entry.label}: {_one_line(exc)}"
                    continue
                servers.setdefault(key, []).append((entry, conn))
            for members in servers.values():
                try:
                    self._look(members, workers, report)
                except errors as exc:
                    for entry, _ in members:
                        report["unreachable"][entry.alias] = f"{entry.label}: {_one_line(exc)}"
        report["verdict"] = "\n".join(server["verdict"] for server in report["servers"])
        if options["json"]:
            self.stdout.write(json.dumps(report, indent=2, sort_keys=False))
        else:
            self.stdout.write("\n".join(_human(report)))
        if report["unreachable"]:
            raise CommandError(
                "; ".join(
                    f"cannot reach the database of DATABASES[{alias!r}]: {reason}"
                    for alias, reason in report["unreachable"].items()
                )
            )

    # ----------------------------------------------------------- collecting

    def _aliases(self, requested: Sequence[str] | None, timeout: float) -> list[_Alias]:
        """The pooled aliases to look at, with their connect parameters; CommandError if none."""
        pooled = pooled_databases()
        if requested:
            configured = configured_databases()
            for alias in requested:
                if alias not in configured:
                    raise CommandError(f"DATABASES has no alias {alias!r}")
                if alias not in pooled:
                    raise CommandError(
                        f"DATABASES[{alias!r}] does not use a django_gevent_pool ENGINE "
                        f"(it uses {configured[alias].get('ENGINE')!r})"
                    )
            chosen = list(dict.fromkeys(requested))
        else:
            chosen = list(pooled)
            if not chosen:
                raise CommandError("no DATABASES alias uses a django_gevent_pool ENGINE")
        result = []
        for alias in chosen:
            settings_dict = pooled[alias]
            mysql = is_mysql_engine(settings_dict.get("ENGINE"))
            try:
                pool_options = alias_pool_options(alias, settings_dict)
                if mysql:
                    params = mysql_connection_params(alias, settings_dict, timeout=timeout)
                else:
                    params = connection_params(
                        alias,
                        settings_dict,
                        application_name=APPLICATION_NAME,
                        connect_timeout=max(2, int(timeout)),
                    )
            except ImproperlyConfigured as exc:
                raise CommandError(str(exc)) from exc
            # MySQL has no application_name: its sessions are told apart by user.
            app_name = None if mysql else settings_dict["OPTIONS"].get("application_name")
            result.append(
                _Alias(
                    alias=alias,
                    params=params,
                    max_conns=pool_options.MAX_CONNS,
                    application_name=str(app_name) if app_name else None,
                    label=mysql_server_label(params) if mysql else server_label(params),
                    host_max_conns=pool_options.HOST_MAX_CONNS,
                    host_lock_dir=pool_options.HOST_LOCK_DIR,
                    mysql=mysql,
                )
            )
        return result

    def _look(
        self, members: list[tuple[_Alias, Any]], workers: int | None, report: dict[str, Any]
    ) -> None:
        """Read one server's limits and activity through the first alias's connection.

        ``members`` are the aliases that reached this same server, possibly at
        different addresses (directly, through a pooler); all their own
        connections are left out.
        """
        entries = [entry for entry, _ in members]
        conn = members[0][1]
        mysql = entries[0].mysql
        if mysql:
            with conn.cursor() as cur:
                cur.execute("SELECT @@max_connections")
                limits = ServerLimits(int(cur.fetchone()[0]), 0)
                cur.execute(_MYSQL_ACTIVITY_SQL)
                raw_rows = cur.fetchall()
        else:
            limits = server_limits(conn)
            with conn.cursor() as cur:
                cur.execute(_ACTIVITY_SQL)
                raw_rows = cur.fetchall()
        own = {entry.own_pid for entry in entries}
        make_row = _mysql_row if mysql else _row
        rows = [make_row(raw) for raw in raw_rows if raw[0] not in own]
        _attribute(rows, entries)
        alias_reports = {
            entry.alias: _alias_report(
                entry, rows, entries, workers, report["host_budgets"].get(entry.alias)
            )
            for entry in entries
        }
        report["aliases"].update(alias_reports)
        labels = list(dict.fromkeys(entry.label for entry in entries))
        label = labels[0] + (f" (also reached at {', '.join(labels[1:])})" if labels[1:] else "")
        server = _server_report(label, limits, rows, entries, alias_reports, workers, own)
        server["kind"] = "mysql" if mysql else "postgresql"
        report["servers"].append(server)


def _host_budget(entry: _Alias) -> dict[str, Any]:
    """The use of ``entry``'s host budget on this host, read from its lock file.

    ``in_use`` counts the slots held by every process of this host sharing the
    budget, ``held_by_this_process`` those of the command's own process. The
    file is only looked at: the command does not join the budget. When it
    cannot be read (another user's), both are None and ``error`` says why;
    when its processes use another HOST_MAX_CONNS, ``error`` says so too.
    """
    assert entry.host_max_conns is not None
    params = entry.params
    key = budget_key_of(params)
    result: dict[str, Any] = {
        "key": key,
        "host_max_conns": entry.host_max_conns,
        "lock_file": None,
        "in_use": None,
        "held_by_this_process": None,
        "error": None,
    }
    try:
        in_use, theirs, path = observe(key, entry.host_max_conns, entry.host_lock_dir)
    except OSError as exc:
        result["error"] = _one_line(exc)
        return result
    result["lock_file"] = path
    result["in_use"] = in_use
    result["held_by_this_process"] = held_here(key)
    if theirs is not None and theirs != entry.host_max_conns:
        result["error"] = (
            f"the processes using this budget configured HOST_MAX_CONNS = {theirs}, "
            f"not {entry.host_max_conns}"
        )
    return result


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _identify(entry: _Alias, conn: Any) -> tuple[Any, ...]:
    """Fill in who the server says ``entry`` is; return a key naming the server itself.

    The key is the address and port the server sees itself on, so two aliases
    that reach one server at different addresses (directly and through
    PgBouncer) share it; over a Unix socket, the configured label.
    """
    with conn.cursor() as cur:
        if entry.mysql:
            # The server's own name and port: aliases reaching it at two addresses share it.
            cur.execute(
                "SELECT CONNECTION_ID(), DATABASE(), SUBSTRING_INDEX(USER(), '@', 1), "
                "@@hostname, @@port"
            )
            own, database, user, hostname, port = cur.fetchone()
            entry.own_pid, entry.user = int(own), user
            entry.database = str(entry.params.get("database") or database or "")
            return ("mysql", hostname, int(port))
        cur.execute(
            "SELECT pg_backend_pid(), current_database(), session_user, "
            "host(inet_server_addr()), inet_server_port()"
        )
        entry.own_pid, entry.database, entry.user, addr, port = cur.fetchone()
    return ("socket", entry.label) if addr is None else ("tcp", addr, port)


def _mysql_row(raw: Sequence[Any]) -> _Row:
    thread_id, db, user, host, command, seconds = raw
    client = str(host or "")
    if client.rpartition(":")[2].isdigit():
        client = client.rpartition(":")[0]  # the client's port: one per connection
    return _Row(
        pid=int(thread_id),
        datname=db or "",
        usename=user or "",
        application_name="",
        client=client or "local socket",
        backend_start=None,
        backend_age=None,
        state="idle" if command == "Sleep" else str(command).lower(),
        state_seconds=float(seconds) if seconds is not None else None,
    )


def _row(raw: Sequence[Any]) -> _Row:
    pid, datname, usename, app, addr, hostname, port, start, age, state, in_state = raw
    if addr is None:
        client = "local socket" if port == -1 else "(unknown)"
    else:
        client = f"{hostname} ({addr})" if hostname else str(addr)
    return _Row(
        pid=int(pid),
        datname=datname or "",
        usename=usename or "",
        application_name=app or "",
        client=client,
        backend_start=start,
        backend_age=age,
        state=state or "(not visible)",
        state_seconds=in_state,
    )


def _matches(row: _Row, entry: _Alias) -> bool:
    return (
        row.datname == entry.database
        and row.usename == entry.user
        and (entry.application_name is None or row.application_name == entry.application_name)
    )


def _attribute(rows: list[_Row], entries: list[_Alias]) -> None:
    """Set each row's owner: the first alias that matches, those naming an application first."""
    ordered = sorted(entries, key=lambda entry: entry.application_name is None)
    for row in rows:
        for entry in ordered:
            if _matches(row, entry):
                row.owner = entry.alias
                break


def _shared_with(entry: _Alias, entries: list[_Alias]) -> list[str]:
    """Other aliases whose connections the server cannot tell apart from ``entry``'s."""
    return [
        other.alias
        for other in entries
        if other is not entry
        and other.database == entry.database
        and other.user == entry.user
        and (
            entry.application_name is None
            or other.application_name is None
            or other.application_name == entry.application_name
        )
    ]


def _alias_report(
    entry: _Alias,
    rows: list[_Row],
    entries: list[_Alias],
    workers: int | None,
    host_budget: dict[str, Any] | None = None,
) -> dict[str, Any]:
    mine = [row for row in rows if row.owner == entry.alias]
    expected = None if workers is None else workers * entry.max_conns
    if entry.host_max_conns is not None:
        # The budget caps every client host, whatever the number of processes.
        expected = entry.host_max_conns if expected is None else min(expected, entry.host_max_conns)
    by_client: dict[str, dict[str, Any]] = {}
    for client, count in sorted(Counter(row.client for row in mine).items()):
        by_client[client] = {
            "connections": count,
            "expected_max": expected,
            "over": expected is not None and count > expected,
        }
    return {
        "server": entry.label,
        "database": entry.database,
        "user": entry.user,
        "application_name": entry.application_name,
        "max_conns": entry.max_conns,
        "host_max_conns": entry.host_max_conns,
        "host_budget": host_budget,
        "workers": workers,
        "expected_max_per_host": expected,
        "connections": len(mine),
        "by_state": dict(sorted(Counter(row.state for row in mine).items())),
        "by_client": by_client,
        "shared_with": _shared_with(entry, entries),
    }


def _server_report(
    label: str,
    limits: ServerLimits,
    rows: list[_Row],
    entries: list[_Alias],
    alias_reports: dict[str, dict[str, Any]],
    workers: int | None,
    own: set[int],
) -> dict[str, Any]:
    groups: dict[tuple[Any, ...], _Group] = {}
    for row in rows:
        key = (row.owner, row.application_name, row.client, row.usename, row.datname, row.state)
        if key not in groups:
            groups[key] = _Group(*key)
        groups[key].add(row)
    ordered = sorted(
        groups.values(),
        key=lambda g: (g.owner is None, g.owner or "", -len(g.pids), g.application_name),
    )
    this_app = sum(1 for row in rows if row.owner is not None)
    others = Counter(row.application_name or "(none)" for row in rows if row.owner is None)
    report: dict[str, Any] = {
        "server": label,
        "excluded_pids": sorted(own),
        "max_connections": limits.max_connections,
        "superuser_reserved_connections": limits.superuser_reserved_connections,
        "reserved_connections": limits.reserved_connections,
        "usable_connections": limits.usable,
        "in_use": len(rows),
        "this_app": this_app,
        "other_clients": len(rows) - this_app,
        "other_clients_by_application": dict(others.most_common()),
        "aliases": [entry.alias for entry in entries],
        "groups": [group.as_json() for group in ordered],
    }
    report["verdict"] = _verdict(report, alias_reports, workers)
    return report


def _cap(alias_report: dict[str, Any], workers: int | None) -> str:
    max_conns = alias_report["max_conns"]
    host_max = alias_report.get("host_max_conns")
    hosts = len(alias_report["by_client"])
    if host_max is not None:
        cap = f"cap {max_conns} per process"
        if workers is not None:
            cap += f" x {workers} workers = {workers * max_conns}"
        cap += f", host budget {host_max}"
        budget = alias_report.get("host_budget") or {}
        if budget.get("in_use") is not None:
            cap += f", {budget['in_use']}/{host_max} in use on this host"
        if hosts > 1:
            cap += f", per host, {hosts} hosts"
        return cap
    if workers is None:
        return f"cap {max_conns} per process; --workers N gives the expected total"
    cap = f"cap {max_conns} per process x {workers} workers = {workers * max_conns}"
    if hosts > 1:
        cap += f" per host, {hosts} hosts"
    return cap


def _verdict(
    server: dict[str, Any], alias_reports: dict[str, dict[str, Any]], workers: int | None
) -> str:
    """One line: the server's use against its usable connections, this app's against its caps."""
    in_use, usable = server["in_use"], server["usable_connections"]
    if len(alias_reports) == 1:
        (only,) = alias_reports.values()
        app = f"this app: {server['this_app']} ({_cap(only, workers)})"
    else:
        parts = "; ".join(
            f"{alias}: {rep['connections']}, {_cap(rep, workers)}"
            for alias, rep in alias_reports.items()
        )
        app = f"this app: {server['this_app']} ({parts})"
    line = f"server: {in_use} of {usable} usable connections in use; {app}"
    over = [
        f"{alias} from {client}: {info['connections']} > {info['expected_max']}"
        for alias, rep in alias_reports.items()
        for client, info in rep["by_client"].items()
        if info["over"]
    ]
    if over:
        line += (
            "; OVER THE CAP: "
            + ", ".join(over)
            + " (more processes than --workers, or another client with the same database "
            "and user)"
        )
    if usable and in_use >= usable:
        line += "; THE SERVER IS FULL"
    elif usable and in_use * 10 >= usable * 9:
        line += "; the server is nearly full"
    return line


# ------------------------------------------------------------------ output


def _human(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for server in report["servers"]:
        own = server["excluded_pids"]
        which = (
            f"own connection, pid {own[0]}, is"
            if len(own) == 1
            else f"own connections, pids {', '.join(str(pid) for pid in own)}, are"
        )
        mysql = server.get("kind") == "mysql"
        if mysql:
            which = which.replace("pid", "thread id")
        lines.append(
            f"{'MySQL' if mysql else 'PostgreSQL'} at {server['server']}, as "
            f"{'information_schema.PROCESSLIST' if mysql else 'pg_stat_activity'} shows it "
            f"(this command's {which} excluded)"
        )
        reserved = server["superuser_reserved_connections"] + server["reserved_connections"]
        usable = (
            f"max_connections {server['max_connections']}"
            if mysql
            else f"max_connections {server['max_connections']} - {reserved} reserved = "
            f"{server['usable_connections']} usable"
        )
        lines.append(
            f"  {usable}; {server['in_use']} client connections in "
            f"use: this app {server['this_app']}, other clients {server['other_clients']}"
        )
        lines.append("")
        lines.append("  this app, by pooled alias:")
        alias_rows = []
        host_rows = []
        noted: set[str] = set()
        for alias in server["aliases"]:
            rep = report["aliases"][alias]
            alias_rows.append(
                [
                    alias,
                    rep["database"],
                    rep["user"],
                    rep["application_name"] or "(any)",
                    str(rep["max_conns"]),
                    _expected(rep),
                    str(rep["connections"]),
                    ", ".join(f"{state} {n}" for state, n in rep["by_state"].items()) or "-",
                ]
            )
            for client, info in rep["by_client"].items():
                host_rows.append(
                    [
                        alias,
                        client,
                        str(info["connections"]),
                        "-" if info["expected_max"] is None else str(info["expected_max"]),
                        "OVER" if info["over"] else "",
                    ]
                )
            later = [other for other in rep["shared_with"] if other not in noted]
            noted.add(alias)
            if later:
                shared = ", ".join(repr(other) for other in later)
                lines.append(
                    f"  note: {alias!r} and {shared} use the same database and user: their "
                    "connections cannot be told apart; set OPTIONS['application_name']"
                )
        lines.extend(
            _table(
                [
                    "ALIAS",
                    "DATABASE",
                    "USER",
                    "APPLICATION_NAME",
                    "MAX_CONNS",
                    "EXPECTED MAX/HOST",
                    "CONNECTIONS",
                    "BY STATE",
                ],
                alias_rows,
            )
        )
        budget_rows = [
            _budget_row(alias, report["host_budgets"][alias])
            for alias in server["aliases"]
            if alias in report["host_budgets"]
        ]
        if budget_rows:
            lines.append("")
            lines.append(
                "  host budgets (HOST_MAX_CONNS), as the lock files on this host show them:"
            )
            lines.extend(
                _table(
                    ["ALIAS", "HOST_MAX_CONNS", "IN USE ON THIS HOST", "HELD BY THIS PROCESS", ""],
                    budget_rows,
                )
            )
        if host_rows:
            lines.append("")
            lines.append("  this app, by client host:")
            lines.extend(_table(["ALIAS", "CLIENT", "CONNECTIONS", "EXPECTED MAX", ""], host_rows))
        lines.append("")
        lines.append("  every client connection on the server, grouped:")
        group_rows = [
            [
                group["alias"] or "(other)",
                group["application_name"] or "(none)",
                group["client"],
                group["usename"],
                group["datname"],
                group["state"],
                str(group["count"]),
                _start(group["oldest_backend_start"], group["oldest_backend_age_seconds"]),
                _duration(group["longest_in_state_seconds"]),
            ]
            for group in server["groups"]
        ]
        lines.extend(
            _table(
                [
                    "OWNER",
                    "APPLICATION_NAME",
                    "CLIENT",
                    "USER",
                    "DATABASE",
                    "STATE",
                    "COUNT",
                    "OLDEST BACKEND_START",
                    "LONGEST IN STATE",
                ],
                group_rows,
            )
        )
        lines.append("")
    for alias, reason in report["unreachable"].items():
        lines.append(f"DATABASES[{alias!r}]: cannot reach the server: {reason}")
    if report["verdict"]:
        lines.append(report["verdict"])
    return lines


def _expected(rep: dict[str, Any]) -> str:
    """The EXPECTED MAX/HOST cell: workers x MAX_CONNS, bounded by the host budget if any."""
    expected, workers, host_max = (
        rep["expected_max_per_host"],
        rep["workers"],
        rep["host_max_conns"],
    )
    if expected is None:
        return "-"
    if host_max is None:
        return f"{workers} x {rep['max_conns']} = {expected}"
    if workers is None:
        return f"host budget {host_max}"
    return f"min({workers} x {rep['max_conns']}, host budget {host_max}) = {expected}"


def _budget_row(alias: str, budget: dict[str, Any]) -> list[str]:
    host_max = budget["host_max_conns"]
    if budget["in_use"] is None:
        return [alias, str(host_max), "?", "?", f"cannot read the budget: {budget['error']}"]
    if budget["error"] is not None:
        return [
            alias,
            str(host_max),
            f"{budget['in_use']}/{host_max}",
            str(budget["held_by_this_process"]),
            f"MISMATCH: {budget['error']}",
        ]
    return [
        alias,
        str(host_max),
        f"{budget['in_use']}/{host_max}",
        str(budget["held_by_this_process"]),
        "FULL" if budget["in_use"] >= host_max else "",
    ]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["  (none)"]
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return (
            "  " + "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _start(iso: str | None, age: float | None) -> str:
    if iso is None:
        return "-"
    when = iso[:19].replace("T", " ")
    return f"{when} UTC ({_duration(age)} ago)"


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC (the server's TimeZone setting does not matter)."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.isoformat()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
