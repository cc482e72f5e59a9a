"""Query views, folded from events inside the same write transaction as the append.

Each entity's folded state lives under its stream; each group member's OR-set slice
under its own key, so adding one member to a huge group costs one key. Indexes are a
function of state: after each fold the keys the old state implied and the new one
implies are compared and only the difference is written, so incremental views equal
views rebuilt from scratch. A unique field's index holds each value once, with the ids
of its holders (sorted, ``\0`` between), so that a lookup is one get and the two holders
a merge can leave are both found. Uniqueness conflicts (one email held by two users after
regions merged) are kept in ``conflicts``, also derived from the indexes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import msgpack

from crdt import ORSet, VersionVector
from crdt import codec as crdt_codec
from node.events import Event, Op, stream_of
from node.fold import (
    ENTITY,
    FOLD_RULES,
    EntityState,
    Folding,
    decode_state,
    encode_state,
    fold_member,
    fold_stored,
    fold_stored_members,
    prune_member,
    remember_state,
)
from node.kv import ReadTxn, WriteTxn
from node.schema import UNIQUE_FIELDS, index_value, search_fold

T = TypeVar("T")
TOKEN_RE = re.compile(r"[^\W_]+")
INDEX_DBS = {"email": "unique_email", "username": "unique_username"}
FIELD_OF_INDEX = {db: field for field, db in INDEX_DBS.items()}
# The unique indexes of data directories written before: one key per holder (value \0 id).
LEGACY_INDEX_DBS = {"email": "idx_email", "username": "idx_username"}
SEARCH_SCAN_KEYS_MAX = 2_000  # search keys one page walks (then short, with a cursor)
SEARCHED_FIELDS = ("name", "username", "email")
INDEXED_FIELDS = tuple(dict.fromkeys((*SEARCHED_FIELDS, *UNIQUE_FIELDS)))


def entity(txn: ReadTxn, stream: str) -> EntityState:
    if isinstance(txn, PendingReads):
        return txn.entity(stream)
    return stored_entity(txn.get, stream)


def stored_entity(get: Callable[[str, bytes], bytes | None], stream: str) -> EntityState:
    """An entity's state as stored, read with ``get``: a transaction's, or the KV's own
    for a read of one key."""
    raw = stored_view(get, stream)
    return EntityState() if raw is None else decode_state(raw)


def stored_view(get: Callable[[str, bytes], bytes | None], stream: str) -> bytes | None:
    """An entity's stored view undecoded (``decode_state`` makes it a state), or None."""
    return get("views", stream.encode())


def member_key(group_id: str, user_id: str) -> bytes:
    return group_id.encode() + b"\0" + user_id.encode()


def member_slice(txn: ReadTxn, group_id: str, user_id: str) -> ORSet[str]:
    raw = txn.get("members", member_key(group_id, user_id))
    return ORSet() if raw is None else crdt_codec.decode_as(raw, ORSet)


def search_tokens(state: EntityState) -> set[str]:
    tokens: set[str] = set()
    for field in SEARCHED_FIELDS:
        value = state.value(field)
        if value:
            folded = search_fold(value)
            tokens.add(folded)
            tokens.update(TOKEN_RE.findall(folded))
    return tokens


INDEX_VALUE_BYTES_MAX = 200  # LMDB keys are at most 511 bytes; ids add at most 65
SEARCH_TOKEN_BYTES_MAX = 64


def index_part(text: str) -> bytes:
    """A value as it stands in an index key: itself, or (if long) a prefix and a hash."""
    raw = text.encode()
    if len(raw) <= INDEX_VALUE_BYTES_MAX:
        return raw
    digest = hashlib.sha256(raw).hexdigest()[:32].encode()
    return raw[: INDEX_VALUE_BYTES_MAX - 33] + b"#" + digest


def search_part(token: str) -> bytes:
    """A search token in a key: its first bytes are enough for a prefix search."""
    return token.encode()[:SEARCH_TOKEN_BYTES_MAX]


