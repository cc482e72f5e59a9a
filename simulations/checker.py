"""The checker: after healing, did every replica converge, keep every write, and agree
with the oracle?

Three verdicts, each a ``Violation`` naming a region and a short detail (a few
differing keys, never whole snapshots):

- ``diverged``: a region's digest or snapshot differs from those of the largest group of
  regions that agree. Digests are compared first, since they also cover state reads do
  not show (writes kept for history on a deleted entity); snapshots say where they differ.
- ``missing_ack``: an acknowledged event whose dot is not in a region's summary.
- ``oracle_mismatch``: a region's snapshot differs from ``oracle_snapshot(union)``.

It also counts what happened to writes: ``superseded`` (acknowledged set writes present
everywhere that are not their field's winner: overwritten or cleared, as designed),
``lost`` (acknowledged writes absent from some replica: never acceptable), and
``conflicts_resolved``. A write counts as lost to a *concurrent* write when it lost to
a winner of another origin; that ignores causality (a later write from another region
that saw it is counted too), which is good enough for a report and needs no history.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from crdt import Dot
from node.events import Event, Op
from node.schema import GROUP_REQUIRED, USER_REQUIRED
from simulations import oracle
from simulations.snapshot import Snapshot

ViolationKind = Literal["diverged", "missing_ack", "oracle_mismatch", "fields_lost"]
EXAMPLES_MAX = 5  # differing keys or missing dots quoted per violation
VALUE_CHARS_MAX = 60


@runtime_checkable
class HasContains(Protocol):
    """A version vector: ``crdt.VersionVector`` answers ``contains(dot)``."""

    def contains(self, dot: Dot) -> bool: ...


Summary = Container[Dot] | Callable[[Dot], bool] | HasContains


@dataclass(frozen=True)
class Violation:
    kind: ViolationKind
    region: str
    detail: str


@dataclass
class Report:
    violations: list[Violation]
    superseded: int  # acknowledged set writes present everywhere, not the winner
    lost: int  # acknowledged writes absent from some replica
    conflicts_resolved: int  # set writes lost to another origin's write + uniqueness conflicts

    @property
    def ok(self) -> bool:
        return not self.violations


def holds(summary: Summary) -> Callable[[Dot], bool]:
    """Whether ``summary`` holds a dot, as a predicate: decided once per summary (an
    ``isinstance`` against a runtime protocol is slow, and the checker asks per event)."""
    if isinstance(summary, HasContains):
        return summary.contains
    if callable(summary):
        return lambda dot: bool(summary(dot))
    return summary.__contains__


# -- comparing snapshots -------------------------------------------------------------


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def flatten(snapshot: Snapshot) -> dict[str, object]:
    """One entry per thing a client can see, keyed by a readable path."""
    flat: dict[str, object] = {}
    for user_id, user in snapshot["users"].items():
        flat[f"user/{user_id}"] = "exists"
        for name, value in user.items():
            if name == "profile":
                flat |= {f"user/{user_id}.profile.{k}": v for k, v in value.items()}
            else:
                flat[f"user/{user_id}.{name}"] = value
    for group_id, group in snapshot["groups"].items():
        flat[f"group/{group_id}"] = "exists"
        for name, value in group.items():
            if name == "members":
                flat |= {f"group/{group_id}.members/{u}": "member" for u in value}
            else:
                flat[f"group/{group_id}.{name}"] = value
    for user_id, group_ids in snapshot["user_groups"].items():
        flat[f"user/{user_id}.groups"] = group_ids
    for field, value, ids in snapshot["conflicts"]:
        flat[f"conflict/{field}/{value}"] = ids
    return flat


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= VALUE_CHARS_MAX else text[: VALUE_CHARS_MAX - 3] + "..."


def diff(a: Snapshot, b: Snapshot, a_name: str, b_name: str) -> str:
    """The first few keys where two snapshots differ, with both values; "" if equal."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ABSENT) != fb.get(k, ABSENT))
    shown = [
        f"{k}: {a_name}={_short(fa.get(k, ABSENT))} {b_name}={_short(fb.get(k, ABSENT))}"
        for k in keys[:EXAMPLES_MAX]
    ]
    more = f"; (+{len(keys) - EXAMPLES_MAX} more keys)" if len(keys) > EXAMPLES_MAX else ""
    return "; ".join(shown) + more


def entity_values(snapshot: Snapshot) -> dict[str, object]:
    """Users, groups (without members) and memberships, one value each."""
    found: dict[str, object] = {f"user/{u}": user for u, user in snapshot["users"].items()}
    for group_id, group in snapshot["groups"].items():
        found[f"group/{group_id}"] = {k: v for k, v in group.items() if k != "members"}
        found |= {f"member/{group_id}/{u}": True for u in group["members"]}
    return found


def divergence(snapshots: Mapping[str, Snapshot]) -> int:
    """How many users, groups and memberships do not look the same in every region."""
    first, *others = [entity_values(s) for s in snapshots.values()]
    keys = set(first).union(*others)
    return sum(1 for k in keys if any(o.get(k, ABSENT) != first.get(k, ABSENT) for o in others))


# -- the checks ----------------------------------------------------------------------


