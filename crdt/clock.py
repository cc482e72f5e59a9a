"""Hybrid logical clock over a 64-bit stamp: ``physical_ms << 16 | logical``.

A stamp is an int; stamps compare like time. The clock never goes backwards and
moves past every stamp it observes, so causality shows in the order of stamps.
Hazard: a peer whose wall clock runs far ahead would drag every clock it touches
into the future; stamps beyond ``max_drift_ms`` are therefore not followed (the
event is still accepted, and the caller is told so it can count it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

LOGICAL_BITS = 16
LOGICAL_MASK = (1 << LOGICAL_BITS) - 1
STAMP_MAX = (1 << 64) - 1
MAX_DRIFT_MS_DEFAULT = 60_000


class ClockOverflowError(OverflowError):
    """The stamp would leave 64 bits: the physical clock is wildly wrong."""


def make_stamp(physical_ms: int, logical: int = 0) -> int:
    if physical_ms < 0 or not 0 <= logical <= LOGICAL_MASK:
        raise ValueError(f"bad stamp parts: {physical_ms=} {logical=}")
    stamp = (physical_ms << LOGICAL_BITS) | logical
    if stamp > STAMP_MAX:
        raise ClockOverflowError(f"stamp for {physical_ms} ms does not fit 64 bits")
    return stamp


def physical_ms(stamp: int) -> int:
    return stamp >> LOGICAL_BITS


def logical(stamp: int) -> int:
    return stamp & LOGICAL_MASK


class Observation(NamedTuple):
    stamp: int  # the clock's new reading, to stamp the receipt with
    drifted: bool  # the remote stamp was too far ahead and was not followed


class HybridLogicalClock:
    """A replica's clock. ``now_ms`` is injected so simulations can use virtual time.

    Both operations take the greatest of: the physical reading, one past the last
    stamp, and (observe only) one past the remote stamp. Adding one to a stamp whose
    logical part is full carries into the physical part, which is how overflow of
    the logical counter is handled: the clock borrows a millisecond from the future.
    """

    __slots__ = ("_last", "_now_ms", "max_drift_ms")

    def __init__(
        self,
        now_ms: Callable[[], int],
        *,
        max_drift_ms: int = MAX_DRIFT_MS_DEFAULT,
        last: int = 0,
    ) -> None:
        if max_drift_ms < 0:
            raise ValueError("max_drift_ms must be >= 0")
        if not 0 <= last <= STAMP_MAX:
            raise ValueError("last stamp out of range")
        self._now_ms = now_ms
        self._last = last
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> int:
        return self._last

    def tick(self) -> int:
        """Stamp a local event."""
        return self._advance(self._physical_stamp(), self._last + 1)

    def observe(self, remote: int) -> Observation:
        """Stamp the receipt of an event stamped ``remote`` by another replica."""
        if not 0 <= remote <= STAMP_MAX:
            raise ValueError(f"remote stamp out of range: {remote}")
        floor = self._physical_stamp()
        if physical_ms(remote) - physical_ms(floor) > self.max_drift_ms:
            return Observation(self._advance(floor, self._last + 1), drifted=True)
        return Observation(self._advance(floor, self._last + 1, remote + 1), drifted=False)

    def observe_all(self, remotes: Sequence[int]) -> int:
        """Observe many remote stamps at once (a batch ingested in one commit): the clock
        ends past every one it follows, as ``observe`` one by one would leave it, with one
        physical reading instead of one each. Returns how many were too far ahead to follow."""
        if not remotes:
            return 0
        floor = self._physical_stamp()
        ahead_max = physical_ms(floor) + self.max_drift_ms
        lowest, highest = min(remotes), max(remotes)
        if lowest >= 0 and highest <= STAMP_MAX and physical_ms(highest) <= ahead_max:
            # The common case, stamp by stamp in C: every one in range, none too far ahead.
            self._advance(floor, self._last + 1, highest + 1)
            return 0
        followed, drifted = -1, 0
        for remote in remotes:
            if not 0 <= remote <= STAMP_MAX:
                raise ValueError(f"remote stamp out of range: {remote}")
            if physical_ms(remote) > ahead_max:
                drifted += 1
            elif remote > followed:
                followed = remote
        self._advance(floor, self._last + 1, followed + 1)
        return drifted

    def _physical_stamp(self) -> int:
        return make_stamp(max(0, self._now_ms()))

    def _advance(self, *candidates: int) -> int:
        stamp = max(candidates)
        if stamp > STAMP_MAX:
            raise ClockOverflowError("hybrid logical clock overflowed 64 bits")
        assert stamp > self._last
        self._last = stamp
        return stamp
