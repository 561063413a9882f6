"""The ``skewed`` scenario's client: keep-alive connections pinned to chosen workers.

    .bench-venv/bin/python benchmarks/skewload.py --port 8000 --seconds 5 \\
        --plan '[{"group": "busy", "clients": 200, "pace": 0},
                 {"group": "light", "clients": 1, "pace": 1.0}, ...]'

Run by ``benchmarks/run.py`` (``benchkit/skewed.py``); prints one JSON line.

gunicorn's workers share one listening socket, so which worker serves a
request depends on which one accepted its connection, and a keep-alive
connection stays with that worker. This client uses that, as a reverse proxy
with long-lived upstream connections does: it opens connections, asks each
which worker it reached (``/pid/``, no database), and keeps exactly the
number the plan gives each worker, closing the others. The plan has one entry
per worker: a group name, a number of clients (each on its own pinned
connection) and a pace (0: closed loop, the next request as soon as the last
answered; otherwise one request every ``pace`` seconds, later if the last
one took longer). Workers get entries largest first in the order they happen
to receive connections: which worker is the busy one is left to the kernel.

Every client requests ``--path`` (``/skewed/``: ``pg_sleep(0.05)`` on a
pooled connection). Responses are counted by completion time inside the
measurement window after ``--warmup``: 200 = served, 503 with
``"pool timeout"`` = the pool's checkout timeout, anything else (and a broken
or timed-out socket) = an error. Latencies are of every response counted
(served and timed out alike, as wrk's). Pinning and the load are both
bounded in time; the load in requests too (``--max-requests``).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import IO, Any  # noqa: E402

import gevent  # noqa: E402

HOST = "127.0.0.1"
#: Seconds pinning may take before the client gives up.
PIN_LIMIT = 30.0


class HttpConnection:
    """One keep-alive HTTP/1.1 connection to the loopback server."""

    def __init__(self, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader: IO[bytes] = self.sock.makefile("rb")
        self.pid: int | None = None

    def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path``; the status and the body. Raises OSError on a broken connection."""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status_line = self.reader.readline(65536)
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split()[1])
        length: int | None = None
        chunked = False
        while True:
            line = self.reader.readline(65536)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            return status, self._chunked()
        if length is None:
            raise ConnectionError("response without Content-Length on a keep-alive connection")
        return status, self.reader.read(length)

    def _chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self.reader.readline(65536).split(b";")[0], 16)
            if size == 0:
                self.reader.readline(65536)
                return body
            body += self.reader.read(size)
            self.reader.readline(65536)

    def close(self) -> None:
        """Close the connection (the worker's greenlet for it ends)."""
        try:
            self.reader.close()
        finally:
            self.sock.close()


def pin(
    port: int, plan: list[dict[str, Any]], timeout: float
) -> tuple[list[list[HttpConnection]], dict[str, Any]]:
    """Connections grouped as the plan says, each list on one worker; how it went.

    Raises RuntimeError when the plan cannot be met within PIN_LIMIT seconds
    or 50 attempts per connection wanted (+ 2000).
    """
    quotas = sorted(range(len(plan)), key=lambda i: -int(plan[i]["clients"]))
    most = max(int(p["clients"]) for p in plan)
    wanted = sum(int(p["clients"]) for p in plan)
    by_pid: dict[int, list[HttpConnection]] = {}
    attempts = 0
    started = time.monotonic()
    limit = 50 * wanted + 2000

    def met() -> list[int] | None:
        pids = sorted(by_pid, key=lambda p: -len(by_pid[p]))
        if len(pids) < len(plan):
            return None
        for rank, index in enumerate(quotas):
            if len(by_pid[pids[rank]]) < int(plan[index]["clients"]):
                return None
        return pids

    while (pids := met()) is None:
        if attempts >= limit or time.monotonic() - started > PIN_LIMIT:
            seen = {p: len(c) for p, c in by_pid.items()}
            for conns in by_pid.values():
                for conn in conns:
                    conn.close()
            raise RuntimeError(
                f"could not pin {wanted} connections as planned in {attempts} attempts: {seen}"
            )
        attempts += 1
        conn = HttpConnection(port, timeout)
        status, body = conn.get("/pid/")
        if status != 200:
            conn.close()
            raise RuntimeError(f"/pid/ answered {status}: {body[:200]!r}")
        conn.pid = int(json.loads(body)["pid"])
        mine = by_pid.setdefault(conn.pid, [])
        if len(mine) < most:
            mine.append(conn)
        else:
            conn.close()
    groups: list[list[HttpConnection]] = [[] for _ in plan]
    for rank, index in enumerate(quotas):
        conns = by_pid.pop(pids[rank])
        keep = int(plan[index]["clients"])
        groups[index] = conns[:keep]
        for extra in conns[keep:]:
            extra.close()
    for conns in by_pid.values():  # workers beyond the plan's
        for conn in conns:
            conn.close()
    return groups, {"attempts": attempts, "seconds": time.monotonic() - started}


