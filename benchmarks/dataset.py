"""A seeded, realistic stream of events for the ingest and rebuild benchmarks.

The mix resembles an identity service's traffic: users created (create + name, username,
email), field updates (names, profile keys; each observing the winner it overwrites),
groups, member adds and removes, a few user deletes. Three origins take turns and the
clock advances as on a busy cluster. Generated lazily: a million events never sit in
memory at once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from crdt import Dot
from node.events import Event, Op

ORIGINS = ("eu~0000aaaa", "us~0000bbbb", "ap~0000cccc")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
ACTOR = "bench"
PROFILE_KEYS = ("title", "city", "team", "phone")


def events(n: int, *, seed: int = 6) -> Iterator[Event]:
    """Exactly ``n`` valid events, deterministic for a seed."""
    rng = random.Random(seed)
    counters = dict.fromkeys(ORIGINS, 0)
    stamp = START_MS << 16
    users: list[str] = []  # live users
    user_creates: dict[str, Dot] = {}
    groups: list[str] = []
    winners: dict[tuple[str, str], Dot] = {}  # (stream, field) -> last dot written
    creates: dict[str, Dot] = {}  # stream -> its create
    member_dots: dict[tuple[str, str], Dot] = {}  # (group, user) -> its live add dot
    made = 0

    def event(
        stream: str,
        op: Op,
        field: str | None = None,
        value: str | None = None,
        observed: frozenset[Dot] = frozenset(),
        origin: str | None = None,
    ) -> Event:
        nonlocal stamp
        origin = origin or rng.choice(ORIGINS)
        counters[origin] += 1
        stamp += rng.randint(1, 3) << 16  # ~2 ms apart
        dot = Dot(origin, counters[origin])
        if op is Op.CREATE:
            creates[stream] = dot
        # A field write names the create it is written under, as a node writes it.
        lives = frozenset({creates[stream]}) if op is Op.SET else frozenset()
        return Event(dot, stamp, stream, op, field, value, observed, ACTOR, lives)

    def set_field(stream: str, field: str, value: str, origin: str | None = None) -> Event:
        prior = winners.get((stream, field))
        e = event(
            stream,
            Op.SET,
            field,
            value,
            frozenset() if prior is None else frozenset({prior}),
            origin,
        )
        winners[(stream, field)] = e.dot
        return e

    while made < n:
        roll = rng.random()
        batch: list[Event] = []
        if not users or roll < 0.10:
            uid = f"u{len(user_creates):07d}"
            stream = f"user/{uid}"
            origin = rng.choice(ORIGINS)
            create = event(stream, Op.CREATE, origin=origin)
            user_creates[uid] = create.dot
            users.append(uid)
            batch = [
                create,
                set_field(stream, "name", f"User {uid}", origin),
                set_field(stream, "username", f"user.{uid}", origin),
                set_field(stream, "email", f"{uid}@example.org", origin),
            ]
        elif not groups or roll < 0.1005:
            gid = f"g{len(groups):05d}"
            stream = f"group/{gid}"
            origin = rng.choice(ORIGINS)
            groups.append(gid)
            batch = [
                event(stream, Op.CREATE, origin=origin),
                set_field(stream, "name", gid, origin),
            ]
        elif roll < 0.25:
            gid, uid = rng.choice(groups), rng.choice(users)
            e = event(f"group/{gid}", Op.ADD, "members", uid)
            member_dots[(gid, uid)] = e.dot
            batch = [e]
        elif roll < 0.27 and member_dots:
            (gid, uid), dot = member_dots.popitem()
            batch = [event(f"group/{gid}", Op.REMOVE, "members", uid, frozenset({dot}))]
        elif roll < 0.272 and len(users) > 10:
            uid = users.pop(rng.randrange(len(users)))
            batch = [event(f"user/{uid}", Op.DELETE, observed=frozenset({user_creates[uid]}))]
        else:
            uid = rng.choice(users)
            if rng.random() < 0.4:
                batch = [set_field(f"user/{uid}", "name", f"User {uid} v{rng.randint(1, 999)}")]
            else:
                key = rng.choice(PROFILE_KEYS)
                batch = [
                    set_field(f"user/{uid}", f"profile.{key}", f"{key}-{rng.randint(1, 9999)}")
                ]
        for e in batch:
            if made >= n:
                return
            made += 1
            yield e
