"""The fold: how one event changes one entity. Pure, deterministic, order-independent.

An entity's existence is an add-wins OR-set of its ``create`` dots (a ``delete``
removes the creates it observed, so a concurrent create wins); each scalar field is
an LWW register; a group's members are OR-set slices kept per member elsewhere. A
field write names the create whose life it was made to (its life). The life that shows
is the greatest live create's: the writes naming it show, so an id created again after
a delete does not show what its previous life wrote, not even a write that raced the
delete, whatever its stamp; one created in two regions at once shows the later
create's life (the earlier's again if the later is deleted, where that delete had seen
it alone), never a mix of the two people's writes. A register holds the greatest write
of each life. A write of format 1 names no create: the greatest such write of a field
shows if it is ordered after the create whose life shows (so a re-created id starts
from scratch, and a create deleted elsewhere clears nothing of the one that survives
it). The same
functions build live views, rebuilt views and any entity as of a past time.
No clock and no randomness is read here: time enters only through event stamps.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgpack

from crdt import Add, Dot, ORSet, Remove, VersionVector, Write
from crdt import codec as crdt_codec
from node.events import NO_DOTS, Event, Op, Value

# 3: each field's writes per life beside those that name none (2: the existence set is
# embedded as its encoded bytes; 1: as its wire form; both still read).
VIEW_FORMAT = 3
# The rules the views are folded by, stored with them (``meta`` ``fold_rules``): views
# folded by other rules are folded again when the node opens. 1: a delete raised the
# floor; 2: a create raises it too; 3: unique values indexed in NFC with ASCII letters
# folded only, searched text in NFKC case-folded (``schema.index_value``, ``search_fold``),
# and an id created twice at once recorded among the conflicts (``views._id_conflict``);
# 4: a user's memberships (``user_groups``) list every live add of it, whatever its
# group's existence, so that a delete of the user removes them all; a delete no longer
# raises the floor (one ordered after a create it did not observe, which survives it,
# cleared what that create's life wrote: an acknowledged create kept no field); 5: a
# field write shows while a create it was written under lives (``Event.lives``).
FOLD_RULES = 5
ENTITY = ""  # the single element of an existence set


class CorruptView(ValueError):
    """A stored view that does not decode: rebuild views from the log."""


# Per origin, a hash already fed "<origin>:": a dot's hash copies it and feeds the counter,
# at less than half the cost of hashing the whole text anew (one per event folded).
_ORIGIN_HASHES: dict[str, Any] = {}
ORIGIN_HASHES_MAX = 4_096  # origins are few (regions x incarnations); a bound all the same


def dot_hash(origin: str, counter: int) -> int:
    """The 64-bit hash of a dot that an entity's etag XORs in: the same on every replica,
    blake2b-64 of ``"<origin>:<counter>"``."""
    prefix = _ORIGIN_HASHES.get(origin)
    if prefix is None:
        if len(_ORIGIN_HASHES) >= ORIGIN_HASHES_MAX:
            _ORIGIN_HASHES.clear()
        prefix = _ORIGIN_HASHES[origin] = hashlib.blake2b(f"{origin}:".encode(), digest_size=8)
    hashed = prefix.copy()
    hashed.update(b"%d" % counter)
    return int.from_bytes(hashed.digest(), "big")


Key = tuple[int, str, int]  # (hlc, origin, counter): the total order of writes
# An LWW register's state: its winning write, as its key and its value. Plain tuples,
# not ``crdt.Write``s: a view holds and decodes many, and the key compares as it is.
Winner = tuple[Key, Value]
# A create's dot as the registers key a life by: (origin, counter), a plain tuple (a dict
# lookup by ``Dot`` calls its Python hash; a fold makes several per write).
Life = tuple[str, int]


@dataclass(frozen=True, slots=True)
class EntityState:
    existence: ORSet[str] = field(default_factory=ORSet)
    # Each field's value: the greatest write that shows (of ``unbound``, and of the life
    # that shows in ``bound``). Derived from the rest, neither stored nor compared.
    fields: Mapping[str, Winner] = field(default_factory=dict, compare=False)
    # Per field, the greatest write naming no create (format 1): it shows if ordered
    # after the create whose life shows.
    unbound: Mapping[str, Winner] = field(default_factory=dict)
    # Per create written under (a life), each field's greatest write naming it; none of a
    # create removed (its life is over: no write of it shows again).
    bound: Mapping[Life, Mapping[str, Winner]] = field(default_factory=dict)
    # The greatest create (a field write is stamped after it: ``commands._sets``).
    floor: Key | None = None
    create_stamps: Mapping[Dot, int] = field(default_factory=dict)  # create dot -> its stamp
    etag: int = 0  # XOR of the hashes of every applied dot: same events, same tag
    events: int = 0
    updated_hlc: int = 0
    # What the views derive from this (immutable) state, e.g. its digest and index keys,
    # kept with it: a state stored by one commit and read back by the next is not
    # hashed and tokenised again. Not part of the state: not compared, not encoded.
    derived: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def exists(self) -> bool:
        return ENTITY in self.existence

    @property
    def created_hlc(self) -> int:
        """When the live incarnation was created (its earliest live create), else 0."""
        stamps = self.create_stamps
        live = (stamps.get(d) for d in self.existence.dots(ENTITY))  # one lookup per dot
        return min((stamp for stamp in live if stamp is not None), default=0)

    def value(self, name: str) -> Value:
        held = self.fields.get(name)
        return None if held is None else held[1]

    def values(self) -> dict[str, Value]:
        return {name: value for name, (_, value) in self.fields.items()}

    def winner(self, name: str) -> Write[Value] | None:
        held = self.fields.get(name)
        if held is None:
            return None
        (hlc, origin, counter), value = held
        return Write(value, hlc, Dot(origin, counter))


def later(key: Key, than: Key) -> bool:
    """The order of an LWW register's writes: the greater stamp, then origin, then counter."""
    return key > than


