"""Real nodes converge: writes everywhere, concurrent writes across a cut link, and the
CRDT contract of ARCHITECTURE.md (LWW by (hlc, origin), add-wins sets, delete semantics)
checked on every replica's views after anti-entropy."""

from __future__ import annotations

from pathlib import Path

import pytest

from crdt import Dot
from node import commands, views
from node import events as ev
from node.audit import history as history_of
from node.events import Event, Op
from replication.protocol import RawEvent
from tests.replication.cluster import Cluster, person, raw_add, run

REGIONS = ("ap", "eu", "us")


def dots_of(events: list[Event]) -> set[Dot]:
    return {e.dot for e in events}


@pytest.mark.parametrize("network", ["clean", "duplicating", "interleaved", "answers-lost"])
def test_writes_at_every_region_converge_everywhere(tmp_path: Path, network: str) -> None:
    async def body(c: Cluster) -> None:
        if network == "duplicating":
            for link in c.links.values():
                link.duplicate = True
        acked: set[Dot] = set()
        users: dict[str, dict[str, str | None]] = {}
        groups: dict[str, set[str]] = {}
        for region in REGIONS:
            for n in range(3):
                user_id = f"{region}{n}"
                users[user_id] = dict(person(user_id))
                acked |= dots_of(
                    await c.write(region, commands.create("user", user_id, users[user_id]))
                )
            group_id = f"team-{region}"
            groups[group_id] = {f"{region}0", f"{region}1"}
            acked |= dots_of(
                await c.write(region, commands.create("group", group_id, {"name": region}))
            )
            for member in sorted(groups[group_id]):
                acked |= dots_of(await c.write(region, commands.add_member(group_id, member)))
            c.advance(10)
        # One exchange started by eu moves events both ways: eu pushes, us answers.
        assert await c.sync("eu", "us")
        eu_and_us = {d for d in acked if d.origin.partition("~")[0] in ("eu", "us")}
        for region in ("eu", "us"):
            assert eu_and_us <= set(c.replica(region).summary.dots())
        await c.sync_all_until_quiet(concurrent=network == "interleaved")
        # Now every region knows every user: cross-region profile fields and memberships.
        for i, region in enumerate(REGIONS):
            other = REGIONS[(i + 1) % len(REGIONS)]
            user_id = f"{other}2"
            field = f"profile.seen_in_{region}"
            users[user_id][field] = f"hello from {region}"
            acked |= dots_of(
                await c.write(
                    region, commands.patch("user", user_id, {field: f"hello from {region}"}, None)
                )
            )
            groups[f"team-{other}"].add(f"{region}2")
            acked |= dots_of(
                await c.write(region, commands.add_member(f"team-{other}", f"{region}2"))
            )
            c.advance(10)
        if network == "answers-lost":  # each request arrives, and every answer is lost
            for a, b in c.links:
                c.cut(b, a, both=False)
                assert not await c.sync(a, b)
                c.heal()
        await c.sync_all_until_quiet(concurrent=network == "interleaved")

        views = c.assert_converged()
        for region in REGIONS:
            replica = c.replica(region)
            assert all(dot in replica.summary for dot in acked), f"{region} lost a write"
            for user_id, fields in users.items():
                state = replica.entity("user", user_id)
                assert state.exists
                assert state.values() == fields
                assert replica.lookup("email", f"{user_id}@example.org") == [user_id]
            for group_id, expected in groups.items():
                assert set(replica.members(group_id, after="", limit=100)) == expected
        user_groups: dict[str, set[str]] = {g: set() for g in groups}
        for key in views["user_groups"]:
            user_id, _, group_id = key.partition("\0")
            user_groups[group_id].add(user_id)
        assert user_groups == groups
        assert views["conflicts"] == []

    run(tmp_path, REGIONS, body, reorder_yields_max=3 if network == "interleaved" else 0)


