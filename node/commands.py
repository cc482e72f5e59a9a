"""Commands: functions that read the current state and return the events to write.

Each returns a ``Decide`` for the writer, which runs it inside the commit so every
check (existence, ``If-Match``, uniqueness in this region) sees the state the events
will land on. A check that fails raises ``Rejected`` before any event is drafted.
"""

from __future__ import annotations

from collections.abc import Mapping

from crdt import Dot
from node import events, views
from node.events import Op, Value, stream_of
from node.fold import EntityState
from node.kv import ReadTxn
from node.schema import PROFILE_KEYS_MAX, PROFILE_REGISTERS_MAX, UNIQUE_FIELDS
from node.tokens import etag_of
from node.writer import Decide, Draft, Rejected


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


def _sets(stream: str, state: EntityState, writes: Mapping[str, Value]) -> list[Draft]:
    drafts = []
    for field, value in sorted(writes.items()):
        # The register's winning write, ((hlc, origin, counter), value): its dot is observed.
        # After the write it replaces and the create it is written under (the floor):
        # it was written knowing them, and must not lose to them, however far ahead
        # their stamps are.
        floor = 0 if state.floor is None else state.floor[0]
        held = state.fields.get(field)
        if held is None:
            drafts.append(Draft(stream, Op.SET, field, value, after=floor))
        else:
            (hlc, origin, counter), _ = held
            observed = frozenset({Dot(origin, counter)})
            drafts.append(Draft(stream, Op.SET, field, value, observed, max(hlc, floor)))
    return drafts


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
        return [Draft(stream, Op.CREATE), *_sets(stream, state, writes)]

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
    observed = sorted(views.member_slice(txn, group_id, user_id).dots(user_id))
    stream, most = stream_of("group", group_id), events.OBSERVED_DOTS_MAX
    return [
        Draft(stream, Op.REMOVE, "members", user_id, frozenset(observed[i : i + most]))
        for i in range(0, len(observed), most)
    ]


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
