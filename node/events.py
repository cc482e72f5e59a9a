"""The event: one small immutable fact about one entity, and its wire form.

Events are the API of the store: ``create``, ``delete``, ``set`` a field, ``add`` or
``remove`` a set element. The dot is the event's identity (ingesting it twice is a
no-op); the hybrid-clock stamp orders concurrent writes. The codec is a msgpack array
with a leading format version; older versions are upcast on read, newer ones raise
``UnknownFormatVersion`` so the caller can quarantine the event instead of losing it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from crdt import Dot
from crdt.clock import STAMP_MAX
from crdt.codec import pack
from node.schema import ENTITY_ID_RE as ENTITY_ID_RE
from node.schema import SET_FIELDS, FieldError, check_value, settable
from node.schema import Value as Value

# 2: a field write names the creates it was written under (``lives``); version 1 bytes
# stay as they are (every event that names none is still written so), read as naming none.
FORMAT_VERSION = 2

ORIGIN_RE = re.compile(r"[a-z][a-z0-9-]{0,31}~[0-9a-z]{4,16}")
COUNTER_MAX = (1 << 63) - 1
OBSERVED_DOTS_MAX = 10_000
# Creates a field write names (those live where it was written: one, or a few made at once)
LIVES_MAX = 64
VALUE_CHARS_MAX = 4_096
ACTOR_CHARS_MAX = 128
EVENT_BYTES_MAX = 256 * 1024
ENTITY_KINDS = ("user", "group")


class Op(IntEnum):
    CREATE = 1
    DELETE = 2
    SET = 3
    ADD = 4
    REMOVE = 5


class InvalidEvent(ValueError):
    """An event that breaks a structural rule; nothing of its batch may be written."""


class UnknownFormatVersion(InvalidEvent):
    """An event written by a newer node: to be kept aside, not dropped."""

    def __init__(self, version: object) -> None:
        super().__init__(f"unknown event format version {version!r}")
        self.version = version


@dataclass(frozen=True, slots=True)
class Event:
    dot: Dot
    hlc: int
    stream: str  # "<kind>/<id>", e.g. "user/homer"
    op: Op
    field: str | None = None  # set: the field; add/remove: the set field
    value: Value = None  # set: the new value (None unsets); add/remove: the element
    observed: frozenset[Dot] = (
        frozenset()
    )  # remove/delete: the dots removed; set: the winner it overwrote
    actor: str = ""
    # set: the creates of the entity live where it was written (the lives it was written
    # under): it shows while one of them is live, and is cleared with the last of them.
    # None named (an event of format 1): the floor alone clears it (see ``node.fold``).
    lives: frozenset[Dot] = frozenset()
    # The event's encoding, kept once made (an event is immutable), or the bytes it was
    # decoded from when they are in the current format: appending it, then pushing it to
    # peers, encodes it once at most. Not an argument, so ``dataclasses.replace`` never
    # carries the bytes of one event over to another; not compared, nor hashed.
    encoded: bytes | None = dataclasses.field(default=None, init=False, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return self.stream.partition("/")[0]

    @property
    def entity_id(self) -> str:
        return self.stream.partition("/")[2]


def stream_of(kind: str, entity_id: str) -> str:
    return f"{kind}/{entity_id}"


# Which ops take what, as sets read once per event (not tuples of members built each time).
_FIELD_OPS = frozenset((Op.SET, Op.ADD, Op.REMOVE))
_ELEMENT_OPS = frozenset((Op.ADD, Op.REMOVE))
_VALUELESS_OPS = frozenset((Op.CREATE, Op.DELETE))
_UNOBSERVING_OPS = frozenset((Op.CREATE, Op.ADD))
NO_DOTS: frozenset[Dot] = frozenset()


# Origins, streams (with their kind) and each kind's register names that passed their
# checks: they repeat from one event to the next, and a lookup costs a fraction of a
# pattern match. One table per kind of name, so passing as one kind never lets a name
# pass as another; each emptied when full. Each maps a name to what its check found
# (a stream's kind; nothing more of the others).
_GOOD_ORIGINS: dict[str, str] = {}
_GOOD_STREAMS: dict[str, str] = {}
_GOOD_FIELDS: dict[str, dict[str, str]] = {kind: {} for kind in ENTITY_KINDS}
GOOD_NAMES_MAX = 16_384


def _passed(good: dict[str, str], text: str, found: str = "") -> None:
    if len(good) >= GOOD_NAMES_MAX:
        good.clear()
    good[text] = found


def validate(event: Event) -> Event:
    """Check every structural rule; return the event, or raise InvalidEvent."""
    dot = event.dot
    origin = dot.origin
    if origin not in _GOOD_ORIGINS:
        if not ORIGIN_RE.fullmatch(origin):
            raise InvalidEvent(f"bad origin {origin!r}")
        _passed(_GOOD_ORIGINS, origin)
    if not 1 <= dot.counter <= COUNTER_MAX:
        raise InvalidEvent(f"counter out of range: {dot.counter}")
    hlc = event.hlc
    if type(hlc) is not int or not 0 < hlc <= STAMP_MAX:  # not a bool either
        raise InvalidEvent(f"clock stamp out of range: {hlc!r}")
    stream = event.stream
    kind = _GOOD_STREAMS.get(stream)
    if kind is None:
        kind, _, entity_id = stream.partition("/")
        if kind not in ENTITY_KINDS or not ENTITY_ID_RE.fullmatch(entity_id):
            raise InvalidEvent(f"bad stream {stream!r}")
        _passed(_GOOD_STREAMS, stream, kind)
    op, field, value = event.op, event.field, event.value
    if not isinstance(op, Op):
        raise InvalidEvent(f"unknown op {op!r}")
    wants_field = op in _FIELD_OPS
    if wants_field != (field is not None):
        raise InvalidEvent(f"{op.name.lower()} {'needs' if wants_field else 'takes no'} field")
    if value is not None and (not isinstance(value, str) or len(value) > VALUE_CHARS_MAX):
        raise InvalidEvent("value must be a string of at most 4096 characters, or null")
    # The schema, as a client's write meets it: a peer's events are checked like client
    # input, so no peer can give a group an email, or make a user a set of members.
    if op is Op.SET:
        assert field is not None
        good = _GOOD_FIELDS[kind]
        if field not in good:
            if not settable(kind, field):
                raise InvalidEvent(f"bad field name {field!r}: a {kind} has no such field")
            _passed(good, field)
        try:
            check_value(field, value)
        except FieldError as exc:
            raise InvalidEvent(f"bad value of {field}: {exc.message}") from None
    elif op in _ELEMENT_OPS:
        if field != SET_FIELDS.get(kind):
            raise InvalidEvent(f"bad field name {field!r}: a {kind} has no such set")
        if value is None or not ENTITY_ID_RE.fullmatch(value):
            raise InvalidEvent(f"{op.name.lower()} needs an element id")
    if value is not None and op in _VALUELESS_OPS:
        raise InvalidEvent(f"{op.name.lower()} takes no value")
    observed = event.observed
    if observed:
        if len(observed) > OBSERVED_DOTS_MAX:
            raise InvalidEvent("too many observed dots")
        if op in _UNOBSERVING_OPS:
            raise InvalidEvent(f"{op.name.lower()} observes nothing")
        _check_dots(observed, "an observed dot")
    actor = event.actor
    if not isinstance(actor, str) or len(actor) > ACTOR_CHARS_MAX:
        raise InvalidEvent("actor must be a string of at most 128 characters")
    lives = event.lives
    if lives:
        if op is not Op.SET:
            raise InvalidEvent(f"{op.name.lower()} is written under no create")
        if len(lives) > LIVES_MAX:
            raise InvalidEvent(f"a write names at most {LIVES_MAX} creates")
        _check_dots(lives, "a create written under")
    return event


def _check_dots(dots: frozenset[Dot], what: str) -> None:
    """Dots of other events (observed, or creates written under): their events' rules."""
    for dot in dots:
        if dot.origin not in _GOOD_ORIGINS:
            if not ORIGIN_RE.fullmatch(dot.origin):
                raise InvalidEvent(f"bad origin of {what} {dot.origin!r}")
            _passed(_GOOD_ORIGINS, dot.origin)
        if dot.counter > COUNTER_MAX:
            raise InvalidEvent(f"counter of {what} out of range: {dot.counter}")