@pytest.mark.parametrize(
    ("skew_ms", "later_wins"),
    [({}, True), ({"us": 60_000}, False)],
    ids=["synced-clocks", "us-clock-ahead"],
)
def test_concurrent_writes_to_one_field_keep_the_greater_stamp(
    tmp_path: Path, skew_ms: dict[str, int], later_wins: bool
) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "dave", person("dave")))
        await c.sync_all_until_quiet()
        c.skew_ms.update(skew_ms)
        c.cut("eu", "us")
        c.advance(1_000)
        [first] = await c.write("us", commands.patch("user", "dave", {"name": "Dave US"}, None))
        c.advance(5)
        [second] = await c.write("eu", commands.patch("user", "dave", {"name": "Dave EU"}, None))
        assert c.replica("us").entity("user", "dave").value("name") == "Dave US"
        assert c.replica("eu").entity("user", "dave").value("name") == "Dave EU"
        c.heal()
        await c.sync_all_until_quiet()

        winner = max((first, second), key=lambda e: (e.hlc, e.dot.origin))
        # "Last" is by clock: the us write made first wins when us's clock runs ahead.
        assert winner is (second if later_wins else first)
        for region in ("eu", "us"):
            state = c.replica(region).entity("user", "dave")
            assert state.value("name") == winner.value
            w = state.winner("name")
            assert w is not None
            assert w.dot == winner.dot
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


def test_an_equal_stamp_is_broken_by_origin(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "erin", person("erin")))
        await c.sync_all_until_quiet()
        c.cut("eu", "us")
        c.advance(1_000)  # both clocks now read the same physical time, past all they saw
        [eu_write] = await c.write("eu", commands.patch("user", "erin", {"name": "EU"}, None))
        [us_write] = await c.write("us", commands.patch("user", "erin", {"name": "US"}, None))
        assert eu_write.hlc == us_write.hlc == c.now_ms[0] << 16
        c.heal()
        await c.sync_all_until_quiet()
        # "us~..." > "eu~...": on equal stamps the greater origin wins, on every replica.
        assert us_write.dot.origin > eu_write.dot.origin
        for region in ("eu", "us"):
            assert c.replica(region).entity("user", "erin").value("name") == "US"
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


async def staff_with(c: Cluster, user_id: str) -> Event:
    await c.write("eu", commands.create("user", user_id, person(user_id)))
    await c.write("eu", commands.create("group", "staff", {"name": "Staff"}))
    [added] = await c.write("eu", raw_add("staff", user_id))
    await c.sync_all_until_quiet()
    return added


def test_an_add_concurrent_with_a_remove_wins(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        first_add = await staff_with(c, "lisa")
        c.cut("eu", "us")
        [removed] = await c.write("us", commands.remove_member("staff", "lisa"))
        assert removed.op is Op.REMOVE
        assert removed.observed == {first_add.dot}
        [again] = await c.write("eu", raw_add("staff", "lisa"))
        assert c.replica("us").members("staff", after="", limit=10) == []
        c.heal()
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert views["members"] == {"staff": {"lisa": [str(again.dot)]}}
        for region in ("eu", "us"):
            assert c.replica(region).groups_of("lisa") == ["staff"]

        # A remove made after seeing every add removes the member everywhere.
        [final] = await c.write("us", commands.remove_member("staff", "lisa"))
        assert final.observed == {again.dot}
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert views["members"] == {}
        for region in ("eu", "us"):
            assert c.replica(region).groups_of("lisa") == []

    run(tmp_path, ("eu", "us"), body)


def test_a_remove_concurrent_with_an_add_it_did_not_see_keeps_that_add(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await staff_with(c, "lisa")
        c.cut("eu", "us")
        # eu removes and adds back; us removes the original add only.
        await c.write("eu", commands.remove_member("staff", "lisa"))
        [back] = await c.write("eu", raw_add("staff", "lisa"))
        await c.write("us", commands.remove_member("staff", "lisa"))
        c.heal()
        await c.sync_all_until_quiet()
        assert c.assert_converged()["members"] == {"staff": {"lisa": [str(back.dot)]}}

    run(tmp_path, ("eu", "us"), body)


def test_a_deleted_user_is_not_resurrected_by_a_concurrent_update(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "alice", person("alice")))
        await c.sync_all_until_quiet()
        c.cut("eu", "us")
        await c.write("eu", commands.delete("user", "alice", None))
        c.advance(1_000)  # the update is even stamped later than the delete
        await c.write("us", commands.patch("user", "alice", {"name": "Alice B."}, None))
        c.heal()
        await c.sync_all_until_quiet()
        c.assert_converged()
        for region in ("eu", "us"):
            replica = c.replica(region)
            assert not replica.entity("user", "alice").exists
            assert replica.lookup("email", "alice@example.org") == []
            assert replica.lookup("username", "alice") == []
            assert replica.entity_ids("user", after="", limit=10) == ([], None)
            assert replica.search("alice", after=b"", limit=10) == ([], None)

    run(tmp_path, ("eu", "us"), body)


def test_a_user_created_again_shows_nothing_of_a_write_that_raced_the_delete(
    tmp_path: Path,
) -> None:
    """Found by review: a profile written in us while eu deleted the user is ordered
    after the delete, so the delete does not clear it; the user created again under
    that id showed it, a previous person's data. The write names the create it was
    written under, which the delete removed: it is cleared with its life, whatever its
    stamp, and a new life starts from scratch everywhere."""

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "zed", person("zed")))
        await c.sync_all_until_quiet()
        c.cut("eu", "us")
        await c.write("eu", commands.delete("user", "zed", None))
        c.advance(1_000)  # the update is stamped later than the delete
        raced = {"profile.phone": "555-0100", "profile.city": "Springfield"}
        await c.write("us", commands.patch("user", "zed", raced, None))
        c.heal()
        await c.sync_all_until_quiet()
        assert not c.replica("eu").entity("user", "zed").exists
        c.advance(1_000)
        await c.write("eu", commands.create("user", "zed", {**person("zed"), "name": "New Zed"}))
        await c.sync_all_until_quiet()
        c.assert_converged()
        for region in ("eu", "us"):
            values = c.replica(region).entity("user", "zed").values()
            assert values == {**person("zed"), "name": "New Zed"}, region
            history = c.replica(region).stream("user", "zed")
            cleared = [e for e in history_of(history) if e.get("field") == "profile.phone"]
            assert [e["won"] for e in cleared] == [False]
            assert cleared[0]["why"].startswith("cleared by the delete ")

    run(tmp_path, ("eu", "us"), body)


