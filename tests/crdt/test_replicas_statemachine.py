"""Several replicas under local writes, delivery, duplication, drops and state merges.

After every step each replica must show exactly what a simple model computes from
the ops it has received, and replicas that received the same ops must be equal.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from crdt import Add, Dot, Remove, VersionVector, Write
from tests.crdt.histories import ELEMENTS, REPLICAS, Envelope, Replica

replica_index = st.integers(0, len(REPLICAS) - 1)


def model_members(received: set[Envelope]) -> frozenset[str]:
    """Add-wins: present iff some add of it was observed by no remove received."""
    removed = {d for e in received if isinstance(e.op, Remove) for d in e.op.observed}
    return frozenset(
        e.op.element for e in received if isinstance(e.op, Add) and e.op.dot not in removed
    )


def model_register(received: set[Envelope]) -> str | None:
    """The greatest write by (stamp, origin, counter)."""
    writes = [e.op for e in received if isinstance(e.op, Write)]
    return max(writes, key=lambda w: (w.hlc, w.dot.origin, w.dot.counter)).value if writes else None


class Replicas(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.replicas = [Replica(name) for name in REPLICAS]
        self.received: list[set[Envelope]] = [set() for _ in REPLICAS]
        self.in_flight: list[tuple[int, Envelope]] = []

    @rule(
        i=replica_index,
        kind=st.sampled_from(["set", "add", "remove"]),
        element=st.sampled_from(ELEMENTS),
    )
    def local_write(self, i: int, kind: str, element: str) -> None:
        envelope = self.replicas[i].write(kind, element)
        self.received[i].add(envelope)
        self.in_flight += [(j, envelope) for j in range(len(REPLICAS)) if j != i]

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data: st.DataObject) -> None:
        k = data.draw(st.integers(0, len(self.in_flight) - 1))
        to, envelope = self.in_flight.pop(k)  # any order: delivery reorders freely
        self.replicas[to].deliver(envelope)
        self.received[to].add(envelope)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def duplicate(self, data: st.DataObject) -> None:
        self.in_flight.append(data.draw(st.sampled_from(self.in_flight)))

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.in_flight.pop(data.draw(st.integers(0, len(self.in_flight) - 1)))

    @rule(i=replica_index, j=replica_index)
    def merge(self, i: int, j: int) -> None:
        """State-based anti-entropy: i takes j's whole state."""
        a, b = self.replicas[i], self.replicas[j]
        a.members = a.members.merge(b.members)
        a.register = a.register.merge(b.register)
        a.seen = a.seen.merge(b.seen)
        a.applied += [e for e in b.applied if e not in a.applied]
        self.received[i] |= self.received[j]

    @invariant()
    def every_replica_matches_the_model(self) -> None:
        for replica, received in zip(self.replicas, self.received, strict=True):
            assert replica.members.value() == model_members(received)
            assert replica.register.value == model_register(received)
            assert replica.seen == VersionVector.of(e.dot for e in received)

    @invariant()
    def replicas_that_saw_the_same_ops_are_equal(self) -> None:
        for a, ra in zip(self.replicas, self.received, strict=True):
            for b, rb in zip(self.replicas, self.received, strict=True):
                if ra == rb:
                    assert (a.members, a.register, a.seen) == (b.members, b.register, b.seen)

    @invariant()
    def own_counters_have_no_gaps(self) -> None:
        for replica in self.replicas:
            assert replica.seen.contiguous(replica.name) == replica.counter
            assert Dot(replica.name, replica.counter + 1) not in replica.seen


Replicas.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestReplicas = Replicas.TestCase