def _index_entries(stream: str, state: EntityState) -> dict[tuple[str, bytes], str | None]:
    """Every index key this entity's state implies: each search key (token \0 id) with
    None, and the key of each unique value it holds (among whose holders it is) with that
    value, as the unique index holds it (``index_value``)."""
    kind, _, entity_id = stream.partition("/")
    if kind != "user" or not state.exists:
        return {}
    suffix = b"\0" + entity_id.encode()
    entries: dict[tuple[str, bytes], str | None] = {
        ("idx_search", search_part(t) + suffix): None for t in search_tokens(state)
    }
    for field in UNIQUE_FIELDS:
        value = state.value(field)
        if value:
            folded = index_value(field, value)
            entries[(INDEX_DBS[field], index_part(folded))] = folded
    return entries


def _holders(raw: bytes | None) -> list[str]:
    """The ids a unique index holds under one value."""
    return [] if raw is None else raw.decode().split("\0")


def _move_holder(txn: WriteTxn, db: str, key: bytes, holder: str, *, holds: bool) -> list[str]:
    """Add ``holder`` to the holders of a unique value, or take it away; return them."""
    held = _holders(txn.get(db, key))
    holders = sorted({*held, holder}) if holds else [h for h in held if h != holder]
    if holders:
        txn.put(db, key, "\0".join(holders).encode())
    else:
        txn.delete(db, key)
    return holders


def _refresh_conflict(txn: WriteTxn, db: str, key: bytes, value: str, holders: list[str]) -> None:
    conflict_key = FIELD_OF_INDEX[db].encode() + b"\0" + key
    if len(holders) > 1:
        txn.put("conflicts", conflict_key, crdt_codec.pack([value, holders]))
    else:
        txn.delete("conflicts", conflict_key)


ID_CONFLICT = "id"  # the conflicts table's field for one id created concurrently


def _id_conflict(stream: str, state: EntityState) -> bytes | None:
    """The conflicts table's record of an id created in two regions at once (its live
    creates: a create here is refused while the id exists, and a delete removes the
    creates it saw, so two live ones never saw each other), or None. The later create's
    life shows, the earlier's writes cleared (the README's rule); this says so where
    operators look, while both live."""
    dots = state.existence.dots(ENTITY)
    if len(dots) < 2:
        return None
    return crdt_codec.pack([stream, sorted(str(d) for d in dots)])


def _refresh_id_conflict(txn: WriteTxn, stream: str, old: EntityState, new: EntityState) -> None:
    if new.existence is old.existence:
        return
    record, key = _id_conflict(stream, new), ID_CONFLICT.encode() + b"\0" + stream.encode()
    if record is not None:
        txn.put("conflicts", key, record)
    elif _id_conflict(stream, old) is not None:
        txn.delete("conflicts", key)


def find_conflicts(txn: WriteTxn) -> None:
    """Record every uniqueness conflict the unique indexes hold, in one pass over them
    (a rebuild, whose ``Pending`` skips the check key by key)."""
    for field, db in INDEX_DBS.items():
        for key, raw in txn.scan(db):
            holders = _holders(raw)
            if len(holders) > 1:
                value = entity(txn, stream_of("user", holders[0])).value(field)
                assert value is not None, "a unique value's holder holds it"
                _refresh_conflict(txn, db, key, index_value(field, value), holders)


# The rules (``fold.FOLD_RULES``) the views were folded by, kept among them: in the search
# index, under a key no token takes (a token is word characters), because an older
# version's rebuild empties that table, where it leaves ``meta`` be. Views it folded
# then carry no mark, and are folded again when this version opens them.
FOLD_RULES_DB, FOLD_RULES_KEY = "idx_search", b"\0fold_rules"


def folded_by_these_rules(txn: ReadTxn) -> bool:
    """Whether the views were folded by this version's rules (``fold.FOLD_RULES``)."""
    return txn.get(FOLD_RULES_DB, FOLD_RULES_KEY) == str(FOLD_RULES).encode()


def mark_fold_rules(txn: WriteTxn) -> None:
    """Record that the views are folded by this version's rules."""
    txn.put(FOLD_RULES_DB, FOLD_RULES_KEY, str(FOLD_RULES).encode())


def has_legacy_indexes(txn: ReadTxn) -> bool:
    """Whether an older version wrote this data directory's unique indexes (in its own
    tables, one key per holder)."""
    return any(next(txn.scan(db), None) is not None for db in LEGACY_INDEX_DBS.values())


