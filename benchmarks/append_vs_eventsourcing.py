"""Durable append through the store's own API versus the ``eventsourcing`` library on
SQLite (issue 6, item 2).

Both sides write to files in the same temporary directory (same file system), and both
are durable when a call returns: ours is LMDB with ``sync`` (fsync per commit), theirs is
``eventsourcing.sqlite`` (WAL journal, ``synchronous=FULL``: the WAL is synced on every
commit; the benchmark reads both pragmas back and refuses to run otherwise).

Events: one "Set" of a 32-character value to the field ``name`` of one of ``USERS``
users, by actor ``bench``. Users are created before timing on both sides.

Figures (events/s, ratio = ours / theirs), each side's best of ``ROUNDS`` rounds, the
two sides taking turns on a fresh directory each round (one round of each swung by a
quarter from run to run on this shared machine):

1. **concurrent writes**: ``N`` independent requests, at most ``CONCURRENCY`` in flight,
   each ``await replica.write(commands.patch(...), actor=...)`` -- the same path an HTTP
   ``PATCH`` takes (it reads the entity, checks it, drafts the event, the writer stamps
   and commits it; concurrent requests share one commit: group commit). The library
   has no group commit: a request is ``user.set_field(...)`` then ``app.save(user)``,
   one SQLite transaction each.
2. **batched append**: ``N`` ready-made events in batches of ``BATCH``. Ours:
   ``replica.ingest(batch)`` (events from a peer: validated, appended, folded into the
   views and indexes, one commit per batch). Theirs: the batch's events are triggered on
   the aggregates untimed, then ``app.save(*users)`` stores them in one transaction
   (it keeps no views: its aggregates are in memory). A second baseline also times
   making the events (``user.set_field``: building each event object and applying it to
   the in-memory aggregate, the library's nearest thing to our fold into the views).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Row, print_table, row

NAME = "append_vs_eventsourcing"
USERS = 100
CONCURRENCY = 512
BATCH = 1_000
PEER = "us~0badc0de"
EPOCH_MS = 1_700_000_000_000


def _value(i: int) -> str:
    return f"value-{i:026d}"  # 32 characters


# --------------------------------------------------------------------------- ours


async def _ours(root: Path, writes: int, ingests: int) -> dict[str, float]:
    from crdt import Dot
    from node import commands
    from node.events import Event, Op, encode
    from node.replica import Replica

    replica = Replica.open(root / "eu", "eu")
    try:
        replica.bind(asyncio.get_running_loop())
        await asyncio.gather(
            *(
                replica.write(commands.create("user", f"u{i}", {}), actor="bench")
                for i in range(USERS)
            )
        )
        gate = asyncio.Semaphore(CONCURRENCY)
        written: list[Event] = []

        async def one(i: int) -> None:
            async with gate:
                decide = commands.patch("user", f"u{i % USERS}", {"name": _value(i)}, None)
                written.extend(await replica.write(decide, actor="bench"))

        commits = replica.writer.commits
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(writes)))
        t_write = time.perf_counter() - t0
        commits = replica.writer.commits - commits
        if len(written) != writes:
            raise AssertionError(f"{len(written)} events written for {writes} writes")

        incoming = [
            Event(
                Dot(PEER, i + 1),
                ((EPOCH_MS + i // 64) << 16) | (i % 64),
                f"user/u{i % USERS}",
                Op.SET,
                "name",
                _value(i),
                frozenset(),
                "bench",
            )
            for i in range(ingests)
        ]
        t0 = time.perf_counter()
        new = 0
        for start in range(0, ingests, BATCH):
            new += len(await replica.ingest(incoming[start : start + BATCH]))
        t_ingest = time.perf_counter() - t0
        if new != ingests:
            raise AssertionError(f"{new} events ingested of {ingests}")
        return {
            "write_s": t_write,
            "ingest_s": t_ingest,
            "events_per_commit": writes / max(1, commits),
            "event_bytes": len(encode(written[-1])),
        }
    finally:
        replica.close()


# --------------------------------------------------------------------------- eventsourcing


@functools.cache
def _their_classes() -> tuple[Any, Any]:
    """The library's aggregate and application, made once: it registers each class by
    its topic for good, and refuses a second class of the same name (a second round)."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event

    class User(Aggregate):
        @event("Created")
        def __init__(self, uid: str) -> None:
            self.uid = uid
            self.fields: dict[str, str] = {}

        @event("Set")
        def set_field(self, field: str, value: str, actor: str) -> None:
            self.fields[field] = value

    class Users(Application):  # type: ignore[type-arg]
        pass

    return User, Users


