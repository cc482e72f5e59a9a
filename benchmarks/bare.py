"""The bare baseline for ingest and rebuild: LMDB scan + msgpack decode + an LWW fold.

What any Python store must at least do to turn a log of events into state: walk the
stored bytes with a cursor, decode each event, and keep the greatest write per field
(plus existence and membership flags). No validation, no views written, no
durability: the floor under ``Replica.ingest`` and ``replay_views``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lmdb
import msgpack

SET, CREATE, DELETE, ADD, REMOVE = 3, 1, 2, 4, 5


def fold(wires: Iterable[list[Any]]) -> tuple[dict[Any, Any], dict[str, bool], dict[Any, bool]]:
    """A bare LWW fold over decoded event arrays (the node's wire form)."""
    registers: dict[tuple[str, str], tuple[tuple[int, str, int], Any]] = {}
    exists: dict[str, bool] = {}
    members: dict[tuple[str, str], bool] = {}
    for _, origin, counter, hlc, stream, op, field, value, *_ in wires:
        if op == SET:
            key = (hlc, origin, counter)
            held = registers.get((stream, field))
            if held is None or key > held[0]:
                registers[(stream, field)] = (key, value)
        elif op == CREATE:
            exists[stream] = True
        elif op == DELETE:
            exists[stream] = False
        elif op == ADD:
            members[(stream, value)] = True
        elif op == REMOVE:
            members.pop((stream, value), None)
    return registers, exists, members


def scan_decode_fold(path: Path, db_name: bytes | None = b"events") -> int:
    """Scan every value of ``db_name`` in the LMDB at ``path``, decode and fold; the count."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=16, readahead=False)
    try:
        db = env.open_db(db_name, create=False) if db_name else None
        count = 0
        unpackb = msgpack.unpackb

        def wires() -> Iterable[list[Any]]:
            nonlocal count
            with env.begin(db=db, buffers=True) as txn:
                for _, data in txn.cursor():
                    count += 1
                    yield unpackb(data)

        fold(wires())
        return count
    finally:
        env.close()


def write_log(path: Path, encoded: Iterable[bytes], *, chunk: int = 50_000) -> int:
    """A plain LMDB with one database ``events`` of seq -> bytes (for the ingest baseline)."""
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=8 << 30, max_dbs=2, sync=False, metasync=False)
    db = env.open_db(b"events")
    n = 0
    try:
        txn = env.begin(write=True, db=db)
        for data in encoded:
            n += 1
            txn.put(n.to_bytes(8, "big"), data, append=True)
            if n % chunk == 0:
                txn.commit()
                txn = env.begin(write=True, db=db)
        txn.commit()
        env.sync(True)
    finally:
        env.close()
    return n
