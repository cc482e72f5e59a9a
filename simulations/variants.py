"""Deliberately broken variants of the system, to prove the checker catches each one.

Each is a context manager that patches one piece of the real code for the duration of
a run (in this process only): a replication that skips events, an LWW tie-break that
ignores the origin, a remove that deletes adds it never observed, a node that
acknowledges writes before they are durable, one that goes on under its old id after
its disk was put back to a snapshot, and a delete that clears field writes up to its
stamp (the rule before, which cleared a surviving create's own fields). None of them is
ever used by a node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from crdt import ORSet, Remove, Write
from node import fold, log
from node.kv import WriteTxn
from node.log import Identity
from replication import protocol
from replication.replicator import Replicator
from simulations.deterministic import SimNode


@contextmanager
def _patched(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def replication_skips_an_event() -> AbstractContextManager[None]:
    """Ingest from peers drops every event whose counter is a multiple of 11."""
    original = Replicator._ingest

    async def skipping(self: Replicator, batch: protocol.Batch) -> int:
        kept = [e for e in batch.events if e.dot.counter % 11]
        return await original(self, protocol.Batch(kept, batch.quarantined))

    return _patched(Replicator, "_ingest", skipping)


@contextmanager
def lww_tie_ignores_origin() -> Iterator[None]:
    """Equal stamps are ordered by counter alone, so replicas disagree with the contract."""

    def by_counter(key: fold.Key, than: fold.Key) -> bool:
        return (key[0], key[2]) > (than[0], than[2])

    with (
        _patched(Write, "key", lambda self: (self.hlc, "", self.dot.counter)),
        _patched(fold, "later", by_counter),
    ):
        yield


def remove_deletes_unobserved_adds() -> AbstractContextManager[None]:
    """A remove takes away every add of the element, seen or not (remove-wins)."""
    original = ORSet.apply

    def greedy(self: ORSet[Any], op: Any) -> ORSet[Any]:
        if isinstance(op, Remove):
            op = Remove(op.element, op.observed | self.dots(op.element))
        return original(self, op)

    return _patched(ORSet, "apply", greedy)


def ack_before_commit() -> AbstractContextManager[None]:
    """Writes are acknowledged before they are durable; a crash loses the tail."""
    return _patched(SimNode, "flush_every_commits", 8)


def no_renewal_after_a_reboot() -> AbstractContextManager[None]:
    """A node whose disk was put back to a snapshot goes on under its old id (as one that
    ran with metasync did before): its next writes take dots its peers hold already."""
    original = log.renew_after_reboot

    def never(txn: WriteTxn, identity: Identity, **options: Any) -> Identity:
        original(txn, identity, **{**options, "renewed": True})  # the mark, no renewal
        return identity

    return _patched(log, "renew_after_reboot", never)


def a_write_outlives_its_life() -> AbstractContextManager[None]:
    """A field write shows whatever became of the creates it was written under, cleared
    by a later create alone (the rule before): of an id created in two regions at once
    and deleted where one create was seen, the survivor shows the deleted life's writes
    ordered after the greatest create."""
    original = fold.Folding.event

    def unbound(self: fold.Folding, *args: Any) -> None:
        original(self, *args[:7])  # the creates written under left out

    return _patched(fold.Folding, "event", unbound)


VARIANTS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "replication_skips_an_event": replication_skips_an_event,
    "lww_tie_ignores_origin": lww_tie_ignores_origin,
    "remove_deletes_unobserved_adds": remove_deletes_unobserved_adds,
    "ack_before_commit": ack_before_commit,
    "no_renewal_after_a_reboot": no_renewal_after_a_reboot,
    "a_write_outlives_its_life": a_write_outlives_its_life,
}
