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
from crdt.version_vector import OriginSeen
from node import events as ev
from node.events import Event, Op
from replication import protocol
from replication.protocol import BadMessage, RawEvent, Received, Sync, Tag

GOLDEN = Path(__file__).parent.parent / "golden" / "sync_v2.json"
STAMP = (1_700_000_000_000 << 16) | 3
EU, US, AP = "eu~a1b2c3d4", "us~0f0f", "ap~0123abcd"


def raw(event: Event) -> RawEvent:
    return RawEvent(event.dot, ev.encode(event))


def vv(**entries: tuple[int, set[int]]) -> VersionVector:
    ids = {"eu": EU, "us": US, "ap": AP}
    return VersionVector(
        {ids[o]: OriginSeen(c, frozenset(cloud)) for o, (c, cloud) in entries.items()}
    )


# What eu holds and sends us; what us confirmed of eu's summary before; what us holds.
EU_HOLDS = vv(eu=(4, {6}), us=(2, set()), ap=(1, set()))
US_WAS_TOLD = vv(eu=(2, set()), us=(1, set()), ap=(1, set()))
US_HOLDS = vv(eu=(4, set()), us=(3, set()))
PUSHED = (
    raw(Event(Dot(EU, 3), STAMP, "user/homer", Op.CREATE, actor="admin")),
    raw(Event(Dot(EU, 4), STAMP + 1, "user/homer", Op.SET, "name", "Homer")),
    raw(Event(Dot(US, 2), STAMP + 2, "group/staff", Op.ADD, "members", "homer")),
)
PULLED = (raw(Event(Dot(US, 3), STAMP + 3, "user/homer", Op.SET, "name", "H.")),)


def golden_messages() -> dict[str, Sync]:
    return {
        # Over what us confirmed: only eu's own entry differs from that plus the events.
        "request": Sync(Tag.SYNC_REQUEST, EU, EU_HOLDS, PUSHED, base=US_WAS_TOLD, receiver=US),
        "request_whole": Sync(Tag.SYNC_REQUEST, EU, EU_HOLDS),
        # Over the request's summary: us lacks eu:6 and holds nothing of ap.
        "response": Sync(Tag.SYNC_RESPONSE, None, US_HOLDS, PULLED, True, base=EU_HOLDS),
        "response_whole": Sync(Tag.SYNC_RESPONSE, US, US_HOLDS, PULLED),
    }


def test_golden_vectors_pin_todays_encoding() -> None:
    pinned = json.loads(GOLDEN.read_text())
    messages = golden_messages()
    assert {name: protocol.encode(m).hex() for name, m in messages.items()} == pinned
    decoded = {
        name: protocol.decode(bytes.fromhex(pinned[name]), expect=m.tag)
        for name, m in messages.items()
    }
    assert decoded["request"] == Received(
        Tag.SYNC_REQUEST,
        EU,
        {EU: OriginSeen(4, frozenset({6}))},
        PUSHED,
        check=protocol.digest(US, EU_HOLDS),
    )
    assert decoded["request"].over(US_WAS_TOLD) == EU_HOLDS
    assert decoded["request_whole"].check is None
    assert decoded["request_whole"].summary == EU_HOLDS
    assert decoded["response"].changes == {EU: OriginSeen(4), AP: OriginSeen()}
    assert decoded["response"].replica_id is None
    assert (decoded["response"].events, decoded["response"].more) == (PULLED, True)
    assert decoded["response"].over(EU_HOLDS) == US_HOLDS
    assert decoded["response_whole"].replica_id == US
    assert decoded["response_whole"].summary == US_HOLDS
    assert decoded["response_whole"].more is False


ids = st.from_regex(ev.ENTITY_ID_RE, fullmatch=True)
origins = st.sampled_from([EU, US, AP])
summaries = st.builds(
    VersionVector.of, st.lists(st.builds(Dot, origins, st.integers(1, 50)), max_size=30)
)


names = st.from_regex(r"[A-Za-z][A-Za-z .'-]{0,19}", fullmatch=True)  # as a client writes them


@st.composite
def syncs(draw: st.DrawFn) -> Sync:
    dots = draw(st.lists(st.builds(Dot, origins, st.integers(1, 1_000)), unique=True))
    events = tuple(
        raw(Event(d, STAMP + n, f"user/{draw(ids)}", Op.SET, "name", draw(names)))
        for n, d in enumerate(dots)
    )
    summary, base = draw(summaries), draw(st.none() | summaries)
    if draw(st.booleans()):
        receiver = None if base is None else draw(origins)
        return Sync(Tag.SYNC_REQUEST, draw(origins), summary, events, base=base, receiver=receiver)
    sender = draw(origins) if base is None else None
    return Sync(Tag.SYNC_RESPONSE, sender, summary, events, draw(st.booleans()), base=base)