def to_wire(event: Event) -> list[Any]:
    """The event's wire: format 2 if it names the creates it was written under, else 1
    (what a node of an older version reads: only what needs the new format has it)."""
    dot, observed, lives = event.dot, event.observed, event.lives
    wire = [
        2 if lives else 1,
        dot.origin,
        dot.counter,
        event.hlc,
        event.stream,
        int(event.op),
        event.field,
        event.value,
        [[d.origin, d.counter] for d in sorted(observed)] if observed else [],
        event.actor,
    ]
    if lives:
        wire.append([[d.origin, d.counter] for d in sorted(lives)])
    return wire


def encode(event: Event) -> bytes:
    data = event.encoded
    if data is None:
        data = pack(to_wire(event))
        object.__setattr__(event, "encoded", data)
    return data


# Upcasters turn the wire of format version N into that of N + 1; a reader meeting
# version N < FORMAT_VERSION chains them. None yet: version 1 is read as it is (version 2
# only adds a trailing item, which version 1 leaves out when it is empty).
UPCASTERS: dict[int, Callable[[list[Any]], list[Any]]] = {}
READ_AS_IS = frozenset((1, 2))  # versions whose wire ``from_wire`` reads without upcasting


_OPS: dict[object, Op] = {int(op): op for op in Op}  # a dict lookup, not an Enum call


