"""The anti-entropy message: one round trip pushes what the peer lacks and pulls back
what this node lacks, both computed from summaries (contiguous counters plus dot
clouds, so gaps left by out-of-order delivery are found and filled).

Wire, msgpack, protocol version 2::

    request:  [1, 2, sender, check, changes, events]
    response: [2, 2, responder, changes, events, more]

``events`` are the events' own bytes. Every event format version begins
``[version, origin, counter, ...]`` (a new version must keep those three first): the
dot is read from there, so an event of a format this node cannot read still has a
known dot and is quarantined, not lost.

``changes`` is the sender's summary, as ``[origin, contiguous, [cloud...]]`` for each
origin where it differs from a *base* the receiver holds joined with the dots of the
carried events. Every origin not listed is as in that base; one listed as
``[origin, 0, []]`` is one the sender holds nothing of. The base of
- a request whose ``check`` is nil: nothing (the summary is sent whole);
- a request with a ``check``: every summary this sender's earlier requests showed the
  receiver, joined. The sender lists what differs from the part the receiver
  confirmed (by answering), which lies between that base and the sender's summary, so
  what it leaves out is as in the base. The ``check``, a 64-bit digest of the
  receiver's id (as the sender believes it) and the sender's whole summary, is what
  makes that safe: a receiver whose rebuilt summary has another digest (it restarted,
  forgot the sender, is another incarnation, or the request is stale) cannot know what
  the sender lacks, so it answers whole with its id and no events, and the sender then
  sends its summary whole;
- a response with a nil ``responder`` (the request's check matched, so the requester
  knows whom it asked): the request's summary;
- a response naming its ``responder``: nothing.
So a round between peers that agree costs a few dozen bytes however many origins there
are, and a rebuilt summary is exact or refused, never guessed. ``more``: the responder
had more to send than fit.

A message that breaks any rule raises ``BadMessage``: the whole batch is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import msgpack

from crdt import Dot, VersionVector
from crdt import codec as crdt_codec
from crdt.version_vector import OriginSeen
from node.events import (
    COUNTER_MAX,
    EVENT_BYTES_MAX,
    ORIGIN_RE,
    Event,
    InvalidEvent,
    UnknownFormatVersion,
)
from node.events import decode as decode_event
from node.pacing import Slices, run_through

PROTOCOL_VERSION = 2
BATCH_EVENTS_MAX = 50_000
# Events a message's reading takes between turns of the event loop (``decode_slices``,
# ``batch_slices``): some 1.5 ms of finding dots, or 3 ms of decoding events, on the
# 2-core machine this project is measured on.
EVENTS_SLICE = 1_000
NOTHING = OriginSeen()


class Tag(IntEnum):
    SYNC_REQUEST = 1
    SYNC_RESPONSE = 2


class BadMessage(ValueError):
    """A sync message that breaks the protocol; nothing of it may be written."""


class RawEvent(NamedTuple):
    """An event as carried: its bytes, and the dot they begin with (a tuple: a message
    makes one per event)."""

    dot: Dot
    data: bytes


@dataclass(frozen=True, slots=True)
class Sync:
    """A message as its sender builds it: its whole summary, the events it sends, whether
    it had more to send than fit, and the base the summary is sent over (None: whole).

    A request with a base names the ``receiver`` it believes it asks; a response with a
    base (the request's summary) has no ``replica_id``.
    """

    tag: Tag
    replica_id: str | None
    summary: VersionVector
    events: tuple[RawEvent, ...] = ()
    more: bool = False
    base: VersionVector | None = None
    receiver: str | None = None

    def __post_init__(self) -> None:
        if self.tag is Tag.SYNC_REQUEST:
            assert self.replica_id is not None, "a request names its sender"
            assert not self.more, "more is an answer's"
            assert (self.base is None) == (self.receiver is None), "a check names a receiver"
        else:
            assert (self.replica_id is None) != (self.base is None), "named, or over a base"
            assert self.receiver is None, "an answer has no check"


@dataclass(frozen=True, slots=True)
class Received:
    """A message as read: its summary is known once joined with its base (``over``)."""

    tag: Tag
    replica_id: str | None
    changes: Mapping[str, OriginSeen]
    events: tuple[RawEvent, ...] = ()
    more: bool = False
    check: int | None = None

    def over(self, base: VersionVector) -> VersionVector:
        """The sender's summary, given the base it was sent over."""
        joined = {**_with_events(base, self.events).origins, **self.changes}
        return VersionVector({o: s for o, s in joined.items() if s.contiguous or s.cloud})

    @property
    def summary(self) -> VersionVector:
        """What the message alone shows the sender holds: all of it if sent whole."""
        return self.over(VersionVector())

    def event_bytes(self) -> int:
        return sum(len(e.data) for e in self.events)


def _with_events(base: VersionVector, events: Sequence[RawEvent]) -> VersionVector:
    return base.add_all(e.dot for e in events) if events else base


def digest(receiver: str, summary: VersionVector) -> int:
    """The check of a request sent over a base (the codec's encoding is canonical)."""
    data = msgpack.packb([receiver, crdt_codec.to_wire(summary)])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _changes(summary: VersionVector, base: VersionVector) -> list[list[Any]]:
    listed = []
    for origin in sorted(summary.origins.keys() | base.origins.keys()):
        seen = summary.origins.get(origin, NOTHING)
        if seen != base.origins.get(origin, NOTHING):
            listed.append([origin, seen.contiguous, sorted(seen.cloud)])
    return listed


def encode(message: Sync) -> bytes:
    base = VersionVector() if message.base is None else message.base
    changes = _changes(message.summary, _with_events(base, message.events))
    events = [e.data for e in message.events]
    head = [int(message.tag), PROTOCOL_VERSION, message.replica_id]
    if message.tag is Tag.SYNC_REQUEST:
        check = None if message.receiver is None else digest(message.receiver, message.summary)
        return bytes(msgpack.packb([*head, check, changes, events]))
    return bytes(msgpack.packb([*head, changes, events, message.more]))


def decode(data: bytes, *, expect: Tag) -> Received:
    return run_through(decode_slices(data, expect=expect))


def decode_slices(data: bytes, *, expect: Tag) -> Slices[Received]:
    """``decode``, stopping after every ``EVENTS_SLICE`` events read (``node.pacing``)."""
    try:
        wire = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise BadMessage(f"not msgpack: {exc}") from exc
    if not isinstance(wire, list) or len(wire) != 6:
        raise BadMessage("a sync message is a 6-element array")
    tag, version, replica_id = wire[:3]
    if tag != expect:
        raise BadMessage(f"expected a {expect.name.lower()} (tag {int(expect)}), got tag {tag!r}")
    if version != PROTOCOL_VERSION:
        raise BadMessage(f"unknown protocol version {version!r}")
    named = isinstance(replica_id, str) and ORIGIN_RE.fullmatch(replica_id)
    if not named and (replica_id is not None or expect is Tag.SYNC_REQUEST):
        raise BadMessage(f"bad replica id {replica_id!r}")
    if expect is Tag.SYNC_REQUEST:
        check, changes, events = wire[3:]
        # msgpack keeps true apart from 1: refuse a bool wherever an int is meant (and
        # has no int past 64 bits).
        if check is not None and (type(check) is not int or check < 0):
            raise BadMessage(f"bad check {check!r}")
        seen = _read_changes(changes)
        return Received(expect, replica_id, seen, (yield from _read_events(events)), check=check)
    changes, events, more = wire[3:]
    if not isinstance(more, bool):
        raise BadMessage("more must be a boolean")
    seen = _read_changes(changes)
    return Received(expect, replica_id, seen, (yield from _read_events(events)), more)


def _is_counter(value: Any, *, least: int) -> bool:
    return type(value) is int and least <= value <= COUNTER_MAX


def _read_changes(changes: Any) -> dict[str, OriginSeen]:
    if not isinstance(changes, list):
        raise BadMessage("bad summary: changes must be an array")
    read: dict[str, OriginSeen] = {}
    for entry in changes:
        if not isinstance(entry, list) or len(entry) != 3:
            raise BadMessage("bad summary: an entry is [origin, contiguous, [cloud...]]")
        origin, contiguous, cloud = entry
        if not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin) or origin in read:
            raise BadMessage(f"bad summary: bad or repeated origin {origin!r}")
        if not _is_counter(contiguous, least=0) or not isinstance(cloud, list):
            raise BadMessage(f"bad summary: bad entry for {origin}")
        if not all(_is_counter(c, least=contiguous + 2) for c in cloud):
            raise BadMessage(f"bad summary: {origin}'s cloud must lie beyond its gap")
        read[origin] = OriginSeen(contiguous, frozenset(cloud))
    return read