_CREATE, _DELETE, _SET = int(Op.CREATE), int(Op.DELETE), int(Op.SET)
_ADD, _REMOVE = int(Op.ADD), int(Op.REMOVE)


class Folding:
    """One entity's state while events fold into it, frozen into an ``EntityState`` once.

    Folding n events costs n cheap steps and one new state, not n states: a register
    keeps only its greatest write (of each life, and of those naming none) until the
    end, where those of removed creates are dropped. That is the same state as folding
    the events one at a time, whatever their order (``test_fold`` checks it): each kept
    write is the greatest of its kind, and a removed create is never live again.
    """

    __slots__ = (
        "base",
        "bound",
        "creates",
        "etag",
        "events",
        "existence",
        "floor",
        "updated",
        "writes",
    )

    def __init__(self, base: EntityState) -> None:
        self.base = base
        self.writes: dict[str, Winner] = {}  # field -> greatest write naming no create
        self.bound: dict[tuple[Life, str], Winner] = {}  # (create, field) -> greatest write
        self.existence = base.existence
        self.floor = base.floor
        self.creates: dict[Dot, int] | None = None  # copied from the base at the first create
        self.etag = base.etag
        self.events = base.events
        self.updated = base.updated_hlc

    def event(
        self,
        origin: str,
        counter: int,
        hlc: int,
        op: int,
        field: str | None,
        value: Value,
        observed: frozenset[Dot],
        lives: Iterable[Life] = (),
    ) -> None:
        self.etag ^= dot_hash(origin, counter)
        self.events += 1
        if hlc > self.updated:
            self.updated = hlc
        if op == _SET:
            assert field is not None
            key = (hlc, origin, counter)
            if lives:
                bound = self.bound
                for life in lives:
                    held = bound.get((life, field))
                    if held is None or later(key, held[0]):
                        bound[life, field] = (key, value)
                return
            held = self.writes.get(field)
            if held is None or later(key, held[0]):
                self.writes[field] = (key, value)
        elif op == _CREATE:
            dot = Dot(origin, counter)
            self.existence = self.existence.apply(Add(ENTITY, dot))
            if self.creates is None:
                self.creates = dict(self.base.create_stamps)
            self.creates[dot] = hlc
            key = (hlc, origin, counter)  # a new life starts from scratch (see the floor)
            if self.floor is None or key > self.floor:
                self.floor = key
        elif op == _DELETE:  # no floor: see the module
            self.existence = self.existence.apply(Remove(ENTITY, observed))
        # add/remove change member slices (fold_member); the entity records that it changed.

    def add(self, event: Event) -> None:
        """Fold one event (``fold``, without making a state of it yet)."""
        dot = event.dot
        self.event(
            dot.origin,
            dot.counter,
            event.hlc,
            event.op,
            event.field,
            event.value,
            event.observed,
            [(life.origin, life.counter) for life in event.lives],
        )

    @property
    def exists(self) -> bool:
        return ENTITY in self.existence

    def state(self) -> EntityState:
        base, floor, existence = self.base, self.floor, self.existence
        unbound = _unbound(base.unbound, self.writes)
        bound = _bound(base.bound, self.bound, existence, base.existence)
        creates = self.creates
        if unbound is base.unbound and bound is base.bound and existence is base.existence:
            shown = base.fields
        else:
            shown = _shown(
                unbound, bound, existence, base.create_stamps if creates is None else creates
            )
        derived: dict[tuple[str, str], Any] = {}
        if existence is base.existence and EXISTENCE_BYTES in base.derived:
            derived[EXISTENCE_BYTES] = base.derived[EXISTENCE_BYTES]  # most events leave it be
        return EntityState(
            existence=existence,
            fields=shown,
            unbound=unbound,
            bound=bound,
            floor=floor,
            create_stamps=base.create_stamps if creates is None else dict(sorted(creates.items())),
            etag=self.etag,
            events=self.events,
            updated_hlc=self.updated,
            derived=derived,
        )


