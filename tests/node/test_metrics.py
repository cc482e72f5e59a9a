"""The garbage collector's pauses, as /metrics reports them."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from node.metrics import GC_PAUSES, GcPauses
from node.server import GC_THRESHOLDS, tune_gc


@pytest.fixture
def pauses() -> Iterator[GcPauses]:
    ticks = iter(float(n) for n in range(0, 1_000, 1))
    tracked = GcPauses(clock=lambda: next(ticks) / 1000)  # each reading 1 ms after the last
    tracked.install()
    tracked.install()  # a second install does not count every collection twice
    try:
        yield tracked
    finally:
        gc.callbacks.remove(tracked)
    assert tracked not in gc.callbacks


def test_each_collection_counts_once_with_its_pause(pauses: GcPauses) -> None:
    gc.collect()
    assert pauses.count == 1
    assert pauses.seconds == pytest.approx(0.001)
    gc.collect(0)
    assert pauses.count == 2
    assert pauses.seconds == pytest.approx(0.002)
    assert pauses.max_seconds == pytest.approx(0.001)


def test_the_longest_pause_is_kept() -> None:
    readings = iter([0.0, 0.010, 1.0, 1.002, 2.0, 2.050, 3.0, 3.001])
    pauses = GcPauses(clock=lambda: next(readings))
    for _ in range(4):
        pauses("start", {"generation": 0})
        pauses("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    assert pauses.count == 4
    assert pauses.max_seconds == pytest.approx(0.050)
    assert pauses.seconds == pytest.approx(0.063)


def test_a_serving_node_counts_its_collections() -> None:
    """``tune_gc``, which a node runs as it starts serving, installs the counter."""
    thresholds = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.callbacks.count(GC_PAUSES) == 1
        before = GC_PAUSES.count
        gc.collect()
        assert GC_PAUSES.count == before + 1
        assert GC_PAUSES.max_seconds > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
        if GC_PAUSES in gc.callbacks:
            gc.callbacks.remove(GC_PAUSES)
