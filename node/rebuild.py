"""Rebuild the views from the log: views are disposable, the log is the truth.

One write transaction clears every view and index and folds every event again in
local order, through the same ``views.apply`` the writer uses, so a crash halfway
leaves the old views, never half-rebuilt ones. A directory that is not a replica's
(no ``meta`` region) is refused, and nothing is created in it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lmdb

from node import events as ev
from node import views
from node.kv import DATABASES, WriteTxn
from node.lmdb_kv import DataDirBusy, LmdbKV


def replay_views(txn: WriteTxn) -> int:
    """Clear the views and fold every event of the log into them; return the count."""
    views.clear(txn)
    count = 0
    for _, data in txn.scan("events"):
        views.apply(txn, ev.decode(data))
        count += 1
    return count


def _replica_id(data_dir: Path) -> str | None:
    """The replica id stored in ``data_dir``, looked up read-only; None if not a replica's."""
    if not (data_dir / "data.mdb").is_file():
        return None
    env = lmdb.open(str(data_dir), readonly=True, max_dbs=len(DATABASES))
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin() as txn:
            region, replica_id = txn.get(b"region", db=meta), txn.get(b"replica_id", db=meta)
    except lmdb.NotFoundError:
        return None
    finally:
        env.close()
    return None if region is None or replica_id is None else bytes(replica_id).decode()


def rebuild_views(data_dir: Path) -> int:
    """Rebuild the views of the replica in ``data_dir``: 0 when done, 2 if it is not one,
    1 if a running node holds it."""
    replica_id = _replica_id(data_dir)
    if replica_id is None:
        print(f"{data_dir} is not a replica data directory (no meta region)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        kv = LmdbKV(data_dir)
    except DataDirBusy as busy:
        print(f"{busy}: stop the node before rebuilding its views", file=sys.stderr)
        return 1
    try:
        count = kv.write(replay_views)
    finally:
        kv.close()
    elapsed_s = time.perf_counter() - started
    print(f"rebuilt views of {replica_id} from {count} events in {elapsed_s:.2f} s")
    return 0