def _convergence(snapshots: Mapping[str, Snapshot], digests: Mapping[str, str]) -> list[Violation]:
    """Regions outside the largest set of regions that agree, each against that set."""

    def agree(a: str, b: str) -> bool:
        da, db = digests.get(a), digests.get(b)
        return (da is None or db is None or da == db) and snapshots[a] == snapshots[b]

    agreeing: list[list[str]] = []
    for region in sorted(snapshots):
        same = next((g for g in agreeing if agree(g[0], region)), None)
        if same is None:
            agreeing.append([region])
        else:
            same.append(region)
    majority = max(agreeing, key=len)  # the first of the largest: ties go to sorted order
    reference = majority[0]
    found = []
    for region in sorted(snapshots):
        if region in majority:
            continue
        detail = diff(snapshots[reference], snapshots[region], reference, region) or (
            f"digest {digests.get(region)} differs from {reference}'s "
            f"{digests.get(reference)} although reads show the same: state kept beside "
            "the views differs"
        )
        found.append(Violation("diverged", region, f"differs from {reference}: {detail}"))
    return found


def _missing_acks(summaries: Mapping[str, Summary], acked: list[Event]) -> list[Violation]:
    found = []
    for region, summary in sorted(summaries.items()):
        held = holds(summary)
        missing = [e for e in acked if not held(e.dot)]
        if missing:
            shown = ", ".join(
                f"{e.dot} ({e.op.name.lower()} {e.stream})" for e in missing[:EXAMPLES_MAX]
            )
            more = f" (+{len(missing) - EXAMPLES_MAX} more)" if len(missing) > EXAMPLES_MAX else ""
            detail = f"{len(missing)} acknowledged events missing: {shown}{more}"
            found.append(Violation("missing_ack", region, detail))
    return found


def _oracle_mismatches(snapshots: Mapping[str, Snapshot], expected: Snapshot) -> list[Violation]:
    return [
        Violation("oracle_mismatch", region, diff(snapshot, expected, region, "oracle"))
        for region, snapshot in sorted(snapshots.items())
        if snapshot != expected
    ]


def _fields_lost(snapshots: Mapping[str, Snapshot]) -> list[Violation]:
    """An existing entity lacking a field every create of it writes (and no write can
    unset): the create that keeps it alive had its own writes cleared, though it was
    acknowledged with them (as a delete ordered after a create it did not observe did)."""
    found = []
    for region, snapshot in sorted(snapshots.items()):
        for kind, required in (("users", USER_REQUIRED), ("groups", GROUP_REQUIRED)):
            lacking = [
                f"{entity_id} lacks {', '.join(f for f in required if entity.get(f) is None)}"
                for entity_id, entity in snapshot[kind].items()  # type: ignore[literal-required]
                if any(entity.get(f) is None for f in required)
            ]
            if lacking:
                shown = "; ".join(lacking[:EXAMPLES_MAX])
                found.append(Violation("fields_lost", region, f"{kind}: {shown}"))
    return found


def check(
    snapshots: Mapping[str, Snapshot],
    summaries: Mapping[str, Summary],
    digests: Mapping[str, str],
    acknowledged: Iterable[Event],
    union: Iterable[Event],
) -> Report:
    """Check the regions' final state against each other, the acks and the oracle.

    ``summaries`` say which dots each region holds (a set of dots, a ``VersionVector``
    or a predicate); ``digests`` are the regions' view digests (regions left out are
    compared by snapshot only); ``union`` is every event any region holds.
    """
    assert snapshots, "nothing to check"
    assert set(summaries) == set(snapshots), (sorted(summaries), sorted(snapshots))
    events = oracle.unique(union)
    held = {e.dot: e for e in events}
    # An acknowledged event whose dot now names another event was lost, and its dot
    # reused: a node acknowledged what it had not made durable, then forgot it.
    acked_all = list({e.dot: e for e in acknowledged}.values())
    replaced = [e for e in acked_all if e.dot in held and held[e.dot] != e]
    acked = [e for e in acked_all if e not in replaced]
    expected = oracle.oracle_snapshot(events)
    violations = [
        *_convergence(snapshots, digests),
        *_missing_acks(summaries, acked),
        *(
            Violation(
                "missing_ack",
                e.dot.origin.partition("~")[0],
                f"acknowledged {e.op.name.lower()} {e.stream} {e.dot} was lost and its "
                "dot reused by another event",
            )
            for e in replaced[:EXAMPLES_MAX]
        ),
        *_oracle_mismatches(snapshots, expected),
        *_fields_lost({**snapshots, "oracle": expected}),
    ]

    streams = oracle.by_stream(events)
    shown = {e.dot for stream_events in streams.values() for e in oracle.showing(stream_events)}
    winner_of = {
        (stream, name): winner.dot
        for stream, stream_events in streams.items()
        for name, winner in oracle.winners(stream_events).items()
    }

    members = [holds(summary) for summary in summaries.values()]

    def everywhere(event: Event) -> bool:
        return all(held(event.dot) for held in members)

    def beaten(event: Event) -> Dot | None:
        """The dot of the write that beat this one, if it lost its field to a write."""
        winner = winner_of.get((event.stream, event.field or ""))
        return None if winner is None or winner == event.dot else winner

    lost = sum(1 for e in acked if not everywhere(e)) + len(replaced)
    superseded = sum(
        1
        for e in acked
        if e.op is Op.SET and everywhere(e) and winner_of.get((e.stream, e.field or "")) != e.dot
    )
    concurrent_losses = sum(
        1
        for e in events
        if e.op is Op.SET
        and e.dot in shown
        and (w := beaten(e)) is not None
        and w.origin != e.dot.origin
    )
    return Report(
        violations=violations,
        superseded=superseded,
        lost=lost,
        conflicts_resolved=concurrent_losses + len(expected["conflicts"]),
    )
