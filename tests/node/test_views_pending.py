"""Views folded through ``views.Pending`` (one store per entity per commit, as the writer
and the rebuild do, flushed at arbitrary points) agree with the model of
``test_views`` and carry the digest recomputed from scratch."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import ORSet
from crdt import codec as crdt_codec
from node import log, views
from node.events import Event
from node.fold import decode_state
from node.kv import MemoryKV, WriteTxn
from node.log import LogState
from tests.node.test_views import Step, check_against_model, histories, replay


def fold_pending(
    events: list[Event], flush_after: set[int], read_after: frozenset[int] = frozenset()
) -> MemoryKV:
    """Fold ``events`` in one transaction, flushing after those numbered in
    ``flush_after`` and reading the entity (as a decision does, which makes a state of
    the events folded so far) after those in ``read_after``."""
    kv, state = MemoryKV(), LogState()

    def work(txn: WriteTxn) -> None:
        pending = views.Pending()
        for n, event in enumerate(events):
            if log.append(txn, state, event) is not None:
                views.apply(txn, event, pending)
            if n in read_after:
                pending.entity(txn, event.stream)
            if n in flush_after:
                pending.flush(txn)
        pending.flush(txn)

    kv.write(work)
    return kv


def digest_from_scratch(kv: MemoryKV) -> int:
    """XOR of every entity's hash and every present membership's hash."""
    total = 0
    with kv.read() as txn:
        for key, raw in txn.scan("views"):
            total ^= views.entity_digest(key.decode(), decode_state(raw))
        for key, raw in txn.scan("members"):
            user = key.partition(b"\0")[2].decode()
            if user in crdt_codec.decode_as(raw, ORSet):
                total ^= views._hash(b"member", key)
    return total


@settings(max_examples=300)
@given(histories, st.data())
def test_pending_views_agree_with_the_model_and_the_digest(
    history: list[Step], data: st.DataObject
) -> None:
    replayed = replay(history)
    events = data.draw(st.permutations(replayed.events))
    flush_after = data.draw(st.sets(st.integers(0, max(0, len(events) - 1))))
    read_after = data.draw(st.frozensets(st.integers(0, max(0, len(events) - 1))))
    kv = fold_pending(events, flush_after, read_after)
    check_against_model(kv, replayed.known)
    with kv.read() as txn:
        assert views.digest(txn) == digest_from_scratch(kv)
