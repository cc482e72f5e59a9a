"""A version vector with a dot cloud: exactly which dots a replica has seen.

Per origin it keeps the contiguous counter (every dot up to it was seen) and the
cloud of dots seen beyond a gap, so out-of-order delivery is summarised exactly
and the gap can be asked for again. The cloud folds into the counter as soon as a
gap fills. Hazard: a cloud that never fills (an event lost for good) grows without
bound; anti-entropy exists to fill it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from crdt.dot import Dot

# Inclusive counter ranges, per origin: what a summary lacks, in compact form.
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class OriginSeen:
    """Dots seen from one origin: ``1..contiguous`` plus ``cloud``."""

    contiguous: int = 0
    cloud: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        assert self.contiguous >= 0
        assert not self.cloud or min(self.cloud) > self.contiguous + 1, "cloud not compacted"

    def contains(self, counter: int) -> bool:
        return counter <= self.contiguous or counter in self.cloud

    def add(self, counter: int) -> OriginSeen:
        if counter == self.contiguous + 1 and not self.cloud:
            return OriginSeen(counter)  # the common case: the next counter, in order
        if self.contains(counter):
            return self
        return _compact(self.contiguous, self.cloud | {counter})

    def merge(self, other: OriginSeen) -> OriginSeen:
        if other.contiguous >= self.contiguous and not self.cloud:
            return other
        base = max(self.contiguous, other.contiguous)
        return _compact(base, frozenset(c for c in self.cloud | other.cloud if c > base))

    def meet(self, other: OriginSeen) -> OriginSeen:
        base = min(self.contiguous, other.contiguous)
        mine = {c for c in self.cloud if c > base and other.contains(c)}
        theirs = {c for c in other.cloud if c > base and self.contains(c)}
        return _compact(base, frozenset(mine | theirs))

    def highest(self) -> int:
        return max(self.cloud, default=self.contiguous)

    def missing_from(self, other: OriginSeen) -> Ranges:
        """Ranges of counters seen here but not in ``other``."""
        lacking = [c for c in self.cloud if not other.contains(c)]
        start = other.contiguous + 1
        ranges: list[tuple[int, int]] = []
        # The contiguous run beyond the other's counter, minus the other's cloud.
        for hole in sorted(c for c in other.cloud if start <= c <= self.contiguous):
            if hole > start:
                ranges.append((start, hole - 1))
            start = hole + 1
        if start <= self.contiguous:
            ranges.append((start, self.contiguous))
        for counter in sorted(lacking):
            if ranges and ranges[-1][1] == counter - 1:
                ranges[-1] = (ranges[-1][0], counter)
            else:
                ranges.append((counter, counter))
        return tuple(ranges)


def _compact(contiguous: int, cloud: frozenset[int]) -> OriginSeen:
    if contiguous + 1 not in cloud:
        return OriginSeen(contiguous, cloud)
    rest = set(cloud)
    while contiguous + 1 in rest:
        contiguous += 1
        rest.discard(contiguous)
    return OriginSeen(contiguous, frozenset(rest))


@dataclass(frozen=True, slots=True)
class VersionVector:
    """An immutable summary of seen dots. Every operation returns a new vector."""

    origins: Mapping[str, OriginSeen] = field(default_factory=dict)

    @classmethod
    def of(cls, dots: Iterable[Dot]) -> VersionVector:
        per_origin: dict[str, set[int]] = {}
        for dot in dots:
            per_origin.setdefault(dot.origin, set()).add(dot.counter)
        return cls({o: _compact(0, frozenset(cs)) for o, cs in per_origin.items()})

    def contains(self, dot: Dot) -> bool:
        seen = self.origins.get(dot.origin)
        return seen is not None and seen.contains(dot.counter)

    __contains__ = contains

    def contiguous(self, origin: str) -> int:
        seen = self.origins.get(origin)
        return 0 if seen is None else seen.contiguous

    def highest(self, origin: str) -> int:
        seen = self.origins.get(origin)
        return 0 if seen is None else seen.highest()

    def add(self, dot: Dot) -> VersionVector:
        seen = self.origins.get(dot.origin, _EMPTY)
        grown = seen.add(dot.counter)
        if grown is seen:
            return self
        return VersionVector({**self.origins, dot.origin: grown})

    def add_all(self, dots: Iterable[Dot]) -> VersionVector:
        """``merge`` with the vector of ``dots``. An origin's counters that run on from its
        contiguous counter without a gap (a peer's batch, in order) fold into it at once,
        without the set arithmetic of a cloud (a Python step per counter)."""
        per_origin: dict[str, set[int]] = {}
        for dot in dots:
            counters = per_origin.get(dot.origin)
            if counters is None:
                counters = per_origin[dot.origin] = set()
            counters.add(dot.counter)
        if not per_origin:
            return self
        merged = dict(self.origins)
        for origin, counters in per_origin.items():
            seen = merged.get(origin, _EMPTY)
            low, high = min(counters), max(counters)
            if not seen.cloud and low <= seen.contiguous + 1 and high - low + 1 == len(counters):
                merged[origin] = seen if high <= seen.contiguous else OriginSeen(high)
            else:
                merged[origin] = seen.merge(_compact(0, frozenset(counters)))
        return VersionVector(merged)

    def merge(self, other: VersionVector) -> VersionVector:
        """Union: every dot seen by either."""
        if not other.origins:
            return self
        merged = dict(self.origins)
        for origin, seen in other.origins.items():
            mine = merged.get(origin)
            merged[origin] = seen if mine is None else mine.merge(seen)
        return VersionVector(merged)

    def meet(self, other: VersionVector) -> VersionVector:
        """Intersection: every dot seen by both (the causally stable part of two)."""
        met = {}
        for origin, seen in self.origins.items():
            theirs = other.origins.get(origin)
            if theirs is not None:
                common = seen.meet(theirs)
                if common.contiguous or common.cloud:
                    met[origin] = common
        return VersionVector(met)

    def covers(self, other: VersionVector) -> bool:
        """Whether every dot of ``other`` is seen here (self dominates other)."""
        return all(
            not seen.missing_from(self.origins.get(origin, _EMPTY))
            for origin, seen in other.origins.items()
        )

    def missing_from(self, other: VersionVector) -> dict[str, Ranges]:
        """What ``other`` lacks of this vector, as inclusive ranges per origin."""
        lacks = {}
        for origin, seen in self.origins.items():
            ranges = seen.missing_from(other.origins.get(origin, _EMPTY))
            if ranges:
                lacks[origin] = ranges
        return lacks

    def dots(self) -> Iterator[Dot]:
        """Every dot, one by one: for tests and small vectors only."""
        for origin in sorted(self.origins):
            seen = self.origins[origin]
            for counter in range(1, seen.contiguous + 1):
                yield Dot(origin, counter)
            for counter in sorted(seen.cloud):
                yield Dot(origin, counter)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionVector):
            return NotImplemented
        return self._normal() == other._normal()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._normal().items())))

    def _normal(self) -> dict[str, OriginSeen]:
        return {o: s for o, s in self.origins.items() if s.contiguous or s.cloud}


_EMPTY = OriginSeen()
