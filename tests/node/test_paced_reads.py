"""A peer's page read in slices, the event loop running between them: the same page as
one read would give, whatever the slice, the limits, the holes and what the peer has."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import Dot, VersionVector
from crdt.clock import make_stamp
from node import commands, log
from node import replica as replica_module
from node.events import COUNTER_MAX, Event, Op
from node.kv import MemoryKV
from node.pacing import run_paced
from node.replica import Replica
from node.writer import Decide

NOW_MS = 1_700_000_000_000
ORIGINS = ("ap~aaaa", "us~bbbb")
# Each origin's counters held here: holes where a peer's events have not come yet.
HELD = {"ap~aaaa": [*range(1, 30), *range(33, 41), 45], "us~bbbb": [*range(1, 12), 20, 21]}


def _events() -> Iterator[Event]:
    for origin, counters in HELD.items():
        for counter in counters:
            stream = f"user/{origin[:2]}{counter}"
            if counter % 7 == 1:
                yield Event(Dot(origin, counter), make_stamp(NOW_MS, counter), stream, Op.CREATE)
            else:
                name = "x" * (1 + counter % 5 * 40)  # events of unlike sizes
                stamp = make_stamp(NOW_MS, counter)
                yield Event(Dot(origin, counter), stamp, stream, Op.SET, "name", name)


@pytest.fixture(scope="module")
def held() -> Iterator[Replica]:
    replica = Replica(MemoryKV(), "eu", threaded_writer=False)

    async def fill() -> None:
        replica.bind(asyncio.get_running_loop())
        own = replica.identity.replica_id
        await replica.ingest(list(_events()))
        for n in range(1, 9):  # some of its own too, which go first
            await replica.write(_create(f"eu{n}"), actor="t")
        assert replica.summary.highest(own) > 0

    asyncio.run(fill())
    yield replica
    replica.close()


def _create(entity: str) -> Decide:
    return commands.create("user", entity, {"name": entity})


def _one_read(
    replica: Replica, theirs: VersionVector, bytes_max: int, events_max: int, only: str | None
) -> tuple[list[tuple[Dot, bytes]], bool]:
    """What the page is: every lacking event in order (its own origin first), cut where
    the next would pass a limit (the first always goes)."""
    own = replica.identity.replica_id
    every: list[tuple[Dot, bytes]] = []
    with replica.kv.read() as txn:
        for origin in replica.summary.origins:
            for counter, data in log.origin_event_bytes(txn, origin, 1, COUNTER_MAX):
                dot = Dot(origin, counter)
                if (only is None or origin == only) and not theirs.contains(dot):
                    every.append((dot, data))
    every.sort(key=lambda pair: (pair[0].origin != own, pair[0].origin, pair[0].counter))
    page: list[tuple[Dot, bytes]] = []
    size = 0
    for dot, data in every:
        if page and (size + len(data) > bytes_max or len(page) >= events_max):
            return page, True
        page.append((dot, data))
        size += len(data)
    return page, False


peers_hold = st.lists(
    st.tuples(st.sampled_from(ORIGINS), st.integers(min_value=1, max_value=50)), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(
    holds=peers_hold,
    slice_events=st.integers(min_value=1, max_value=12),
    bytes_max=st.integers(min_value=1, max_value=4_000),
    events_max=st.integers(min_value=1, max_value=60),
    only_own=st.booleans(),
)
def test_a_page_read_in_slices_is_the_page_read_at_once(
    held: Replica,
    holds: list[tuple[str, int]],
    slice_events: int,
    bytes_max: int,
    events_max: int,
    only_own: bool,
) -> None:
    theirs = VersionVector.of(Dot(origin, counter) for origin, counter in holds)
    only = held.identity.replica_id if only_own else None
    expected = _one_read(held, theirs, bytes_max, events_max, only)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replica_module, "READ_SLICE_EVENTS", slice_events)
        kwargs = {"bytes_max": bytes_max, "events_max": events_max, "only": only}
        assert held.read_missing(theirs, **kwargs) == expected  # type: ignore[arg-type]
        paced = asyncio.run(run_paced(held.missing_slices(theirs, bytes_max, events_max, only)))
        assert paced == expected


def test_the_event_loop_runs_between_the_slices_of_a_page(held: Replica) -> None:
    """Other requests are served while a page is read: a task scheduled meanwhile runs
    once per slice, not after the whole page."""

    async def body() -> tuple[int, int]:
        turns = 0

        async def other_requests() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        others = asyncio.ensure_future(other_requests())
        await asyncio.sleep(0)
        started = turns
        page, _ = await run_paced(held.missing_slices(VersionVector(), 1 << 20, 1_000, None))
        others.cancel()
        return turns - started, len(page)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(replica_module, "READ_SLICE_EVENTS", 10)
        turns, events = asyncio.run(body())
    assert events == sum(map(len, HELD.values())) + 8 * 2  # each create: create + name
    assert turns >= events // 10 - 1