def convert_legacy_indexes(txn: WriteTxn) -> int:
    """Make the unique indexes and their conflicts anew from the stored user views, empty
    the older version's tables (``LEGACY_INDEX_DBS``), and return the users indexed.

    From the views, not from the older tables: an index is a function of the views, and
    the older tables may be partial (a directory moved back to an older version without
    ``rebuild-views`` indexes only the users written since).
    """
    for db in (*INDEX_DBS.values(), *LEGACY_INDEX_DBS.values(), "conflicts"):
        txn.clear(db)
    users = 0
    for key, raw in txn.scan("views", prefix=b"user/"):
        stream = key.decode()
        holder = stream.partition("/")[2]
        for (db, index_key), value in _index_entries(stream, decode_state(raw)).items():
            if value is not None:  # a unique value's key (the search index is kept)
                _move_holder(txn, db, index_key, holder, holds=True)
        users += 1
    find_conflicts(txn)
    return users


def _hash(*parts: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"\0".join(parts), digest_size=16).digest(), "big")


def entity_digest(stream: str, state: EntityState) -> int:
    """A hash of what a client can see of an entity (not how it was stored), 0 if nothing."""
    winners = sorted(
        (name, value, hlc, f"{origin}:{counter}")
        for name, ((hlc, origin, counter), value) in state.fields.items()
    )
    if not winners and not state.exists:
        return 0
    return _hash(stream.encode(), crdt_codec.pack([state.exists, winners]))


def digest(txn: ReadTxn) -> int:
    """XOR of every entity's and every membership's hash: equal views, equal digests."""
    raw = txn.get("meta", b"digest")
    return 0 if raw is None else int.from_bytes(raw, "big")


def _update_digest(txn: WriteTxn, change: int) -> None:
    if change:
        txn.put("meta", b"digest", (digest(txn) ^ change).to_bytes(16, "big"))


def apply(txn: WriteTxn, event: Event, pending: Pending | None = None) -> None:
    """Fold one newly appended event into the views and indexes.

    With ``pending``, the entity's folded state is kept there and stored (with its index
    and digest changes) when the caller flushes it: one write per entity per commit
    however many of its events the commit holds. Member slices and memberships are
    written at once either way.
    """
    if pending is None:
        pending = Pending()
        apply(txn, event, pending)
        pending.flush(txn)
        return
    folding = pending.folding(txn, event.stream)
    op = event.op
    if op is Op.SET:  # most events: a field write changes no existence and no membership
        folding.add(event)
        return
    folding.add(event)
    group_id = event.entity_id
    if op is Op.ADD or op is Op.REMOVE:
        assert event.value is not None
        before = member_slice(txn, group_id, event.value)
        member = fold_member(before, event)
        txn.put("members", member_key(group_id, event.value), crdt_codec.encode(member))
        if (event.value in before) != (event.value in member):
            pending.digest_change ^= _hash(b"member", member_key(group_id, event.value))
            # Whatever the group's existence: a delete of the user removes them all.
            _refresh_membership(txn, group_id, event.value, event.value in member)


# One entity of a rebuild, folded and ready to store (``replayed``, ``store_replayed``):
# plain bytes, ints, lists and tuples, which a worker process hands over at little cost.
# (stream, view, hash, search keys, unique (table, key)s, member slices (key, slice),
# memberships (user_groups keys), events folded, its id conflict's record or None)
Replayed = tuple[
    bytes,
    bytes,
    int,
    list[bytes],
    list[tuple[str, bytes]],
    list[tuple[bytes, bytes]],
    list[bytes],
    int,
    bytes | None,
]


def replayed(stream: str, wires: list[list[Any]]) -> Replayed:
    """Every event of one entity, as the log holds them, folded into what the views
    (cleared before: the rebuild) store of it: its view, its index keys, its member
    slices and the memberships they make, and what it adds to the digest (XORed)."""
    state = fold_stored(EntityState(), wires)
    change = entity_digest(stream, state)
    search_keys: list[bytes] = []
    unique: list[tuple[str, bytes]] = []
    for (db, key), value in _index_entries(stream, state).items():
        if value is None:
            search_keys.append(key)
        else:
            unique.append((db, key))
    slices: list[tuple[bytes, bytes]] = []
    memberships: list[bytes] = []
    kind, _, group_id = stream.partition("/")
    if kind == "group":
        for user_id, member in fold_stored_members(wires).items():
            key = member_key(group_id, user_id)
            slices.append((key, crdt_codec.encode(member)))
            if user_id in member:
                change ^= _hash(b"member", key)
                memberships.append(user_id.encode() + b"\0" + group_id.encode())
    view = encode_state(state)
    conflict = _id_conflict(stream, state)
    return (
        stream.encode(),
        view,
        change,
        search_keys,
        unique,
        slices,
        memberships,
        len(wires),
        conflict,
    )


