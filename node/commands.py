"""Commands: functions that read the current state and return the events to write.

Each returns a ``Decide`` for the writer, which runs it inside the commit so every
check (existence, ``If-Match``, uniqueness in this region) sees the state the events
will land on. A check that fails raises ``Rejected`` before any event is drafted.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import msgpack

from crdt import Dot
from node import events, log, views
from node.events import Op, Value, stream_of
from node.fold import EntityState, showing_life
from node.kv import ReadTxn, WriteTxn
from node.schema import PROFILE_KEYS_MAX, PROFILE_REGISTERS_MAX, UNIQUE_FIELDS
from node.tokens import etag_of
from node.writer import Decide, Draft, Rejected, Then


def _existing(txn: ReadTxn, kind: str, entity_id: str) -> EntityState:
    state = views.entity(txn, stream_of(kind, entity_id))
    if not state.exists:
        raise Rejected(404, "not_found", f"no {kind} {entity_id!r}")
    return state


def _check_match(state: EntityState, if_match: str | None) -> None:
    if if_match is not None and if_match.strip() != "*" and etag_of(state.etag) not in if_match:
        raise Rejected(
            412,
            "precondition_failed",
            "the entity changed since that ETag",
            etag=etag_of(state.etag),
        )


def _check_unique(txn: ReadTxn, kind: str, entity_id: str, writes: Mapping[str, Value]) -> None:
    if kind != "user":
        return
    for field in UNIQUE_FIELDS:
        value = writes.get(field)
        if value is None:
            continue
        holders = [h for h in views.lookup(txn, field, value) if h != entity_id]
        if holders:
            raise Rejected(
                409,
                "conflict",
                f"{field} {value!r} is taken in this region",
                field=field,
                held_by=holders[0],
            )


def _check_profile_room(state: EntityState, writes: Mapping[str, Value]) -> None:
    """A user holds at most PROFILE_KEYS_MAX profile keys at once: a write may add keys
    only while that holds (each write's 64 kept no user from growing to 19 MB over 300
    writes, which then stalled every read and write of it; found by a review). Unset
    keys do not count; concurrent writes in several regions may go past it by theirs."""
    profile = {f: v for f, v in writes.items() if f.startswith("profile.")}
    if not profile:
        return
    # An unset is written even of a key not set here (a set made elsewhere, not here yet,
    # must lose to it, as last-writer-wins says), and stays as a register: counted too
    # (unsets of keys never set, by the thousand, grew a user to 11 MB: a review).
    registers = {f for f in state.fields if f.startswith("profile.")}
    grown = registers | profile.keys()
    if len(grown) > PROFILE_REGISTERS_MAX and len(grown) > len(registers):
        raise Rejected(
            422,
            "invalid_value",
            f"a user keeps at most {PROFILE_REGISTERS_MAX} profile keys, unset ones included "
            "(each stays, for the order of writes): set one it has, or delete the user",
            field="profile",
        )
    held = {f for f, (_, value) in state.fields.items() if f.startswith("profile.") and value}
    unset = {f for f, v in profile.items() if v is None}
    after = (held | profile.keys()) - unset
    if len(after) > PROFILE_KEYS_MAX and len(after) > len(held):
        raise Rejected(
            422,
            "invalid_value",
            f"a user holds at most {PROFILE_KEYS_MAX} profile keys; this write would make "
            f"{len(after)} (unset some with null)",
            field="profile",
        )


def _sets(
    stream: str, state: EntityState, writes: Mapping[str, Value], *, new_life: bool = False
) -> list[Draft]:
    """Each write drafted under the creates live here (``new_life``: under the create
    drafted just before): it shows while one of them lives, and goes with the last."""
    lives = frozenset() if new_life else _lives(state)
    drafts = []
    for field, value in sorted(writes.items()):
        # The register's winning write, ((hlc, origin, counter), value): its dot is observed.
        # After the write it replaces and the create it is written under (the floor):
        # it was written knowing them, and must not lose to them, however far ahead
        # their stamps are.
        floor = 0 if state.floor is None else state.floor[0]
        held = state.fields.get(field)
        if held is None:
            observed, after = frozenset[Dot](), floor
        else:
            (hlc, origin, counter), _ = held
            observed, after = frozenset({Dot(origin, counter)}), max(hlc, floor)
        drafts.append(Draft(stream, Op.SET, field, value, observed, after, lives, new_life))
    return drafts


def _lives(state: EntityState) -> frozenset[Dot]:
    """The create whose life shows here: the person whose data (and ETag) the client saw
    and wrote to. Of an id created in two regions at once, a write made where both are
    seen is that person's alone: named under both, it showed in the other's account once
    the later create was deleted where it alone was seen (a review: an API key so)."""
    life = showing_life(state.existence, state.create_stamps)
    return frozenset() if life is None else frozenset((Dot(*life),))


def create(kind: str, entity_id: str, writes: Mapping[str, Value]) -> Decide:
    stream = stream_of(kind, entity_id)

    def decide(txn: ReadTxn) -> list[Draft]:
        state = views.entity(txn, stream)
        if state.exists:
            raise Rejected(409, "exists", f"{kind} {entity_id!r} already exists")
        _check_unique(txn, kind, entity_id, writes)
        # Memberships this replica holds for the id stay: whether an add was made for an
        # earlier, deleted life (racing its delete) or for a live one whose create has not
        # arrived here yet, nothing here tells apart. Add wins (see the README's table).
        # Stamped by the clock, not after the writes of the id it knows: one stamped far
        # ahead (a peer's clock) would carry the new life's every stamp there with it.
        return [Draft(stream, Op.CREATE), *_sets(stream, state, writes, new_life=True)]

    return decide


def patch(kind: str, entity_id: str, writes: Mapping[str, Value], if_match: str | None) -> Decide:
    stream = stream_of(kind, entity_id)

    def decide(txn: ReadTxn) -> list[Draft]:
        state = _existing(txn, kind, entity_id)
        _check_match(state, if_match)
        _check_unique(txn, kind, entity_id, writes)
        _check_profile_room(state, writes)
        return _sets(stream, state, writes)

    return decide


def delete(kind: str, entity_id: str, if_match: str | None) -> Decide:
    stream = stream_of(kind, entity_id)

    def decide(txn: ReadTxn) -> list[Draft]:
        state = _existing(txn, kind, entity_id)
        _check_match(state, if_match)
        drafts = [Draft(stream, Op.DELETE, observed=state.existence.dots(""))]
        if kind == "user":  # deleting a user removes the memberships this replica sees
            for group_id in views.groups_of(txn, entity_id, existing=False):
                drafts += _remove_member(txn, group_id, entity_id)
        else:  # deleting a group removes the members it has here; a re-created one starts empty
            for user_id in views.members(txn, entity_id):
                drafts += _remove_member(txn, entity_id, user_id)
        return drafts

    return decide


def _remove_member(txn: ReadTxn, group_id: str, user_id: str) -> list[Draft]:
    """The removes of every add of the member this replica holds: none if there is none,
    else one per OBSERVED_DOTS_MAX of them (an event observes no more), so a member
    whose adds piled up (an older version added one per PUT) can still be removed."""
    return _removes(group_id, user_id, views.member_slice(txn, group_id, user_id).dots(user_id))


def _removes(group_id: str, user_id: str, dots: frozenset[Dot]) -> list[Draft]:
    observed = sorted(dots)
    stream, most = stream_of("group", group_id), events.OBSERVED_DOTS_MAX
    return [
        Draft(stream, Op.REMOVE, "members", user_id, frozenset(observed[i : i + most]))
        for i in range(0, len(observed), most)
    ]


# A group's delete through the API removes its members about GROUP_REMOVES_PER_COMMIT
# adds a commit, other writes going on between them (one commit of 50,000 removes held
# every other write 3 s): the first commit holds the delete and the first removes and
# records in ``meta`` the delete's seq and the last member done; each commit after takes
# the next ones, until none is left, also after a stop (``Replica.finish_group_deletes``).
# Only adds this node held when it deleted (seq below the delete's) are removed then: one
# that came after (made elsewhere at the same time as the delete, or to the group
# created again) stays, as it would have.
GROUP_REMOVES_PER_COMMIT = 1_000
GROUP_CLEANUP = b"group_cleanup\0"  # + group id -> [the delete's seq, the last member done]


def group_cleanup_key(group_id: str) -> bytes:
    return GROUP_CLEANUP + group_id.encode()


def group_of_cleanup_key(key: bytes) -> str:
    return key[len(GROUP_CLEANUP) :].decode()


def cleanups(txn: ReadTxn) -> Iterator[tuple[bytes, bytes]]:
    return txn.scan("meta", prefix=GROUP_CLEANUP)


def delete_group(group_id: str, if_match: str | None) -> tuple[Decide, Then]:
    """A group's delete and the removes of its first members (see above)."""
    stream = stream_of("group", group_id)
    left: list[str | None] = [None]  # the last member done, if more are left

    def decide(txn: ReadTxn) -> list[Draft]:
        state = _existing(txn, "group", group_id)
        _check_match(state, if_match)
        removes, left[0] = _member_removes(txn, group_id, after="", before_seq=None)
        return [Draft(stream, Op.DELETE, observed=state.existence.dots("")), *removes]

    def then(txn: WriteTxn, written: list[tuple[int, events.Event]]) -> None:
        _record_cleanup(txn, group_id, written[0][0], left[0])

    return decide, then