def test_a_deleted_user_is_listed_in_no_group_though_an_add_raced_its_delete(
    tmp_path: Path,
) -> None:
    """Found by review: an add of a user to a group while another region deleted the
    user outlives the delete (add wins), and the group listed the user though GET said
    404. A group lists only users that exist. Created again, the user is a member: the
    add won, and nothing tells an add for its earlier life from one for a live one whose
    create has not arrived (the next test)."""

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "yan", person("yan")))
        await c.write("eu", commands.create("group", "band", {"name": "Band"}))
        await c.sync_all_until_quiet()
        c.cut("eu", "us")
        await c.write("eu", commands.delete("user", "yan", None))
        await c.write("us", commands.add_member("band", "yan"))
        c.heal()
        await c.sync_all_until_quiet()
        for region in ("eu", "us"):
            replica = c.replica(region)
            assert not replica.entity("user", "yan").exists
            with replica.kv.read() as txn:
                assert list(views.members(txn, "band")) == ["yan"], region  # the add won
            assert replica.members("band", after="", limit=10) == [], region
            assert replica.groups_of("yan") == ["band"], region  # GET of its groups: 404
        await c.write("eu", commands.create("user", "yan", person("yan")))
        await c.sync_all_until_quiet()
        c.assert_converged()
        for region in ("eu", "us"):
            assert c.replica(region).members("band", after="", limit=10) == ["yan"], region

    run(tmp_path, ("eu", "us"), body)


def test_a_create_ahead_of_the_ids_other_create_removes_no_membership(tmp_path: Path) -> None:
    """Found by review: a region can hold an add of a user whose create has not reached
    it yet (a peer pushes its own events first). A create of that id there, say a
    client's retry, must not take that add for an earlier life's and remove it (a
    version that did lost that membership everywhere)."""

    async def body(c: Cluster) -> None:
        band = await c.write("us", commands.create("group", "band", {"name": "Band"}))
        await c.write("eu", commands.create("user", "yan", person("yan")))
        assert await c.sync("eu", "us")
        add = await c.write("us", commands.add_member("band", "yan"))
        # us pushes its own events to ap: the group and the add, not eu's create of yan
        c.replicator("us").enqueue([RawEvent(e.dot, ev.encode(e)) for e in band + add])
        await c.replicator("us").push("ap")
        ap = c.replica("ap")
        assert not ap.entity("user", "yan").exists
        assert ap.groups_of("yan") == ["band"]
        created = await c.write("ap", commands.create("user", "yan", person("yan")))
        assert [e.op for e in created if e.stream != "user/yan"] == []
        await c.sync_all_until_quiet()
        c.assert_converged()
        for region in c.regions:
            assert c.replica(region).groups_of("yan") == ["band"], region

    run(tmp_path, ("ap", "eu", "us"), body)