# The creates field writes name, by the one they name (most name one, and the writes of
# an entity name the same): one set for all of them, made once, not one per write.
_LIVES: dict[tuple[str, int], frozenset[Dot]] = {}


def _lives_of(named: list[Any]) -> frozenset[Dot]:
    if len(named) == 1 and type(named[0]) is list and len(named[0]) == 2:
        origin, counter = named[0]
        if type(origin) is str and type(counter) is int:  # not a bool: Dot refuses one
            lives = _LIVES.get((origin, counter))
            if lives is None:
                lives = frozenset((Dot(origin, counter),))
                if len(_LIVES) >= GOOD_NAMES_MAX:
                    _LIVES.clear()
                _LIVES[origin, counter] = lives
            return lives
    lives = frozenset([Dot(o, c) for o, c in named])
    if len(lives) != len(named):
        raise ValueError("the creates written under repeat")
    return lives


def from_wire(wire: Any, *, dot: Dot | None = None) -> Event:
    """The event of a decoded wire, validated. ``dot``: the dot the caller expects (read
    from the bytes' head); the event takes that very object when the wire names it."""
    if not isinstance(wire, list) or not wire:
        raise InvalidEvent("an event is a non-empty array")
    version = wire[0]
    if type(version) is not int or version < 1:  # not a bool, which is an int too
        raise InvalidEvent(f"bad event format version {version!r}")
    if version > FORMAT_VERSION:
        raise UnknownFormatVersion(version)
    while version not in READ_AS_IS:
        wire = UPCASTERS[version](wire)
        version = wire[0]
    try:
        if version == 1:
            _, origin, counter, hlc, stream, op, field, value, observed, actor = wire
            lives = NO_DOTS
        else:
            _, origin, counter, hlc, stream, op, field, value, observed, actor, named = wire
            if type(named) is not list or not named:  # empty: written as version 1
                raise TypeError("the creates written under must be a non-empty array")
            lives = _lives_of(named)
        if type(op) is not int:  # a bool or a float would find an op among the ints
            raise KeyError(op)
        if type(observed) is not list:
            raise TypeError("observed dots must be an array")
        dots = frozenset([Dot(o, c) for o, c in observed]) if observed else NO_DOTS
        if len(dots) != len(observed):  # its bytes are stored as they came: no padding
            raise ValueError("observed dots repeat")
        if (
            dot is None
            or origin != dot.origin
            or type(counter) is not int
            or counter != dot.counter
        ):
            dot = Dot(origin, counter)
        event = Event(dot, hlc, stream, _OPS[op], field, value, dots, actor, lives)
    except KeyError:
        raise InvalidEvent(f"malformed event: unknown op {op!r}") from None
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"malformed event: {exc}") from exc
    if not isinstance(stream, str) or not (field is None or isinstance(field, str)):
        raise InvalidEvent("malformed event: stream and field are strings")
    return validate(event)


def decode(data: bytes, *, dot: Dot | None = None) -> Event:
    """The event ``data`` encodes, validated (see ``from_wire`` for ``dot``)."""
    if len(data) > EVENT_BYTES_MAX:
        raise InvalidEvent("event too large")
    try:
        wire = msgpack.unpackb(data)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidEvent(f"event is not msgpack: {exc}") from exc
    event = from_wire(wire, dot=dot)
    if wire[0] in READ_AS_IS:  # read as it stands, not upcast: its bytes are its encoding
        object.__setattr__(event, "encoded", data)
    return event
