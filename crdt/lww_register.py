"""Last-writer-wins register ordered by ``(hlc, origin, counter)``.

The write with the greater hybrid-clock stamp wins; equal stamps fall to the
origin, then the counter, so the order is total and every replica picks the same
winner. Hazard: "last" is by clock, not by causality; a replica whose clock runs
ahead wins races it did not see, which is why the HLC bounds drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from crdt.dot import Dot

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Write(Generic[V]):
    """One assignment: the op a register applies, and the state it holds."""

    value: V
    hlc: int
    dot: Dot

    def key(self) -> tuple[int, str, int]:
        return (self.hlc, self.dot.origin, self.dot.counter)

    def beats(self, other: Write[V]) -> bool:
        return self.key() > other.key()


@dataclass(frozen=True, slots=True)
class LWWRegister(Generic[V]):
    """A register holding its winning write, or nothing before the first write."""

    winner: Write[V] | None = None

    @property
    def value(self) -> V | None:
        return None if self.winner is None else self.winner.value

    def set(self, value: V, hlc: int, dot: Dot) -> Write[V]:
        """Build the op for a local assignment (the register is not changed)."""
        return Write(value, hlc, dot)

    def apply(self, write: Write[V]) -> LWWRegister[V]:
        if self.winner is None or write.beats(self.winner):
            return LWWRegister(write)
        return self

    def merge(self, other: LWWRegister[V]) -> LWWRegister[V]:
        return self if other.winner is None else self.apply(other.winner)