@hsettings(max_examples=100)
@given(syncs())
def test_encode_decode_round_trip(message: Sync) -> None:
    """Whatever the base, the receiver that holds it rebuilds the summary exactly."""
    decoded = protocol.decode(protocol.encode(message), expect=message.tag)
    assert (decoded.tag, decoded.replica_id, decoded.events, decoded.more) == (
        message.tag,
        message.replica_id,
        message.events,
        message.more,
    )
    base = VersionVector() if message.base is None else message.base
    assert decoded.over(base) == message.summary
    if message.receiver is not None:
        assert decoded.check == protocol.digest(message.receiver, message.summary)
    else:
        assert decoded.check is None
    assert {e.dot: e for e in protocol.read_batch(decoded).events} == {
        r.dot: ev.decode(r.data) for r in message.events
    }


@hsettings(max_examples=50)
@given(summaries, summaries)
def test_what_a_message_alone_shows_never_exceeds_the_summary(
    summary: VersionVector, base: VersionVector
) -> None:
    """Without its base, a message sent over one is still a lower bound of the summary."""
    sent = Sync(Tag.SYNC_RESPONSE, None, summary, base=base)
    assert summary.covers(protocol.decode(protocol.encode(sent), expect=sent.tag).summary)


def test_the_check_covers_the_receiver_and_every_entry() -> None:
    check = protocol.digest(US, EU_HOLDS)
    assert protocol.digest(US, EU_HOLDS) == check
    assert protocol.digest("us~0f0e", EU_HOLDS) != check
    assert protocol.digest(US, EU_HOLDS.add(Dot(AP, 3))) != check
    assert 0 <= check < 1 << 64


def wire_of(name: str) -> list[Any]:
    wire = msgpack.unpackb(protocol.encode(golden_messages()[name]))
    assert isinstance(wire, list)
    return wire


def refused(wire: Any, *, expect: Tag = Tag.SYNC_REQUEST) -> str:
    with pytest.raises(BadMessage) as caught:
        protocol.decode(msgpack.packb(wire), expect=expect)
    return str(caught.value)


def request_with(**fields: Any) -> list[Any]:
    wire = wire_of("request")
    slots = {"sender": 2, "check": 3, "changes": 4, "events": 5}
    for name, value in fields.items():
        wire[slots[name]] = value
    return wire


def carrying(*data: Any) -> list[Any]:
    return request_with(events=list(data))


def test_decode_accepts_the_good_wire() -> None:
    for name, message in golden_messages().items():
        protocol.decode(msgpack.packb(wire_of(name)), expect=message.tag)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01", msgpack.packb([1]) + b"\x00"])
def test_bytes_that_are_not_one_msgpack_value_are_refused(data: bytes) -> None:
    with pytest.raises(BadMessage, match="not msgpack"):
        protocol.decode(data, expect=Tag.SYNC_REQUEST)


@pytest.mark.parametrize("wire", [{}, "sync", [], [1, 2, EU, None, []], [*wire_of("request"), 0]])
def test_a_message_that_is_not_a_six_element_array_is_refused(wire: Any) -> None:
    assert "6-element array" in refused(wire)


@pytest.mark.parametrize("tag", [2, 0, 3, "1", None])
def test_wrong_tag_is_refused(tag: Any) -> None:
    wire = wire_of("request")
    wire[0] = tag
    assert "expected a sync_request" in refused(wire)


def test_a_request_is_not_taken_for_a_response() -> None:
    assert "expected a sync_response" in refused(wire_of("request"), expect=Tag.SYNC_RESPONSE)
    assert "expected a sync_request" in refused(wire_of("response"))


@pytest.mark.parametrize("version", [0, 1, 3, "2", None])
def test_unknown_protocol_version_is_refused(version: Any) -> None:
    wire = wire_of("request")
    wire[1] = version
    assert "protocol version" in refused(wire)


@pytest.mark.parametrize("replica_id", ["eu", "EU~abcd", "eu~ab", "", 7, None, "eu~abcd\n"])
def test_bad_sender_is_refused(replica_id: Any) -> None:
    assert "bad replica id" in refused(request_with(sender=replica_id))


@pytest.mark.parametrize("replica_id", ["eu", "", 7, False])
def test_bad_responder_is_refused(replica_id: Any) -> None:
    wire = wire_of("response")
    wire[2] = replica_id
    assert "bad replica id" in refused(wire, expect=Tag.SYNC_RESPONSE)


