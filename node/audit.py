"""An entity's audit trail and its past states, read off its stream of events.

Both need every event of the entity: whether a write won is a matter of all the others,
and a past state is a fold of those before it. So neither may hold the event loop for
the length of a long stream (a user written at every login, a group of 50,000 members):
a stream's events are read in one snapshot (bytes, a short read), then decoded a chunk
at a time, the loop serving other requests in between; the verdicts (won, why) cost one
pass, and are kept for the next page while the entity has not changed (its stored view,
which every event folded into it changes, is the same).
"""

from __future__ import annotations

import asyncio
import functools
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from crdt import Dot
from crdt.clock import physical_ms
from node import log
from node.events import Event, Op
from node.events import decode as decode_event
from node.fold import ENTITY, EntityState, Folding, showing_life, shows
from node.kv import KV

# Events decoded (or folded) between two turns of the event loop.
DECODE_CHUNK_EVENTS = 2_000
# Trails kept for the next page: at most this many entities, and this many of their
# events all together (a longer stream's trail is not kept; each page reads it again).
TRAILS_KEPT_MAX = 8
TRAIL_EVENTS_KEPT_MAX = 200_000
TRAIL_BYTES_KEPT_MAX = 64 * 1024 * 1024  # of their events as stored
# Streams read and decoded at once (for histories and past states): each holds its whole
# stream meanwhile; more wait. Requests for the history of one stream share one reading.
READINGS_MAX = 2

# Per event: None (not a field write), or whether it won and, if not, why not.
Verdict = tuple[bool, str | None] | None