def store_replayed(txn: WriteTxn, entities: Iterable[Replayed]) -> int:
    """Store rebuilt entities (``replayed``) in views cleared before, and the digest they
    make; return the events they folded. Uniqueness conflicts are left to
    ``find_conflicts``, once, over the finished indexes."""
    change = events = 0
    for (
        stream,
        view,
        hashed,
        search_keys,
        unique,
        slices,
        memberships,
        folded,
        conflict,
    ) in entities:
        txn.put("views", stream, view)
        if conflict is not None:
            txn.put("conflicts", ID_CONFLICT.encode() + b"\0" + stream, conflict)
        for key in search_keys:
            txn.put("idx_search", key, b"")
        if unique:
            holder = stream.partition(b"/")[2].decode()
            for db, key in unique:
                _move_holder(txn, db, key, holder, holds=True)
        for key, member in slices:
            txn.put("members", key, member)
        for key in memberships:
            txn.put("user_groups", key, b"")
        change ^= hashed
        events += folded
    _update_digest(txn, change)
    return events


class Pending:
    """Entity states folded in a write transaction and not stored yet (see ``apply``).

    Whoever reads views or indexes in the same transaction must ``flush`` first, or read
    through ``PendingReads``, which flushes when it must. Storing only the last state of
    each entity gives the same views, indexes, conflicts and digest as storing every
    intermediate one: each is a function of the final state (index keys carry the
    entity's id; the digest changes telescope). For the same reason the events of one
    entity fold into one ``Folding``, made a state only when read or flushed.
    """

    def __init__(self) -> None:
        # stream -> its latest state, or a Folding of the events since it
        self.states: dict[str, EntityState | Folding] = {}
        self.stored: dict[str, EntityState] = {}  # stream -> its state as stored
        self.digest_change = 0

    def __len__(self) -> int:
        return len(self.states)

    def entity(self, txn: ReadTxn, stream: str) -> EntityState:
        held = self.states.get(stream)
        if held is None:
            held = self.stored[stream] = self.states[stream] = entity(txn, stream)
        elif isinstance(held, Folding):
            held = self.states[stream] = held.state()
        return held

    def folding(self, txn: ReadTxn, stream: str) -> Folding:
        """Where the next event of ``stream`` in this transaction folds."""
        held = self.states.get(stream)
        if isinstance(held, Folding):
            return held
        if held is None:
            held = self.stored[stream] = entity(txn, stream)
        folding = self.states[stream] = Folding(held)
        return folding

    def flush(self, txn: WriteTxn) -> None:
        """Store every pending state, its index changes and the digest change."""
        change = self.digest_change
        for stream, held in self.states.items():
            old = self.stored[stream]
            new = held.state() if isinstance(held, Folding) else held
            if new is old:
                continue
            data = encode_state(new)
            txn.put("views", stream.encode(), data)
            remember_state(data, new)
            if new.existence is not old.existence or new.fields is not old.fields:
                change ^= _derived(entity_digest, stream, old)
                change ^= _derived(entity_digest, stream, new)
            _reindex(txn, stream, old, new)
            _refresh_id_conflict(txn, stream, old, new)
        _update_digest(txn, change)
        self.states.clear()
        self.stored.clear()
        self.digest_change = 0


# What ``Pending.flush`` writes: a read of any of these must see the pending states stored.
DEFERRED_DBS = frozenset(("views", "meta", "conflicts", "idx_search", *INDEX_DBS.values()))


