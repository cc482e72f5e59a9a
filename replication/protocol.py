"""The anti-entropy message: one round trip pushes what the peer lacks and pulls back
what this node lacks, both computed from summaries (contiguous counters plus dot
clouds, so gaps left by out-of-order delivery are found and filled).

Wire: msgpack ``[tag, version, replica_id, summary, events, more]`` where ``events``
is ``[[origin, [[counter, event_bytes], ...]], ...]``: grouped by origin so an origin
is sent once per batch, and carried as the event's own bytes so an event of a format
this node cannot read still has a known dot and can be quarantined, not lost.
A message that breaks any rule raises ``BadMessage``: the whole batch is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack

from crdt import Dot, VersionVector
from crdt import codec as crdt_codec
from node.events import (
    COUNTER_MAX,
    EVENT_BYTES_MAX,
    ORIGIN_RE,
    Event,
    InvalidEvent,
    UnknownFormatVersion,
)
from node.events import decode as decode_event

PROTOCOL_VERSION = 1
BATCH_EVENTS_MAX = 50_000


class Tag(IntEnum):
    SYNC_REQUEST = 1
    SYNC_RESPONSE = 2


class BadMessage(ValueError):
    """A sync message that breaks the protocol; nothing of it may be written."""


@dataclass(frozen=True, slots=True)
class RawEvent:
    dot: Dot
    data: bytes


@dataclass(frozen=True, slots=True)
class Sync:
    """A request (tag SYNC_REQUEST) or a response (SYNC_RESPONSE): the sender's summary,
    the events it sends, and whether it had more to send than fit."""

    tag: Tag
    replica_id: str
    summary: VersionVector
    events: tuple[RawEvent, ...] = ()
    more: bool = False

    def event_bytes(self) -> int:
        return sum(len(e.data) for e in self.events)


def encode(message: Sync) -> bytes:
    grouped: dict[str, list[list[Any]]] = {}
    for raw in message.events:
        grouped.setdefault(raw.dot.origin, []).append([raw.dot.counter, raw.data])
    return bytes(
        msgpack.packb(
            [
                int(message.tag),
                PROTOCOL_VERSION,
                message.replica_id,
                crdt_codec.to_wire(message.summary),
                [[origin, items] for origin, items in grouped.items()],
                message.more,
            ]
        )
    )


def decode(data: bytes, *, expect: Tag) -> Sync:
    try:
        wire = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadMessage(f"not msgpack: {exc}") from exc
    if not isinstance(wire, list) or len(wire) != 6:
        raise BadMessage("a sync message is [tag, version, replica_id, summary, events, more]")
    tag, version, replica_id, summary, groups, more = wire
    if tag != expect:
        raise BadMessage(f"expected a {expect.name.lower()} (tag {int(expect)}), got tag {tag!r}")
    if version != PROTOCOL_VERSION:
        raise BadMessage(f"unknown protocol version {version!r}")
    if not isinstance(replica_id, str) or not ORIGIN_RE.fullmatch(replica_id):
        raise BadMessage(f"bad replica id {replica_id!r}")
    try:
        vv = crdt_codec.from_wire(summary)
    except crdt_codec.CodecError as exc:
        raise BadMessage(f"bad summary: {exc}") from exc
    if not isinstance(vv, VersionVector):
        raise BadMessage("summary must be a version vector")
    if not isinstance(more, bool):
        raise BadMessage("more must be a boolean")
    return Sync(expect, replica_id, vv, tuple(_events(groups)), more)


def _events(groups: Any) -> Iterable[RawEvent]:
    if not isinstance(groups, list):
        raise BadMessage("events must be an array")
    count = 0
    for group in groups:
        if not isinstance(group, list) or len(group) != 2:
            raise BadMessage("an event group is [origin, [[counter, bytes], ...]]")
        origin, items = group
        if not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin):
            raise BadMessage(f"bad origin {origin!r}")
        if not isinstance(items, list):
            raise BadMessage("an event group's items must be an array")
        for item in items:
            count += 1
            if count > BATCH_EVENTS_MAX:
                raise BadMessage(f"more than {BATCH_EVENTS_MAX} events in one message")
            if not isinstance(item, list) or len(item) != 2:
                raise BadMessage("an event is [counter, bytes]")
            counter, data = item
            # msgpack keeps true apart from 1, and a Dot refuses a bool: refuse it here.
            if type(counter) is not int or not 1 <= counter <= COUNTER_MAX:
                raise BadMessage(f"bad counter {counter!r}")
            if not isinstance(data, bytes) or len(data) > EVENT_BYTES_MAX:
                raise BadMessage("event bytes missing or too large")
            yield RawEvent(Dot(origin, counter), data)


def read_event(raw: RawEvent) -> Event:
    """Decode and validate one carried event; its dot must be the one it was sent under.

    Raises ``UnknownFormatVersion`` (an ``InvalidEvent``) for a newer format, which the
    caller quarantines, and ``BadMessage`` for anything else that is wrong.
    """
    event = decode_event(raw.data)
    if event.dot != raw.dot:
        raise BadMessage(f"event {event.dot} was sent as {raw.dot}")
    return event


@dataclass
class Batch:
    """Events read and accepted from a message, split into readable and quarantined."""

    events: list[Event] = field(default_factory=list)
    quarantined: list[RawEvent] = field(default_factory=list)


def read_batch(message: Sync) -> Batch:
    """Every event of ``message``, validated; one bad event refuses the whole batch."""
    batch = Batch()
    for raw in message.events:
        try:
            batch.events.append(read_event(raw))
        except UnknownFormatVersion:
            batch.quarantined.append(raw)
        except InvalidEvent as exc:
            raise BadMessage(f"event {raw.dot}: {exc}") from exc
    return batch
