"""The fold: how one event changes one entity. Pure, deterministic, order-independent.

An entity's existence is an add-wins OR-set of its ``create`` dots (a ``delete``
removes the creates it observed, so a concurrent create wins); each scalar field is
an LWW register; a group's members are OR-set slices kept per member elsewhere. A
delete also clears every field write ordered before it (a floor on the registers),
so an id created again after a delete does not show what its previous life wrote. The
same functions build live views, rebuilt views and any entity as of a past time.
No clock and no randomness is read here: time enters only through event stamps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgpack

from crdt import Add, Dot, LWWRegister, ORSet, Remove, VersionVector, Write
from crdt import codec as crdt_codec
from node.events import Event, Op, Value

VIEW_FORMAT = 1
ENTITY = ""  # the single element of an existence set


class CorruptView(ValueError):
    """A stored view that does not decode: rebuild views from the log."""


def dot_hash(event: Event) -> int:
    digest = hashlib.blake2b(
        f"{event.dot.origin}:{event.dot.counter}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


Key = tuple[int, str, int]  # (hlc, origin, counter): the total order of writes


def key_of(event: Event) -> Key:
    return (event.hlc, event.dot.origin, event.dot.counter)


@dataclass(frozen=True, slots=True)
class EntityState:
    existence: ORSet[str] = field(default_factory=ORSet)
    fields: Mapping[str, LWWRegister[Value]] = field(default_factory=dict)
    # Every field write ordered at or below the greatest delete is cleared: a re-created
    # id starts from scratch instead of showing what was written before its deletion.
    floor: Key | None = None
    create_stamps: Mapping[Dot, int] = field(default_factory=dict)  # create dot -> its stamp
    etag: int = 0  # XOR of the hashes of every applied dot: same events, same tag
    events: int = 0
    updated_hlc: int = 0

    @property
    def exists(self) -> bool:
        return ENTITY in self.existence

    @property
    def created_hlc(self) -> int:
        """When the live incarnation was created (its earliest live create), else 0."""
        live = self.existence.dots(ENTITY)
        return min((self.create_stamps[d] for d in live if d in self.create_stamps), default=0)

    def value(self, name: str) -> Value:
        register = self.fields.get(name)
        return None if register is None else register.value

    def values(self) -> dict[str, Value]:
        return {name: register.value for name, register in self.fields.items()}

    def winner(self, name: str) -> Write[Value] | None:
        register = self.fields.get(name)
        return None if register is None else register.winner


def _above(floor: Key | None, write: Write[Value] | None) -> bool:
    return write is not None and (floor is None or write.key() > floor)


def fold(state: EntityState, event: Event) -> EntityState:
    """Apply one event to its entity. The caller guarantees each dot comes once."""
    existence, fields, floor = state.existence, state.fields, state.floor
    create_stamps = state.create_stamps
    if event.op is Op.CREATE:
        existence = existence.apply(Add(ENTITY, event.dot))
        create_stamps = {**create_stamps, event.dot: event.hlc}
    elif event.op is Op.DELETE:
        existence = existence.apply(Remove(ENTITY, event.observed))
        floor = key_of(event) if floor is None else max(floor, key_of(event))
        fields = {name: r for name, r in fields.items() if _above(floor, r.winner)}
    elif event.op is Op.SET:
        assert event.field is not None
        write = Write(event.value, event.hlc, event.dot)
        if _above(floor, write):
            register = fields.get(event.field, LWWRegister())
            fields = {**fields, event.field: register.apply(write)}
    # add/remove change member slices (fold_member); the entity records that it changed.
    return EntityState(
        existence=existence,
        fields=fields,
        floor=floor,
        create_stamps=create_stamps,
        etag=state.etag ^ dot_hash(event),
        events=state.events + 1,
        updated_hlc=max(state.updated_hlc, event.hlc),
    )


def fold_member(member: ORSet[str], event: Event) -> ORSet[str]:
    """Apply an add or remove of one element to that element's OR-set slice."""
    assert event.value is not None
    if event.op is Op.ADD:
        return member.apply(Add(event.value, event.dot))
    return member.apply(Remove(event.value, event.observed))


def prune_member(member: ORSet[str], stable: VersionVector) -> ORSet[str] | None:
    """Drop the tombstones (removed dots) of a member slice that are causally stable.

    Safe in a node because the log filters every dot it has seen, so no add below the
    stable point can arrive again; the slice's value never changes. Returns None when
    nothing is left to keep (a removed member whose removal every replica has seen).
    """
    live = frozenset(d for dots in member.entries.values() for d in dots)
    tombstones = [d for d in member.context.dots() if d not in live and d not in stable]
    if not member.entries and not tombstones:
        return None
    return ORSet(member.entries, VersionVector.of([*live, *tombstones]))


def fold_all(events: Iterable[Event]) -> tuple[EntityState, ORSet[str]]:
    """An entity and its members from scratch: for history and time travel."""
    state = EntityState()
    members: ORSet[str] = ORSet()
    for event in events:
        state = fold(state, event)
        if event.op in (Op.ADD, Op.REMOVE):
            members = fold_member(members, event)
    return state, members


def encode_state(state: EntityState) -> bytes:
    fields = {
        name: [w.value, w.hlc, w.dot.origin, w.dot.counter]
        for name, register in sorted(state.fields.items())
        if (w := register.winner) is not None
    }
    creates = [[d.origin, d.counter, hlc] for d, hlc in sorted(state.create_stamps.items())]
    return bytes(
        msgpack.packb(
            [
                VIEW_FORMAT,
                crdt_codec.to_wire(state.existence),
                fields,
                None if state.floor is None else list(state.floor),
                creates,
                state.etag,
                state.events,
                state.updated_hlc,
            ]
        )
    )


def decode_state(data: bytes) -> EntityState:
    try:
        version, existence, fields, floor, creates, etag, events, updated = msgpack.unpackb(data)
        if version != VIEW_FORMAT:
            raise CorruptView(f"view format {version!r}")
        registers: dict[str, LWWRegister[Value]] = {}
        for name, wire in fields.items():
            register = crdt_codec.from_wire([crdt_codec.Tag.LWW_REGISTER, 1, wire])
            assert isinstance(register, LWWRegister)
            registers[name] = register
        exists = crdt_codec.from_wire(existence)
        assert isinstance(exists, ORSet)
        return EntityState(
            existence=exists,
            fields=registers,
            floor=None if floor is None else (floor[0], floor[1], floor[2]),
            create_stamps={Dot(o, c): hlc for o, c, hlc in creates},
            etag=etag,
            events=events,
            updated_hlc=updated,
        )
    except (ValueError, TypeError, AssertionError) as exc:
        raise CorruptView(str(exc)) from exc