def _unbound(held: Mapping[str, Winner], writes: dict[str, Winner]) -> Mapping[str, Winner]:
    """The greatest write of each field naming no create (``held``, and ``writes`` folded
    since), in key order."""
    grown: dict[str, Winner] | None = None
    named = False  # a field with no write before
    for name, write in writes.items():
        kept = held.get(name)
        if kept is None or later(write[0], kept[0]):
            if grown is None:
                grown = dict(held)
            grown[name] = write
            named = named or kept is None
    if grown is None:
        return held
    return dict(sorted(grown.items())) if named else grown  # in key order, as decoded


def _lives(existence: ORSet[str]) -> tuple[set[Life], VersionVector]:
    """The live creates (as lives), and every create seen (a removed one too)."""
    return {(d.origin, d.counter) for d in existence.dots(ENTITY)}, existence.context


def _over(life: Life, live: set[Life], seen: VersionVector) -> bool:
    """Whether a life is over: its create was removed (seen, and not live)."""
    if life in live:
        return False
    origin = seen.origins.get(life[0])
    return origin is not None and origin.contains(life[1])


def _bound(
    held: Mapping[Life, Mapping[str, Winner]],
    writes: dict[tuple[Life, str], Winner],
    existence: ORSet[str],
    was: ORSet[str],
) -> Mapping[Life, Mapping[str, Winner]]:
    """Each life's greatest write of each field (``held``, and ``writes`` folded since),
    none of a create removed: its life is over for good. Fields in key order."""
    if not writes and existence is was:
        return held
    live, seen = _lives(existence)
    grown = dict(held)
    copied: dict[Life, dict[str, Winner]] = {}  # the lives copied here, to change
    named: set[Life] = set()  # lives given a field they had no write of
    for (life, name), write in writes.items():
        if _over(life, live, seen):
            continue
        fields = copied.get(life)
        if fields is None:
            fields = copied[life] = dict(grown.get(life, {}))
        kept = fields.get(name)
        if kept is None or later(write[0], kept[0]):
            fields[name] = write
            if kept is None:
                named.add(life)
    for life, fields in copied.items():
        grown[life] = dict(sorted(fields.items())) if life in named else fields
    if existence is not was:  # creates removed since: their lives' writes go
        for life in [life for life in grown if _over(life, live, seen)]:
            del grown[life]
    return grown


