"""The loads: ``wrk`` against a competitor's gunicorn, ``micro.py`` in its own process, and
``skewload.py`` (the ``skewed`` scenario's client, pinning connections to workers)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .servers import HOST

BENCH_DIR = Path(__file__).resolve().parent.parent
WRK_SCRIPT = BENCH_DIR / "benchkit" / "wrk.lua"
MICRO = BENCH_DIR / "micro.py"
SKEWLOAD = BENCH_DIR / "skewload.py"
RESULT_MARK = "DGPB-RESULT "
#: Seconds a request may take before wrk counts it as a timeout.
WRK_TIMEOUT = 10


def run_wrk(
    wrk: str, port: int, view: str, clients: int, seconds: float, items: int
) -> dict[str, Any]:
    """Drive ``/<view>/`` with ``clients`` keep-alive connections for ``seconds``.

    One wrk thread (so wrk takes as little as possible of the CPU the server
    needs). Returns successful requests/s (2xx), p50/p90/p99/max latency in
    ms (wrk's HdrHistogram, all responses), non-2xx responses and socket
    errors (connect, read, write, timeout).
    """
    command = [
        wrk,
        "-t1",
        f"-c{clients}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={WRK_TIMEOUT}s",
        "-s",
        str(WRK_SCRIPT),
        f"http://{HOST}:{port}/",
        "--",
        view,
        str(items),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + WRK_TIMEOUT + 30, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    raw = json.loads(lines[-1][len(RESULT_MARK) :])
    duration = raw["duration_us"] / 1e6
    socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    ok = raw["requests"] - raw["status"]
    return {
        "view": view,
        "clients": clients,
        "seconds": duration,
        "requests": raw["requests"],
        "ok": ok,
        "rps": ok / duration if duration else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "non2xx": raw["status"],
        "socket_errors": socket_errors,
        "socket_errors_detail": {k: raw[k] for k in ("connect", "read", "write", "timeout")},
        "errors": raw["status"] + socket_errors,
    }


def run_micro(
    python: str,
    env: dict[str, str],
    competitor: str,
    greenlets: int,
    warmup: float,
    seconds: float,
    log_path: Path,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> dict[str, Any]:
    """Run ``micro.py`` for one competitor in a new process; its JSON result.

    ``on_start`` gets the process as soon as it exists (the orchestrator's
    guard may have to kill it).
    """
    command = [
        python,
        str(MICRO),
        f"--competitor={competitor}",
        f"--greenlets={greenlets}",
        f"--warmup={warmup}",
        f"--seconds={seconds}",
    ]
    return _json_child(
        command,
        env,
        on_start,
        warmup + seconds + 60,
        log_path,
        f"micro.py --competitor={competitor}",
    )


def _json_child(
    command: list[str],
    env: dict[str, str] | None,
    on_start: Callable[[subprocess.Popen[str]], None] | None,
    timeout: float,
    log_path: Path,
    what: str,
) -> dict[str, Any]:
    """Run a measuring child to its end (killed after ``timeout`` s); its last JSON line."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if on_start is not None:
        on_start(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate(timeout=15)
    log_path.write_text(stdout + stderr)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_skewload(
    python: str,
    port: int,
    plan: list[dict[str, Any]],
    warmup: float,
    seconds: float,
    log_path: Path,
    on_start: Callable[[subprocess.Popen[str]], None] | None = None,
) -> dict[str, Any]:
    """Run ``skewload.py`` against the gunicorn on ``port`` with ``plan``; its JSON result.

    One plan entry per worker (``group``, ``clients``, ``pace``). Bounded: the
    process is killed (by PID) if it outlives pinning, warm-up and window by a minute.
    """
    command = [
        python,
        str(SKEWLOAD),
        f"--port={port}",
        f"--plan={json.dumps(plan)}",
        f"--warmup={warmup}",
        f"--seconds={seconds}",
        f"--request-timeout={WRK_TIMEOUT}",
    ]
    return _json_child(command, None, on_start, warmup + seconds + 60, log_path, "skewload.py")
