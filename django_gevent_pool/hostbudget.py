"""One connection budget for every process of a host: ``HOST_MAX_CONNS``.

No Django, no driver, no daemon. The budget of one server, database and user
is a lock file; each of its ``HOST_MAX_CONNS`` slots is a one-byte range of
that file, and a process holds a slot by holding a write lock on its byte:

- **Crash-safe.** The locks are open-file-description locks
  (``F_OFD_SETLK``, Linux), which the kernel drops when the last descriptor of
  the description closes: a process that exits, even by ``SIGKILL``, frees its
  slots at once. There is no counter a crash could leave wrong. Where OFD
  locks do not exist (macOS), POSIX record locks (``F_SETLK``) are used: also
  dropped at exit, and, as the lock file is opened once per process, with the
  same meaning.
- **Never blocks.** Every lock is taken non-blocking; waiting for a slot is
  the pool's business (it queues its checkouts and polls, cooperatively).
- **Fork.** A forked child shares its parent's open file description, hence
  its locks: the child closes its inherited descriptor at once (the parent's
  slots stay the parent's) and opens its own on first use.

Besides the slots, three control bytes:

- ``_HEADER``: held briefly while a process joins, so two newcomers cannot
  both find "nobody here" and write different budgets.
- ``_MEMBERS``: every member holds a shared lock on it. A newcomer that finds
  members reads the budget they wrote in the file and must agree; one that
  finds none writes its own (an old file of a finished deployment is not a
  conflict).
- ``_DEMAND``: a process whose checkouts wait for a slot holds a shared lock
  on it; the others see it with one ``F_OFD_GETLK`` and close idle
  connections sooner, so a busy process gets what idle ones give back.
- The waiters' bytes: a waiting process also holds one byte of its own there,
  so how many processes wait can be counted (:meth:`HostBudget.share`): a
  process holding more than its fair share gives slots up, one below it is
  served first.

Counting locks costs about two ``F_OFD_GETLK`` calls per process holding
some, not one per byte: a query returns one conflicting lock, and the ranges
on either side of it are asked again.

Who may join: the lock file is created ``0600`` in a directory of the
process's own user (``HOST_LOCK_DIR``), so the budget is shared by the
processes of one OS user. A file that cannot be opened raises
:class:`~django_gevent_pool.errors.PoolConfigError` saying so.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import struct
import tempfile
import time
import weakref
from collections.abc import Mapping
from typing import Any

from . import sync
from .errors import PoolConfigError

# Byte offsets in the lock file. Slot i is the byte _SLOTS + i.
_HEADER = 0
_MEMBERS = 1
_DEMAND = 2
_WAITERS = 64  # one byte per waiting process, up to _SLOTS
_SLOTS = 4096

_SETLK: int = getattr(fcntl, "F_OFD_SETLK", fcntl.F_SETLK)
_GETLK: int = getattr(fcntl, "F_OFD_GETLK", fcntl.F_GETLK)
#: True where the kernel has open-file-description locks (Linux >= 3.15).
OFD_LOCKS = hasattr(fcntl, "F_OFD_SETLK")

# struct flock { short l_type; short l_whence; off_t l_start; off_t l_len; pid_t l_pid; }
# in native alignment; l_pid must be 0 for OFD locks. Padded to the C size.
_FLOCK = "hhqqi"
_FLOCK_SIZE = max(struct.calcsize(_FLOCK), 32)
# Joining waits at most this long for another newcomer's header lock (held for
# microseconds): longer means a process stopped while joining (SIGSTOP).
_JOIN_WITHIN = 2.0
_MAGIC = "django-gevent-pool host budget"


def default_lock_dir() -> str:
    """Where lock files live unless ``HOST_LOCK_DIR`` says otherwise.

    ``/dev/shm`` where it exists (memory-backed, and unaffected by systemd's
    ``PrivateTmp``, which gives each service its own ``/tmp``), else the
    system's temporary directory; in both a subdirectory of the user's own.
    """
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"django-gevent-pool-{os.geteuid()}")


def _flock(kind: int, start: int, length: int = 1) -> bytes:
    packed = struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)
    return packed + b"\0" * (_FLOCK_SIZE - len(packed))


def _try_lock(fd: int, kind: int, start: int, length: int = 1) -> bool:
    """Take (or, with F_UNLCK, drop) a lock on bytes ``start..start+length``; never waits."""
    try:
        fcntl.fcntl(fd, _SETLK, _flock(kind, start, length))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _conflicts(fd: int, kind: int, start: int) -> bool:
    """Would a ``kind`` lock on byte ``start`` conflict with another's? (Our own never do.)"""
    answer = fcntl.fcntl(fd, _GETLK, _flock(kind, start))
    return struct.unpack(_FLOCK, answer[: struct.calcsize(_FLOCK)])[0] != fcntl.F_UNLCK