def test_a_create_concurrent_with_a_delete_of_the_same_id_wins(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        c.cut("eu", "us")
        await c.write("eu", commands.create("user", "bob", person("bob")))
        await c.write("eu", commands.delete("user", "bob", None))
        c.advance(1_000)
        created = await c.write("us", commands.create("user", "bob", person("bob")))
        c.heal()
        await c.sync_all_until_quiet()
        c.assert_converged()
        for region in ("eu", "us"):
            state = c.replica(region).entity("user", "bob")
            assert state.exists
            assert state.existence.dots("") == {created[0].dot}
            assert c.replica(region).lookup("username", "bob") == ["bob"]

    run(tmp_path, ("eu", "us"), body)


def test_deleting_a_user_removes_the_memberships_its_replica_saw_only(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "carol", person("carol")))
        for group_id in ("g1", "g2"):
            await c.write("eu", commands.create("group", group_id, {"name": group_id}))
        [seen] = await c.write("eu", raw_add("g1", "carol"))
        await c.sync_all_until_quiet()
        c.cut("eu", "us")
        deleted = await c.write("eu", commands.delete("user", "carol", None))
        removes = [e for e in deleted if e.op is Op.REMOVE]
        assert [(e.stream, e.observed) for e in removes] == [("group/g1", frozenset({seen.dot}))]
        [concurrent] = await c.write("us", commands.add_member("g2", "carol"))
        c.heal()
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert views["members"] == {"g2": {"carol": [str(concurrent.dot)]}}
        for region in ("eu", "us"):
            replica = c.replica(region)
            assert not replica.entity("user", "carol").exists
            assert replica.members("g1", after="", limit=10) == []
            assert replica.groups_of("carol") == ["g2"]

    run(tmp_path, ("eu", "us"), body)


