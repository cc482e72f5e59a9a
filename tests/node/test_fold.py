"""Folding many events at once gives the state folding them one at a time gives, in any
order and from any starting state; so does folding them as the log stores them."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import ORSet
from node import events as ev
from node.events import Event, Op
from node.fold import (
    VIEW_FORMAT,
    CorruptView,
    EntityState,
    _decode_state,
    decode_state,
    dot_hash,
    encode_state,
    fold,
    fold_many,
    fold_member,
    fold_stored,
    fold_stored_members,
)
from tests.node.test_views import Step, histories, replay

EXAMPLES = 300


@given(
    st.sampled_from(["eu~0000aaaa", "us~1f2e3d4c", "ap-south~0123456789abcdef"]),
    st.integers(min_value=1, max_value=ev.COUNTER_MAX),
)
def test_dot_hash_is_blake2b_of_the_dot_text(origin: str, counter: int) -> None:
    """Etags are stored in views and compared across replicas and versions: the hash a
    dot contributes stays blake2b-64 of "<origin>:<counter>", however it is computed."""
    text = f"{origin}:{counter}".encode()
    expected = int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")
    assert dot_hash(origin, counter) == expected
    assert dot_hash(origin, counter) == expected  # again, from the origin's kept prefix


def by_stream(events: list[Event]) -> dict[str, list[Event]]:
    streams: dict[str, list[Event]] = {}
    for event in events:
        streams.setdefault(event.stream, []).append(event)
    return streams


def one_at_a_time(events: list[Event]) -> EntityState:
    state = EntityState()
    for event in events:
        state = fold(state, event)
    return state


@settings(max_examples=EXAMPLES)
@given(histories, st.data())
def test_folding_in_batches_equals_folding_one_at_a_time(
    history: list[Step], data: st.DataObject
) -> None:
    for events in by_stream(replay(history).events).values():
        expected = one_at_a_time(events)
        shuffled = data.draw(st.permutations(events))
        cut = data.draw(st.integers(0, len(shuffled)))
        state = fold_many(fold_many(EntityState(), shuffled[:cut]), shuffled[cut:])
        assert state == expected
        assert state.values() == expected.values()
        assert state.fields == expected.fields
        assert state.exists == expected.exists
        # in key order, as decoding a stored view gives them (remember_state relies on it)
        assert list(state.fields) == sorted(state.fields)
        assert list(state.create_stamps) == sorted(state.create_stamps)
        assert decode_state(encode_state(state)) == state
        assert decode_state(encode_state(state)).fields == state.fields
        # Folded on a base stored and read back (which keeps its existence set encoded),
        # a state encodes to the bytes of the same state with nothing kept.
        reread = decode_state(encode_state(fold_many(EntityState(), shuffled[:cut])))
        fresh = dataclasses.replace(expected, derived={})
        assert encode_state(fold_many(reread, shuffled[cut:])) == encode_state(fresh)


@settings(max_examples=EXAMPLES)
@given(histories)
def test_a_view_stored_in_an_older_format_reads_as_the_same_state(history: list[Step]) -> None:
    # Format 1 embedded the existence set's wire form where format 2 embeds its bytes;
    # format 3 adds the writes that name their creates (which formats 1 and 2 never
    # held): a data directory written before reads the same, and is stored anew.
    for events in by_stream(replay(history).events).values():
        state = fold_many(EntityState(), events)
        wire = msgpack.unpackb(encode_state(state))
        assert wire[0] == VIEW_FORMAT == 3
        assert isinstance(wire[1], bytes)
        if not state.bound:
            for old in (
                msgpack.packb([2, *wire[1:8]]),
                msgpack.packb([1, msgpack.unpackb(wire[1]), *wire[2:8]]),
            ):
                reread = _decode_state(old)
                assert reread == state
                assert reread.fields == state.fields
                assert encode_state(reread) == encode_state(dataclasses.replace(state, derived={}))
        with pytest.raises(CorruptView, match="view format 4"):
            _decode_state(msgpack.packb([4, *wire[1:]]))
        with pytest.raises(CorruptView, match="view format 2"):
            _decode_state(msgpack.packb([2, *wire[1:]]))  # format 2 has no writes per life


@settings(max_examples=EXAMPLES)
@given(histories, st.data())
def test_folding_events_as_stored_equals_folding_them(
    history: list[Step], data: st.DataObject
) -> None:
    for events in by_stream(replay(history).events).values():
        shuffled = data.draw(st.permutations(events))
        cut = data.draw(st.integers(0, len(shuffled)))
        base = fold_many(EntityState(), shuffled[:cut])
        stored = fold_stored(base, [ev.to_wire(e) for e in shuffled[cut:]])
        assert stored == fold_many(base, shuffled[cut:])


@settings(max_examples=EXAMPLES)
@given(histories, st.data())
def test_member_slices_from_stored_events_equal_folding_each_member(
    history: list[Step], data: st.DataObject
) -> None:
    for events in by_stream(replay(history).events).values():
        shuffled = data.draw(st.permutations(events))
        expected: dict[str, ORSet[str]] = {}
        for event in shuffled:
            if event.op in (Op.ADD, Op.REMOVE):
                assert event.value is not None
                expected[event.value] = fold_member(expected.get(event.value, ORSet()), event)
        assert fold_stored_members([ev.to_wire(e) for e in shuffled]) == expected


def test_a_bounded_map_keeps_what_it_weighs_under_its_byte_budget() -> None:
    from node.fold import Bounded

    kept = Bounded[str, bytes](100, bytes_max=1_600, weigh=lambda key, value: len(value))
    for n in range(30):
        kept.put(f"k{n}", bytes(60 + 20 * (n % 3)))
    assert kept.bytes == sum(len(kept.get(k) or b"") for k in kept._values)
    assert kept.bytes <= 1_600
    assert "k0" not in kept._values  # the oldest went first
    kept.put("k29", bytes(50))  # put again: weighed anew, not counted twice
    assert kept.bytes == sum(len(kept.get(k) or b"") for k in kept._values)
    kept.put("k29", bytes(101))  # over a sixteenth of the budget: not kept at all
    assert kept.get("k29") is None
    assert kept.bytes == sum(len(kept.get(k) or b"") for k in kept._values)
    kept.clear()
    assert (len(kept), kept.bytes) == (0, 0)
