"""Replication ingest: events/s applied durably with views, from 1 MB sync batches.

Runs in-process through the real serving path, ``Replicator.handle`` (decode the sync
message, validate every event, one group commit per batch appending to the log and
folding into the views, answer with what the peer lacks), on a fresh durable node.
Baseline in the same run: LMDB scan + msgpack decode + a bare LWW fold of the same events.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks import bare, dataset
from benchmarks.common import Row, best_of, row, scratch_dir
from crdt import VersionVector
from crdt.version_vector import OriginSeen
from node import events as ev
from node.replica import Replica, wall_clock_ms
from node.server import tune_gc
from replication import protocol
from replication.protocol import RawEvent, Sync, Tag
from replication.replicator import Limits, Replicator
from replication.transport import MemoryTransport

T = TypeVar("T")
NAME = "replication ingest"
BATCH_BYTES_MAX = 1_048_576
SENDER = "us~0000bbbb"


def sync_bodies(encoded: list[tuple[RawEvent, int]]) -> list[bytes]:
    """Sync requests of at most 1 MB of events (and the replicator's event cap) each."""
    events_max = Limits().batch_events_max
    bodies: list[bytes] = []
    seen: dict[str, int] = {}
    batch: list[RawEvent] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        summary = VersionVector({o: OriginSeen(c) for o, c in seen.items()})
        bodies.append(protocol.encode(Sync(Tag.SYNC_REQUEST, SENDER, summary, tuple(batch))))
        batch, size = [], 0

    for raw, length in encoded:
        if batch and (size + length > BATCH_BYTES_MAX or len(batch) >= events_max):
            flush()
        batch.append(raw)
        size += length
        seen[raw.dot.origin] = max(seen.get(raw.dot.origin, 0), raw.dot.counter)
    if batch:
        flush()
    return bodies


async def _ingest(data_dir: Path, bodies: list[bytes]) -> tuple[float, int]:
    replica = Replica.open(data_dir, "eu")
    try:
        replica.bind(asyncio.get_running_loop())
        replicator = Replicator(replica, MemoryTransport(), ["us"], now_ms=wall_clock_ms)
        gc.collect()
        started = time.perf_counter()
        for body in bodies:
            await replicator.handle(body)
        elapsed = time.perf_counter() - started
        return elapsed, replica.state.seq
    finally:
        replica.close()


def _as_a_node(work: Callable[[], T]) -> T:
    """Run ``work`` with the collector tuned as a node process tunes it at start-up, then
    put the collector back as it was for the benchmarks that run after this one."""
    thresholds = gc.get_threshold()
    tune_gc()
    try:
        return work()
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def run(quick: bool) -> list[Row]:
    n = 50_000 if quick else 200_000
    encoded = []
    for e in dataset.events(n):
        data = ev.encode(e)
        encoded.append((RawEvent(e.dot, data), len(data)))
    bodies = sync_bodies(encoded)
    with scratch_dir("ingest") as tmp:
        base = Path(tmp)
        bare.write_log(base / "bare", (raw.data for raw, _ in encoded))
        del encoded
        baseline_s = best_of(lambda: bare.scan_decode_fold(base / "bare"), 3)
        elapsed, count = _as_a_node(lambda: asyncio.run(_ingest(base / "node", bodies)))
    assert count == n, f"ingested {count} of {n} events"
    rate, baseline_rate = n / elapsed, n / baseline_s
    what = f"events/s ({n:,} events, {len(bodies)} batches)"
    return [
        row(NAME, what, rate, "events/s", baseline_rate, at_least=0.3),
        row(NAME, "events/s absolute", rate, "events/s", at_least=100_000, absolute=True),
    ]
