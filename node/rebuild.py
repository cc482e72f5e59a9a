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

import gc
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable, Generator
from contextlib import closing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from node import log, views
from node.kv import DATABASES, WriteTxn
from node.lmdb_kv import DataDirBusy, LmdbKV, snapshot
from node.writer import gc_paused

T = TypeVar("T")

# A rebuild of a log this long folds in worker processes (``replay_views``); a shorter
# one in the rebuilding process, where a worker's start (~0.2 s) would cost more than
# it saves.
REPLAY_WORKERS_EVENTS_MIN = 100_000
REPLAY_WORKERS_MAX = 4
# A worker folds this many entities, then hands them over at once.
REPLAY_BLOCK_STREAMS = 256


def replay_views(txn: WriteTxn, *, data_dir: Path | None = None, workers: int = 1) -> int:
    """Clear the views and fold every event of the log into them; return the count.

    With ``data_dir`` (where ``txn``'s environment lives) and ``workers`` > 1, a log of at
    least ``REPLAY_WORKERS_EVENTS_MIN`` events is folded by that many worker processes,
    each reading it from what was last committed (the views being cleared here are
    not) and folding every ``workers``-th block of entities; this process stores the
    blocks in order. Folding is nine tenths of a rebuild, storing the rest, so on two
    cores two workers take about half the time. The views are the same either way.
    """
    views.clear(txn)
    with gc_paused():
        if data_dir is not None and workers > 1 and _log_length(txn) >= REPLAY_WORKERS_EVENTS_MIN:
            with closing(_folded_by_workers(data_dir, workers)) as folded_by_workers:
                count = views.store_replayed(txn, folded_by_workers)
        else:
            folded = (views.replayed(s, wires) for _, s, wires in log.stored_streams(txn))
            count = views.store_replayed(txn, folded)
        views.find_conflicts(txn)
    views.mark_fold_rules(txn)
    return count


def replay_workers() -> int:
    """Worker processes a rebuild folds in by default: one per core this process may use."""
    return max(1, min(REPLAY_WORKERS_MAX, len(os.sched_getaffinity(0))))


def _log_length(txn: WriteTxn) -> int:
    last = next(txn.scan("events", reverse=True), None)
    return 0 if last is None else log.from_u64(last[0])


class ReplayFailed(RuntimeError):
    """A rebuild's worker process failed: nothing of the rebuild is committed."""


def _folded_by_workers(data_dir: Path, workers: int) -> Generator[views.Replayed, None, None]:
    """Every entity of the log folded (``views.replayed``), in stream order, by
    ``workers`` processes: block ``n`` of ``REPLAY_BLOCK_STREAMS`` entities comes from
    worker ``n % workers``."""
    context = multiprocessing.get_context("spawn")  # safe in a process with threads
    pipes = [context.Pipe(duplex=False) for _ in range(workers)]
    processes = [
        context.Process(
            target=_fold_part,
            args=(str(data_dir), part, workers, REPLAY_BLOCK_STREAMS, sender),
            name=f"replay-{part}",
            daemon=True,
        )
        for part, (_, sender) in enumerate(pipes)
    ]
    try:
        for process in processes:
            process.start()
        for _, sender in pipes:
            sender.close()  # the worker's end: a worker that dies leaves its pipe at EOF
        receivers = [receiver for receiver, _ in pipes]
        block = 0
        while True:
            message = _received(receivers[block % workers])
            if message is None:  # no block `block`: none after it either
                break
            number, folded = message
            if number != block:
                raise ReplayFailed(f"a rebuild worker sent block {number}, not {block}")
            yield from folded
            block += 1
        for part, receiver in enumerate(receivers):
            if part != block % workers and _received(receiver) is not None:
                raise ReplayFailed("a rebuild worker sent a block past the last one")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def _received(receiver: Connection) -> tuple[int, list[views.Replayed]] | None:
    try:
        message: tuple[str, Any] = receiver.recv()
    except EOFError:
        raise ReplayFailed("a rebuild worker ended without finishing its part") from None
    kind, body = message
    if kind == "failed":
        raise ReplayFailed(f"a rebuild worker failed: {body}")
    return None if kind == "done" else body


def _fold_part(
    data_dir: str, part: int, parts: int, block_streams: int, sender: Connection
) -> None:
    """A worker process: fold this part's blocks of entities (see ``_folded_by_workers``)
    and send each, then ("done", None); ("failed", why) if it cannot."""
    try:
        gc.disable()  # as gc_paused: a fold makes nothing cyclic
        with snapshot(Path(data_dir)) as txn:
            block, folded = -1, list[views.Replayed]()
            for number, stream, wires in log.stored_streams(
                txn, part=part, parts=parts, block_streams=block_streams
            ):
                if number != block and folded:
                    sender.send(("block", (block, folded)))
                    folded = []
                block = number
                folded.append(views.replayed(stream, wires))
            if folded:
                sender.send(("block", (block, folded)))
        sender.send(("done", None))
    except Exception:
        sender.send(("failed", traceback.format_exc(limit=5)))
    finally:
        sender.close()


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


def rebuild_views(data_dir: Path, *, workers: int | None = None) -> int:
    """Rebuild the views of the replica in ``data_dir`` (folding in ``workers`` processes,
    by default one per core): 0 when done, 2 if it is not one, 1 if a running node holds
    it or a worker failed (nothing changed then)."""
    started = time.perf_counter()
    jobs = replay_workers() if workers is None else workers

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
        return log.new_incarnation(txn, log.Identity(replica_id.partition("~")[0], replica_id))

    try:
        old, new = _write_stopped(data_dir, "giving it a new incarnation", renew)
    except _Refused as refused:
        return refused.code
    print(f"{old} is now {new.replica_id}: its writes take new dots from here on")
    return 0