class PendingReads:
    """A write transaction as a decision reads it, with the pending states in view.

    An entity's state comes from ``pending`` (folded in this commit, not stored yet) or
    from the transaction, and stays in ``pending`` for the fold of what the decision
    writes: a commit of many writes to one entity stores it once, not once per write.
    Any other read of what a flush writes (an index, a view scan) flushes first.
    """

    __slots__ = ("pending", "txn")

    def __init__(self, txn: WriteTxn, pending: Pending) -> None:
        self.txn, self.pending = txn, pending

    def entity(self, stream: str) -> EntityState:
        return self.pending.entity(self.txn, stream)

    def get(self, db: str, key: bytes) -> bytes | None:
        self._settle(db)
        return self.txn.get(db, key)

    def scan(
        self, db: str, *, prefix: bytes = b"", start: bytes | None = None, reverse: bool = False
    ) -> Iterator[tuple[bytes, bytes]]:
        self._settle(db)
        return self.txn.scan(db, prefix=prefix, start=start, reverse=reverse)

    def _settle(self, db: str) -> None:
        if db in DEFERRED_DBS and self.pending.states:
            self.pending.flush(self.txn)


def _derived(compute: Callable[[str, EntityState], T], stream: str, state: EntityState) -> T:
    """``compute(stream, state)``, kept with the state for whoever asks again."""
    key = (compute.__name__, stream)
    try:
        value: T = state.derived[key]
    except KeyError:
        value = state.derived[key] = compute(stream, state)
    return value


def _indexed(stream: str, state: EntityState) -> tuple[object, ...]:
    """What the index keys of an entity are a function of."""
    if not stream.startswith("user/") or not state.exists:
        return ()
    return tuple(state.value(field) for field in INDEXED_FIELDS)


def _reindex(txn: WriteTxn, stream: str, old: EntityState, new: EntityState) -> None:
    if _indexed(stream, old) == _indexed(stream, new):
        return
    before, after = _derived(_index_entries, stream, old), _derived(_index_entries, stream, new)
    holder = stream.partition("/")[2]
    # What the old state implied and the new one does not goes; then the reverse comes.
    for entries, others, holds in ((before, after, False), (after, before, True)):
        for (db, key), value in entries.items():
            if (db, key) in others:
                continue
            if value is None:  # a search key
                if holds:
                    txn.put(db, key, b"")
                else:
                    txn.delete(db, key)
                continue
            holders = _move_holder(txn, db, key, holder, holds=holds)
            _refresh_conflict(txn, db, key, value, holders)  # who holds that value changed


def _refresh_membership(txn: WriteTxn, group_id: str, user_id: str, present: bool) -> None:
    key = user_id.encode() + b"\0" + group_id.encode()
    if present:
        txn.put("user_groups", key, b"")
    else:
        txn.delete("user_groups", key)


def members(txn: ReadTxn, group_id: str, *, after: str = "") -> Iterator[str]:
    """The group's members, in id order after ``after``: users an add of which is live."""
    for user_id, live in member_slices(txn, group_id, after=after):
        if live:
            yield user_id


def member_slices(txn: ReadTxn, group_id: str, *, after: str = "") -> Iterator[tuple[str, bool]]:
    """Every member slice the group keeps, in id order after ``after``: its user and
    whether an add of it is live (a removed one's slice stays until compacted)."""
    for user_id, member in member_sets(txn, group_id, after=after):
        yield user_id, bool(member.entries)


def member_sets(
    txn: ReadTxn, group_id: str, *, after: str = ""
) -> Iterator[tuple[str, ORSet[str]]]:
    """``member_slices`` with each slice itself."""
    prefix = group_id.encode() + b"\0"
    start = prefix + after.encode() + b"\0" if after else None
    for key, raw in txn.scan("members", prefix=prefix, start=start):
        yield key[len(prefix) :].decode(), crdt_codec.decode_as(raw, ORSet)


def groups_of(txn: ReadTxn, user_id: str, *, existing: bool = True) -> list[str]:
    """The groups holding a live add of the user: those that exist (what a client sees),
    or with ``existing`` false every one, whatever its group's existence (a group not
    here yet, or deleted concurrently with the add: a delete of the user removes them
    all, or the add would list a new user of the same id once the group is there)."""
    prefix = user_id.encode() + b"\0"
    held = [key[len(prefix) :].decode() for key, _ in txn.scan("user_groups", prefix=prefix)]
    if not existing:
        return held
    return [group_id for group_id in held if entity(txn, stream_of("group", group_id)).exists]