def _count_locked(fd: int, start: int, end: int) -> int:
    """Bytes in ``start..end`` write-locked by others (adjacent bytes of one owner merge)."""
    count = 0
    todo = [(start, end)]
    size = struct.calcsize(_FLOCK)
    while todo:
        low, high = todo.pop()
        if low >= high:
            continue
        answer = fcntl.fcntl(fd, _GETLK, _flock(fcntl.F_WRLCK, low, high - low))
        kind, _, lock_start, lock_len, _ = struct.unpack(_FLOCK, answer[:size])
        if kind == fcntl.F_UNLCK:
            continue
        first = max(low, lock_start)
        last = high if lock_len == 0 else min(high, lock_start + lock_len)
        count += max(0, last - first)
        todo.append((low, first))
        todo.append((last, high))
    return count


class HostBudget:
    """The slots of one server, database and user, shared by the processes of a host.

    Thread- and greenlet-safe: its own OS lock guards a few syscalls that
    never wait. Slots are numbers; :meth:`take` returns one or None at once,
    :meth:`give` frees it. Built by :func:`budget_for`, one per key per process.
    """

    def __init__(self, key: str, size: int, directory: str) -> None:
        self.key = key
        self.size = size
        self.directory = directory
        self.path = _lock_path(key, directory)
        self._lock = sync.allocate_lock()
        # --- below, changed only under self._lock ---
        self._fd: int | None = None
        self._held: set[int] = set()
        self._next = os.getpid() % size  # where the next search starts
        self._wanting = 0  # pools of this process with checkouts waiting for a slot
        self._waiter_byte: int | None = None  # ours among the waiters' bytes, while wanting
        self._pid = os.getpid()
        _ALL.add(self)

    # ------------------------------------------------------------ slots

    def take(self) -> int | None:
        """A free slot, locked for this process, or None when the host uses them all.

        One non-blocking lock attempt per slot, at most ``size``, starting
        after the last one taken. Raises :class:`PoolConfigError` when the
        lock file cannot be opened or another budget is configured for it.
        """
        with self._lock:  # critical section: non-blocking lock calls only
            fd = self._joined()
            for i in range(self.size):
                slot = (self._next + i) % self.size
                if slot in self._held:
                    continue
                if _try_lock(fd, fcntl.F_WRLCK, _SLOTS + slot):
                    self._held.add(slot)
                    self._next = (slot + 1) % self.size
                    return slot
            return None

    def give(self, slot: int) -> None:
        """Free ``slot`` (a no-op for one this process does not hold, e.g. its parent's)."""
        with self._lock:  # critical section: one unlock
            if slot not in self._held or self._fd is None:
                return
            self._held.discard(slot)
            _try_lock(self._fd, fcntl.F_UNLCK, _SLOTS + slot)

    def held(self) -> int:
        """Slots this process holds (every pool of this budget)."""
        return len(self._held)

    def in_use(self) -> int:
        """Slots held on the whole host: ours, and the others' counted with a few lock queries."""
        with self._lock:  # critical section: non-blocking lock queries only
            fd = self._joined()
            return len(self._held) + _count_locked(fd, _SLOTS, _SLOTS + self.size)

    def share(self) -> tuple[int, int]:
        """This process's fair share, rounded down and up: the budget divided among the
        processes that wait for a slot, this one counted whether it waits or not."""
        with self._lock:  # critical section: non-blocking lock queries only
            others = _count_locked(self._joined(), _WAITERS, _SLOTS)
        return self.size // (others + 1), -(-self.size // (others + 1))

    # ------------------------------------------------------------ demand

    def want(self, wanting: bool) -> None:
        """A pool of this process starts (True) or stops (False) waiting for a slot."""
        with self._lock:  # critical section: count, and one lock call at 0 <-> 1
            fd = self._joined()
            before = self._wanting
            self._wanting = max(0, before + (1 if wanting else -1))
            if before == 0 and self._wanting == 1:
                _try_lock(fd, fcntl.F_RDLCK, _DEMAND)
                # A byte of our own among the waiters', so that they can be counted.
                count = _SLOTS - _WAITERS
                for i in range(count):
                    byte = _WAITERS + (self._pid + i) % count
                    if _try_lock(fd, fcntl.F_WRLCK, byte):
                        self._waiter_byte = byte
                        break
            elif before == 1 and self._wanting == 0:
                _try_lock(fd, fcntl.F_UNLCK, _DEMAND)
                if self._waiter_byte is not None:
                    _try_lock(fd, fcntl.F_UNLCK, self._waiter_byte)
                    self._waiter_byte = None

    def wanted(self) -> bool:
        """Does a process of the host (this one included) wait for a slot? One syscall."""
        with self._lock:  # critical section: one lock query
            if self._wanting:
                return True
            return _conflicts(self._joined(), fcntl.F_WRLCK, _DEMAND)

    def wanted_elsewhere(self) -> bool:
        """Does another process of the host wait for a slot? One syscall."""
        with self._lock:  # critical section: one lock query
            return _conflicts(self._joined(), fcntl.F_WRLCK, _DEMAND)

    # ------------------------------------------------------------ joining

    def _joined(self) -> int:
        """Under the lock: this process's descriptor of the lock file, joining first if needed."""
        if self._pid != os.getpid():
            self._after_fork_in_child()
        if self._fd is None:
            self._fd = self._join()
        return self._fd

    def _join(self) -> int:
        fd = _open_lock_file(self.path, self.directory, self.key)
        try:
            deadline = time.monotonic() + _JOIN_WITHIN
            while not _try_lock(fd, fcntl.F_WRLCK, _HEADER):
                if time.monotonic() >= deadline:
                    raise PoolConfigError(
                        f"host budget of {self.key}: another process has been joining it for "
                        f"{_JOIN_WITHIN:.0f} s (stopped?); lock file {self.path}"
                    )
                # Held for microseconds by a process joining. A real sleep: this
                # runs under our OS lock, where no greenlet may switch away.
                sync.original("time", "sleep")(0.001)
            try:
                if _conflicts(fd, fcntl.F_WRLCK, _MEMBERS):
                    theirs = _read_size(fd)
                    if theirs is not None and theirs != self.size:
                        raise PoolConfigError(
                            f"HOST_MAX_CONNS = {self.size} for {self.key}, but the processes "
                            f"already sharing its budget on this host use {theirs}: every "
                            f"process on this server, database and user must configure the "
                            f"same HOST_MAX_CONNS (lock file {self.path})"
                        )
                else:
                    _write_size(fd, self.key, self.size)
                _try_lock(fd, fcntl.F_RDLCK, _MEMBERS)
            finally:
                _try_lock(fd, fcntl.F_UNLCK, _HEADER)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _after_fork_in_child(self) -> None:
        """Drop the parent's descriptor (closing it frees nothing of the parent's)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = None
        self._held = set()
        self._wanting = 0
        self._waiter_byte = None
        self._pid = os.getpid()
        self._lock = sync.allocate_lock()

    def __repr__(self) -> str:
        return f"<HostBudget {self.key} size={self.size} held={len(self._held)} {self.path}>"


def _lock_path(key: str, directory: str) -> str:
    """The lock file of ``key``'s budget: named by a digest (the key names a database)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return os.path.join(directory, f"budget-{digest}.lock")


