"""One pool per key (a Django alias) per process, following the settings it was made for.

When the settings behind a key change (the test runner swapping NAME for the
test database, ``override_settings`` on TIME_ZONE...), the next lookup builds a
new pool and closes the old one: its idle connections at once, the ones still
lent when they come back. No Django import here.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from . import sync
from .pool import ConnectionPool

_ALL_REGISTRIES: weakref.WeakSet[PoolRegistry] = weakref.WeakSet()


class _Record:
    __slots__ = ("fingerprint", "pool", "tags")

    def __init__(self, fingerprint: Hashable, pool: ConnectionPool, tags: Mapping[str, Any]):
        self.fingerprint = fingerprint
        self.pool = pool
        self.tags = dict(tags)


class PoolRegistry:
    """Maps a key to the pool built for a fingerprint of its settings."""

    def __init__(self) -> None:
        # An OS lock whatever gevent patched: the sections below never do I/O.
        self._lock = sync.allocate_lock()
        self._records: dict[Hashable, _Record] = {}
        _ALL_REGISTRIES.add(self)

    def get(
        self,
        key: Hashable,
        fingerprint: Hashable,
        factory: Callable[[], ConnectionPool],
        tags: Mapping[str, Any] | None = None,
    ) -> ConnectionPool:
        """The pool for ``key`` built for ``fingerprint``, built by ``factory`` if needed.

        ``factory`` must not do I/O (pools connect lazily). A pool replaced
        because the fingerprint changed is closed after the lock is released.
        """
        record = self._records.get(key)
        if record is not None and record.fingerprint == fingerprint:
            return record.pool
        with self._lock:  # critical section: build or replace the pool for key
            record = self._records.get(key)
            if record is not None and record.fingerprint == fingerprint:
                return record.pool
            old = record
            record = _Record(fingerprint, factory(), tags or {})
            self._records[key] = record
        if old is not None:
            old.pool.close()
        return record.pool

    def pools(self) -> dict[Hashable, ConnectionPool]:
        """The current pool of every key."""
        with self._lock:  # critical section: copy
            return {key: record.pool for key, record in self._records.items()}

    def close(self, key: Hashable | None = None, **tags: Any) -> int:
        """Close and forget the pool of ``key``, or those whose tags match; return how many."""
        with self._lock:  # critical section: pick and forget
            chosen = [
                k
                for k, record in self._records.items()
                if (key is None or k == key)
                and all(record.tags.get(name) == value for name, value in tags.items())
            ]
            records = [self._records.pop(k) for k in chosen]
        for record in records:
            record.pool.close()
        return len(records)


def _after_fork_in_child() -> None:
    """A new lock in the child: another thread of the parent may have held the old one.

    The pools reset themselves (``ConnectionPool`` has its own hook); the
    records stay, so each key keeps its (now empty) pool.
    """
    for registry in list(_ALL_REGISTRIES):
        registry._lock = sync.allocate_lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