def finish_group_delete(group_id: str) -> tuple[Decide, Then]:
    """The next removes a group's delete left, by its record (none: nothing)."""
    record: list[tuple[int, str | None] | None] = [None]

    def decide(txn: ReadTxn) -> list[Draft]:
        raw = txn.get("meta", group_cleanup_key(group_id))
        if raw is None:
            record[0] = None
            return []
        delete_seq, after = msgpack.unpackb(raw)
        removes, left = _member_removes(txn, group_id, after=after, before_seq=delete_seq)
        record[0] = (delete_seq, left)
        return removes

    def then(txn: WriteTxn, written: list[tuple[int, events.Event]]) -> None:
        if record[0] is not None:
            _record_cleanup(txn, group_id, *record[0])

    return decide, then


def _record_cleanup(txn: WriteTxn, group_id: str, delete_seq: int, left: str | None) -> None:
    key = group_cleanup_key(group_id)
    if left is None:
        txn.delete("meta", key)  # done (an earlier delete's record too: this one took all)
    else:
        txn.put("meta", key, msgpack.packb([delete_seq, left]))


def _member_removes(
    txn: ReadTxn, group_id: str, *, after: str, before_seq: int | None
) -> tuple[list[Draft], str | None]:
    """Removes of the adds of the group's members after member ``after`` (with
    ``before_seq``, of those appended before it), whole members until there are
    GROUP_REMOVES_PER_COMMIT or more, and the last member done if more are left."""
    drafts: list[Draft] = []
    last = after
    for user_id, member in views.member_sets(txn, group_id, after=after):
        if len(drafts) >= GROUP_REMOVES_PER_COMMIT:
            return drafts, last
        last = user_id
        dots = member.dots(user_id)  # none: removed, its slice kept until compacted
        if not dots:
            continue
        if before_seq is not None:
            dots = frozenset(d for d in dots if _seq_of(txn, d) < before_seq)
        drafts += _removes(group_id, user_id, dots)
    return drafts, None


def _seq_of(txn: ReadTxn, dot: Dot) -> int:
    """Where the event of ``dot`` is in this node's log (past the end if it is not)."""
    raw = txn.get("dots", log.dot_key(dot))
    return log.SEQ_MAX if raw is None else log.from_u64(raw)


def add_member(group_id: str, user_id: str) -> Decide:
    def decide(txn: ReadTxn) -> list[Draft]:
        _existing(txn, "group", group_id)
        _existing(txn, "user", user_id)
        # Even for a member already, a fresh add: it outlives a concurrent remove elsewhere
        # (add wins), which is what a client that just PUT the member expects. It replaces
        # the adds held here (removed in the same write), as an ORSWOT's add does, so a
        # member PUT again and again keeps one add, not one per PUT.
        return [
            *_remove_member(txn, group_id, user_id),
            Draft(stream_of("group", group_id), Op.ADD, "members", user_id),
        ]

    return decide


def remove_member(group_id: str, user_id: str) -> Decide:
    def decide(txn: ReadTxn) -> list[Draft]:
        _existing(txn, "group", group_id)
        return _remove_member(txn, group_id, user_id)  # none if not a member: idempotent

    return decide
