"""Rebuild the views from the log: views are disposable, the log is the truth.

One write transaction clears every view and index and folds every event again, so a
crash halfway leaves the old views, never half-rebuilt ones. Events are taken entity by
entity (each entity's events in local order, from the ``streams`` index), decoded as
stored (the log validated them when it appended them), and each entity is folded whole
(``fold_stored``, the writer's fold over many events at once) and stored once, its
member slices too; uniqueness conflicts are found in one pass at the end. The views are
those the writer built incrementally, byte for byte. A directory that is not a
replica's (no ``meta`` region) is refused, and nothing is created in it.

Also here, for the node stopped too: a new incarnation for a data directory restored
from a backup (``renew_incarnation``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from node import log, views
from node.kv import DATABASES, WriteTxn
from node.lmdb_kv import DataDirBusy, LmdbKV
from node.writer import gc_paused

T = TypeVar("T")

# Entities folded before their views are stored: bounds the memory a rebuild holds.
REPLAY_PENDING_MAX = 1_000


def replay_views(txn: WriteTxn) -> int:
    """Clear the views and fold every event of the log into them; return the count."""
    views.clear(txn)
    count = 0
    pending = views.Pending(rebuild=True)
    with gc_paused():
        for stream, wires in log.stored_streams(txn):  # entity by entity
            views.replay(txn, stream, wires, pending)
            count += len(wires)
            if len(pending) >= REPLAY_PENDING_MAX:
                pending.flush(txn)
        pending.flush(txn)
        views.find_conflicts(txn)
    views.mark_fold_rules(txn)
    return count


def _replica_id(data_dir: Path) -> str | None:
    """The replica id stored in ``data_dir``, looked up read-only; None if not a replica's."""
    if not (data_dir / "data.mdb").is_file():
        return None
    try:
        env = lmdb.open(str(data_dir), readonly=True, max_dbs=len(DATABASES))
    except lmdb.Error:  # not an LMDB file at all
        return None
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            region, replica_id = txn.get(b"region", db=meta), txn.get(b"replica_id", db=meta)
    except lmdb.NotFoundError:
        return None
    finally:
        env.close()
    return None if region is None or replica_id is None else bytes(replica_id).decode()


def _replica_id_or_why_not(data_dir: Path) -> str | None:
    """The replica id stored in ``data_dir``; else None, having said why on stderr."""
    replica_id = _replica_id(data_dir)
    if replica_id is None:
        print(f"{data_dir} is not a replica data directory (no meta region)", file=sys.stderr)
    return replica_id


class _Refused(Exception):
    """An offline tool cannot work on a directory (it said why): its exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _write_stopped(data_dir: Path, doing: str, work: Callable[[WriteTxn, str], T]) -> tuple[str, T]:
    """``work(txn, replica_id)`` in one write transaction on the replica in ``data_dir``,
    whose node is stopped; raises ``_Refused`` (2: no replica's, 1: a node holds it)."""
    replica_id = _replica_id_or_why_not(data_dir)
    if replica_id is None:
        raise _Refused(2)
    try:
        kv = LmdbKV(data_dir)
    except DataDirBusy as busy:
        print(f"{busy}: stop the node before {doing}", file=sys.stderr)
        raise _Refused(1) from None
    try:
        return replica_id, kv.write(lambda txn: work(txn, replica_id))
    finally:
        kv.close()


def rebuild_views(data_dir: Path) -> int:
    """Rebuild the views of the replica in ``data_dir``: 0 when done, 2 if it is not one,
    1 if a running node holds it."""
    started = time.perf_counter()
    try:
        replica_id, count = _write_stopped(
            data_dir, "rebuilding its views", lambda txn, _: replay_views(txn)
        )
    except _Refused as refused:
        return refused.code
    elapsed_s = time.perf_counter() - started
    print(f"rebuilt views of {replica_id} from {count} events in {elapsed_s:.2f} s")
    return 0


def renew_incarnation(data_dir: Path) -> int:
    """Give the replica in ``data_dir`` a new incarnation: for a directory restored from a
    backup, whose later commits its peers may hold under dots it would take again (and
    then never converge with them). Its events stay; those it lost come back from its
    peers as another origin's. 0 when done, 2 if it is not a replica's, 1 if a running
    node holds it."""

    def renew(txn: WriteTxn, replica_id: str) -> log.Identity:
        return log.new_incarnation(txn, log.Identity(replica_id.partition("~")[0], replica_id))

    try:
        old, new = _write_stopped(data_dir, "giving it a new incarnation", renew)
    except _Refused as refused:
        return refused.code
    print(f"{old} is now {new.replica_id}: its writes take new dots from here on")
    return 0
