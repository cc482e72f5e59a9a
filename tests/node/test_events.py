"""The event codec: round trips, a pinned golden encoding, every validation rule, upcasting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt import Dot
from node import events as ev
from node.events import Event, InvalidEvent, Op, UnknownFormatVersion
from node.schema import API_KEY_RE, CONTROL_RE, USERNAME_RE

GOLDEN = Path(__file__).parent.parent / "golden" / "event_v1.json"
STAMP = (1_700_000_000_000 << 16) | 7
EU, US = "eu~a1b2c3d4", "us~0f0f"


def golden_events() -> dict[str, Event]:
    create = Dot(EU, 1)
    name = Dot(EU, 2)
    return {
        "create": Event(create, STAMP, "user/homer", Op.CREATE, actor="admin"),
        "set_with_observed": Event(
            Dot(US, 1), STAMP + 1, "user/homer", Op.SET, "name", "Homer J.", frozenset({name})
        ),
        "remove_with_observed": Event(
            Dot(US, 2),
            STAMP + 2,
            "group/staff",
            Op.REMOVE,
            "members",
            "homer",
            frozenset({Dot(EU, 3), Dot(US, 1)}),
        ),
        "delete": Event(
            Dot(EU, 4), STAMP + 3, "user/homer", Op.DELETE, observed=frozenset({create})
        ),
    }


def test_golden_vectors_pin_todays_encoding() -> None:
    pinned = json.loads(GOLDEN.read_text())
    assert {name: ev.encode(e).hex() for name, e in golden_events().items()} == pinned
    for name, event in golden_events().items():
        assert ev.decode(bytes.fromhex(pinned[name])) == event


origins = st.from_regex(ev.ORIGIN_RE, fullmatch=True)
ids = st.from_regex(ev.ENTITY_ID_RE, fullmatch=True)
dots = st.builds(Dot, origins, st.integers(1, ev.COUNTER_MAX))


# Text a client may write (no control characters, not only blanks), and each register's
# values as its schema takes them.
# No lone surrogate: the API refuses one as bad JSON, and msgpack cannot encode one.
texts = st.text(
    st.characters(min_codepoint=0x20, exclude_characters="\x7f", exclude_categories=["Cs"]),
    max_size=50,
)
names = texts.filter(str.strip).filter(lambda t: not CONTROL_RE.search(t))
REGISTERS: dict[str, st.SearchStrategy[str | None]] = {
    "name": names,
    "username": st.from_regex(USERNAME_RE, fullmatch=True),
    "email": st.from_regex(r"[a-z0-9.]{1,20}@[a-z0-9-]{1,10}\.example", fullmatch=True),
    "api_key": st.from_regex(API_KEY_RE, fullmatch=True),
    "profile.city": st.none() | names,
}
SETTABLE = {"user": sorted(REGISTERS), "group": ["name"]}


@st.composite
def valid_events(draw: st.DrawFn) -> Event:
    """Events as a client's writes make them: each kind's ops, registers and values."""
    kind = draw(st.sampled_from(ev.ENTITY_KINDS))
    op = draw(st.sampled_from([o for o in Op if kind == "group" or o not in (Op.ADD, Op.REMOVE)]))
    field: str | None = None
    value: str | None = None
    observed: frozenset[Dot] = frozenset()
    lives: frozenset[Dot] = frozenset()
    if op is Op.SET:
        field = draw(st.sampled_from(SETTABLE[kind]))
        value = draw(REGISTERS[field])
        observed = draw(st.frozensets(dots, max_size=1))
        lives = draw(st.frozensets(dots, max_size=3))
    elif op in (Op.ADD, Op.REMOVE):
        field, value = "members", draw(ids)
    if op in (Op.REMOVE, Op.DELETE):
        observed = draw(st.frozensets(dots, max_size=4))
    return Event(
        dot=draw(dots),
        hlc=draw(st.integers(1, (1 << 64) - 1)),
        stream=f"{kind}/{draw(ids)}",
        op=op,
        field=field,
        value=value,
        observed=observed,
        actor=draw(st.text(st.characters(exclude_categories=["Cs"]), max_size=20)),
        lives=lives,
    )


@given(valid_events())
def test_decode_of_encode_is_the_event(event: Event) -> None:
    # decode(encode(e)) == e, and validation accepts what it encoded
    assert ev.decode(ev.encode(ev.validate(event))) == event


def test_observed_dots_encode_in_one_order() -> None:
    a, b = Dot(EU, 1), Dot(US, 1)
    one = Event(Dot(EU, 9), STAMP, "user/x", Op.DELETE, observed=frozenset([a, b]))
    other = dataclasses.replace(one, observed=frozenset([b, a]))
    assert ev.encode(one) == ev.encode(other)


GOOD = Event(Dot(EU, 1), STAMP, "user/homer", Op.SET, "name", "Homer")


def test_a_decoded_event_is_stored_as_the_bytes_it_came_in() -> None:
    # Ingest stores and forwards what a peer sent without encoding it again.
    data = ev.encode(GOOD)
    decoded = ev.decode(data)
    assert ev.encode(decoded) is data
    # The dot a message carried the event under is taken as is when the bytes name it.
    sent_as = Dot(GOOD.dot.origin, GOOD.dot.counter)
    assert ev.decode(data, dot=sent_as).dot is sent_as
    other = Dot(GOOD.dot.origin, GOOD.dot.counter + 1)
    assert ev.decode(data, dot=other).dot == GOOD.dot
    # A counter that only equals the dot's (true == 1) is no dot: refused as before.
    with pytest.raises(InvalidEvent, match="malformed"):
        ev.decode(wire_of(GOOD, counter=True), dot=Dot(GOOD.dot.origin, 1))
    # An event made here is encoded once, however often it is stored or sent.
    assert ev.encode(GOOD) is ev.encode(GOOD)
    # A changed copy is a new event: it never keeps the bytes of the one it was made from.
    renamed = dataclasses.replace(decoded, value="Max Power")
    assert ev.decode(ev.encode(renamed)).value == "Max Power"


GROUP_ADD = Event(Dot(EU, 1), STAMP, "group/staff", Op.ADD, "members", "homer")


def wire_of(event: Event, **changes: Any) -> bytes:
    """Encode without validating, so broken events can reach the decoder."""
    wire = ev.to_wire(event)
    names = ["version", "origin", "counter", "hlc", "stream", "op", "field", "value", "observed"]
    for name, value in changes.items():
        wire[names.index(name)] = value
    return bytes(msgpack.packb(wire))


BAD_WIRES: list[tuple[str, bytes, str]] = [
    ("bad origin", wire_of(GOOD, origin="EU"), "bad origin"),
    ("origin without incarnation", wire_of(GOOD, origin="eu"), "bad origin"),
    ("counter 0", wire_of(GOOD, counter=0), "counter"),
    ("counter beyond 63 bits", wire_of(GOOD, counter=1 << 63), "counter"),
    ("hlc 0", wire_of(GOOD, hlc=0), "clock stamp"),
    ("hlc not an int", wire_of(GOOD, hlc="soon"), "clock stamp"),
    ("bad stream kind", wire_of(GOOD, stream="robot/x"), "bad stream"),
    ("bad stream id", wire_of(GOOD, stream="user/a b"), "bad stream"),
    ("stream not a string", wire_of(GOOD, stream=7), "malformed"),
    ("unknown op", wire_of(GOOD, op=9), "malformed"),
    ("set without field", wire_of(GOOD, field=None), "set needs field"),
    ("create with field", wire_of(GOOD, op=1), "create takes no field"),
    ("bad field name", wire_of(GOOD, field="Name!"), "bad field name"),
    ("value too long", wire_of(GOOD, value="x" * (ev.VALUE_CHARS_MAX + 1)), "at most 4096"),
    ("value not a string", wire_of(GOOD, value=3), "value must be a string"),
    ("add without element", wire_of(GROUP_ADD, value=None), "element id"),
    ("add of a bad element", wire_of(GROUP_ADD, value="a/b"), "element id"),
    # The schema, as client input meets it (a peer's events are checked like it).
    ("a user's member", wire_of(GROUP_ADD, stream="user/homer"), "a user has no such set"),
    ("a group's other set", wire_of(GROUP_ADD, field="owners"), "a group has no such set"),
    ("a group's email", wire_of(GOOD, stream="group/staff", field="email"), "no such field"),
    ("a group's members set", wire_of(GOOD, stream="group/x", field="members"), "no such field"),
    ("an unknown field", wire_of(GOOD, field="zzz"), "a user has no such field"),
    ("a bad profile key", wire_of(GOOD, field="profile.City"), "no such field"),
    ("a name unset", wire_of(GOOD, value=None), "bad value of name"),
    ("a blank name", wire_of(GOOD, value="  "), "bad value of name"),
    ("control characters", wire_of(GOOD, field="email", value="\x00 a@b.example"), "control"),
    ("not an email", wire_of(GOOD, field="email", value="no email"), "not an email"),
    ("op true", wire_of(GOOD, op=True), "unknown op"),
    ("op a float", wire_of(GOOD, op=3.0), "unknown op"),
    ("stamp true", wire_of(GOOD, hlc=True), "clock stamp"),
    ("create with value", wire_of(GOOD, op=1, field=None, value="x"), "takes no value"),
    ("observed not an array", wire_of(GOOD, observed=None), "observed dots must be an array"),
    ("observed an empty string", wire_of(GOOD, observed=""), "observed dots must be an array"),
    ("observed a dot of one part", wire_of(GOOD, op=2, observed=[["eu~0000aaaa"]]), "malformed"),
    ("observed a dot twice", wire_of(GOOD, op=2, observed=[[EU, 1], [EU, 1]]), "repeat"),
    ("not msgpack", b"\xc1", "not msgpack"),
    ("trailing bytes", wire_of(GOOD) + b"\x00", "not msgpack"),
    ("not an array", msgpack.packb({"v": 1}), "non-empty array"),
    ("empty array", msgpack.packb([]), "non-empty array"),
    ("wrong arity", msgpack.packb(ev.to_wire(GOOD)[:-1]), "malformed"),
    ("version 0", wire_of(GOOD, version=0), "bad event format version"),
    ("version true", wire_of(GOOD, version=True), "bad event format version"),
    (
        "observed a dot of no origin",
        wire_of(GOOD, observed=[["NOT AN ORIGIN \x00", 1]]),
        "bad origin of an observed dot",
    ),
    (
        "observed a dot past every counter",
        wire_of(GOOD, observed=[[EU, ev.COUNTER_MAX + 1]]),
        "counter of an observed dot out of range",
    ),
    ("event too large", b"\x00" * (ev.EVENT_BYTES_MAX + 1), "too large"),
]


@pytest.mark.parametrize(
    ("data", "complaint"), [(d, c) for _, d, c in BAD_WIRES], ids=[n for n, _, _ in BAD_WIRES]
)
def test_bad_bytes_are_refused(data: bytes, complaint: str) -> None:
    with pytest.raises(InvalidEvent, match=complaint):
        ev.decode(data)


def _many_dots(n: int) -> frozenset[Dot]:
    return frozenset(Dot(EU, c) for c in range(1, n + 1))


BAD_EVENTS: list[tuple[str, Event, str]] = [
    (
        "too many observed",
        Event(
            Dot(EU, 1), STAMP, "user/x", Op.DELETE, observed=_many_dots(ev.OBSERVED_DOTS_MAX + 1)
        ),
        "too many observed",
    ),
    ("actor too long", dataclasses.replace(GOOD, actor="a" * 129), "actor"),
    ("actor not a string", dataclasses.replace(GOOD, actor=None), "actor"),  # type: ignore[arg-type]
    (
        "create observes",
        Event(Dot(EU, 1), STAMP, "user/x", Op.CREATE, observed=frozenset({Dot(US, 1)})),
        "create observes nothing",
    ),
    ("op not an Op", dataclasses.replace(GOOD, op=3), "unknown op"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    ("event", "complaint"), [(e, c) for _, e, c in BAD_EVENTS], ids=[n for n, _, _ in BAD_EVENTS]
)
def test_bad_events_are_refused_before_encoding(event: Event, complaint: str) -> None:
    with pytest.raises(InvalidEvent, match=complaint):
        ev.validate(event)


def test_an_event_from_a_newer_node_is_unknown_not_invalid() -> None:
    # UnknownFormatVersion is what the caller quarantines instead of refusing.
    with pytest.raises(UnknownFormatVersion) as raised:
        ev.decode(wire_of(GOOD, version=ev.FORMAT_VERSION + 1))
    assert raised.value.version == ev.FORMAT_VERSION + 1
    assert isinstance(raised.value, InvalidEvent)


def test_an_older_version_is_upcast_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a version that reads version 1 only through an upcaster (one naming the
    # event's own origin's first create as its life, say): version-1 bytes go through it.
    def v1_to_v2(wire: list[Any]) -> list[Any]:
        return [2, *wire[1:], [[wire[1], 1]]]

    v1_bytes = ev.encode(GOOD)
    monkeypatch.setattr(ev, "READ_AS_IS", frozenset({2}))
    monkeypatch.setitem(ev.UPCASTERS, 1, v1_to_v2)
    upcast = ev.decode(v1_bytes)
    assert upcast == dataclasses.replace(GOOD, lives=frozenset({Dot(GOOD.dot.origin, 1)}))
    # An upcast event keeps no bytes of the old format: it is stored and sent as the new.
    assert msgpack.unpackb(ev.encode(upcast))[0] == 2


def test_a_write_naming_its_creates_is_format_2_and_every_other_event_stays_format_1() -> None:
    """Only what needs the new format has it: a node of the version before reads every
    event but the field writes naming their creates (which it keeps aside)."""
    assert GOOD.op is Op.SET
    assert not GOOD.lives
    v1_bytes = ev.encode(GOOD)
    assert msgpack.unpackb(v1_bytes)[0] == 1
    decoded = ev.decode(v1_bytes)
    assert decoded == GOOD
    assert decoded.encoded == v1_bytes
    lives = frozenset({Dot(US, 4), Dot(EU, 2)})
    bound = dataclasses.replace(GOOD, lives=lives)
    wire = msgpack.unpackb(ev.encode(bound))
    assert wire[0] == 2
    assert wire[10] == [[EU, 2], [US, 4]]
    assert ev.decode(ev.encode(bound)) == bound


@pytest.mark.parametrize(
    ("lives", "complaint"),
    [
        ([], "non-empty array"),
        ([[EU, 1], [EU, 1]], "repeat"),
        ("x", "non-empty array"),
        ([["bad origin", 1]], "bad origin of a create written under"),
        ([[EU, 0]], "dot counter"),
    ],
)
def test_bad_creates_written_under_are_refused(lives: Any, complaint: str) -> None:
    wire = msgpack.unpackb(ev.encode(GOOD))
    with pytest.raises(InvalidEvent, match=complaint):
        ev.decode(msgpack.packb([2, *wire[1:], lives]))


def test_only_a_field_write_is_written_under_creates() -> None:
    create = Event(Dot(EU, 1), STAMP, "user/homer", Op.CREATE, lives=frozenset({Dot(EU, 1)}))
    with pytest.raises(InvalidEvent, match="create is written under no create"):
        ev.validate(create)
    many = frozenset(Dot(EU, n) for n in range(1, ev.LIVES_MAX + 2))
    with pytest.raises(InvalidEvent, match="at most"):
        ev.validate(dataclasses.replace(GOOD, lives=many))


def test_a_name_that_passed_as_one_thing_is_still_checked_as_another() -> None:
    # Names that passed are remembered, one set per role: a good origin or stream is
    # no good field name, and being remembered as one must not let it pass as another.
    good = Event(Dot(EU, 1), STAMP, "user/homer", Op.SET, "name", "Homer")
    ev.validate(good)
    for event, complaint in [
        (dataclasses.replace(good, field=EU), "bad field name"),
        (dataclasses.replace(good, field="user/homer"), "bad field name"),
        (dataclasses.replace(good, stream=EU), "bad stream"),
        (dataclasses.replace(good, dot=Dot("name", 1)), "bad origin"),
    ]:
        for _ in range(2):  # a refused name is not remembered either
            with pytest.raises(InvalidEvent, match=complaint):
                ev.validate(event)


def test_the_names_remembered_as_checked_are_bounded() -> None:
    for n in range(ev.GOOD_NAMES_MAX + 10):
        ev.validate(Event(Dot(EU, 1), STAMP, f"user/u{n}", Op.SET, "name", "x"))
    assert 0 < len(ev._GOOD_STREAMS) <= ev.GOOD_NAMES_MAX