def _open_lock_file(path: str, directory: str, key: str) -> int:
    """Open (creating) the lock file, in a directory only this user may write to."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.stat(directory)
    except OSError as exc:
        raise PoolConfigError(
            f"host budget of {key}: cannot create HOST_LOCK_DIR {directory!r}: {exc}"
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise PoolConfigError(f"host budget of {key}: {directory!r} is not a directory")
    mine = info.st_uid == os.geteuid()
    if not mine and (directory == default_lock_dir() or info.st_mode & stat.S_IWOTH):
        # Somebody else made it (or anyone may write in it): they could
        # replace the lock file with one of theirs.
        anyone = " and anyone may write in it" if info.st_mode & stat.S_IWOTH else ""
        raise PoolConfigError(
            f"host budget of {key}: the lock directory {directory!r} belongs to another "
            f"user (uid {info.st_uid}){anyone}; "
            "set OPTIONS['HOST_LOCK_DIR'] to a directory of this user's or its group's"
        )
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        raise PoolConfigError(
            f"host budget of {key}: cannot open the lock file {path}: {exc}. Every process "
            "sharing a budget must be able to open it: run them as the same OS user, or give "
            "them a HOST_LOCK_DIR they share with a lock file they may all write"
        ) from exc


def _read_size(fd: int) -> int | None:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name == "HOST_MAX_CONNS" and value.strip().isdigit():
            return int(value)
    return None


def _write_size(fd: int, key: str, size: int) -> None:
    data = f"{_MAGIC}\nkey={key}\nHOST_MAX_CONNS={size}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


# ---------------------------------------------------------------- registry

_BUDGETS: dict[str, HostBudget] = {}
_REGISTRY_LOCK: Any = None


def budget_for(key: str, size: int, directory: str | None, *, name: str) -> HostBudget:
    """This process's budget for ``key`` (server, database, user), made on first use.

    Two pools of one process with the same key share it. Raises
    :class:`PoolConfigError`, naming ``name``, when they configure different
    sizes or lock directories. Does no I/O: the lock file is opened on the
    first :meth:`HostBudget.take`.
    """
    global _REGISTRY_LOCK
    if _REGISTRY_LOCK is None:
        _REGISTRY_LOCK = sync.allocate_lock()
    directory = directory or default_lock_dir()
    with _REGISTRY_LOCK:  # critical section: find or make
        budget = _BUDGETS.get(key)
        if budget is None:
            budget = _BUDGETS[key] = HostBudget(key, size, directory)
        elif budget.size != size or budget.directory != directory:
            raise PoolConfigError(
                f"{name}: OPTIONS['HOST_MAX_CONNS'] = {size} (lock directory {directory!r}) but "
                f"another alias of this process uses {budget.size} ({budget.directory!r}) for "
                f"the same server, database and user ({key}): they share one budget and must agree"
            )
        return budget


def observe(key: str, size: int, directory: str | None) -> tuple[int, int | None, str]:
    """Look at a budget's lock file without joining it: ``(in use, members' size, path)``.

    ``in use`` counts the slots held by every process of the host (this one
    included); ``members' size`` is the ``HOST_MAX_CONNS`` the processes using
    the budget wrote, or None when nobody uses it. A missing file is a budget
    nobody used yet: ``(0, None, path)``. For reports (``pool_connections``):
    unlike :meth:`HostBudget.take`, this never makes the caller a member, so a
    process starting meanwhile with another budget is not refused because of it.
    Raises OSError when the file exists but cannot be opened.
    """
    path = _lock_path(key, directory or default_lock_dir())
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return 0, None, path
    try:
        theirs = _read_size(fd) if _conflicts(fd, fcntl.F_WRLCK, _MEMBERS) else None
        # The members' slots, however many they configured.
        span = max(size, theirs or 0)
        return _count_locked(fd, _SLOTS, _SLOTS + span), theirs, path
    finally:
        os.close(fd)


def held_here(key: str) -> int:
    """Slots this process holds in the budget of ``key`` (0 when it has none)."""
    budget = _BUDGETS.get(key)
    return 0 if budget is None else budget.held()


def budget_key(host: str | None, port: Any, dbname: str | None, user: str | None) -> str:
    """The budget's identity: ``user@host:port/dbname`` (no password, ever)."""
    host = host or "localhost"
    return f"{user or ''}@{host}:{port or 5432}/{dbname or ''}"


def params_dbname(params: Mapping[str, Any]) -> Any:
    """The database a driver's connect parameters name (libpq's ``dbname``, PyMySQL's)."""
    for key in ("dbname", "database", "db"):
        if params.get(key):
            return params[key]
    return None


def budget_key_of(params: Mapping[str, Any]) -> str:
    """:func:`budget_key` of a driver's connect parameters (libpq's names or PyMySQL's).

    The one place the pool, the checks and ``pool_connections`` get a key
    from: they must agree, or a budget would be counted twice.
    """
    return budget_key(
        params.get("host") or params.get("unix_socket"),
        params.get("port"),
        params_dbname(params),
        params.get("user"),
    )


_ALL: weakref.WeakSet[HostBudget] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = None
    for budget in list(_ALL):
        budget._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
