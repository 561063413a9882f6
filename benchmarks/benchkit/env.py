"""The benchmark's own environment: ``.bench-venv`` at the repository root, and system tools.

``ensure_venv`` makes the virtualenv if missing (or stale: the requirements
or our ``setup.cfg`` changed since it was made) and installs
``benchmarks/requirements.txt`` plus our package from the working tree
(``pip install -e .``). ``reexec_in_venv`` then runs the orchestrator itself
with that interpreter, so everything below imports from one environment.
``ensure_tools`` installs ``wrk`` and ``pgbouncer`` with apt when missing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
ROOT = BENCH_DIR.parent
VENV = ROOT / ".bench-venv"
VENV_PYTHON = VENV / "bin" / "python"
REQUIREMENTS = BENCH_DIR / "requirements.txt"
STAMP = VENV / ".bench-stamp"
#: Set in the re-executed orchestrator, so it never re-executes twice.
REEXEC_MARK = "DGPB_IN_BENCH_VENV"
#: Seconds pip gets to install everything (it is usually well under a minute).
INSTALL_LIMIT = 600


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (REQUIREMENTS, ROOT / "setup.cfg", ROOT / "pyproject.toml"):
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def _run(command: list[str]) -> None:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=INSTALL_LIMIT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )


def ensure_venv() -> float:
    """Create or refresh ``.bench-venv``; return the seconds it took (0 when up to date)."""
    fingerprint = _fingerprint()
    if VENV_PYTHON.exists() and STAMP.exists() and STAMP.read_text().strip() == fingerprint:
        return 0.0
    started = time.monotonic()
    print(f"setting up {VENV.relative_to(ROOT)} (benchmark environment)...", flush=True)
    if not VENV_PYTHON.exists():
        _run([sys.executable, "-m", "venv", str(VENV)])
    pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, "-r", str(REQUIREMENTS)])
    _run([*pip, "-e", str(ROOT)])
    STAMP.write_text(fingerprint + "\n")
    return time.monotonic() - started


def in_venv() -> bool:
    """True when this interpreter is ``.bench-venv``'s."""
    return Path(sys.prefix).resolve() == VENV.resolve()


def reexec_in_venv(argv: list[str]) -> None:
    """Replace this process by the same script under ``.bench-venv``'s Python (no return)."""
    env = {**os.environ, REEXEC_MARK: "1"}
    os.execve(str(VENV_PYTHON), [str(VENV_PYTHON), *argv], env)


def ensure_tools() -> list[str]:
    """Install ``wrk`` and ``pgbouncer`` from Debian if missing; return what was installed."""
    missing = [
        package
        for package, binary in (("wrk", "wrk"), ("pgbouncer", "pgbouncer"))
        if find_binary(binary) is None
    ]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(
            f"missing {', '.join(missing)}: install them (Debian: apt-get install -y "
            f"{' '.join(missing)}) and run again"
        )
    print(f"installing {', '.join(missing)} with apt-get...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=INSTALL_LIMIT, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return missing


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin (pgbouncer lives there, often off a user's PATH)."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found
