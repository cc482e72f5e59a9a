"""The version vector agrees with the obvious model: a plain set of dots."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from crdt import Dot, VersionVector

dots = st.builds(Dot, st.sampled_from(["eu", "us", "ap"]), st.integers(1, 25))
dot_sets = st.frozensets(dots, max_size=40)


def ranges_to_dots(lacks: dict[str, tuple[tuple[int, int], ...]]) -> set[Dot]:
    return {Dot(o, c) for o, rs in lacks.items() for lo, hi in rs for c in range(lo, hi + 1)}


@given(dot_sets, dot_sets, dots)
def test_summary_agrees_with_a_set_of_dots(
    a: frozenset[Dot], b: frozenset[Dot], probe: Dot
) -> None:
    va, vb = VersionVector.of(a), VersionVector.of(b)
    assert set(va.dots()) == a
    assert (probe in va) == (probe in a)
    assert set(va.add(probe).dots()) == a | {probe}
    assert set(va.merge(vb).dots()) == a | b
    assert va.add_all(b) == va.merge(vb)  # the same summary, not only the same dots
    assert set(va.meet(vb).dots()) == a & b
    assert va.covers(vb) == (b <= a)
    assert ranges_to_dots(va.missing_from(vb)) == a - b


@given(dot_sets)
def test_summary_is_the_same_whatever_the_order_of_arrival(a: frozenset[Dot]) -> None:
    forwards, backwards = VersionVector(), VersionVector()
    for dot in sorted(a):
        forwards = forwards.add(dot)
    for dot in sorted(a, reverse=True):
        backwards = backwards.add(dot)
    assert forwards == backwards == VersionVector.of(a)


@given(dot_sets, dot_sets)
def test_missing_ranges_are_sorted_disjoint_and_coalesced(
    a: frozenset[Dot], b: frozenset[Dot]
) -> None:
    for ranges in VersionVector.of(a).missing_from(VersionVector.of(b)).values():
        for lo, hi in ranges:
            assert lo <= hi
        for (_, hi), (lo, _) in pairwise(ranges):
            assert hi + 1 < lo  # a gap between every two ranges, or they'd be one


def test_contiguous_dots_compact_into_one_counter() -> None:
    vv = VersionVector.of([Dot("eu", 3), Dot("eu", 1)])
    assert (vv.contiguous("eu"), vv.origins["eu"].cloud) == (1, frozenset({3}))
    vv = vv.add(Dot("eu", 2))
    assert (vv.contiguous("eu"), vv.origins["eu"].cloud) == (3, frozenset())
    assert vv.missing_from(VersionVector()) == {"eu": ((1, 3),)}


@given(dot_sets, st.sampled_from(["eu", "us", "ap"]), st.integers(1, 30), st.integers(0, 30))
def test_adding_a_run_of_counters_is_merging_it(
    a: frozenset[Dot], origin: str, first: int, length: int
) -> None:
    # A peer's batch in order: a run of one origin's counters, with or without a gap
    # after what is already here; add_all takes a shortcut for a run that has no gap.
    run = [Dot(origin, c) for c in range(first, first + length)]
    va = VersionVector.of(a)
    assert va.add_all(run) == va.merge(VersionVector.of(run))
    assert set(va.add_all(run).dots()) == a | set(run)
