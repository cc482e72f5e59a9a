"""The sync message: round trips, a pinned golden encoding, and every way to break it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from crdt import Dot, VersionVector
from crdt import codec as crdt_codec
from crdt.version_vector import OriginSeen
from node import events as ev
from node.events import Event, Op
from replication import protocol
from replication.protocol import BadMessage, RawEvent, Sync, Tag

GOLDEN = Path(__file__).parent.parent / "golden" / "sync_v1.json"
STAMP = (1_700_000_000_000 << 16) | 3
EU, US, AP = "eu~a1b2c3d4", "us~0f0f", "ap~0123abcd"


def raw(event: Event) -> RawEvent:
    return RawEvent(event.dot, ev.encode(event))


def golden_messages() -> dict[str, Sync]:
    summary = VersionVector({EU: OriginSeen(2, frozenset({5})), US: OriginSeen(1)})
    events = (
        raw(Event(Dot(EU, 3), STAMP, "user/homer", Op.CREATE, actor="admin")),
        raw(Event(Dot(EU, 4), STAMP + 1, "user/homer", Op.SET, "name", "Homer")),
        raw(Event(Dot(US, 2), STAMP + 2, "group/staff", Op.ADD, "members", "homer")),
    )
    return {
        "request": Sync(Tag.SYNC_REQUEST, EU, summary, events),
        "response": Sync(Tag.SYNC_RESPONSE, US, VersionVector.of([Dot(US, 1)]), (), True),
    }


def test_golden_vectors_pin_todays_encoding() -> None:
    pinned = json.loads(GOLDEN.read_text())
    messages = golden_messages()
    assert {name: protocol.encode(m).hex() for name, m in messages.items()} == pinned
    for name, message in messages.items():
        expect = Tag.SYNC_REQUEST if name == "request" else Tag.SYNC_RESPONSE
        assert protocol.decode(bytes.fromhex(pinned[name]), expect=expect) == message


ids = st.from_regex(ev.ENTITY_ID_RE, fullmatch=True)
origins = st.sampled_from([EU, US, AP])


@st.composite
def syncs(draw: st.DrawFn) -> Sync:
    dots = draw(st.lists(st.builds(Dot, origins, st.integers(1, 1_000)), unique=True))
    events = tuple(
        raw(Event(d, STAMP + n, f"user/{draw(ids)}", Op.SET, "name", draw(st.text(max_size=20))))
        for n, d in enumerate(dots)
    )
    summary = VersionVector.of(draw(st.lists(st.builds(Dot, origins, st.integers(1, 50)))))
    tag = draw(st.sampled_from(Tag))
    return Sync(tag, draw(origins), summary, events, draw(st.booleans()))


@hsettings(max_examples=50)
@given(syncs())
def test_encode_decode_round_trip(message: Sync) -> None:
    decoded = protocol.decode(protocol.encode(message), expect=message.tag)
    assert (decoded.tag, decoded.replica_id, decoded.summary, decoded.more) == (
        message.tag,
        message.replica_id,
        message.summary,
        message.more,
    )
    # The wire groups events by origin; within an origin their order is kept.
    for origin in (EU, US, AP):
        assert [e for e in decoded.events if e.dot.origin == origin] == [
            e for e in message.events if e.dot.origin == origin
        ]
    assert len(decoded.events) == len(message.events)
    assert {e.dot: e for e in protocol.read_batch(decoded).events} == {
        r.dot: ev.decode(r.data) for r in message.events
    }


def good_wire() -> list[Any]:
    message = golden_messages()["request"]
    wire = msgpack.unpackb(protocol.encode(message))
    assert isinstance(wire, list)
    return wire


def refused(wire: Any, *, expect: Tag = Tag.SYNC_REQUEST) -> str:
    with pytest.raises(BadMessage) as caught:
        protocol.decode(msgpack.packb(wire), expect=expect)
    return str(caught.value)


def with_item(item: Any) -> list[Any]:
    wire = good_wire()
    wire[4] = [[EU, [item]]]
    return wire


def test_decode_accepts_the_good_wire() -> None:
    assert (
        protocol.decode(msgpack.packb(good_wire()), expect=Tag.SYNC_REQUEST)
        == (golden_messages()["request"])
    )


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", msgpack.packb([1]) + b"\x00"])
def test_bytes_that_are_not_one_msgpack_value_are_refused(data: bytes) -> None:
    with pytest.raises(BadMessage, match="not msgpack"):
        protocol.decode(data, expect=Tag.SYNC_REQUEST)


@pytest.mark.parametrize("wire", [{}, "sync", [], [1, 1, EU, [2, 1, []], []]])
def test_a_message_that_is_not_a_six_element_array_is_refused(wire: Any) -> None:
    assert "a sync message is" in refused(wire)


@pytest.mark.parametrize("tag", [2, 0, 3, "1", None])
def test_wrong_tag_is_refused(tag: Any) -> None:
    wire = good_wire()
    wire[0] = tag
    assert "expected a sync_request" in refused(wire)


def test_a_request_is_not_taken_for_a_response() -> None:
    assert "expected a sync_response" in refused(good_wire(), expect=Tag.SYNC_RESPONSE)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_protocol_version_is_refused(version: Any) -> None:
    wire = good_wire()
    wire[1] = version
    assert "protocol version" in refused(wire)


@pytest.mark.parametrize("replica_id", ["eu", "EU~abcd", "eu~ab", "", 7, None, "eu~abcd\n"])
def test_bad_replica_id_is_refused(replica_id: Any) -> None:
    wire = good_wire()
    wire[2] = replica_id
    assert "bad replica id" in refused(wire)


@pytest.mark.parametrize(
    "summary",
    [
        None,
        [],
        [99, 1, []],  # unknown tag
        [int(crdt_codec.Tag.VERSION_VECTOR), 2, []],  # unknown version
        [int(crdt_codec.Tag.VERSION_VECTOR), 1, [[EU, 3, [2]]]],  # cloud inside the run
        [int(crdt_codec.Tag.VERSION_VECTOR), 1, [[EU, -1, []]]],
        [int(crdt_codec.Tag.VERSION_VECTOR), 1, [[EU, 1]]],
        [int(crdt_codec.Tag.VERSION_VECTOR), 1, "x"],
    ],
)
def test_bad_summary_is_refused(summary: Any) -> None:
    wire = good_wire()
    wire[3] = summary
    assert "bad summary" in refused(wire)


def test_a_summary_that_is_another_crdt_is_refused() -> None:
    wire = good_wire()
    wire[3] = crdt_codec.to_wire(Dot(EU, 1))
    assert "summary must be a version vector" in refused(wire)


@pytest.mark.parametrize("more", [0, 1, None, "yes"])
def test_more_must_be_a_boolean(more: Any) -> None:
    wire = good_wire()
    wire[5] = more
    assert "more must be a boolean" in refused(wire)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({}, "events must be an array"),
        ("x", "events must be an array"),
        ([EU], "an event group is"),
        ([[EU]], "an event group is"),
        ([[EU, [], []]], "an event group is"),
        ([["EU~abcd", []]], "bad origin"),
        ([[7, []]], "bad origin"),
        ([[EU, {}]], "items must be an array"),
        ([[EU, [[1]]]], "an event is [counter, bytes]"),
        ([[EU, [[1, b"x", b"y"]]]], "an event is [counter, bytes]"),
        ([[EU, [b"x"]]], "an event is [counter, bytes]"),
        ([[EU, [[1, "text, not bytes"]]]], "event bytes missing"),
        ([[EU, [[1, None]]]], "event bytes missing"),
        ([[EU, [[1, b"x" * (ev.EVENT_BYTES_MAX + 1)]]]], "too large"),
    ],
)
def test_bad_event_group_shapes_are_refused(groups: Any, message: str) -> None:
    wire = good_wire()
    wire[4] = groups
    assert message in refused(wire)


@pytest.mark.parametrize("counter", [0, -1, ev.COUNTER_MAX + 1, "1", None, 1.0, True])
def test_bad_counter_is_refused(counter: Any) -> None:
    assert "bad counter" in refused(with_item([counter, b"x"]))


def test_too_many_events_are_refused() -> None:
    items = [[n, b""] for n in range(1, protocol.BATCH_EVENTS_MAX + 2)]
    wire = good_wire()
    wire[4] = [[EU, items]]
    assert "more than" in refused(wire)


def test_as_many_events_as_allowed_decode() -> None:
    items = [[n, b""] for n in range(1, protocol.BATCH_EVENTS_MAX + 1)]
    wire = good_wire()
    wire[4] = [[EU, items[:-10]], [US, items[-10:]]]
    message = protocol.decode(msgpack.packb(wire), expect=Tag.SYNC_REQUEST)
    assert len(message.events) == protocol.BATCH_EVENTS_MAX


def carried(items: list[RawEvent]) -> Sync:
    return Sync(Tag.SYNC_REQUEST, US, VersionVector(), tuple(items))


def test_an_event_sent_under_another_dot_refuses_the_batch() -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    liar = RawEvent(Dot(EU, 3), ev.encode(Event(Dot(EU, 2), STAMP, "user/bart", Op.CREATE)))
    with pytest.raises(BadMessage, match="was sent as"):
        protocol.read_batch(carried([good, liar]))


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",
        msgpack.packb("an event"),
        msgpack.packb([1, EU, 2]),
        ev.encode(Event(Dot(EU, 2), STAMP, "user/not an id", Op.CREATE)),
        ev.encode(Event(Dot(EU, 2), STAMP, "user/bart", Op.ADD, "members", None)),
        msgpack.packb([0, EU, 2, STAMP, "user/bart", 1, None, None, [], ""]),
    ],
)
def test_an_invalid_event_refuses_the_whole_batch(data: bytes) -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    with pytest.raises(BadMessage, match=f"event {EU}:2"):
        protocol.read_batch(carried([good, RawEvent(Dot(EU, 2), data)]))


def test_an_event_of_a_newer_format_is_quarantined_not_refused() -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    newer = RawEvent(
        Dot(AP, 1), msgpack.packb([2, AP, 1, STAMP, "user/homer", 3, "name", "H", [], ""])
    )
    message = protocol.decode(protocol.encode(carried([good, newer])), expect=Tag.SYNC_REQUEST)
    batch = protocol.read_batch(message)
    assert [e.dot for e in batch.events] == [good.dot]
    assert batch.quarantined == [newer]


def test_a_boolean_counter_is_a_bad_message_not_a_crash() -> None:
    """Found writing these tests: ``true`` passed the int check and Dot raised a bare
    ValueError, which the HTTP endpoint answered with a 500 and sync_with did not catch."""
    assert "bad counter" in refused(with_item([True, b"x"]))