_NO_FIELDS: Mapping[str, Winner] = {}  # shared: a state's fields are never changed


def showing_life(existence: ORSet[str], creates: Mapping[Dot, int]) -> Life | None:
    """The life that shows: the greatest live create's, by (stamp, origin, counter)."""
    top = _showing_create(existence, creates)
    return None if top is None else (top[1], top[2])


def _showing_create(existence: ORSet[str], creates: Mapping[Dot, int]) -> Key | None:
    """The greatest live create, as its key (stamp, origin, counter)."""
    live = existence.dots(ENTITY)
    if not live:
        return None
    return max((creates.get(d, 0), d.origin, d.counter) for d in live)


def _shown(
    unbound: Mapping[str, Winner],
    bound: Mapping[Life, Mapping[str, Winner]],
    existence: ORSet[str],
    creates: Mapping[Dot, int],
) -> Mapping[str, Winner]:
    """Each field's greatest write that shows: of those naming the life that shows, and
    of those naming none, ordered after its create. Most entities: that life's fields,
    as they are."""
    top = _showing_create(existence, creates)
    fields = _NO_FIELDS if top is None else bound.get((top[1], top[2]), _NO_FIELDS)
    if unbound and top is not None:
        after = {name: w for name, w in unbound.items() if w[0] > top}
    else:
        after = dict(unbound)  # no life shows: neither does the entity
    if not after:
        return fields
    for name, write in fields.items():
        kept = after.get(name)
        if kept is None or later(write[0], kept[0]):
            after[name] = write
    return dict(sorted(after.items()))


def shows(state: EntityState, event: Event) -> bool:
    """Whether a field write can show in ``state`` (folded from events including it):
    it names the life that shows, or names none and is ordered after its create."""
    top = _showing_create(state.existence, state.create_stamps)
    if event.lives:
        return top is not None and Dot(top[1], top[2]) in event.lives
    return top is None or (event.hlc, event.dot.origin, event.dot.counter) > top


def fold(state: EntityState, event: Event) -> EntityState:
    """Apply one event to its entity. The caller guarantees each dot comes once."""
    return fold_many(state, (event,))


def fold_many(state: EntityState, events: Iterable[Event]) -> EntityState:
    """Apply events to their entity, as ``fold`` one at a time would."""
    folding = Folding(state)
    for e in events:
        folding.add(e)
    return folding.state()


def fold_stored(state: EntityState, wires: Iterable[list[Any]]) -> EntityState:
    """Apply events as this node's log holds them, decoded but not made ``Event``s (each
    was validated when it was appended; format 1, or 2 with the creates it names last):
    the rebuild."""
    folding = Folding(state)
    for wire in wires:
        _, origin, counter, hlc, _stream, op, name, value, observed = wire[:9]
        dots = NO_DOTS if op != _DELETE else frozenset(Dot(o, c) for o, c in observed)
        lives = () if len(wire) < 11 else [(o, c) for o, c in wire[10]]
        folding.event(origin, counter, hlc, op, name, value, dots, lives)
    return folding.state()


def fold_member(member: ORSet[str], event: Event) -> ORSet[str]:
    """Apply an add or remove of one element to that element's OR-set slice."""
    assert event.value is not None
    if event.op is Op.ADD:
        return member.apply(Add(event.value, event.dot))
    return member.apply(Remove(event.value, event.observed))