def _theirs(root: Path, writes: int, ingests: int) -> dict[str, float]:
    User, Users = _their_classes()
    env = {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(root / "es.db")}
    app: Any = Users(env=env)
    try:
        datastore = app.recorder.datastore
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("PRAGMA journal_mode")
            journal = str(cursor.fetchone()[0]).lower()
            cursor.execute("PRAGMA synchronous")
            synchronous = int(cursor.fetchone()[0])
        if journal != "wal" or synchronous < 2:
            raise RuntimeError(f"SQLite is not durable here: {journal=} {synchronous=}")
        users = [User(f"u{i}") for i in range(USERS)]
        app.save(*users)

        t0 = time.perf_counter()
        for i in range(writes):
            user = users[i % USERS]
            user.set_field("name", _value(i), "bench")
            app.save(user)
        t_write = time.perf_counter() - t0

        t_ingest = t_trigger = 0.0
        for start in range(0, ingests, BATCH):
            t0 = time.perf_counter()
            for i in range(start, min(ingests, start + BATCH)):
                users[i % USERS].set_field("name", _value(i), "bench")
            t1 = time.perf_counter()
            app.save(*users)
            t_ingest += time.perf_counter() - t1
            t_trigger += t1 - t0

        expected = USERS + writes + ingests
        with datastore.transaction(commit=False) as cursor:
            cursor.execute("SELECT COUNT(*) FROM stored_events")
            (count,) = cursor.fetchone()
            cursor.execute(
                "SELECT AVG(LENGTH(originator_id) + 8 + LENGTH(topic) + LENGTH(state))"
                " FROM stored_events WHERE topic LIKE '%.Set'"
            )
            (row_bytes,) = cursor.fetchone()
        if count != expected:
            raise AssertionError(f"eventsourcing stored {count} events, expected {expected}")
        last = app.repository.get(users[0].id)
        if last.fields.get("name") != users[0].fields.get("name"):
            raise AssertionError("eventsourcing did not read back what it stored")
        return {
            "write_s": t_write,
            "ingest_s": t_ingest,
            "trigger_s": t_trigger,
            # a stored row: id (UUID text), version (8), topic, state (JSON)
            "event_bytes": float(row_bytes),
        }
    finally:
        app.close()


# --------------------------------------------------------------------------- run


ROUNDS = 3  # each side runs this many times, taking turns; each figure is its best round


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each time (``*_s``) of the round that was fastest at it; the rest of the first."""
    return {
        key: min(r[key] for r in rounds) if key.endswith("_s") else value
        for key, value in rounds[0].items()
    }


def run(quick: bool) -> list[Row]:
    writes = 600 if quick else 5_000
    ingests = 5_000 if quick else 50_000
    ours_rounds, theirs_rounds = [], []
    for round_ in range(ROUNDS):
        root = Path(tempfile.mkdtemp(prefix=f"bench-append-{round_}-"))
        try:
            ours_rounds.append(asyncio.run(_ours(root, writes, ingests)))
            theirs_rounds.append(_theirs(root, writes, ingests))
        finally:
            shutil.rmtree(root, ignore_errors=True)
    ours, theirs = _best(ours_rounds), _best(theirs_rounds)
    per_commit = ours["events_per_commit"]
    return [
        row(NAME, f"{writes:,} concurrent writes (<= {CONCURRENCY} in flight; "
            f"{per_commit:.0f} events/commit) vs app.save per event",
            writes / ours["write_s"], "events/s", writes / theirs["write_s"], at_least=3.0),
        row(NAME, f"{ingests:,} events, ingest in batches of {BATCH:,} vs app.save per batch",
            ingests / ours["ingest_s"], "events/s", ingests / theirs["ingest_s"],
            at_least=3.0),
        row(NAME, "same, vs making the events on the aggregates + app.save per batch",
            ingests / ours["ingest_s"], "events/s",
            ingests / (theirs["ingest_s"] + theirs["trigger_s"]), at_least=3.0),
        row(NAME, "stored bytes per Set event (ours: encoded event; theirs: row)",
            ours["event_bytes"], "bytes", theirs["event_bytes"]),
    ]  # fmt: skip


if __name__ == "__main__":
    import sys

    print_table(run(quick="--quick" in sys.argv))
