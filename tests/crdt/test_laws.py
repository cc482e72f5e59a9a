"""The algebraic laws every CRDT here claims, on states reached by real histories."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import LWWRegister, ORSet, VersionVector, Write
from tests.crdt.histories import Replica, all_ops, histories, replay

LAW_EXAMPLES = 300


def states(history: list[Any], kind: str) -> list[Any]:
    replicas = replay(history)
    return [getattr(r, kind) for r in replicas]


KINDS = st.sampled_from(["register", "members", "seen"])


@settings(max_examples=LAW_EXAMPLES)
@given(histories, KINDS)
def test_merge_is_commutative(history: list[Any], kind: str) -> None:
    a, b, _ = states(history, kind)
    # a ⊔ b == b ⊔ a
    assert a.merge(b) == b.merge(a)


@settings(max_examples=LAW_EXAMPLES)
@given(histories, KINDS)
def test_merge_is_associative(history: list[Any], kind: str) -> None:
    a, b, c = states(history, kind)
    # (a ⊔ b) ⊔ c == a ⊔ (b ⊔ c)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))


@settings(max_examples=LAW_EXAMPLES)
@given(histories, KINDS)
def test_merge_is_idempotent(history: list[Any], kind: str) -> None:
    a, b, _ = states(history, kind)
    # a ⊔ a == a, and (a ⊔ b) ⊔ b == a ⊔ b
    assert a.merge(a) == a
    assert a.merge(b).merge(b) == a.merge(b)


@settings(max_examples=LAW_EXAMPLES)
@given(histories, st.data())
def test_any_permutation_with_duplicates_gives_the_same_state(
    history: list[Any], data: st.DataObject
) -> None:
    ops = all_ops(replay(history))
    shuffled = data.draw(st.permutations(ops))
    duplicates = data.draw(st.lists(st.sampled_from(ops), max_size=10)) if ops else []
    in_order, scrambled = Replica("x"), Replica("y")
    # apply(ops) == apply(permute(ops + duplicates)), bypassing the dot filter for duplicates
    for envelope in ops:
        in_order.deliver(envelope)
    for envelope in shuffled + duplicates:
        op = envelope.op
        if isinstance(op, Write):
            scrambled.register = scrambled.register.apply(op)
        else:
            scrambled.members = scrambled.members.apply(op)
    assert scrambled.register == in_order.register
    assert scrambled.members == in_order.members


@settings(max_examples=LAW_EXAMPLES)
@given(histories, st.data())
def test_a_set_built_at_once_from_its_ops_equals_applying_them_one_by_one(
    history: list[Any], data: st.DataObject
) -> None:
    ops = [e.op for e in all_ops(replay(history)) if not isinstance(e.op, Write)]
    one_by_one: ORSet[str] = ORSet()
    for op in ops:
        one_by_one = one_by_one.apply(op)
    assert ORSet.of_ops(data.draw(st.permutations(ops))) == one_by_one


@settings(max_examples=LAW_EXAMPLES)
@given(histories)
def test_merging_states_equals_applying_the_union_of_their_ops(history: list[Any]) -> None:
    a, b, _ = replay(history)
    union = Replica("x")
    for envelope in a.applied + b.applied:
        union.deliver(envelope)
    # state(a) ⊔ state(b) == state(ops(a) ∪ ops(b))
    assert a.members.merge(b.members) == union.members
    assert a.register.merge(b.register) == union.register
    assert a.seen.merge(b.seen) == union.seen


@settings(max_examples=LAW_EXAMPLES)
@given(histories)
def test_compaction_below_the_stable_point_changes_no_value_nor_merge(history: list[Any]) -> None:
    a, b, c = replay(history)
    stable = a.seen.meet(b.seen).meet(c.seen)
    compacted = [r.members.compact(stable) for r in (a, b, c)]
    for replica, small in zip((a, b, c), compacted, strict=True):
        assert small.value() == replica.members.value()
    # compact(a) ⊔ b has the value of a ⊔ b: no removed element comes back
    assert compacted[0].merge(b.members).value() == a.members.merge(b.members).value()
    assert compacted[0].merge(compacted[1]).value() == a.members.merge(b.members).value()


def test_concurrent_add_wins_over_remove() -> None:
    history = [("add", 0, 0, "bart"), ("deliver", 1, 0, "-"), ("remove", 1, 0, "bart")]
    history += [("add", 0, 0, "bart"), ("deliver", 0, 1, "-"), ("deliver", 1, 0, "-")]
    eu, us, _ = replay(history)
    assert eu.members.value() == us.members.value() == frozenset({"bart"})


def test_remove_that_arrives_before_its_add_still_removes_it() -> None:
    eu, us, ap = replay([("add", 0, 0, "lisa"), ("deliver", 1, 0, "-"), ("remove", 1, 0, "lisa")])
    remove = us.applied[-1]
    add = eu.applied[-1]
    ap.deliver(remove)
    ap.deliver(add)
    assert "lisa" not in ap.members


def test_register_tie_on_stamp_falls_to_the_origin() -> None:
    eu, us, _ = replay([("set", 0, 0, "Homer"), ("set", 1, 0, "Homer J.")])
    assert eu.register.winner is not None
    assert us.register.winner is not None
    assert eu.register.winner.hlc == us.register.winner.hlc  # same frozen clock, same stamp
    merged: LWWRegister[str] = eu.register.merge(us.register)
    assert merged.value == "Homer J."  # "us" > "eu"
    assert us.register.merge(eu.register) == merged


def test_empty_states_are_identities() -> None:
    eu, *_ = replay([("add", 0, 0, "homer"), ("set", 0, 0, "x"), ("remove", 0, 0, "homer")])
    empty_set: ORSet[str] = ORSet()
    empty_register: LWWRegister[str] = LWWRegister()
    assert eu.members.merge(empty_set) == eu.members == empty_set.merge(eu.members)
    assert eu.register.merge(empty_register) == eu.register == empty_register.merge(eu.register)
    assert eu.seen.merge(VersionVector()) == eu.seen
