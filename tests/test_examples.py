"""The examples run, end to end, and keep the pool's promise: never more than MAX_CONNS.

Each example runs in a subprocess of its own (this test process may be
monkey-patched by gevent, and the examples patch themselves), against the
same server as the rest of the suite: ``$DGP_DSN``, else 127.0.0.1:5432, else
an embedded one that lives as long as this process. Each reports its numbers
as JSON, which the assertions read; the server-side peak comes from
``pg_stat_activity``, not from the pool's own bookkeeping.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from django_gevent_pool import devserver

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 50  # seconds per example run; below the suite's per-test limit


@pytest.fixture(scope="module")
def server_dsn() -> str:
    """DSN of the server the examples use (any database; each example picks its own)."""
    dsn, _where = devserver.server_dsn()
    return dsn


def example_env(dsn: str, dbname: str, **extra: str) -> dict[str, str]:
    """The environment of an example run: this one, minus the suite's Django settings."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "DJANGO_SETTINGS_MODULE" and not key.startswith("DGP_")
    }
    env.update(DGP_DSN=devserver.ensure_database(dsn, dbname), DGP_DBNAME=dbname, **extra)
    return env


def run_example(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` with this interpreter; its output is kept for the failure message."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def read_result(path: Path, done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON an example wrote, or a failure showing its output."""
    output = f"exit status {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert path.exists(), f"no results written\n{output}"
    result: dict[str, Any] = json.loads(path.read_text())
    assert done.returncode == 0, f"{result['problems']}\n{output}"
    return result


def test_script_stays_within_max_conns(server_dsn: str, tmp_path: Path) -> None:
    """200 greenlets through a pool of 5: all succeed, the server never sees a sixth."""
    out = tmp_path / "script.json"
    env = example_env(server_dsn, "dgp_examples_script")
    done = run_example("script.py", env, "--greenlets=200", "--max-conns=5", f"--json-out={out}")
    result = read_result(out, done)

    assert result["errors"] == 0
    assert result["done"] == 200
    assert result["orders"] == 200
    # Measured on the server, while greenlets were waiting for the pool.
    assert 1 <= result["peak"] <= 5, result
    assert result["samples"] > 0
    stats = result["pool_stats"]
    assert stats["pool_max"] == 5
    assert stats["requests_queued"] > 0, "no greenlet ever waited: the cap was never tested"
    assert stats["requests_timeouts"] == 0
    assert stats["pool_in_use"] == 0, "close_connection gave every connection back"
    assert (
        f"peak server connections for application_name {result['application_name']!r}: "
        f"{result['peak']} (MAX_CONNS 5"
    ) in done.stdout
    assert done.stdout.rstrip().endswith("OK")


def test_demo_serves_without_errors_within_max_conns(server_dsn: str, tmp_path: Path) -> None:
    """gunicorn with a gevent worker, 50 keep-alive clients on a pool of 4: no errors, <= 4."""
    out = tmp_path / "demo.json"
    env = example_env(
        server_dsn,
        "dgp_examples_demo",
        DGP_DEMO_SECONDS="2",
        DGP_DEMO_CLIENTS="50",
        DGP_MAX_CONNS="4",
        DGP_ITEMS="200",
        DGP_DEMO_JSON=str(out),
    )
    done = run_example("demo.py", env)
    result = read_result(out, done)

    assert result["errors"] == 0, result["error_samples"]
    for endpoint, row in result["endpoints"].items():
        assert row["ok"] > 0, f"no successful {endpoint} request"
    assert result["orders"] == result["endpoints"]["/tx/"]["ok"]
    assert 1 <= result["peak"] <= 4, result
    stats = result["pool_stats"]
    assert stats["pool_max"] == 4
    assert stats["requests_queued"] > 0, "no request ever waited: the cap was never tested"
    assert stats["requests_timeouts"] == 0
    assert "peak server connections: " in done.stdout
    # The observability the demo turns on: Server-Timing, the guarded view, the log.
    assert re.fullmatch(r'db-pool;dur=\d+\.\d{3};desc="1 checkout"', result["server_timing"])
    assert result["ops_view"].startswith("302 /login/?next=")
    assert "pool 'default': size=" in result["stats_log"]
    # The worker that served (and the master with it) is gone once the demo has exited.
    with pytest.raises(ProcessLookupError):
        os.kill(result["worker_pid"], 0)


def test_bare_pool_example_shares_five_connections(server_dsn: str) -> None:
    """The README's bare-pool example: 50 greenlets, 5 connections, every result right."""
    done = run_example("bare_pool.py", example_env(server_dsn, "dgp_examples_bare"))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sum"] == 2 * sum(range(50))
    stats = result["stats"]
    assert stats["requests_num"] == 50
    assert stats["connections_num"] <= 5
    assert stats["requests_queued"] > 0  # the greenlets really did wait for each other
    assert stats["requests_errors"] == 0
