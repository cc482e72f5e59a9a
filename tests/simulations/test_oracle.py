"""The oracle on hand-written histories, and against real replicas on generated ones.

The examples pin each rule of the semantics; the cross-check ingests reachable
histories (built the way the commands build events) into a real ``Replica`` in any
order, with duplicates, and asks that what it shows equals what the oracle computes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import Dot
from node.events import Event, Op
from node.kv import MemoryKV
from node.replica import Replica
from simulations.oracle import oracle_snapshot
from simulations.snapshot import Snapshot, entities_of, snapshot_of_replica, snapshot_over_http
from tests.node.api_client import Api, run
from tests.node.test_views import Step, histories, replay

EU, US, AP = "eu~aaaa", "us~bbbb", "ap~cccc"
CROSS_CHECK_EXAMPLES = 300


def ev(
    origin: str,
    counter: int,
    hlc: int,
    stream: str,
    op: Op,
    field: str | None = None,
    value: str | None = None,
    observed: Iterable[Dot] = (),
) -> Event:
    return Event(Dot(origin, counter), hlc, stream, op, field, value, frozenset(observed))


def user(origin: str, counter: int, hlc: int, user_id: str, **fields: str | None) -> list[Event]:
    """A create and its field writes, the way ``POST /users`` writes them."""
    stream = f"user/{user_id}"
    events = [ev(origin, counter, hlc, stream, Op.CREATE)]
    for n, (name, value) in enumerate(sorted(fields.items()), 1):
        events.append(
            ev(origin, counter + n, hlc + n, stream, Op.SET, name.replace("__", "."), value)
        )
    return events


# -- existence -----------------------------------------------------------------------


def test_a_delete_removes_only_the_creates_it_observed() -> None:
    create = ev(EU, 1, 10, "user/homer", Op.CREATE)
    delete = ev(US, 1, 20, "user/homer", Op.DELETE, observed=[create.dot])
    assert oracle_snapshot([create])["users"] == {"homer": {"profile": {}}}
    assert oracle_snapshot([create, delete])["users"] == {}
    # a create concurrent with the delete (it was not observed) wins, whatever its stamp
    concurrent = ev(AP, 1, 15, "user/homer", Op.CREATE)
    assert "homer" in oracle_snapshot([create, delete, concurrent])["users"]
    # a delete that observed both creates ends it
    both = ev(EU, 2, 30, "user/homer", Op.DELETE, observed=[create.dot, concurrent.dot])
    assert oracle_snapshot([create, delete, concurrent, both])["users"] == {}


def test_field_writes_never_resurrect_a_deleted_entity() -> None:
    create = ev(EU, 1, 10, "group/staff", Op.CREATE)
    delete = ev(EU, 2, 20, "group/staff", Op.DELETE, observed=[create.dot])
    late = ev(US, 1, 30, "group/staff", Op.SET, "name", "Staff")  # us had not seen the delete
    assert oracle_snapshot([create, delete, late])["groups"] == {}


def test_duplicates_count_once_and_order_does_not_matter() -> None:
    events = [*user(EU, 1, 10, "homer", name="Homer"), *user(US, 1, 11, "marge", name="Marge")]
    assert oracle_snapshot(events + events[::-1]) == oracle_snapshot(events[::-1])


def test_two_different_events_with_one_dot_are_refused() -> None:
    a = ev(EU, 1, 10, "user/homer", Op.CREATE)
    b = ev(EU, 1, 10, "user/marge", Op.CREATE)
    with pytest.raises(AssertionError, match="two events with dot"):
        oracle_snapshot([a, b])


# -- scalar fields -------------------------------------------------------------------


def name_of(events: list[Event]) -> object:
    return oracle_snapshot(events)["users"]["homer"].get("name")


def test_the_greatest_stamp_wins() -> None:
    events = user(EU, 1, 10, "homer")
    late = ev(EU, 9, 50, "user/homer", Op.SET, "name", "late")
    early = ev(US, 9, 40, "user/homer", Op.SET, "name", "early")  # greater origin, lower stamp
    assert name_of([*events, late, early]) == name_of([early, late, *events]) == "late"


def test_equal_stamps_are_ordered_by_origin_then_counter() -> None:
    events = user(EU, 1, 10, "homer")
    by_origin = [
        ev(o, 5, 50, "user/homer", Op.SET, "name", o) for o in (US, EU, AP)
    ]  # us~ > eu~ > ap~
    assert name_of([*events, *by_origin]) == US
    by_counter = [ev(AP, c, 50, "user/homer", Op.SET, "name", f"c{c}") for c in (7, 12, 9)]
    assert name_of([*events, *by_counter]) == "c12"


def test_a_create_a_delete_did_not_observe_keeps_what_its_life_wrote() -> None:
    first = user(EU, 1, 10, "homer", name="Homer", email="homer@x.us", profile__city="Springfield")
    delete = ev(EU, 10, 100, "user/homer", Op.DELETE, observed=[first[0].dot])
    # A create the delete did not observe (concurrent with it) keeps the user: add-wins,
    # and with it every write above it, though the delete's stamp is greater: its floor
    # would have cleared an acknowledged create's fields (found by a review).
    concurrent = ev(US, 1, 95, "user/homer", Op.CREATE)
    above = ev(AP, 1, 150, "user/homer", Op.SET, "name", "above")
    between = ev(US, 2, 96, "user/homer", Op.SET, "username", "between")
    below = ev(AP, 2, 90, "user/homer", Op.SET, "email", "below@x.us")  # below the create
    events = [*first, delete, concurrent, above, between, below]
    homer = oracle_snapshot(events)["users"]["homer"]
    assert homer == {"name": "above", "username": "between", "profile": {}}
    # The same create, recreating the id after a delete it had seen, on a region that
    # then sees a delete from a region that had not seen it: the same.
    again = user(US, 5, 120, "homer", name="New Homer", email="new@x.us")
    stale = ev(EU, 11, 130, "user/homer", Op.DELETE, observed=[first[0].dot])
    homer = oracle_snapshot([*first, delete, *again, stale])["users"]["homer"]
    assert homer == {"name": "New Homer", "email": "new@x.us", "profile": {}}


def test_a_create_clears_every_write_up_to_its_own_key_a_new_life_starts_from_scratch() -> None:
    first = user(EU, 1, 10, "homer", name="Homer", email="homer@x.us", profile__city="Springfield")
    delete = ev(EU, 10, 100, "user/homer", Op.DELETE, observed=[first[0].dot])
    # Concurrent with the delete and ordered after it: it outlives the delete, not the
    # next create of the id, which is someone else.
    raced = ev(AP, 1, 150, "user/homer", Op.SET, "profile.phone", "555-0100")
    again = ev(US, 1, 200, "user/homer", Op.CREATE)
    assert oracle_snapshot([*first, delete, raced, again])["users"] == {"homer": {"profile": {}}}
    named = ev(US, 2, 201, "user/homer", Op.SET, "name", "New Homer")
    users = oracle_snapshot([*first, delete, raced, again, named])["users"]
    assert users == {"homer": {"name": "New Homer", "profile": {}}}


def test_a_profile_key_set_to_none_is_unset() -> None:
    events = user(EU, 1, 10, "homer", profile__city="Springfield", profile__pet="Santa")
    unset = ev(US, 1, 50, "user/homer", Op.SET, "profile.city", None)
    assert oracle_snapshot([*events, unset])["users"]["homer"]["profile"] == {"pet": "Santa"}


# -- members -------------------------------------------------------------------------


def group_and_users(*users: str) -> list[Event]:
    events = [ev(EU, 1, 10, "group/staff", Op.CREATE)]
    events += [ev(EU, 1 + n, 10 + n, f"user/{u}", Op.CREATE) for n, u in enumerate(users, 1)]
    return events


def test_members_are_add_wins() -> None:
    base = group_and_users("homer", "marge")
    add = ev(EU, 10, 100, "group/staff", Op.ADD, "members", "homer")
    add_marge = ev(EU, 11, 101, "group/staff", Op.ADD, "members", "marge")
    remove = ev(US, 1, 200, "group/staff", Op.REMOVE, "members", "homer", [add.dot])
    concurrent = ev(AP, 1, 150, "group/staff", Op.ADD, "members", "homer")  # not observed
    snapshot = oracle_snapshot([*base, add, add_marge, remove])
    assert snapshot["groups"]["staff"]["members"] == ["marge"]
    assert snapshot["user_groups"] == {"marge": ["staff"]}
    snapshot = oracle_snapshot([*base, add, add_marge, remove, concurrent])
    assert snapshot["groups"]["staff"]["members"] == ["homer", "marge"]
    # a remove of marge observing homer's add does not touch homer
    odd = ev(US, 2, 300, "group/staff", Op.REMOVE, "members", "marge", [concurrent.dot])
    assert oracle_snapshot([*base, concurrent, odd])["groups"]["staff"]["members"] == ["homer"]


def test_deleting_a_user_removes_the_memberships_it_saw() -> None:
    base = group_and_users("homer", "marge")
    adds = [
        ev(EU, 10 + n, 100 + n, "group/staff", Op.ADD, "members", u)
        for n, u in enumerate(("homer", "marge"))
    ]
    delete = ev(US, 1, 200, "user/homer", Op.DELETE, observed=[base[1].dot])
    unjoin = ev(US, 2, 200, "group/staff", Op.REMOVE, "members", "homer", [adds[0].dot])
    snapshot = oracle_snapshot([*base, *adds, delete, unjoin])
    assert snapshot["users"].keys() == {"marge"}
    assert snapshot["groups"]["staff"]["members"] == ["marge"]
    assert snapshot["user_groups"] == {"marge": ["staff"]}
    # Without the remove, the add outlives the user (add wins), but only users that
    # exist are listed, as members and with their groups.
    snapshot = oracle_snapshot([*base, *adds, delete])
    assert snapshot["groups"]["staff"]["members"] == ["marge"]
    assert snapshot["user_groups"] == {"marge": ["staff"]}


def test_a_deleted_group_is_in_no_one_s_groups() -> None:
    base = group_and_users("homer")
    add = ev(EU, 10, 100, "group/staff", Op.ADD, "members", "homer")
    delete = ev(US, 1, 200, "group/staff", Op.DELETE, observed=[base[0].dot])
    snapshot = oracle_snapshot([*base, add, delete])
    assert snapshot["groups"] == {}
    assert snapshot["user_groups"] == {}


# -- uniqueness conflicts ------------------------------------------------------------


def test_one_value_held_by_two_existing_users_is_a_conflict_casefolded() -> None:
    homer = user(EU, 1, 10, "homer", email="Homer@x.us", username="homer")
    marge = user(US, 1, 10, "marge", email="homer@X.US", username="marge")
    bart = user(AP, 1, 10, "bart", email="HOMER@x.us", username="Marge")
    assert oracle_snapshot([*homer, *marge])["conflicts"] == [
        ["email", "homer@x.us", ["homer", "marge"]]
    ]
    assert oracle_snapshot([*homer, *marge, *bart])["conflicts"] == [
        ["email", "homer@x.us", ["bart", "homer", "marge"]],
        ["username", "marge", ["bart", "marge"]],
    ]
    gone = ev(EU, 10, 100, "user/marge", Op.DELETE, observed=[marge[0].dot])
    assert oracle_snapshot([*homer, *marge, gone])["conflicts"] == []


# -- against real replicas -----------------------------------------------------------


async def _ingest(replica: Replica, batches: list[list[Event]]) -> None:
    replica.bind(asyncio.get_running_loop())
    for batch in batches:
        await replica.ingest(batch)


def replica_snapshot(batches: list[list[Event]], entities: set[tuple[str, str]]) -> Snapshot:
    replica = Replica(MemoryKV(), "eu")
    try:
        asyncio.run(_ingest(replica, batches))
        return snapshot_of_replica(replica, entities)
    finally:
        replica.close()


@settings(max_examples=CROSS_CHECK_EXAMPLES)
@given(histories, st.data())
def test_a_replica_shows_what_the_oracle_computes_in_any_order(
    history: list[Step], data: st.DataObject
) -> None:
    replayed = replay(history)
    # every event written, or what one origin knew (a state a replica can be in)
    which = data.draw(st.integers(-1, len(replayed.origins) - 1), label="events of")
    events = replayed.events if which < 0 else list(replayed.origins[which].known.values())
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=5)) if events else []
    arrival = data.draw(st.permutations(events + duplicates), label="arrival")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(arrival)), max_size=4), label="cuts"))
    batches = [arrival[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrival)], strict=True)]
    assert replica_snapshot(batches, entities_of(events)) == oracle_snapshot(events)


def test_the_http_api_shows_what_the_replica_and_the_oracle_show() -> None:
    crowd = [f"u{n:03d}" for n in range(120)]  # more than a page of members
    events = [*group_and_users(*crowd)]
    events += [
        ev(US, n, 1000 + n, "group/staff", Op.ADD, "members", u) for n, u in enumerate(crowd, 1)
    ]
    events += user(AP, 1, 10, "homer", name="Homer", email="Homer@x.us", profile__city="Spring")
    events += user(AP, 10, 10, "marge", name="Marge", email="homer@x.us", api_key="k" * 12)
    events += [ev(AP, 20, 2000, "group/staff", Op.ADD, "members", "homer")]
    events += [ev(AP, 21, 2001, "group/band", Op.CREATE)]
    events += [ev(AP, 22, 2002, "group/band", Op.SET, "name", "Band")]
    events += [ev(AP, 23, 2003, "group/band", Op.ADD, "members", "homer")]
    deleted = ev(AP, 30, 3000, "user/gone", Op.CREATE)
    events += [deleted, ev(AP, 31, 3001, "user/gone", Op.DELETE, observed=[deleted.dot])]
    entities = entities_of(events) | {("user", "never")}

    async def body(api: Api) -> None:
        await api.replica.ingest(events)
        base_url = str(api.client.make_url("")).rstrip("/")
        over_http = await snapshot_over_http(api.client.session, base_url, entities)
        expected = oracle_snapshot(events)
        assert over_http == snapshot_of_replica(api.replica, entities) == expected
        assert expected["user_groups"]["homer"] == ["band", "staff"]
        assert expected["conflicts"] == [["email", "homer@x.us", ["homer", "marge"]]]
        assert len(expected["groups"]["staff"]["members"]) == len(crowd) + 1

    run(body)