def lookup(txn: ReadTxn, field: str, value: str) -> list[str]:
    """The ids of users holding ``value`` in a unique field (more than one: a conflict)."""
    return _holders(txn.get(INDEX_DBS[field], index_part(index_value(field, value))))


def search(
    txn: ReadTxn, query: str, *, after: bytes = b"", limit: int
) -> tuple[list[str], bytes | None]:
    """Up to ``limit`` users whose every query word prefixes some token of their name,
    username or email, and the cursor the next page starts after (None: no more).

    The search index is walked over the range of the longest word's prefix, from
    ``after`` on: users come in the order of their matching token, then of their id, each
    once (at its first key in the range), so the pages list every match once however
    many there are. A page walks at most SEARCH_SCAN_KEYS_MAX keys, so one broad query
    never holds the node for long: it may come back short, with a cursor. (It took the
    first 20,000 keys' users and said no more: a common word's other matches were lost.)
    """
    words = TOKEN_RE.findall(search_fold(query))
    if not words:
        return [], None
    prefix = search_part(max(words, key=len))
    listed_at: dict[str, bytes | None] = {}  # a user's key in the range; None: no match
    found: list[str] = []
    n = 0
    for key, _ in txn.scan("idx_search", prefix=prefix, start=after or None):
        if key == after:
            continue
        n += 1
        user_id = key[key.rindex(b"\0") + 1 :].decode()
        if user_id not in listed_at:
            listed_at[user_id] = _listed_at(txn, user_id, words, prefix)
        if listed_at[user_id] == key:
            found.append(user_id)
            if len(found) >= limit:
                return found, key
        if n >= SEARCH_SCAN_KEYS_MAX:
            return found, key
    return found, None


def _listed_at(txn: ReadTxn, user_id: str, words: list[str], prefix: bytes) -> bytes | None:
    """The key of the search index ``user_id`` is listed at in ``prefix``'s range (its
    least there), or None if it does not match every word."""
    tokens = search_tokens(entity(txn, stream_of("user", user_id)))
    if not all(any(t.startswith(w) for t in tokens) for w in words):
        return None
    parts = [part for t in tokens if (part := search_part(t)).startswith(prefix)]
    return min(parts) + b"\0" + user_id.encode() if parts else None


def conflicts(txn: ReadTxn) -> Iterator[tuple[str, str, list[str]]]:
    for _, field, value, holders in conflict_entries(txn):
        yield field, value, holders


def conflict_entries(
    txn: ReadTxn, *, after: bytes = b""
) -> Iterator[tuple[bytes, str, str, list[str]]]:
    """Each conflict after the key ``after``, with its key (a page's cursor)."""
    start = after + b"\0" if after else None  # the key's successor
    for key, raw in txn.scan("conflicts", start=start):
        value, holders = msgpack.unpackb(raw)
        yield key, key.partition(b"\0")[0].decode(), value, list(holders)


COMPACTION_KEYS_MAX = 10_000


def compact(
    txn: WriteTxn, stable: VersionVector, *, start: bytes = b"", keys_max: int = COMPACTION_KEYS_MAX
) -> tuple[int, bytes]:
    """Prune stable tombstones from up to ``keys_max`` member slices from ``start``.

    Returns how many slices shrank or went, and where the next call resumes (b"" once
    the table has been walked), so a huge table never holds the writer for long.
    """
    changed = 0
    for n, (key, raw) in enumerate(txn.scan("members", start=start or None)):
        if n >= keys_max:
            return changed, key
        member = crdt_codec.decode_as(raw, ORSet)
        pruned = prune_member(member, stable)
        if pruned is None:
            txn.delete("members", key)
            changed += 1
        elif pruned != member:
            txn.put("members", key, crdt_codec.encode(pruned))
            changed += 1
    return changed, b""


def clear(txn: WriteTxn) -> None:
    txn.delete("meta", b"digest")
    tables = ("views", "members", "user_groups", "conflicts", "idx_search")
    for db in (*tables, *INDEX_DBS.values(), *LEGACY_INDEX_DBS.values()):
        txn.clear(db)
