"""Add-wins observed-remove set (an ORSWOT: no tombstone per removed element).

Each add is tagged with the dot of its event. A remove carries the add dots it
observed and removes exactly those, so an add concurrent with a remove survives:
add wins. The causal ``context`` records every dot the set has seen, added or
removed; a dot present on one side of a merge and absent on the other was removed
there iff the other's context has seen it. Hazard: the context's cloud holds the
removed dots (the tombstones) until ``compact`` folds in a causally stable summary.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from crdt.dot import Dot
from crdt.version_vector import VersionVector

E = TypeVar("E", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Add(Generic[E]):
    element: E
    dot: Dot


@dataclass(frozen=True, slots=True)
class Remove(Generic[E]):
    element: E
    observed: frozenset[Dot]


@dataclass(frozen=True, slots=True)
class ORSet(Generic[E]):
    entries: Mapping[E, frozenset[Dot]] = field(default_factory=dict)
    context: VersionVector = field(default_factory=VersionVector)

    def value(self) -> frozenset[E]:
        return frozenset(self.entries)

    def __contains__(self, element: object) -> bool:
        return element in self.entries

    def dots(self, element: E) -> frozenset[Dot]:
        return self.entries.get(element, frozenset())

    def add(self, element: E, dot: Dot) -> Add[E]:
        """Build the op adding ``element`` under a fresh dot (the set is not changed)."""
        return Add(element, dot)

    def remove(self, element: E) -> Remove[E]:
        """Build the op removing ``element`` as observed here (the set is not changed)."""
        return Remove(element, self.dots(element))

    def apply(self, op: Add[E] | Remove[E]) -> ORSet[E]:
        if isinstance(op, Add):
            if op.dot in self.context:
                return self  # a duplicate, or an add whose remove came first
            grown = self.dots(op.element) | {op.dot}
            return ORSet({**self.entries, op.element: grown}, self.context.add(op.dot))
        if not op.observed:
            return self
        entries = dict(self.entries)
        left = self.dots(op.element) - op.observed
        if left:
            entries[op.element] = left
        else:
            entries.pop(op.element, None)
        return ORSet(entries, self.context.add_all(op.observed))

    @classmethod
    def of_ops(cls, ops: Iterable[Add[E] | Remove[E]]) -> ORSet[E]:
        """The set that applying ``ops`` (distinct dots) to an empty set gives, in any
        order, built once: each element keeps the adds no remove observed, and the
        context holds every dot added or observed removed."""
        added: dict[E, set[Dot]] = {}
        removed: dict[E, set[Dot]] = {}
        for op in ops:
            if isinstance(op, Add):
                added.setdefault(op.element, set()).add(op.dot)
            else:
                removed.setdefault(op.element, set()).update(op.observed)
        entries = {
            e: frozenset(live)
            for e, dots in added.items()
            if (live := dots - removed.get(e, set()))
        }
        seen = set().union(*added.values(), *removed.values())
        return cls(entries, VersionVector.of(seen))

    def merge(self, other: ORSet[E]) -> ORSet[E]:
        entries: dict[E, frozenset[Dot]] = {}
        for element in self.entries.keys() | other.entries.keys():
            mine, theirs = self.dots(element), other.dots(element)
            kept = (
                (mine & theirs)
                | frozenset(d for d in mine - theirs if d not in other.context)
                | frozenset(d for d in theirs - mine if d not in self.context)
            )
            if kept:
                entries[element] = kept
        return ORSet(entries, self.context.merge(other.context))

    def compact(self, stable: VersionVector) -> ORSet[E]:
        """Fold a causally stable summary into the context, dropping tombstones.

        ``stable`` must be seen by this replica (it is the meet of every replica's
        summary, so it is). Every dot below it was seen here: either it is still an
        entry, or it was removed, and the context already says so for both.
        """
        return ORSet(self.entries, self.context.merge(stable))
