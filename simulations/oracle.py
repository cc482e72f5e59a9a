"""The oracle: what every replica must show, computed from the union of all events.

A small model written from the semantics in ARCHITECTURE.md with plain sets, ``max``
and comprehensions over the whole event set at once. It shares no code with ``node/``
(only the ``Event`` and ``Dot`` data types): no fold, no CRDT merge, no views, so a bug
there cannot hide by being repeated here. It is slow on purpose; it is obviously right.

- An entity exists iff some create of its stream no delete of that stream observed.
- A field's value is that of its greatest write by (hlc, origin, counter) among those
  that show: a write naming the creates it was written under shows iff it names the
  greatest (by hlc, origin, counter) of the creates no delete observed; one naming none
  (format 1) iff it is greater than that create. With none that shows, the field is
  absent.
- A user is a member of a group iff it exists and some add of that user no remove of that
  user observed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from crdt import Dot
from node.events import Event, Op
from node.schema import index_value
from simulations.snapshot import Snapshot, assemble, render

Key = tuple[int, str, int]
UNIQUE_FIELDS = ("email", "username")


def key(event: Event) -> Key:
    """The total order of writes: clock stamp, then origin, then counter."""
    return (event.hlc, event.dot.origin, event.dot.counter)


def unique(events: Iterable[Event]) -> list[Event]:
    """Each event once: the dot is its identity."""
    by_dot: dict[Dot, Event] = {}
    for event in events:
        kept = by_dot.setdefault(event.dot, event)
        assert kept == event, f"two events with dot {event.dot}"
    return list(by_dot.values())


def by_stream(events: Iterable[Event]) -> dict[str, list[Event]]:
    streams: dict[str, list[Event]] = {}
    for event in unique(events):
        streams.setdefault(event.stream, []).append(event)
    return streams


def exists(stream: list[Event]) -> bool:
    deleted = {dot for e in stream if e.op is Op.DELETE for dot in e.observed}
    return any(e.dot not in deleted for e in stream if e.op is Op.CREATE)


def live_creates(stream: list[Event]) -> list[str]:
    """The creates no delete observed, as dot strings, sorted: two or more were made in
    two regions at once, a conflict reported (``views._id_conflict``)."""
    deleted = {dot for e in stream if e.op is Op.DELETE for dot in e.observed}
    return sorted(str(e.dot) for e in stream if e.op is Op.CREATE and e.dot not in deleted)


def showing(stream: list[Event]) -> list[Event]:
    """The field writes that show: those naming the greatest create no delete observed,
    and those naming none that are greater than it."""
    deleted = {dot for e in stream if e.op is Op.DELETE for dot in e.observed}
    live = [e for e in stream if e.op is Op.CREATE and e.dot not in deleted]
    if not live:
        return []  # the entity is not shown
    top = max(live, key=key)
    return [
        e
        for e in stream
        if e.op is Op.SET and (top.dot in e.lives if e.lives else key(e) > key(top))
    ]


def winners(stream: list[Event]) -> dict[str, Event]:
    """Field -> the set event that wins it, for the fields that have a winner."""
    writes = showing(stream)
    fields = {e.field for e in writes if e.field is not None}
    return {f: max((e for e in writes if e.field == f), key=key) for f in fields}


def members(stream: list[Event]) -> set[str]:
    removed = {(e.value, dot) for e in stream if e.op is Op.REMOVE for dot in e.observed}
    return {
        e.value
        for e in stream
        if e.op is Op.ADD and e.value is not None and (e.value, e.dot) not in removed
    }


def live(streams: dict[str, list[Event]], kind: str) -> dict[str, list[Event]]:
    """Entity id -> its events, for the existing entities of ``kind``."""
    return {
        s.partition("/")[2]: evs
        for s, evs in streams.items()
        if s.partition("/")[0] == kind and exists(evs)
    }


def values(stream: list[Event]) -> dict[str, Any]:
    return {f: e.value for f, e in winners(stream).items()}


def oracle_snapshot(events: Iterable[Event]) -> Snapshot:
    """The snapshot every replica that has seen exactly ``events`` must show."""
    streams = by_stream(events)
    users = {u: render("user", values(evs)) for u, evs in live(streams, "user").items()}
    live_groups = live(streams, "group")
    group_members = {g: members(evs) & users.keys() for g, evs in live_groups.items()}
    groups = {g: render("group", values(evs), group_members[g]) for g, evs in live_groups.items()}
    user_groups = {u: [g for g in groups if u in group_members[g]] for u in users}
    holders: dict[tuple[str, str], set[str]] = {}
    for user_id, user in users.items():
        for field in UNIQUE_FIELDS:
            value = user.get(field)
            if isinstance(value, str) and value:
                holders.setdefault((field, index_value(field, value)), set()).add(user_id)
    conflicts: list[tuple[str, str, Any]] = [
        (f, v, ids) for (f, v), ids in holders.items() if len(ids) > 1
    ]
    for stream, evs in streams.items():
        creates = live_creates(evs)
        if len(creates) > 1:
            conflicts.append(("id", stream, creates))
    return assemble(users, groups, user_groups, conflicts)