def test_one_email_claimed_in_two_regions_is_reported_as_a_conflict(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        c.cut("eu", "us")
        shared = {"name": "Pat", "email": "pat@example.org"}
        await c.write("eu", commands.create("user", "pat-eu", {**shared, "username": "pat1"}))
        await c.write("us", commands.create("user", "pat-us", {**shared, "username": "pat2"}))
        c.heal()
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert views["conflicts"] == [("email", "pat@example.org", ["pat-eu", "pat-us"])]
        for region in ("eu", "us"):
            assert c.replica(region).lookup("email", "PAT@example.org") == ["pat-eu", "pat-us"]

    run(tmp_path, ("eu", "us"), body)


@pytest.mark.parametrize("deleted_is_later", [True, False])
def test_an_id_created_in_two_regions_and_deleted_in_one_shows_the_survivor_alone(
    tmp_path: Path, deleted_is_later: bool
) -> None:
    """A client's own id created in eu and in us while they are cut off; eu edits its
    user (an email, an API key) and deletes it, having seen its own create alone. After
    the heal, us's create stands (add wins) and every region shows what us's life wrote,
    nothing of eu's: the deleted account's email and API key do not surface in us's
    user. Its history says why each of eu's writes is gone."""

    async def body(c: Cluster) -> None:
        c.cut("eu", "us")
        c.skew_ms.update({"eu": 5} if deleted_is_later else {"us": 5})
        await c.write(
            "us",
            commands.create(
                "user",
                "alice",
                {"name": "Alice of us", "username": "alice.us", "email": "alice@us.example"},
            ),
        )
        await c.write(
            "eu",
            commands.create(
                "user",
                "alice",
                {"name": "Alice of eu", "username": "alice.eu", "email": "alice@eu.example"},
            ),
        )
        c.advance(10)
        edit = {"email": "alice2@eu.example", "api_key": "eu-secret-key-0001"}
        await c.write("eu", commands.patch("user", "alice", edit, None))
        [delete, *_] = await c.write("eu", commands.delete("user", "alice", None))
        c.heal()
        await c.sync_all_until_quiet()
        for region in ("eu", "us"):
            state = c.replica(region).entity("user", "alice")
            assert state.exists
            assert state.values() == {
                "name": "Alice of us",
                "username": "alice.us",
                "email": "alice@us.example",
            }
        c.assert_converged()
        trail = await c.replica("us").trail("user", "alice")
        assert trail is not None
        entries, _ = trail.page(0, 100)
        eu_writes = [e for e in entries if e["op"] == "set" and e["origin"] == delete.dot.origin]
        assert len(eu_writes) == 5
        for entry in eu_writes:
            assert entry["won"] is False
            assert entry["why"].startswith(f"cleared by the delete {delete.dot} of the create")

    run(tmp_path, ("eu", "us"), body)


def test_an_id_created_in_two_regions_at_once_shows_the_later_create_s_life_alone(
    tmp_path: Path,
) -> None:
    """Two people given one id in eu and us at once: eu's create (the earlier) sets an
    API key and a phone, us's sets neither. Every region shows us's person alone, none
    of eu's writes (they were merged field by field for a while: a review found eu's key
    in us's account). Deleted where it alone was seen, us's life would end and eu's
    show (``..._shows_the_survivor_alone``)."""

    async def body(c: Cluster) -> None:
        c.cut("eu", "us")
        eu_fields = {**person("alice"), "api_key": "eu-secret-key-0001", "profile.phone": "1"}
        await c.write("eu", commands.create("user", "alice", eu_fields))
        c.advance(5)
        us_fields = {"name": "Alice Us", "username": "alice.us", "email": "alice@us.example"}
        [us_create, *_] = await c.write("us", commands.create("user", "alice", us_fields))
        c.heal()
        await c.sync_all_until_quiet()
        for region in ("eu", "us"):
            assert c.replica(region).entity("user", "alice").values() == us_fields
        c.assert_converged()
        entries = history_of(c.replica("eu").stream("user", "alice"))
        eu_writes = [e for e in entries if e["op"] == "set" and e["origin"] != us_create.dot.origin]
        assert {e["why"] for e in eu_writes} == {f"cleared by the later create {us_create.dot}"}

        # A PATCH where both creates are seen is written to the person it showed.
        await c.write("eu", commands.patch("user", "alice", {"profile.city": "Paris"}, None))
        await c.sync_all_until_quiet()
        for region in ("eu", "us"):
            shown = c.replica(region).entity("user", "alice").values()
            assert shown == {**us_fields, "profile.city": "Paris"}

    run(tmp_path, ("eu", "us"), body)


def test_a_write_made_where_both_creates_are_seen_stays_with_the_person_it_was_made_to(
    tmp_path: Path,
) -> None:
    """eu and us create alice at once (us's the later); ap sees both, shows us's person,
    and a client there sets its API key. Then us deletes its alice, having seen its own
    create alone: eu's person stands, and must not get us's person's key (it did while a
    write named every live create: a review)."""

    async def body(c: Cluster) -> None:
        for region in c.regions:
            c.isolate(region)
        eu_fields = {"name": "Alice EU", "username": "alice.eu", "email": "a@eu.example"}
        await c.write("eu", commands.create("user", "alice", eu_fields))
        c.advance(5)
        us_fields = {"name": "Alice US", "username": "alice.us", "email": "a@us.example"}
        [us_create, *_] = await c.write("us", commands.create("user", "alice", us_fields))
        for a, b in (("us", "ap"), ("eu", "ap")):  # ap hears us, then eu; us hears no one
            c.links[(a, b)].cut = c.links[(b, a)].cut = False
            await c.sync_all_until_quiet()
            c.cut(a, b)
        assert c.replica("ap").entity("user", "alice").values() == us_fields
        key = {"api_key": "us-person-secret-01"}
        [written] = await c.write("ap", commands.patch("user", "alice", key, None))
        assert written.lives == {us_create.dot}  # the person it showed, alone
        await c.write("us", commands.delete("user", "alice", None))
        c.heal()
        await c.sync_all_until_quiet()
        for region in ("eu", "us", "ap"):
            assert c.replica(region).entity("user", "alice").values() == eu_fields, region
        c.assert_converged()

    run(tmp_path, ("eu", "us", "ap"), body)