@dataclass
class Tally:
    """One group's (or one worker's) counts over the measurement window."""

    served: int = 0
    timeouts: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str | None = None

    def as_dict(self, seconds: float) -> dict[str, Any]:
        """Counts, rates and latency percentiles (of every counted response)."""
        ordered = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not ordered:
                return None
            return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]

        return {
            "served": self.served,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "rps": self.served / seconds if seconds else 0.0,
            "p50_ms": pct(50),
            "p99_ms": pct(99),
            "max_ms": ordered[-1] if ordered else None,
            "first_error": self.first_error,
        }


def drive(
    groups: list[list[HttpConnection]],
    plan: list[dict[str, Any]],
    path: str,
    warmup: float,
    seconds: float,
    max_requests: int,
) -> dict[str, Any]:
    """Run every pinned client; the counts of the window after ``warmup``."""
    begin = time.monotonic()
    window_start = begin + warmup
    end = window_start + seconds
    by_group: dict[str, Tally] = {}
    by_pid: dict[int, Tally] = {}
    sent = 0

    def count(tally: Tally, latency_ms: float | None, kind: str, error: str | None) -> None:
        if kind == "served":
            tally.served += 1
        elif kind == "timeout":
            tally.timeouts += 1
        else:
            tally.errors += 1
            tally.first_error = tally.first_error or error
        if latency_ms is not None:
            tally.latencies_ms.append(latency_ms)

    def client(conn: HttpConnection, group: str, pace: float) -> None:
        nonlocal sent
        next_at = time.monotonic()
        while True:
            if pace:
                wait = next_at - time.monotonic()
                if wait > 0:
                    gevent.sleep(wait)
                next_at = max(next_at + pace, time.monotonic())
            now = time.monotonic()
            if now >= end or sent >= max_requests:
                return
            sent += 1
            error = None
            try:
                status, body = conn.get(path)
            except (OSError, ValueError) as exc:
                status, body, error = 0, b"", repr(exc)
            done = time.monotonic()
            latency = None if error else (done - now) * 1000
            if status == 200:
                kind = "served"
            elif status == 503 and b"pool timeout" in body:
                kind = "timeout"
            else:
                kind = "error"
                error = error or f"HTTP {status}: {body[:200]!r}"
            if window_start <= done <= end:
                count(by_group.setdefault(group, Tally()), latency, kind, error)
                count(by_pid.setdefault(conn.pid or 0, Tally()), latency, kind, error)
            if error and status == 0:
                return  # a broken connection is no longer pinned: this client stops

    clients = [
        gevent.spawn(client, conn, str(plan[i]["group"]), float(plan[i]["pace"]))
        for i, conns in enumerate(groups)
        for conn in conns
    ]
    # Requests still running at the end are dropped, as wrk does: their sockets close.
    gevent.joinall(clients, timeout=max(0.0, end - time.monotonic()) + 0.05)
    gevent.killall(clients, timeout=5)
    window = max(0.0, min(time.monotonic(), end) - window_start)
    pids_of_group: dict[str, list[int]] = {}
    for i, conns in enumerate(groups):
        if conns and conns[0].pid is not None:
            pids_of_group.setdefault(str(plan[i]["group"]), []).append(conns[0].pid)
    return {
        "seconds": window,
        "requests_sent": sent,
        "groups": {name: tally.as_dict(window) for name, tally in by_group.items()},
        "workers": {
            str(pid): {**tally.as_dict(window), "group": _group_of(pid, pids_of_group)}
            for pid, tally in by_pid.items()
        },
        "pids_of_group": pids_of_group,
    }


def _group_of(pid: int, pids_of_group: dict[str, list[int]]) -> str | None:
    return next((g for g, pids in pids_of_group.items() if pid in pids), None)


def main(argv: list[str]) -> int:
    """Pin, drive, print the result as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", required=True, help="JSON: one entry per worker")
    parser.add_argument("--path", default="/skewed/")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    plan: list[dict[str, Any]] = json.loads(args.plan)
    groups, pinning = pin(args.port, plan, args.request_timeout)
    try:
        result = drive(groups, plan, args.path, args.warmup, args.seconds, args.max_requests)
    finally:
        for conns in groups:
            for conn in conns:
                conn.close()
    result["pinning"] = pinning
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
