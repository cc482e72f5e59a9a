"""What clients can see, in one canonical JSON-able form: the ground oracle and replicas meet on.

A snapshot holds only existing entities::

    {"users": {id: {"name": ..., "username": ..., "email": ..., "api_key": ...,
                    "profile": {key: value}}},          # a field only if it has a winner
     "groups": {id: {"name": ..., "members": [sorted user ids]}},
     "user_groups": {user id: [sorted group ids]},      # existing users with a group
     "conflicts": [[field, folded value, [sorted ids]], ...]}  # sorted; for an id
     # created in two regions at once: ["id", "<kind>/<id>", [sorted create dots]]

It is read from an in-process replica through its public read methods, or from a node
over its HTTP API; both read entity by entity, so take it once the cluster is quiet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypedDict

import aiohttp

from node.events import Event

MEMBER_PAGE_ITEMS = 500
MEMBER_PAGES_MAX = 100_000  # a bound on paging, far above any simulated group
REQUESTS_IN_FLIGHT_MAX = 16
ENTITY_KINDS = ("user", "group")
HTTP_ONLY_KEYS = ("id", "created_at", "updated_at")


class Snapshot(TypedDict):
    users: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    user_groups: dict[str, list[str]]
    conflicts: list[list[Any]]


def empty() -> Snapshot:
    return {"users": {}, "groups": {}, "user_groups": {}, "conflicts": []}


def entities_of(events: Iterable[Event]) -> set[tuple[str, str]]:
    """Every (kind, id) some event wrote to: what a snapshot has to look at."""
    return {(e.kind, e.entity_id) for e in events}


def render(kind: str, values: Mapping[str, Any], members: Iterable[str] = ()) -> dict[str, Any]:
    """An entity from its winning field values (profile keys as "profile.<key>").

    As the HTTP API shows it: a profile key whose value is None is unset, so not shown;
    a group has no profile and shows its members instead.
    """
    assert kind in ENTITY_KINDS, kind
    out: dict[str, Any] = {f: v for f, v in values.items() if not f.startswith("profile.")}
    if kind == "user":
        out["profile"] = {
            f.removeprefix("profile."): v
            for f, v in sorted(values.items())
            if f.startswith("profile.") and v is not None
        }
    else:
        out["members"] = sorted(members)
    return dict(sorted(out.items()))


def assemble(
    users: Mapping[str, dict[str, Any]],
    groups: Mapping[str, dict[str, Any]],
    user_groups: Mapping[str, Iterable[str]],
    conflicts: Iterable[tuple[str, str, Iterable[str]]],
) -> Snapshot:
    """The canonical form: sorted keys and lists, only existing users' groups."""
    return {
        "users": dict(sorted(users.items())),
        "groups": dict(sorted(groups.items())),
        "user_groups": {
            u: sorted(gs) for u, gs in sorted(user_groups.items()) if u in users and list(gs)
        },
        "conflicts": [[f, v, sorted(ids)] for f, v, ids in sorted(conflicts)],
    }


# -- an in-process replica -----------------------------------------------------------


class EntityView(Protocol):
    @property
    def exists(self) -> bool: ...

    def values(self) -> dict[str, Any]: ...


class ReplicaReads(Protocol):
    """The public read methods of ``node.replica.Replica`` a snapshot uses."""

    def entity(self, kind: str, entity_id: str) -> EntityView: ...

    def members_page(
        self, group_id: str, *, after: str, limit: int
    ) -> tuple[list[str], str | None]: ...

    def groups_of(self, user_id: str) -> list[str]: ...

    def conflicts(self) -> list[tuple[str, str, list[str]]]: ...


def _all_members(replica: ReplicaReads, group_id: str) -> list[str]:
    found: list[str] = []
    cursor: str | None = ""
    for _ in range(MEMBER_PAGES_MAX):
        page, cursor = replica.members_page(group_id, after=cursor or "", limit=MEMBER_PAGE_ITEMS)
        found += page
        if cursor is None:
            return found
    raise RuntimeError(f"group {group_id!r} has more than {MEMBER_PAGES_MAX} pages of members")


def snapshot_of_replica(replica: ReplicaReads, kinds_ids: Iterable[tuple[str, str]]) -> Snapshot:
    """What ``replica`` shows for the entities ``kinds_ids`` (see ``entities_of``)."""
    users: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    for kind, entity_id in sorted(set(kinds_ids)):
        state = replica.entity(kind, entity_id)
        if not state.exists:
            continue
        if kind == "user":
            users[entity_id] = render(kind, state.values())
        else:
            groups[entity_id] = render(kind, state.values(), _all_members(replica, entity_id))
    user_groups = {u: replica.groups_of(u) for u in users}
    return assemble(users, groups, user_groups, replica.conflicts())


# -- a node over HTTP ----------------------------------------------------------------


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> Any | None:
    """The JSON body, or None on 404; any other failure raises."""
    async with session.get(url, params=params) as response:
        if response.status == 404:
            return None
        response.raise_for_status()
        return await response.json()


async def _members_over_http(session: aiohttp.ClientSession, base_url: str, group_id: str) -> Any:
    found: list[str] = []
    cursor = ""
    for _ in range(MEMBER_PAGES_MAX):
        params = {"cursor": cursor} if cursor else {}
        page = await _get(session, f"{base_url}/groups/{group_id}/members", **params)
        if page is None:
            return None  # deleted while we looked: the caller reads a moving target
        found += page["members"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found
    raise RuntimeError(f"group {group_id!r} has more than {MEMBER_PAGES_MAX} pages of members")


async def snapshot_over_http(
    session: aiohttp.ClientSession, base_url: str, kinds_ids: Iterable[tuple[str, str]]
) -> Snapshot:
    """What the node at ``base_url`` shows for ``kinds_ids``, through its HTTP API.

    The session carries whatever the node needs (an API token in default headers).
    """
    base_url = base_url.rstrip("/")
    users: dict[str, dict[str, Any]] = {}
    groups: dict[str, dict[str, Any]] = {}
    user_groups: dict[str, list[str]] = {}
    in_flight = asyncio.Semaphore(REQUESTS_IN_FLIGHT_MAX)

    async def read(kind: str, entity_id: str) -> None:
        async with in_flight:
            body = await _get(session, f"{base_url}/{kind}s/{entity_id}")
            if body is None:
                return
            seen = {k: v for k, v in body.items() if k not in HTTP_ONLY_KEYS}
            if kind == "user":
                users[entity_id] = dict(sorted(seen.items()))
                found = await _get(session, f"{base_url}/users/{entity_id}/groups")
                if found is not None:
                    user_groups[entity_id] = found["groups"]
            else:
                members = await _members_over_http(session, base_url, entity_id)
                if members is not None:
                    groups[entity_id] = dict(sorted({**seen, "members": sorted(members)}.items()))

    await asyncio.gather(*(read(kind, i) for kind, i in sorted(set(kinds_ids))))
    listed: list[dict[str, Any]] = []
    cursor = ""
    for _ in range(MEMBER_PAGES_MAX):  # a page at a time, as a client reads them
        answer = await _get(
            session, f"{base_url}/conflicts", **({"cursor": cursor} if cursor else {})
        )
        assert answer is not None, "GET /conflicts answered 404"
        listed += answer["conflicts"]
        cursor = answer["next_cursor"]
        if cursor is None:
            break
    conflicts = [
        (c["field"], f"{c['kind']}/{c['value']}", c["creates"])  # an id created twice
        if c["field"] == "id"
        else (c["field"], c["value"], c["ids"])
        for c in listed
    ]
    return assemble(users, groups, user_groups, conflicts)
