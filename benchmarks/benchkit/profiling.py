"""Where our side spends its time: py-spy on our workers under wrk, and on the micro loop.

py-spy samples the running Python stacks of a process from outside (no
change to the code measured). Only active samples count (idle ones, waiting
in the gevent hub for the network, are left out), so the shares below are
shares of the process's CPU time. A frame is "ours" when its file is in the
``django_gevent_pool`` package; a function's *inclusive* share counts the
samples with it anywhere on the stack (what it and everything it calls
cost), its *self* share those where it is the innermost Python frame (its
own code and the C calls it makes directly).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchapp.competitors import ITEMS, OURS_TRANSACTION

from .loads import MICRO, run_wrk
from .report import plural
from .runner import TMP, Run

PACKAGE = "django_gevent_pool/"
RATE = 250  # samples per second
#: Our psycopg2 wait callback: every psycopg2 competitor has one (psycogreen's, for the others).
WAIT_CALLBACK = "django_gevent_pool/drivers/psycopg2_waiting.py:gevent_wait_callback"


@dataclass
class Profile:
    """Aggregated py-spy samples of one load."""

    title: str
    samples: int = 0
    ours: int = 0  # samples with any frame of our package on the stack
    ours_without_wait: int = 0  # the same, leaving out stacks where only the wait callback is
    functions: dict[str, list[int]] = field(default_factory=dict)  # name -> [inclusive, self]
    leaf_packages: Counter[str] = field(default_factory=Counter)
    load: dict[str, Any] = field(default_factory=dict)

    def share(self, count: int) -> float:
        """``count`` as a fraction of all samples."""
        return count / self.samples if self.samples else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the JSON file."""
        return {
            "title": self.title,
            "samples": self.samples,
            "ours_share": self.share(self.ours),
            "ours_share_without_wait_callback": self.share(self.ours_without_wait),
            "functions": {
                name: {"inclusive": self.share(inc), "self": self.share(own)}
                for name, (inc, own) in sorted(self.functions.items(), key=lambda kv: -kv[1][0])
            },
            "leaf_packages": {k: self.share(v) for k, v in self.leaf_packages.most_common()},
            "load": self.load,
        }

    def text(self, top: int = 14) -> str:
        """A readable summary."""
        lines = [
            f"{self.title}: {self.samples} active samples at {RATE} Hz",
            f"  inside django_gevent_pool (inclusive): {self.share(self.ours) * 100:.1f}% "
            f"of the CPU; without the psycopg2 wait callback (which every psycopg2 "
            f"competitor has): {self.share(self.ours_without_wait) * 100:.1f}%",
        ]
        us_per_op = self.load.get("us_per_op")
        if us_per_op:
            lines[0] += (
                f" ({self.load['ops_per_s']:.0f} ops/s while sampled: {us_per_op:.1f} us/op)"
            )
            lines.append(
                "  our functions, inclusive / self share of the process's CPU (us per op):"
            )
        else:
            lines.append("  our functions, inclusive / self share of the process's CPU:")
        ranked = sorted(self.functions.items(), key=lambda kv: -kv[1][0])[:top]
        for name, (inclusive, own) in ranked:
            line = f"    {self.share(inclusive) * 100:5.1f}% / {self.share(own) * 100:4.1f}%"
            if us_per_op:
                cost_in, cost_self = self.share(inclusive) * us_per_op, self.share(own) * us_per_op
                line += f" ({cost_in:4.1f} / {cost_self:4.1f})"
            lines.append(f"{line}  {name}")
        leaves = ", ".join(
            f"{pkg} {self.share(n) * 100:.0f}%" for pkg, n in self.leaf_packages.most_common(7)
        )
        lines.append(f"  innermost frame by package: {leaves}")
        return "\n".join(lines)


def _frame(raw: str) -> tuple[str, str]:
    """``"func (path/file.py)"`` -> ``("path/file.py", "func")``."""
    raw = raw.strip()
    if raw.endswith(")") and " (" in raw:
        func, _, path = raw[:-1].rpartition(" (")
        return path, func
    return "", raw


def _package(path: str) -> str:
    if path.startswith("<") or "/" not in path:
        return "python" if path.startswith("<") or path.endswith(".py") else path or "?"
    return path.split("/", 1)[0]


