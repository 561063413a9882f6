"""Find a PostgreSQL server for tests, the demo and benchmarks; start an embedded one if none.

Order: an explicit DSN in the environment (``DGP_DSN``) wins; else a server on
127.0.0.1:5432 (user ``postgres``, trust auth); else a throwaway embedded
PostgreSQL from the ``pgserver`` package's binaries (the ``embedded`` or
``test`` extra), or from the server binaries installed on the machine
(:func:`postgres_binaries`), started in a temporary directory, listening on a
free loopback TCP port and a Unix socket, and deleted when the process exits.
``DGP_EMBEDDED=1`` (or ``prefer_embedded=True``) skips the local server.

Not used by the pool itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import parse_dsn

ENV_DSN = "DGP_DSN"
ENV_EMBEDDED = "DGP_EMBEDDED"
ENV_PG_BIN = "DGP_PG_BIN"
LOCAL_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"

_embedded: Any = None


def _reachable(dsn: str) -> bool:
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.Error:
        return False
    conn.close()
    return True


def server_dsn(*, prefer_embedded: bool = False) -> tuple[str, str]:
    """Return ``(dsn, where)`` of a usable server; ``where`` says which one was picked.

    Raises RuntimeError when there is no DSN, no local server and ``pgserver``
    is not installed.
    """
    explicit = os.environ.get(ENV_DSN)
    if explicit:
        return explicit, f"${ENV_DSN}"
    prefer_embedded = prefer_embedded or os.environ.get(ENV_EMBEDDED) == "1"
    if not prefer_embedded and _reachable(LOCAL_DSN):
        return LOCAL_DSN, "127.0.0.1:5432"
    return _start_embedded(), "embedded pgserver"


def postgres_binaries() -> Path | None:
    """Where the embedded server's ``initdb`` and ``pg_ctl`` are, or None.

    ``$DGP_PG_BIN`` if set; else the ``pgserver`` package's binaries; else a
    PostgreSQL installed on the machine (``/usr/lib/postgresql/<newest>/bin``
    on Debian and Ubuntu, or the directory of ``pg_ctl`` on ``PATH``): pgserver
    has no wheel for every Python (none for 3.13 yet).
    """
    explicit = os.environ.get(ENV_PG_BIN)
    if explicit:
        return Path(explicit)
    try:
        with warnings.catch_warnings():
            # platformdirs complains when XDG_RUNTIME_DIR is unset (CI, containers).
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        pass
    else:
        return Path(POSTGRES_BIN_PATH)
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("pg_ctl")
    if found and (Path(found).parent / "initdb").exists():
        return Path(found).parent
    return None


def _start_embedded() -> str:
    global _embedded
    if _embedded is None:
        _embedded = EmbeddedServer()
        _embedded.start()
    return _embedded.dsn()


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedServer:
    """A throwaway PostgreSQL cluster run from the ``pgserver`` package's binaries.

    It listens on 127.0.0.1 at a free TCP port (so PgBouncer, proxies and
    subprocesses reach it like any server) and on a Unix socket in its data
    directory. As root, the server runs as the unprivileged ``pgserver`` user,
    as PostgreSQL requires. The cluster is stopped and its directory removed
    by :meth:`cleanup`, which also runs when the creating process exits.

    Tests use :meth:`stop`, :meth:`start` and :meth:`restart` to inject real
    outages, and :meth:`standby` / :meth:`promote` for a real failover.
    Raises RuntimeError when ``pgserver`` is not installed, and
    ``subprocess.CalledProcessError`` (with the server log in the message's
    output) when initdb or the start fails.
    """

    SYSTEM_USER = "pgserver"

    def __init__(self, *, datadir: str | None = None, port: int | None = None) -> None:
        bin_dir = postgres_binaries()
        if bin_dir is None:  # pragma: no cover - depends on the machine
            raise RuntimeError(
                f"no PostgreSQL: set ${ENV_DSN}, run a server on 127.0.0.1:5432, "
                "or install the embedded one: pip install 'django-gevent-pool[embedded]' "
                "(pgserver: wheels for Python up to 3.12), or PostgreSQL's server "
                f"binaries (initdb, pg_ctl; ${ENV_PG_BIN} names their directory)"
            )
        self.bin = bin_dir
        self._owns_dir = datadir is None
        self.root = Path(datadir or tempfile.mkdtemp(prefix="dgp-pg-"))
        self.pgdata = self.root / "data"
        self.host = "127.0.0.1"
        self.port = port or _free_port(self.host)
        self._user = None
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            self._user = self.SYSTEM_USER
            self._ensure_system_user()
        self._pid = os.getpid()
        atexit.register(self.cleanup)

    # ------------------------------------------------------------ lifecycle

    def initdb(self) -> None:
        """Create the cluster (trust auth, replication allowed from loopback)."""
        self._own(self.root)
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "--auth=trust",
            "--encoding=utf8",
            "-U",
            "postgres",
            "--no-sync",
        )
        self._configure()

    def _configure(self) -> None:
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.pgdata}'",
            "max_connections": "200",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "wal_level": "replica",
            "max_wal_senders": "5",
            "hot_standby": "on",
            "logging_collector": "off",
        }
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        conf = self.pgdata / "postgresql.conf"
        # Appended: later lines win over initdb's defaults.
        with conf.open("a") as handle:
            handle.write("\n# django-gevent-pool embedded server\n" + text)

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the server (creating the cluster first if needed); wait until it accepts."""
        if not (self.pgdata / "PG_VERSION").exists():
            self.initdb()
        self._pg_ctl("-w", "-t", str(int(timeout)), "-l", str(self.root / "log"), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends every session, ``immediate`` is a crash."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop then start again on the same port; sessions end as in :meth:`stop`."""
        self._pg_ctl("-w", "-m", mode, "-l", str(self.root / "log"), "restart")

    def promote(self) -> None:
        """Promote a standby to a primary; returns once it accepts writes."""
        self._pg_ctl("-w", "promote")

    def is_running(self) -> bool:
        done = subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"],
            capture_output=True,
            user=self._user,
            check=False,
        )
        return done.returncode == 0

    def standby(self) -> EmbeddedServer:
        """A streaming standby of this (running) server, started, on its own free port.

        Made with ``pg_basebackup -R``: it follows this server until promoted.
        """
        replica = EmbeddedServer()
        replica._own(replica.root)
        replica._run(
            "pg_basebackup",
            "-D",
            str(replica.pgdata),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        replica._configure()
        replica.start()
        return replica

    def cleanup(self) -> None:
        """Stop the server at once and remove its directory. Idempotent; creator only."""
        if os.getpid() != self._pid:
            return  # a forked child: the server is its parent's
        atexit.unregister(self.cleanup)
        if (self.pgdata / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                self._pg_ctl("-w", "-m", "immediate", "stop")
        if self._owns_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ addresses

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq DSN over loopback TCP."""
        return f"host={self.host} port={self.port} user=postgres dbname={dbname}"

    # ------------------------------------------------------------ helpers

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.pgdata), *args)

    def _run(self, program: str, *args: str) -> None:
        try:
            subprocess.run(
                [str(self.bin / program), *args],
                capture_output=True,
                text=True,
                check=True,
                user=self._user,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.CalledProcessError as exc:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            exc.output = f"{exc.stdout}{exc.stderr}\n--- server log ---\n{tail}"
            raise

    def _ensure_system_user(self) -> None:
        import pwd

        try:
            pwd.getpwnam(self.SYSTEM_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "-s", "/bin/sh", self.SYSTEM_USER], check=True, capture_output=True
            )
        # The binaries and every folder above the data directory must be
        # reachable by that user.
        for path in (self.bin, self.bin.parent / "lib", self.bin.parent / "share"):
            if path.exists():
                _make_readable(path)
        _make_traversable(self.root)

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            import pwd

            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _make_traversable(path: Path) -> None:
    """Let other users pass through every folder above ``path``."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        wanted = mode | stat.S_IXGRP | stat.S_IXOTH
        if wanted != mode:
            with contextlib.suppress(PermissionError):
                parent.chmod(wanted)


def _make_readable(path: Path) -> None:
    """Let other users read and run what is under ``path`` (the pgserver binaries)."""
    _make_traversable(path)
    bits = stat.S_IRGRP | stat.S_IROTH
    for current, dirs, files in os.walk(path):
        here = Path(current)
        here.chmod(here.stat().st_mode | bits | stat.S_IXGRP | stat.S_IXOTH)
        for name in files:
            item = here / name
            mode = item.stat().st_mode
            extra = bits | (stat.S_IXGRP | stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            if mode | extra != mode:
                item.chmod(mode | extra)
        del dirs  # walked by os.walk


def django_settings(dsn: str, dbname: str | None = None) -> dict[str, Any]:
    """The ``DATABASES`` entry fields (NAME, USER, PASSWORD, HOST, PORT) for ``dsn``."""
    params = parse_dsn(dsn)
    return {
        "NAME": dbname or params.get("dbname", "postgres"),
        "USER": params.get("user", ""),
        "PASSWORD": params.get("password", ""),
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
    }


def ensure_database(dsn: str, dbname: str) -> str:
    """Create ``dbname`` on the server of ``dsn`` if missing; return a DSN pointing at it."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [dbname])
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{dbname}"')
    finally:
        conn.close()
    params = parse_dsn(dsn)
    params["dbname"] = dbname
    return " ".join(f"{k}={v}" for k, v in params.items())


if __name__ == "__main__":  # pragma: no cover
    dsn, where = server_dsn()
    print(f"{where}: {dsn}")
