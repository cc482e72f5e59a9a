"""The checker on real replicas: quiet on a clean run, loud and specific on each fault."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable

from crdt import Dot, VersionVector
from node.events import Event, Op
from node.kv import MemoryKV
from node.replica import Replica
from simulations.checker import Report, Summary, Violation, check, divergence
from simulations.snapshot import Snapshot, entities_of, snapshot_of_replica
from tests.simulations.test_oracle import AP, EU, US, ev, user

REGIONS = ("eu", "us", "ap")


def history() -> list[Event]:
    """Two users, one group; homer's name written twice in eu, then concurrently in us."""
    events = user(EU, 1, 10, "homer", name="Homer", email="homer@x.us", username="homer")
    # a uniqueness conflict
    events += user(US, 1, 10, "marge", name="Marge", email="HOMER@x.us", username="marge")
    events += [
        ev(EU, 10, 100, "group/staff", Op.CREATE),
        ev(EU, 11, 101, "group/staff", Op.ADD, "members", "homer"),
        ev(EU, 13, 102, "group/staff", Op.SET, "name", "Staff"),
        ev(EU, 12, 200, "user/homer", Op.SET, "name", "Homer J"),  # overwrites "Homer"
        ev(AP, 1, 300, "user/homer", Op.SET, "name", "Max Power"),  # concurrent with it, wins
    ]
    return events


async def _fold(events: Iterable[Event]) -> tuple[Snapshot, VersionVector, str]:
    replica = Replica(MemoryKV(), "eu")
    try:
        replica.bind(asyncio.get_running_loop())
        events = list(events)
        await replica.ingest(events)
        entities = entities_of(history())
        return snapshot_of_replica(replica, entities), replica.summary, replica.digest()
    finally:
        replica.close()


def run_check(
    held: dict[str, list[Event]], acknowledged: list[Event]
) -> tuple[Report, dict[str, Snapshot]]:
    """Each region folds the events it holds; the checker judges the result."""

    async def fold_all() -> list[tuple[Snapshot, VersionVector, str]]:
        return [await _fold(held[r]) for r in REGIONS]

    folded = dict(zip(REGIONS, asyncio.run(fold_all()), strict=True))
    snapshots = {r: s for r, (s, _, _) in folded.items()}
    summaries: dict[str, Summary] = {r: v for r, (_, v, _) in folded.items()}
    digests = {r: d for r, (_, _, d) in folded.items()}
    union = [e for events in held.values() for e in events]
    return check(snapshots, summaries, digests, acknowledged, union), snapshots


def kinds(report: Report) -> list[tuple[str, str]]:
    return sorted((v.kind, v.region) for v in report.violations)


def test_a_clean_run_reports_nothing_and_counts_what_was_overwritten() -> None:
    events = history()
    report, snapshots = run_check({r: events for r in REGIONS}, acknowledged=events)
    assert report.violations == []
    assert report.ok
    assert report.lost == 0
    # "Homer" (overwritten in eu) and "Homer J" (beaten by ap's concurrent write)
    assert report.superseded == 2
    # "Homer J" lost to another origin; "Homer" lost to ap's write too (no causality
    # tracked); and one email claimed twice
    assert report.conflicts_resolved == 3
    assert divergence(snapshots) == 0


def test_a_region_missing_an_acknowledged_write_is_reported_twice_and_counted_lost() -> None:
    events = history()
    late = events[-1]
    held = {"eu": events, "us": events, "ap": events[:-1]}
    report, snapshots = run_check(held, acknowledged=events)
    assert kinds(report) == [("diverged", "ap"), ("missing_ack", "ap"), ("oracle_mismatch", "ap")]
    missing = next(v for v in report.violations if v.kind == "missing_ack")
    assert str(late.dot) in missing.detail
    diverged = next(v for v in report.violations if v.kind == "diverged")
    assert "user/homer.name: eu='Max Power' ap='Homer J'" in diverged.detail
    assert report.lost == 1
    assert not report.ok
    assert divergence(snapshots) == 1  # user/homer


def test_a_wrong_field_is_an_oracle_mismatch() -> None:
    events = history()
    report, snapshots = run_check({r: events for r in REGIONS}, acknowledged=events)
    snapshots = copy.deepcopy(snapshots)
    snapshots["us"]["users"]["marge"]["email"] = "marge@x.us"
    summaries: dict[str, Summary] = {r: {e.dot for e in events} for r in REGIONS}
    report = check(snapshots, summaries, {}, events, events)
    assert kinds(report) == [("diverged", "us"), ("oracle_mismatch", "us")]
    mismatch = next(v for v in report.violations if v.kind == "oracle_mismatch")
    assert mismatch == Violation(
        "oracle_mismatch", "us", "user/marge.email: us='marge@x.us' oracle='HOMER@x.us'"
    )


def test_a_digest_difference_is_divergence_even_when_reads_look_the_same() -> None:
    # A write on a group deleted elsewhere: kept for history where it arrived, not shown.
    events = history()
    create = ev(US, 10, 400, "group/band", Op.CREATE)
    delete = ev(US, 11, 500, "group/band", Op.DELETE, observed=[create.dot])
    late = ev(AP, 5, 600, "group/band", Op.SET, "name", "Band")
    everything = [*events, create, delete, late]
    held = {"eu": everything, "us": [*events, create, delete], "ap": everything}
    report, _ = run_check(held, acknowledged=events)
    assert kinds(report) == [("diverged", "us")]
    assert "reads show the same" in report.violations[0].detail
    assert report.lost == 0


def test_summaries_may_be_sets_or_predicates() -> None:
    events = history()
    report, snapshots = run_check({r: events for r in REGIONS}, acknowledged=events)
    dots = {e.dot for e in events}
    summaries: dict[str, Summary] = {
        "eu": dots,
        "us": dots.__contains__,
        "ap": lambda dot: dot != Dot(EU, 12),
    }
    report = check(snapshots, summaries, {}, events, events)
    assert kinds(report) == [("missing_ack", "ap")]
    assert report.lost == 1
    assert report.superseded == 1  # "Homer" only: "Homer J" is not everywhere, so lost


def test_divergence_counts_users_groups_and_memberships_that_differ() -> None:
    events = history()
    _, snapshots = run_check({r: events for r in REGIONS}, acknowledged=events)
    changed = copy.deepcopy(snapshots)
    changed["eu"]["groups"]["staff"]["members"] = ["marge"]  # homer out, marge in: 2 keys
    changed["us"]["groups"]["staff"]["name"] = "Staff 2"  # the group itself: 1 key
    del changed["ap"]["users"]["marge"]  # 1 key
    assert divergence(changed) == 4