def fold_stored_members(wires: Iterable[list[Any]]) -> dict[str, ORSet[str]]:
    """Each element's OR-set slice from a group's adds and removes, as the log holds them
    (see ``fold_stored``); every other event is passed over."""
    changes: dict[str, list[Add[str] | Remove[str]]] = {}
    for _, origin, counter, _hlc, _stream, op, _field, element, observed, *_ in wires:
        if op == _ADD:
            changes.setdefault(element, []).append(Add(element, Dot(origin, counter)))
        elif op == _REMOVE:
            dots = frozenset(Dot(o, c) for o, c in observed)
            changes.setdefault(element, []).append(Remove(element, dots))
    return {element: ORSet.of_ops(ops) for element, ops in changes.items()}


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
    held = list(events)
    members: ORSet[str] = ORSet()
    for event in held:
        if event.op in (Op.ADD, Op.REMOVE):
            members = fold_member(members, event)
    return fold_many(EntityState(), held), members


# A state's existence set encoded (``crdt.codec``), kept with the state (see ``derived``):
# a state folded from one with the same set, or decoded, does not encode it again. Bytes,
# one object the garbage collector never walks, where the set's wire form was seven lists
# in every state the map of decoded states keeps.
EXISTENCE_BYTES = ("existence_bytes", "")


def encode_state(state: EntityState) -> bytes:
    existence = state.derived.get(EXISTENCE_BYTES)
    if existence is None:
        existence = state.derived[EXISTENCE_BYTES] = crdt_codec.encode(state.existence)
    fields = {
        name: [value, hlc, origin, counter]
        for name, ((hlc, origin, counter), value) in sorted(state.unbound.items())
    }
    creates = [[d.origin, d.counter, hlc] for d, hlc in sorted(state.create_stamps.items())]
    bound = [
        [
            life[0],
            life[1],
            {
                name: [value, hlc, origin, counter]
                for name, ((hlc, origin, counter), value) in sorted(written.items())
            },
        ]
        for life, written in sorted(state.bound.items())
    ]
    return crdt_codec.pack(
        [
            VIEW_FORMAT,
            existence,
            fields,
            None if state.floor is None else list(state.floor),
            creates,
            state.etag,
            state.events,
            state.updated_hlc,
            bound,
        ]
    )


def _life(origin: Any, counter: Any) -> Life:
    """A stored life, with the checks ``_winner`` makes of a dot."""
    if not isinstance(origin, str) or not origin or not isinstance(counter, int) or counter < 1:
        raise CorruptView("a life is [str, int >= 1]")
    return origin, counter


def _winner(wire: Any) -> Winner:
    """A stored register's winning write, from ``[value, hlc, origin, counter]``, with the
    checks ``crdt.codec`` makes of a register."""
    if not isinstance(wire, list):
        raise CorruptView(f"a register is an array, not {type(wire).__name__}")
    value, hlc, origin, counter = wire
    if not isinstance(hlc, int) or hlc < 0:
        raise CorruptView("register stamp must be an int >= 0")
    if not isinstance(origin, str) or not origin or not isinstance(counter, int) or counter < 1:
        raise CorruptView("dot must be [str, int >= 1]")
    if value is not None and not isinstance(value, str):
        raise CorruptView("a value is a string or null")
    return (hlc, origin, counter), value


# Decoded views, by their bytes: a state is immutable, so one object can serve every
# reader of the same bytes (reads of a hot entity, a write's check and its fold), and the
# writer, which has just folded the state it stores, need not decode it again.
# Every state kept is a handful of objects the garbage collector walks while the map
# fills: under HTTP writes on 1,000 users, a full collection then stopped the node for
# ~60 ms and young ones for 14-18 ms, where 2,048 states made it ~17 ms and under 1 ms.
# Once full, the map frees a state for each it keeps, and no collection is due. 2,048
# cost PATCHes on 5,000 users 8% more instructions (961k -> 1,038k), decoding the states
# their checks read: the fill's pauses were the cheaper price. /metrics shows them.
DECODED_VIEWS_MAX = 8_192