def iso_of(stamp: int) -> str:
    ms = physical_ms(stamp)
    return _iso_seconds(ms // 1000) + f".{ms % 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    """Formatting a time costs more than the rest of an entity's JSON: stamps repeat."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def verdicts(events: Sequence[Event]) -> list[Verdict]:
    """Whether each field write won and why not, in one pass and one walk per field.

    A write that does not show was cleared: with the life it was written under (every
    create it names was deleted), by a later create of the id made elsewhere at the same
    time (whose life shows), or, naming none, by the create whose life shows (it is
    ordered before it). Of those that show, the greatest of each field won. A loser was
    *overwritten* when the winner's chain of observed winners reaches it (the winner was
    written knowing it), and otherwise lost on (clock, origin).
    """
    state = _fold(events)
    by_dot: dict[Dot, Event] = {}
    deleted_by: dict[Dot, Event] = {}  # a create -> the first delete that removed it
    for e in events:
        by_dot[e.dot] = e
        if e.op is Op.DELETE:
            for removed in e.observed:
                kept = deleted_by.get(removed)
                # The first by the order of writes, not this node's log: every replica
                # names the same one.
                if kept is None or (e.hlc, e.dot) < (kept.hlc, kept.dot):
                    deleted_by[removed] = e
    winners = {
        name: Dot(origin, counter) for name, ((_, origin, counter), _) in state.fields.items()
    }
    reached: dict[str, set[Dot]] = {}  # per field: the dots its winner's chain reaches

    def overwrote(name: str, dot: Dot) -> bool:
        known = reached.get(name)
        if known is None:
            known = reached[name] = set()
            frontier = list(by_dot[winners[name]].observed)
            while frontier:
                seen = frontier.pop()
                if seen not in known:
                    known.add(seen)
                    earlier = by_dot.get(seen)
                    if earlier is not None:
                        frontier.extend(earlier.observed)
        return dot in known

    found: list[Verdict] = []
    for e in events:
        if e.op is not Op.SET or e.field is None:
            found.append(None)
        elif not shows(state, e):
            found.append((False, _cleared(e, deleted_by, state)))
        else:
            winner = winners[e.field]
            if winner == e.dot:
                found.append((True, None))
            elif overwrote(e.field, e.dot):
                found.append((False, f"overwritten by {winner}"))
            else:
                # Not provably concurrent: the winner's region may have seen this write
                # without it being the value the winner replaced.
                why = f"lost to {winner}, which has the greater (clock, origin)"
                found.append((False, why))
    return found


def _cleared(e: Event, deleted_by: dict[Dot, Event], state: EntityState) -> str:
    """Why a write that does not show was cleared."""
    shown = showing_life(state.existence, state.create_stamps)
    if not e.lives:  # ordered before the create whose life shows
        return f"cleared by the create {Dot(*shown)}" if shown else "cleared by a create"
    if shown is not None and e.lives & state.existence.dots(ENTITY):  # a live one, not shown
        return f"cleared by the later create {Dot(*shown)}"
    waiting = sorted(life for life in e.lives if life not in deleted_by)
    if waiting:  # a create it names has not arrived here yet (the others were deleted)
        return f"written under the create {waiting[0]}, which is not here yet"
    life = min(e.lives)
    return f"cleared by the delete {deleted_by[life].dot} of the create {life} it was written under"


def _fold(events: Iterable[Event]) -> EntityState:
    folding = Folding(EntityState())
    for e in events:
        folding.add(e)
    return folding.state()


def item(seq: int, e: Event, verdict: Verdict) -> dict[str, Any]:
    """One entry of an audit trail, as the history answers it."""
    entry: dict[str, Any] = {
        "seq": seq,
        "dot": str(e.dot),
        "origin": e.dot.origin,
        "time": iso_of(e.hlc),
        "hlc": e.hlc,
        "actor": e.actor,
        "op": e.op.name.lower(),
    }
    if e.field is not None:
        entry["field"] = e.field
        entry["value"] = e.value
    if verdict is not None:
        entry["won"] = verdict[0]
        if verdict[1] is not None:
            entry["why"] = verdict[1]
    if e.observed and e.op in (Op.REMOVE, Op.DELETE):
        entry["observed"] = sorted(str(d) for d in e.observed)
    return entry


def history(events: Iterable[tuple[int, Event]]) -> list[dict[str, Any]]:
    """The whole audit trail of one entity (every entry ``item`` makes), at once."""
    listed = list(events)
    found = verdicts([e for _, e in listed])
    return [item(seq, e, v) for (seq, e), v in zip(listed, found, strict=True)]


@dataclass(frozen=True, slots=True)
class Trail:
    """An entity's stream as read in one snapshot, with its verdicts."""

    view: bytes | None  # the entity's stored view then: while it is the same, so is this
    seqs: list[int]
    raws: list[bytes]
    verdicts: list[Verdict]
    bytes: int  # of its events as stored

    def page(self, after: int, limit: int) -> tuple[list[dict[str, Any]], int | None]:
        """The entries after seq ``after``, at most ``limit``, and the next cursor."""
        start = bisect_right(self.seqs, after)
        end = min(len(self.seqs), start + limit)
        entries = [
            item(self.seqs[i], decode_event(self.raws[i]), self.verdicts[i])
            for i in range(start, end)
        ]
        return entries, (self.seqs[end - 1] if end < len(self.seqs) and end > start else None)


async def decoded_chunks(raws: Sequence[bytes]) -> AsyncIterator[list[Event]]:
    """Events from their stored bytes, a chunk at a time, the loop turning between."""
    for start in range(0, len(raws), DECODE_CHUNK_EVENTS):
        if start:
            await asyncio.sleep(0)
        yield [decode_event(raw) for raw in raws[start : start + DECODE_CHUNK_EVENTS]]


async def decoded(raws: Sequence[bytes]) -> list[Event]:
    """Events from their stored bytes (``decoded_chunks``), all of them."""
    return [e async for chunk in decoded_chunks(raws) for e in chunk]


class Audits:
    """Trails and past states of the entities of one replica (see the module)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._trails: OrderedDict[str, Trail] = OrderedDict()
        self._events_kept = 0
        self._bytes_kept = 0
        self._reading: dict[str, asyncio.Future[Trail | None]] = {}  # by stream
        self._readings: asyncio.Semaphore | None = None  # made on the loop that reads

    def _read(self, stream: str) -> tuple[bytes | None, list[tuple[int, bytes]]]:
        with self.kv.read() as txn:
            return txn.get("views", stream.encode()), log.stream_event_bytes(txn, stream)

    async def trail(self, stream: str) -> Trail | None:
        """The entity's trail (None: no event of it here), kept while it is unchanged."""
        kept = self._kept(stream)
        if kept is not None:
            return kept
        reading = self._reading.get(stream)
        if reading is not None:  # another request reads it: one copy, not one each
            return await asyncio.shield(reading)
        future: asyncio.Future[Trail | None] = asyncio.get_running_loop().create_future()
        self._reading[stream] = future
        try:
            async with self._gate():
                view, stored = self._read(stream)
                made = None
                if stored:
                    seqs = [seq for seq, _ in stored]
                    raws = [raw for _, raw in stored]
                    del stored
                    events = await decoded(raws)
                    made = Trail(view, seqs, raws, verdicts(events), sum(map(len, raws)))
                    del events
                    self._keep(stream, made)
            future.set_result(made)
            return made
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no one else may be waiting
            raise
        finally:
            del self._reading[stream]

    def _gate(self) -> asyncio.Semaphore:
        if self._readings is None:
            self._readings = asyncio.Semaphore(READINGS_MAX)
        return self._readings

    def _kept(self, stream: str) -> Trail | None:
        """The trail kept of the entity, if it has not changed since."""
        kept = self._trails.get(stream)
        if kept is None or kept.view != self.kv.get("views", stream.encode()):
            return None
        self._trails.move_to_end(stream)
        return kept

    def _keep(self, stream: str, made: Trail) -> None:
        old = self._trails.pop(stream, None)
        if old is not None:
            self._events_kept -= len(old.seqs)
            self._bytes_kept -= old.bytes
        if (
            made.view is None
            or len(made.seqs) > TRAIL_EVENTS_KEPT_MAX
            or made.bytes > TRAIL_BYTES_KEPT_MAX
        ):
            return
        self._trails[stream] = made
        self._events_kept += len(made.seqs)
        self._bytes_kept += made.bytes
        while (
            len(self._trails) > TRAILS_KEPT_MAX
            or self._events_kept > TRAIL_EVENTS_KEPT_MAX
            or self._bytes_kept > TRAIL_BYTES_KEPT_MAX
        ):
            _, dropped = self._trails.popitem(last=False)
            self._events_kept -= len(dropped.seqs)
            self._bytes_kept -= dropped.bytes

    async def state_at(self, stream: str, includes: Any) -> EntityState | None:
        """The entity folded from its events that ``includes`` takes (None: no event of
        it here), a chunk at a time between turns of the loop."""
        async with self._gate():
            kept = self._kept(stream)
            if kept is not None:
                raws: Sequence[bytes] = kept.raws
            else:
                _, stored = self._read(stream)
                if not stored:
                    return None
                raws = [raw for _, raw in stored]
            folding = Folding(EntityState())
            async for chunk in decoded_chunks(raws):
                for e in chunk:
                    if includes(e):
                        folding.add(e)
            return folding.state()
