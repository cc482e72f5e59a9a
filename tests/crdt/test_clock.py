"""The hybrid logical clock: monotonic, past every observed stamp, bounded drift."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crdt.clock import (
    LOGICAL_MASK,
    STAMP_MAX,
    ClockOverflowError,
    HybridLogicalClock,
    logical,
    make_stamp,
    physical_ms,
)

DRIFT_MS = 1_000

# Each step moves the physical clock (forwards or backwards) then ticks or observes a
# remote stamp somewhere around now: behind, close ahead, or far beyond the drift bound.
steps = st.lists(
    st.tuples(
        st.integers(-5_000, 5_000),
        st.one_of(st.none(), st.integers(-10_000, 10_000), st.integers(0, LOGICAL_MASK)),
    ),
    max_size=60,
)


@given(steps)
def test_clock_is_monotonic_and_passes_what_it_observes(
    history: list[tuple[int, int | None]],
) -> None:
    now = [1_700_000_000_000]
    clock = HybridLogicalClock(lambda: now[0], max_drift_ms=DRIFT_MS)
    previous = 0
    for jump_ms, remote_offset_ms in history:
        now[0] = max(0, now[0] + jump_ms)
        if remote_offset_ms is None:
            stamp = clock.tick()
        else:
            remote = make_stamp(now[0] + remote_offset_ms, 7)
            observation = clock.observe(remote)
            stamp = observation.stamp
            # the drift bound: a stamp too far ahead is flagged and not followed
            assert observation.drifted == (remote_offset_ms > DRIFT_MS)
            if observation.drifted:
                assert physical_ms(stamp) <= max(physical_ms(previous) + 1, now[0])
            else:
                assert stamp > remote
        assert stamp > previous  # never backwards, never equal
        assert physical_ms(stamp) >= now[0]  # never behind the wall clock
        assert stamp == clock.last
        previous = stamp


def test_logical_overflow_carries_into_the_physical_part() -> None:
    full = make_stamp(5_000, LOGICAL_MASK)
    clock = HybridLogicalClock(lambda: 5_000, last=full)
    stamp = clock.tick()
    assert (physical_ms(stamp), logical(stamp)) == (5_001, 0)


def test_logical_counter_counts_within_one_millisecond() -> None:
    clock = HybridLogicalClock(lambda: 42)
    assert [logical(clock.tick()) for _ in range(3)] == [0, 1, 2]


def test_clock_refuses_to_leave_64_bits() -> None:
    clock = HybridLogicalClock(lambda: 0, last=STAMP_MAX)
    with pytest.raises(ClockOverflowError):
        clock.tick()
    with pytest.raises(ValueError, match="out of range"):
        clock.observe(STAMP_MAX + 1)


@given(
    st.integers(0, 2_000_000_000_000),
    st.lists(st.integers(-10_000, 10_000), max_size=30),
)
def test_observing_a_batch_passes_what_observing_one_by_one_passes(
    start_ms: int, offsets: list[int]
) -> None:
    # A batch ingested in one commit is observed at once: the clock passes every stamp it
    # follows, counts the same stamps as too far ahead, and never goes backwards.
    now = 1_700_000_000_000
    remotes = [make_stamp(max(0, now + offset)) for offset in offsets]
    one_by_one = HybridLogicalClock(lambda: now, max_drift_ms=DRIFT_MS, last=make_stamp(start_ms))
    batch = HybridLogicalClock(lambda: now, max_drift_ms=DRIFT_MS, last=make_stamp(start_ms))
    before = batch.last
    drifted = sum(one_by_one.observe(remote).drifted for remote in remotes)
    assert batch.observe_all(remotes) == drifted
    followed = [r for r in remotes if physical_ms(r) - now <= DRIFT_MS]
    assert all(batch.last > r for r in followed)
    if remotes:
        assert batch.last > before
        assert batch.last >= make_stamp(now)
    else:
        assert batch.last == before
    assert batch.last <= one_by_one.last  # one step per batch, not one per stamp
