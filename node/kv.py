"""The storage interface the log and views are written against, and its in-memory form.

Named databases of sorted byte keys, read transactions that see a snapshot, and
write transactions run as a function so the backend may retry them (LMDB grows its
map and runs the function again). Two backends pass one contract test suite: the
real one (``node.lmdb_kv``) and this in-memory one, for unit tests of logic above.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, TypeVar

T = TypeVar("T")

DATABASES = (
    "events",  # local seq -> event bytes, in arrival order: the change feed
    "dots",  # origin \0 counter -> seq: idempotence and per-origin range reads
    "streams",  # stream \0 seq -> b"": history and time travel
    "quarantine",  # origin \0 counter -> raw bytes of events too new to read
    "views",  # stream -> folded entity state
    "members",  # group \0 user -> the member's OR-set slice
    "user_groups",  # user \0 group -> b"": a live add of the user (the group may not exist)
    "unique_email",  # email as index_value folds it -> the ids holding it, sorted, \0 between
    "unique_username",  # username, folded likewise -> the ids holding it, sorted, \0 between
    "idx_email",  # before: casefolded email \0 user -> b"" (converted at open, then empty)
    "idx_username",  # before: casefolded username \0 user -> b"" (likewise)
    "idx_search",  # token \0 user -> b""
    "conflicts",  # field \0 value -> ids claiming it after a merge
    "meta",  # replica id, region, counters, summary, schema version
)


class StorageFailed(Exception):
    """The storage refused a commit (its disk full, a file size limit, an I/O error):
    nothing of the commit is written, and a later one may well succeed. ``full``: the
    file could not grow (no space, a quota or a file size limit). ``fatal``: the storage
    refuses everything from now on, reads too (LMDB after a failed write of its meta
    page), until it is opened again."""

    def __init__(self, message: str, *, full: bool, fatal: bool = False) -> None:
        super().__init__(message)
        self.full, self.fatal = full, fatal


def key_after(prefix: bytes) -> bytes | None:
    """The least key greater than every key that starts with ``prefix`` (None: no bound)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


class ReadTxn(Protocol):
    def get(self, db: str, key: bytes) -> bytes | None:
        """The value under ``key``, or None; None for the empty key, which no table holds."""
        ...

    def scan(
        self, db: str, *, prefix: bytes = b"", start: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        """Keys with ``prefix`` in order (from ``start`` inclusive), or backwards from the end."""
        ...


class WriteTxn(ReadTxn, Protocol):
    def put(self, db: str, key: bytes, value: bytes) -> None: ...

    def put_many(
        self, db: str, items: Iterable[tuple[bytes, bytes]], *, append: bool = False
    ) -> None:
        """``put`` each pair in turn, in one call: a commit's rows of one log table.

        ``append``: each key is above the one before it and above every key in ``db``
        (the log's sequence numbers), so LMDB writes it at the end without searching
        for its place. A key that is not raises ``ValueError``; the write aborts whole.
        """
        ...

    def delete(self, db: str, key: bytes) -> None: ...

    def clear(self, db: str) -> None: ...


class KV(Protocol):
    def read(self) -> AbstractContextManager[ReadTxn]: ...

    def get(self, db: str, key: bytes) -> bytes | None:
        """One key, read in a transaction of its own (``read`` for several in one snapshot)."""
        ...

    def getter(self, db: str) -> Callable[[bytes], bytes | None]:
        """``get`` of one table as one function: for the hottest reads (a GET by id), where
        each call a request makes shows in its time."""
        ...

    def write(self, work: Callable[[WriteTxn], T]) -> T:
        """Run ``work`` in one write transaction and commit it durably, or abort on error."""
        ...

    def sync(self) -> None:
        """Make every commit durable, whatever the commit settings skipped."""
        ...

    def close(self) -> None: ...


class _MemoryTxn:
    def __init__(self, dbs: dict[str, dict[bytes, bytes]]) -> None:
        self.dbs = dbs

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.dbs[db].get(key)

    def scan(
        self, db: str, *, prefix: bytes = b"", start: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        table = self.dbs[db]
        keys = sorted(table)
        if reverse:
            # Stop before the least key above the prefix's range, as LMDB's cursor does: a
            # fixed run of 0xff bytes would miss longer keys that carry the prefix.
            end = key_after(prefix)
            stop = len(keys) if end is None else bisect.bisect_left(keys, end)
            chosen = reversed(keys[:stop])
        else:
            chosen = iter(keys[bisect.bisect_left(keys, max(prefix, start or b"")) :])
        for key in chosen:
            if not key.startswith(prefix):
                return
            yield key, table[key]

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.dbs[db][bytes(key)] = bytes(value)

    def put_many(
        self, db: str, items: Iterable[tuple[bytes, bytes]], *, append: bool = False
    ) -> None:
        table = self.dbs[db]
        highest = max(table, default=None) if append else None
        for key, value in items:
            if append:
                if highest is not None and key <= highest:
                    raise ValueError(f"appended key {key!r} is not above {highest!r}")
                highest = key
            self.put(db, key, value)

    def delete(self, db: str, key: bytes) -> None:
        self.dbs[db].pop(key, None)

    def clear(self, db: str) -> None:
        self.dbs[db].clear()


class MemoryKV:
    """Snapshot reads, all-or-nothing writes, no durability: for unit tests only."""

    def __init__(self) -> None:
        self._dbs: dict[str, dict[bytes, bytes]] = {name: {} for name in DATABASES}

    @contextmanager
    def read(self) -> Iterator[ReadTxn]:
        yield _MemoryTxn(self._dbs)  # a writer replaces the dicts, never edits these

    def get(self, db: str, key: bytes) -> bytes | None:
        return self._dbs[db].get(key)

    def getter(self, db: str) -> Callable[[bytes], bytes | None]:
        return lambda key: self._dbs[db].get(key)  # the tables a write replaced, not these

    def write(self, work: Callable[[WriteTxn], T]) -> T:
        draft = {name: dict(table) for name, table in self._dbs.items()}
        result = work(_MemoryTxn(draft))
        self._dbs = draft
        return result

    def sync(self) -> None:
        pass  # nothing here outlives the process

    def close(self) -> None:
        pass
