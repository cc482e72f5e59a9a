"""Replicas driven by generated histories, so laws are checked on reachable states.

A history is a list of steps over a few replicas: a local write (set the register,
add or remove a member) or a delivery of one replica's ops to another. Replaying it
gives replica states that real use could produce, plus the ops each one applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import strategies as st

from crdt import Add, Dot, HybridLogicalClock, LWWRegister, ORSet, Remove, VersionVector, Write

REPLICAS = ("eu", "us", "ap")
ELEMENTS = ("homer", "marge", "bart", "lisa")

Op = Write[str] | Add[str] | Remove[str]


@dataclass(frozen=True)
class Envelope:
    """An op with the dot of the event that carried it (removes have dots too)."""

    dot: Dot
    op: Op


@dataclass
class Replica:
    name: str
    now_ms: list[int] = field(default_factory=lambda: [1_000])
    counter: int = 0
    register: LWWRegister[str] = field(default_factory=LWWRegister)
    members: ORSet[str] = field(default_factory=ORSet)
    seen: VersionVector = field(default_factory=VersionVector)
    applied: list[Envelope] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = HybridLogicalClock(lambda: self.now_ms[0])

    def next_dot(self) -> Dot:
        self.counter += 1
        return Dot(self.name, self.counter)

    def write(self, kind: str, element: str) -> Envelope:
        dot = self.next_dot()
        op: Op
        if kind == "set":
            op = self.register.set(element, self.clock.tick(), dot)
        elif kind == "add":
            op = self.members.add(element, dot)
        else:
            op = self.members.remove(element)
        envelope = Envelope(dot, op)
        self.deliver(envelope)
        return envelope

    def deliver(self, envelope: Envelope) -> None:
        if envelope.dot in self.seen:
            return
        self.seen = self.seen.add(envelope.dot)
        self.applied.append(envelope)
        op = envelope.op
        if isinstance(op, Write):
            self.clock.observe(op.hlc)
            self.register = self.register.apply(op)
        else:
            self.members = self.members.apply(op)


Step = tuple[str, int, int, str]

steps = st.tuples(
    st.sampled_from(["set", "add", "add", "remove", "remove", "deliver", "tick"]),
    st.integers(0, len(REPLICAS) - 1),
    st.integers(0, len(REPLICAS) - 1),
    st.sampled_from(ELEMENTS),
)
histories = st.lists(steps, max_size=40)


def replay(history: list[Step]) -> list[Replica]:
    replicas = [Replica(name) for name in REPLICAS]
    for kind, i, j, element in history:
        if kind == "deliver":
            for envelope in list(replicas[j].applied):
                replicas[i].deliver(envelope)
        elif kind == "tick":
            replicas[i].now_ms[0] += j  # clocks advance unevenly, sometimes not at all
        else:
            replicas[i].write(kind, element)
    return replicas


def all_ops(replicas: list[Replica]) -> list[Envelope]:
    unique = {e.dot: e for r in replicas for e in r.applied}
    return [unique[d] for d in sorted(unique)]