@pytest.mark.parametrize("check", [-1, -(1 << 63), "0", b"\x00", 1.0, True, []])
def test_bad_check_is_refused(check: Any) -> None:
    assert "bad check" in refused(request_with(check=check))


@pytest.mark.parametrize(
    "changes",
    [
        None,
        {},
        [EU],
        [[EU, 1]],
        [[EU, 1, [], 0]],
        [["EU~abcd", 1, []]],
        [[7, 1, []]],
        [[EU, 1, []], [EU, 2, []]],  # one origin twice
        [[EU, -1, []]],
        [[EU, True, []]],
        [[EU, 1.0, []]],
        [[EU, ev.COUNTER_MAX + 1, []]],
        [[EU, 1, None]],
        [[EU, 3, [2]]],  # cloud inside the run
        [[EU, 3, [4]]],  # cloud touching the run: not compacted
        [[EU, 3, [True]]],
        [[EU, 3, [ev.COUNTER_MAX + 1]]],
    ],
)
def test_bad_summary_is_refused(changes: Any) -> None:
    assert "bad summary" in refused(request_with(changes=changes))


@pytest.mark.parametrize("more", [0, 1, None, "yes"])
def test_more_must_be_a_boolean(more: Any) -> None:
    wire = wire_of("response")
    wire[5] = more
    assert "more must be a boolean" in refused(wire, expect=Tag.SYNC_RESPONSE)


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ({}, "events must be an array"),
        ("x", "events must be an array"),
        ([["not", "bytes"]], "event bytes missing"),
        (["text, not bytes"], "event bytes missing"),
        ([None], "event bytes missing"),
        ([b"x" * (ev.EVENT_BYTES_MAX + 1)], "too large"),
    ],
)
def test_bad_event_list_shapes_are_refused(events: Any, message: str) -> None:
    assert message in refused(request_with(events=events))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb("an event"),
        msgpack.packb([1, EU]),
        msgpack.packb({"version": 1}),
        b"\x93\x01",  # an array cut short
    ],
)
def test_an_event_that_does_not_begin_with_its_dot_is_refused(data: bytes) -> None:
    assert "an event begins [version, origin, counter]" in refused(carrying(data))


@pytest.mark.parametrize("origin", ["EU~abcd", "eu", 7, None])
def test_an_event_of_a_bad_origin_is_refused(origin: Any) -> None:
    assert "bad origin" in refused(carrying(msgpack.packb([1, origin, 1])))


@pytest.mark.parametrize("counter", [0, -1, ev.COUNTER_MAX + 1, "1", None, 1.0, True])
def test_bad_counter_is_refused(counter: Any) -> None:
    assert "bad counter" in refused(carrying(msgpack.packb([1, EU, counter])))


def test_too_many_events_are_refused() -> None:
    data = [msgpack.packb([1, EU, n]) for n in range(1, protocol.BATCH_EVENTS_MAX + 2)]
    assert "more than" in refused(carrying(*data))


def test_as_many_events_as_allowed_decode() -> None:
    data = [msgpack.packb([1, EU, n]) for n in range(1, protocol.BATCH_EVENTS_MAX + 1)]
    message = protocol.decode(msgpack.packb(carrying(*data)), expect=Tag.SYNC_REQUEST)
    assert len(message.events) == protocol.BATCH_EVENTS_MAX
    assert message.events[-1].dot == Dot(EU, protocol.BATCH_EVENTS_MAX)


def carried(items: list[RawEvent]) -> Received:
    return Received(Tag.SYNC_REQUEST, US, {}, tuple(items))


def test_an_event_sent_under_another_dot_refuses_the_batch() -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    liar = RawEvent(Dot(EU, 3), ev.encode(Event(Dot(EU, 2), STAMP, "user/bart", Op.CREATE)))
    with pytest.raises(BadMessage, match="was sent as"):
        protocol.read_batch(carried([good, liar]))


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb([1, EU, 2]),
        msgpack.packb([1, EU, 2, STAMP, "user/bart", 1, None, None, [], ""]) + b"\x00",
        ev.encode(Event(Dot(EU, 2), STAMP, "user/not an id", Op.CREATE)),
        ev.encode(Event(Dot(EU, 2), STAMP, "user/bart", Op.ADD, "members", None)),
        msgpack.packb([0, EU, 2, STAMP, "user/bart", 1, None, None, [], ""]),
    ],
)
def test_an_invalid_event_refuses_the_whole_batch(data: bytes) -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    message = protocol.decode(msgpack.packb(carrying(good.data, data)), expect=Tag.SYNC_REQUEST)
    with pytest.raises(BadMessage, match=f"event {EU}:2"):
        protocol.read_batch(message)


