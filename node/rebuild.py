"""Rebuild the views from the log: views are disposable, the log is the truth.

One write transaction clears every view and index and folds every event again, so a
crash halfway leaves the old views, never half-rebuilt ones. Events are taken entity by
entity (each entity's events in local order, from the ``streams`` index), decoded as
stored (the log validated them when it appended them), and each entity is folded whole
(``fold_stored``, the writer's fold over many events at once) and stored once, its
member slices too; uniqueness conflicts are found in one pass at the end. The views are
those the writer built incrementally, byte for byte. A directory that is not a
replica's (no ``meta`` region) is refused, and nothing is created in it.

Also here: a new incarnation for a data directory restored from a backup, the node
stopped (``renew_incarnation``), and a backup taken while it runs (``backup``)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import lmdb

from node import log, views
from node.kv import DATABASES, StorageFailed, WriteTxn
from node.lmdb_kv import (
    LOCK_FILE,
    DataDirBusy,
    DataFileTruncated,
    DataFileUnreadable,
    LmdbKV,
    check_data_file,
)
from node.replay_workers import FoldingWorkers, ReplayFailed, WorkersUnavailable
from node.writer import gc_paused

T = TypeVar("T")
logger = logging.getLogger(__name__)

# A rebuild of a log this long folds in worker processes (``replay_views``); a shorter
# one in the rebuilding process, where a worker's start (~0.2 s) would cost more than
# it saves.
REPLAY_WORKERS_EVENTS_MIN = 100_000
REPLAY_WORKERS_MAX = 8  # each reads the whole streams index: more than cores only costs
# A worker folds this many entities, then hands them over at once.
REPLAY_BLOCK_STREAMS = 256


def replay_views(txn: WriteTxn, *, data_dir: Path | None = None, workers: int = 1) -> int:
    """Clear the views and fold every event of the log into them; return the count.

    With ``data_dir`` (where ``txn``'s environment lives) and ``workers`` > 1, a log of at
    least ``REPLAY_WORKERS_EVENTS_MIN`` events is folded by that many worker processes
    (``node.replay_workers``, at most ``REPLAY_WORKERS_MAX``), each reading what was last
    committed (not the views being cleared here) and folding every ``workers``-th block
    of entities; this process stores the blocks in order. Folding is nine tenths of a
    rebuild, storing the rest: on two cores, two workers take about two thirds of the
    time. The views are the same either way. Workers that cannot start: folded here.
    ``ReplayFailed`` if a worker fails (nothing is stored: the caller's write aborts).
    """
    views.clear(txn)
    with gc_paused():
        parts = min(workers, REPLAY_WORKERS_MAX)
        folding = None
        if data_dir is not None and parts > 1 and log.last_seq(txn) >= REPLAY_WORKERS_EVENTS_MIN:
            try:
                folding = FoldingWorkers(data_dir, parts, REPLAY_BLOCK_STREAMS)
            except WorkersUnavailable as exc:
                logger.warning("folding the log in this process: %s", exc)
        if folding is not None:
            with folding:
                count = views.store_replayed(txn, folding.folded())
        else:
            folded = (views.replayed(s, wires) for _, s, wires in log.stored_streams(txn))
            count = views.store_replayed(txn, folded)
        views.find_conflicts(txn)
    views.mark_fold_rules(txn)
    return count


def replay_workers() -> int:
    """Worker processes a rebuild folds in by default: one per core this process may use."""
    return max(1, min(REPLAY_WORKERS_MAX, len(os.sched_getaffinity(0))))


def _replica_id(data_dir: Path) -> str | None:
    """The replica id stored in ``data_dir``, looked up read-only; None if not a replica's."""
    data = data_dir / "data.mdb"
    if not data.is_file():
        return None
    check_data_file(data_dir)
    try:
        env = lmdb.open(str(data_dir), readonly=True, max_dbs=len(DATABASES))
    except lmdb.Error as exc:
        raise DataFileUnreadable(f"{data} cannot be read as an LMDB file: {exc}") from None
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            region, replica_id = txn.get(b"region", db=meta), txn.get(b"replica_id", db=meta)
    except lmdb.NotFoundError:
        return None
    except lmdb.Error as exc:
        raise DataFileUnreadable(f"{data} cannot be read as an LMDB file: {exc}") from None
    finally:
        env.close()
    return None if region is None or replica_id is None else bytes(replica_id).decode()


def _replica_id_or_why_not(data_dir: Path) -> str | None:
    """The replica id stored in ``data_dir``; else None, having said why on stderr."""
    try:
        replica_id = _replica_id(data_dir)
    except (DataFileTruncated, DataFileUnreadable, DataDirBusy) as unreadable:
        print(unreadable, file=sys.stderr)
        return None
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
    except (DataFileTruncated, DataFileUnreadable, lmdb.Error, StorageFailed, OSError) as exc:
        print(f"{data_dir}: cannot open it: {exc}", file=sys.stderr)
        raise _Refused(2) from None
    try:
        return replica_id, kv.write(lambda txn: work(txn, replica_id))
    except (lmdb.Error, StorageFailed) as exc:  # a damaged page, a full disk: not committed
        print(f"{data_dir}: {doing} failed, nothing changed: {exc}", file=sys.stderr)
        raise _Refused(2) from None
    finally:
        kv.close()


def rebuild_views(data_dir: Path, *, workers: int | None = None) -> int:
    """Rebuild the views of the replica in ``data_dir`` (folding in ``workers`` processes,
    by default one per core): 0 when done, 2 if it is not one, 1 if a running node holds
    it or a worker failed (nothing changed then)."""
    started = time.perf_counter()
    jobs = replay_workers() if workers is None else workers
    if jobs > REPLAY_WORKERS_MAX:
        print(f"--workers is at most {REPLAY_WORKERS_MAX}", file=sys.stderr)
        return 2

    def rebuild(txn: WriteTxn, _: str) -> int:
        return replay_views(txn, data_dir=data_dir, workers=jobs)

    try:
        replica_id, count = _write_stopped(data_dir, "rebuilding its views", rebuild)
    except _Refused as refused:
        return refused.code
    except ReplayFailed as failed:
        print(f"{data_dir}: views left as they were: {failed}", file=sys.stderr)
        return 1
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
        # Renewed here, not again when a node starts (as a backup, or after a reboot).
        txn.delete("meta", log.BACKUP_KEY)
        txn.delete("meta", log.UNSYNCED_BOOT_KEY)
        return log.new_incarnation(txn, log.Identity(replica_id.partition("~")[0], replica_id))

    try:
        old, new = _write_stopped(data_dir, "giving it a new incarnation", renew)
    except _Refused as refused:
        return refused.code
    print(f"{old} is now {new.replica_id}: its writes take new dots from here on")
    return 0


def backup(data_dir: Path, dest: Path) -> int:
    """Copy the replica in ``data_dir`` to the new directory ``dest``, its node running or
    not: one read transaction's snapshot (LMDB's copy, compacted), synced, and marked so
    that a node started on it serves as a new incarnation (``log.renew_if_backup``). 0 when
    done, 2 if ``data_dir`` is not a replica's or ``dest`` is not empty."""
    replica_id = _replica_id_or_why_not(data_dir)
    if replica_id is None:
        return 2
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        print(f"{dest} is not an empty directory: back up into a new one", file=sys.stderr)
        return 2
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=len(DATABASES), readahead=False)
    try:
        env.copy(str(dest), compact=True)
    except lmdb.Error as exc:
        print(f"{data_dir}: cannot copy it: {exc}", file=sys.stderr)
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            (dest / "data.mdb").unlink(missing_ok=True)
        return 2
    finally:
        env.close()
    for path in (dest / "data.mdb", dest):  # the copy is not synced by LMDB
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        kv = LmdbKV(dest)
        try:
            kv.write(lambda txn: txn.put("meta", log.BACKUP_KEY, replica_id.encode()))
            with kv.read() as txn:
                seq = log.last_seq(txn)
        finally:
            kv.close()
    except (lmdb.Error, StorageFailed, OSError) as exc:
        # Unmarked, the copy would start as its original, and take dots peers hold.
        print(f"{dest}: cannot mark the copy as a backup: {exc}", file=sys.stderr)
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for name in ("data.mdb", "lock.mdb", LOCK_FILE):
                (dest / name).unlink(missing_ok=True)
        return 2
    (dest / LOCK_FILE).unlink(missing_ok=True)
    elapsed_s = time.perf_counter() - started
    print(
        f"backed up {replica_id} ({seq} events) to {dest} in {elapsed_s:.2f} s: a node "
        "started on it serves as a new incarnation, and gets what it lacks from its peers"
    )
    return 0