def _read_events(items: Any) -> Slices[tuple[RawEvent, ...]]:
    if not isinstance(items, list):
        raise BadMessage("events must be an array")
    if len(items) > BATCH_EVENTS_MAX:
        raise BadMessage(f"more than {BATCH_EVENTS_MAX} events in one message")
    for data in items:
        if not isinstance(data, bytes) or len(data) > EVENT_BYTES_MAX:
            raise BadMessage("event bytes missing or too large")
    read: list[RawEvent] = []
    for start in range(0, len(items), EVENTS_SLICE):
        if start:
            yield
        read += [RawEvent(dot_of(data), data) for data in items[start : start + EVENTS_SLICE]]
    return tuple(read)


def dot_of(data: bytes) -> Dot:
    """The dot of an event of any format version, read from its leading fields."""
    leading = _leading_fast(data)
    if leading is None:
        leading = _leading(data)
    origin, counter = leading
    if not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin):
        raise BadMessage(f"bad origin {origin!r}")
    if not _is_counter(counter, least=1):
        raise BadMessage(f"bad counter {counter!r}")
    return Dot(origin, counter)


def _leading(data: bytes) -> tuple[Any, Any]:
    """An event's origin and counter, the 2nd and 3rd items of its array, by msgpack."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(data)
    try:
        leading = [unpacker.unpack() for _ in range(min(3, unpacker.read_array_header()))]
    except (ValueError, msgpack.UnpackException) as exc:
        raise BadMessage(f"an event begins [version, origin, counter]: {exc}") from exc
    if len(leading) < 3:
        raise BadMessage("an event begins [version, origin, counter]")
    return leading[1], leading[2]


_UINT_BYTES = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack's uint 8/16/32/64 tags


def _leading_fast(data: bytes) -> tuple[str, int] | None:
    """``_leading`` read straight off the bytes for the shape every encoder here writes
    (a fixarray of 3..15 items, a fixint version, a fixstr or str 8 origin, an unsigned
    counter), at a fifth of the cost of an unpacker; None for any other shape."""
    if len(data) < 4 or not 0x93 <= data[0] <= 0x9F or data[1] > 0x7F:
        return None
    tag = data[2]
    if 0xA0 <= tag <= 0xBF:
        start = 3
        end = start + (tag & 0x1F)
    elif tag == 0xD9:
        start = 4
        end = start + data[3]
    else:
        return None
    if end >= len(data):
        return None
    try:
        origin = data[start:end].decode()
    except UnicodeDecodeError:
        return None
    tag = data[end]
    if tag <= 0x7F:
        return origin, tag
    width = _UINT_BYTES.get(tag)
    if width is None or end + 1 + width > len(data):
        return None
    return origin, int.from_bytes(data[end + 1 : end + 1 + width], "big")


def read_event(raw: RawEvent) -> Event:
    """Decode and validate one carried event; its dot must be the one it was sent under.

    Raises ``UnknownFormatVersion`` (an ``InvalidEvent``) for a newer format, which the
    caller quarantines, and ``BadMessage`` for anything else that is wrong.
    """
    event = decode_event(raw.data, dot=raw.dot)
    if event.dot is not raw.dot:  # decode takes the dot given when the bytes name it
        raise BadMessage(f"event {event.dot} was sent as {raw.dot}")
    return event


@dataclass
class Batch:
    """Events read and accepted from a message, split into readable and quarantined."""

    events: list[Event] = field(default_factory=list)
    quarantined: list[RawEvent] = field(default_factory=list)
    again: list[RawEvent] = field(default_factory=list)  # of dots ``known``, undecoded


def read_batch(message: Received, known: VersionVector | None = None) -> Batch:
    """Every event of ``message``, validated; one bad event refuses the whole batch.

    Events whose dots are ``known`` (already in the log) are left out undecoded: the
    log would skip them anyway, and a peer resending what crossed its request costs
    one dot read, not a decode.
    """
    return run_through(batch_slices(message, known))


def batch_slices(message: Received, known: VersionVector | None = None) -> Slices[Batch]:
    """``read_batch``, stopping after every ``EVENTS_SLICE`` events (``node.pacing``)."""
    batch = Batch()
    for n, raw in enumerate(message.events, 1):
        if known is not None and raw.dot in known:
            batch.again.append(raw)
        else:
            try:
                batch.events.append(read_event(raw))
            except UnknownFormatVersion:
                batch.quarantined.append(raw)
            except InvalidEvent as exc:
                raise BadMessage(f"event {raw.dot}: {exc}") from exc
        if n % EVENTS_SLICE == 0:
            yield
    return batch