def test_an_event_of_a_newer_format_is_quarantined_not_refused() -> None:
    good = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    newer = msgpack.packb([3, AP, 1, {"a": "field this node has never heard of"}])
    message = protocol.decode(msgpack.packb(carrying(good.data, newer)), expect=Tag.SYNC_REQUEST)
    batch = protocol.read_batch(message)
    assert [e.dot for e in batch.events] == [good.dot]
    assert batch.quarantined == [RawEvent(Dot(AP, 1), newer)]


def test_a_boolean_counter_is_a_bad_message_not_a_crash() -> None:
    """Found writing these tests: ``true`` passed the int check and Dot raised a bare
    ValueError, which the HTTP endpoint answered with a 500 and sync_with did not catch."""
    assert "bad counter" in refused(carrying(msgpack.packb([1, EU, True])))


leading_items = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=40),
    st.binary(max_size=8),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)


@given(
    st.one_of(
        st.binary(max_size=64),
        st.lists(leading_items, max_size=16).map(msgpack.packb),
        st.tuples(st.integers(0, 127), st.text(max_size=300), st.integers(0, 2**64 - 1)).map(
            lambda t: msgpack.packb([*t, "stream", 1])
        ),
    )
)
def test_reading_the_dot_off_the_bytes_agrees_with_msgpack(data: bytes) -> None:
    """The byte-level fast path reads what an unpacker reads, or leaves it to one."""
    fast = protocol._leading_fast(data)
    if fast is None:
        return
    slow = protocol._leading(data)
    assert slow == fast
    assert [type(item) for item in slow] == [type(item) for item in fast]


@given(st.integers(1, ev.COUNTER_MAX), st.sampled_from([EU, "a" * 32 + "~" + "b" * 16]))
def test_the_fast_path_reads_every_dot_this_encoder_writes(counter: int, origin: str) -> None:
    data = ev.encode(Event(Dot(origin, counter), STAMP, "user/homer", Op.CREATE))
    assert protocol._leading_fast(data) == (origin, counter)
    assert protocol.dot_of(data) == Dot(origin, counter)


def test_events_already_known_are_left_out_undecoded() -> None:
    """A dot the node holds is skipped before decoding: its bytes are not read at all."""
    held = raw(Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE))
    new = raw(Event(Dot(EU, 2), STAMP, "user/bart", Op.CREATE))
    garbled = RawEvent(held.dot, held.data[:-3])  # would not decode
    known = VersionVector.of([held.dot])
    batch = protocol.read_batch(carried([garbled, new]), known=known)
    assert [e.dot for e in batch.events] == [new.dot]
    with pytest.raises(BadMessage, match=f"event {EU}:1"):
        protocol.read_batch(carried([garbled, new]))  # unknown, it is read and refused


def _slices_of(slices: Any) -> tuple[int, Any]:
    """How many times ``slices`` paused, and what it returned."""
    pauses = 0
    while True:
        try:
            next(slices)
        except StopIteration as done:
            return pauses, done.value
        pauses += 1


@hsettings(max_examples=100)
@given(syncs(), st.integers(min_value=1, max_value=7), st.none() | summaries)
def test_a_message_read_in_slices_is_the_message_read_at_once(
    message: Sync, slice_events: int, known: VersionVector | None
) -> None:
    """A node reads a peer's page a slice of events at a time, the event loop running in
    between: whatever the slice, it reads the same message and the same batch, pausing
    once per slice."""
    data = protocol.encode(message)
    whole = protocol.decode(data, expect=message.tag)
    batch = protocol.read_batch(whole, known)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "EVENTS_SLICE", slice_events)
        pauses, sliced = _slices_of(protocol.decode_slices(data, expect=message.tag))
        assert sliced == whole
        assert pauses == max(0, -(-len(message.events) // slice_events) - 1)
        pauses, sliced_batch = _slices_of(protocol.batch_slices(whole, known))
        assert sliced_batch == batch
        assert pauses == len(message.events) // slice_events


def test_a_bad_event_in_a_later_slice_still_refuses_the_whole_batch() -> None:
    good = [
        raw(Event(Dot(EU, n), STAMP + n, "user/homer", Op.SET, "name", "H")) for n in range(1, 8)
    ]
    bad = RawEvent(
        Dot(EU, 8), ev.encode(Event(Dot(EU, 8), STAMP, "user/bart", Op.ADD, "members", "x"))
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "EVENTS_SLICE", 2)
        slices = protocol.batch_slices(carried([*good, bad]))
        with pytest.raises(BadMessage, match=f"event {EU}:8"):
            _slices_of(slices)
