"""The fold: how one event changes one entity. Pure, deterministic, order-independent.

An entity's existence is an add-wins OR-set of its ``create`` dots (a ``delete``
removes the creates it observed, so a concurrent create wins); each scalar field is
an LWW register; a group's members are OR-set slices kept per member elsewhere. The
same functions build live views, rebuilt views and any entity as of a past time.
No clock and no randomness is read here: time enters only through event stamps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from crdt import Add, LWWRegister, ORSet, Remove, VersionVector, Write
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


@dataclass(frozen=True, slots=True)
class EntityState:
    existence: ORSet[str] = field(default_factory=ORSet)
    fields: Mapping[str, LWWRegister[Value]] = field(default_factory=dict)
    etag: int = 0  # XOR of the hashes of every applied dot: same events, same tag
    events: int = 0
    created_hlc: int = 0
    updated_hlc: int = 0

    @property
    def exists(self) -> bool:
        return ENTITY in self.existence

    def value(self, name: str) -> Value:
        register = self.fields.get(name)
        return None if register is None else register.value

    def values(self) -> dict[str, Value]:
        return {name: register.value for name, register in self.fields.items()}

    def winner(self, name: str) -> Write[Value] | None:
        register = self.fields.get(name)
        return None if register is None else register.winner


def fold(state: EntityState, event: Event) -> EntityState:
    """Apply one event to its entity. The caller guarantees each dot comes once."""
    existence, fields = state.existence, state.fields
    created = state.created_hlc
    if event.op is Op.CREATE:
        existence = existence.apply(Add(ENTITY, event.dot))
        created = event.hlc if not created else min(created, event.hlc)
    elif event.op is Op.DELETE:
        existence = existence.apply(Remove(ENTITY, event.observed))
    elif event.op is Op.SET:
        assert event.field is not None
        register = fields.get(event.field, LWWRegister())
        fields = {**fields, event.field: register.apply(Write(event.value, event.hlc, event.dot))}
    # add/remove change member slices (fold_member); the entity records that it changed.
    return EntityState(
        existence=existence,
        fields=fields,
        etag=state.etag ^ dot_hash(event),
        events=state.events + 1,
        created_hlc=created,
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
    return bytes(
        msgpack.packb(
            [
                VIEW_FORMAT,
                crdt_codec.to_wire(state.existence),
                fields,
                state.etag,
                state.events,
                state.created_hlc,
                state.updated_hlc,
            ]
        )
    )


def decode_state(data: bytes) -> EntityState:
    try:
        version, existence, fields, etag, events, created, updated = msgpack.unpackb(data)
        if version != VIEW_FORMAT:
            raise CorruptView(f"view format {version!r}")
        registers: dict[str, LWWRegister[Value]] = {}
        for name, wire in fields.items():
            register = crdt_codec.from_wire([crdt_codec.Tag.LWW_REGISTER, 1, wire])
            assert isinstance(register, LWWRegister)
            registers[name] = register
        exists = crdt_codec.from_wire(existence)
        assert isinstance(exists, ORSet)
        return EntityState(exists, registers, etag, events, created, updated)
    except (ValueError, TypeError, AssertionError) as exc:
        raise CorruptView(str(exc)) from exc


def state_json(state: EntityState) -> dict[str, Any]:
    """Debug and digest form: every winning write, stable across replicas."""
    return {name: value for name, value in sorted(state.values().items())}