K = TypeVar("K", bytes, str)
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """A bounded map, the oldest put out first: at most ``size`` entries and, with
    ``weigh``, at most ``bytes_max`` of what it weighs (an entry over a sixteenth of that
    is not kept: a few huge entities would push every other out).

    A read is one dict lookup, without a lock (atomic under the GIL): every GET makes
    one. Puts come from the writer thread and the event loop, so they take the lock.
    """

    def __init__(
        self,
        size: int,
        *,
        bytes_max: int = 0,
        weigh: Callable[[K, V], int] | None = None,
    ) -> None:
        assert (weigh is None) == (bytes_max == 0), "a byte bound needs its weights"
        self.size, self.bytes_max = size, bytes_max
        self._weigh: Callable[[K, V], int] | None = weigh
        self.bytes = 0  # what the entries kept weigh
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        # The dict's own method: a read makes no Python call (each shows in a GET's time).
        self.get: Callable[[K], V | None] = self._values.get

    def put(self, key: K, value: V) -> None:
        weigh = self._weigh
        with self._lock:
            values = self._values
            if weigh is None:
                values[key] = value
                if len(values) > self.size:
                    values.popitem(last=False)  # O(1); a plain dict's is O(deleted keys)
                return
            old = values.get(key)
            if old is not None:
                self.bytes -= weigh(key, old)
            weight = weigh(key, value)
            if weight > self.bytes_max // 16:
                if old is not None:
                    del values[key]
                return
            values[key] = value
            self.bytes += weight
            while len(values) > self.size or self.bytes > self.bytes_max:
                oldest, gone = values.popitem(last=False)
                self.bytes -= weigh(oldest, gone)

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self.bytes = 0


# Weighed by the view's bytes; decoded, a state takes about nine times as much memory
# (a user of 1,280 profile keys: a 54 KB view, ~474 KB of objects). Some 300 bytes a
# user: the bound is the number of states, unless entities are large.
DECODED_VIEW_BYTES_MAX = 8 * 1024 * 1024


def _view_bytes(data: bytes, state: EntityState) -> int:
    return len(data)


# By the view's bytes: a state is derived from them alone, so an entry is never stale.
_DECODED = Bounded[bytes, EntityState](
    DECODED_VIEWS_MAX, bytes_max=DECODED_VIEW_BYTES_MAX, weigh=_view_bytes
)


def remember_state(data: bytes, state: EntityState) -> None:
    """Let ``decode_state(data)`` answer ``state``: ``data`` is ``encode_state(state)``.

    A folded state keeps its fields and creates in key order, as decoding gives them, so
    nothing that iterates it can tell it was not decoded.
    """
    _DECODED.put(data, state)


def decode_state(data: bytes) -> EntityState:
    state = _DECODED.get(data)
    if state is None:
        state = _decode_state(data)
        _DECODED.put(data, state)
    return state


def _decode_state(data: bytes) -> EntityState:
    try:
        version, existence, fields, floor, creates, etag, events, updated, *rest = msgpack.unpackb(
            data
        )
        if version == 1:  # the set's wire form, as views stored it before
            existence = crdt_codec.pack(existence)
        elif version not in (2, VIEW_FORMAT) or len(rest) != (version == VIEW_FORMAT):
            raise CorruptView(f"view format {version!r}")
        exists = crdt_codec.decode_as(existence, ORSet)
        registers = {name: _winner(wire) for name, wire in fields.items()}
        stamps = {Dot(o, c): hlc for o, c, hlc in creates}
        bound = {
            _life(life_origin, life_counter): {name: _winner(w) for name, w in written.items()}
            for life_origin, life_counter, written in (rest[0] if rest else ())
        }
        return EntityState(
            existence=exists,
            fields=_shown(registers, bound, exists, stamps),
            unbound=registers,
            bound=bound,
            floor=None if floor is None else (floor[0], floor[1], floor[2]),
            create_stamps=stamps,
            etag=etag,
            events=events,
            updated_hlc=updated,
            derived={EXISTENCE_BYTES: existence},  # as encode_state made it: read, not changed
        )
    except (ValueError, TypeError, AssertionError) as exc:
        raise CorruptView(str(exc)) from exc