def parse_raw(text: str, title: str) -> Profile:
    """Aggregate py-spy's ``--format raw`` output (collapsed stacks, one per line)."""
    profile = Profile(title)
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f[0] and not f[0].startswith("process ")]
        if not frames:
            continue
        profile.samples += count
        leaf_path, _ = frames[-1]
        profile.leaf_packages[_package(leaf_path)] += count
        ours = {f"{path}:{func}" for path, func in frames if path.startswith(PACKAGE)}
        if not ours:
            continue
        profile.ours += count
        if ours - {WAIT_CALLBACK}:
            profile.ours_without_wait += count
        for name in ours:
            profile.functions.setdefault(name, [0, 0])[0] += count
        if leaf_path.startswith(PACKAGE):
            leaf = f"{leaf_path}:{frames[-1][1]}"
            profile.functions[leaf][1] += count
    return profile


def _record(pid: int, seconds: float, output: Path, subprocesses: bool) -> str:
    command = [
        str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(RATE),
        "--format",
        "raw",
        "--nolineno",
        "--output",
        str(output),
    ]
    if subprocesses:
        command.append("--subprocesses")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if done.returncode != 0 or not output.exists():
        raise RuntimeError(f"py-spy failed ({done.returncode}): {done.stderr[-2000:]}")
    return output.read_text()


def profile_http(run: Run, view: str, seconds: float, key: str = "ours") -> Profile:
    """Our gunicorn (competitor ``key``) under wrk on ``view``; py-spy on master and workers."""
    config = run.config
    with run.serving(key, f"profile-{key}-{view}") as (gunicorn, clients):
        results: dict[str, Any] = {}

        def load() -> None:
            results.update(
                run_wrk(run.tools["wrk"], gunicorn.port, view, clients, seconds + 2, ITEMS)
            )

        driver = threading.Thread(target=load, name="dgpb-profile-wrk")
        driver.start()
        time.sleep(1.0)
        raw = _record(gunicorn.proc.pid, seconds, TMP / f"profile-http-{key}-{view}.raw", True)
        driver.join(timeout=seconds + 60)
    profile = parse_raw(
        raw,
        f"HTTP /{view}/, {key}, {plural(config.workers, 'gevent worker')}, "
        f"{clients} wrk connections, "
        f"{seconds:g} s",
    )
    profile.load = {k: results.get(k) for k in ("rps", "p99_ms", "errors")}
    return profile


def profile_micro(run: Run, seconds: float) -> Profile:
    """``micro.py --competitor ours`` (through Django); py-spy on that process."""
    config = run.config
    warmup = 1.0
    proc = subprocess.Popen(
        [
            sys.executable,
            str(MICRO),
            "--competitor=ours",
            f"--greenlets={config.micro_greenlets}",
            f"--warmup={warmup}",
            f"--seconds={seconds + 1}",
        ],
        env=run.micro_env("ours"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run.register(proc)
    try:
        time.sleep(warmup + 0.5)
        raw = _record(proc.pid, seconds, TMP / "profile-micro.raw", False)
        stdout, _ = proc.communicate(timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)
        run.settle()
    profile = parse_raw(
        raw,
        f"micro, ours through Django, {config.micro_greenlets} greenlets "
        "(checkout + SELECT 1 + return)",
    )
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if lines:
        ops = float(json.loads(lines[-1])["query"]["ops_per_s"])
        profile.load = {"ops_per_s": ops, "us_per_op": 1e6 / ops if ops else None}
    return profile


def profile_ours(run: Run, seconds: float) -> list[Profile]:
    """Profiles of the loads whose targets concern us: pk, transaction and wait views, micro.

    The wait view is profiled in transaction mode, when that mode was measured.
    """
    out = []
    loads = [("ours", "item"), ("ours", "tx")]
    if OURS_TRANSACTION in run.config.competitors and OURS_TRANSACTION not in run.skipped:
        loads.append((OURS_TRANSACTION, "wait"))
    for key, view in loads:
        print(f"  profiling {key} on /{view}/ ({seconds:g} s)...", flush=True)
        out.append(profile_http(run, view, seconds, key))
    print(f"  profiling ours in the micro loop ({seconds:g} s)...", flush=True)
    out.append(profile_micro(run, seconds))
    return out
