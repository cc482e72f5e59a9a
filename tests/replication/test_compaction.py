"""Compaction at the causally stable point: after churn and a full sync, member slices
shed their tombstones (or go), what clients read does not change, and later concurrent
writes converge alike on compacted and uncompacted replicas."""

from __future__ import annotations

from pathlib import Path

from node import commands
from tests.replication.cluster import Cluster, person, raw_add, run

REGIONS = ("ap", "eu", "us")
USERS = tuple(f"u{n}" for n in range(5))


def members_db(c: Cluster, region: str) -> tuple[int, int]:
    """How many member slices ``region`` stores, and their bytes."""
    with c.replica(region).kv.read() as txn:
        stored = [len(key) + len(value) for key, value in txn.scan("members")]
    return len(stored), sum(stored)


async def churn(c: Cluster, rounds: int) -> None:
    for n in range(rounds):
        region = REGIONS[n % len(REGIONS)]
        user_id = USERS[n % len(USERS)]
        await c.write(region, raw_add("staff", user_id))
        await c.write(region, commands.remove_member("staff", user_id))
        if n % 4 == 3:
            await c.sync_all_until_quiet()
        c.advance(7)


def test_compaction_sheds_stable_tombstones_and_changes_no_view(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("group", "staff", {"name": "Staff"}))
        for user_id in USERS:
            await c.write("eu", commands.create("user", user_id, person(user_id)))
        await c.sync_all_until_quiet()
        await churn(c, rounds=40)
        for user_id in USERS[:2]:  # two end up members
            await c.write("us", raw_add("staff", user_id))
        await c.sync_all_until_quiet()

        before = {region: c.views_of(region) for region in REGIONS}
        assert before["eu"]["members"].keys() == {"staff"}
        assert sorted(before["eu"]["members"]["staff"]) == ["u0", "u1"]
        stored = {region: members_db(c, region) for region in REGIONS}
        for region in REGIONS:
            stable = c.replicator(region).stable()
            assert stable is not None
            assert stable == c.replica(region).summary

        for region in ("eu", "us"):  # ap stays uncompacted
            assert await c.replicator(region).compact() > 0
            keys, size = members_db(c, region)
            assert keys == 2 < stored[region][0]  # the slices of removed members went
            assert size < stored[region][1] // 2
            assert await c.replicator(region).compact() == 0  # nothing left to shed
        assert members_db(c, "ap") == stored["ap"]
        for region in REGIONS:
            assert c.views_of(region) == before[region]
        c.assert_converged()

        # Concurrent writes after compaction, each region cut off from the others.
        for region in REGIONS:
            c.isolate(region)
        await c.write("eu", commands.remove_member("staff", "u0"))  # a compacted slice
        await c.write("us", raw_add("staff", "u0"))  # concurrent: add wins
        await c.write("ap", commands.remove_member("staff", "u1"))  # ap uncompacted
        await c.write("eu", raw_add("staff", "u2"))  # a member whose slice was dropped
        await c.write("us", commands.remove_member("staff", "u2"))  # saw nothing: no-op
        await c.write("ap", commands.delete("user", "u3", None))
        c.heal()
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert sorted(views["members"]["staff"]) == ["u0", "u2"]
        assert not views["entities"]["user/u3"]["exists"]

        await churn(c, rounds=12)  # and churn again, compacting everywhere
        await c.sync_all_until_quiet()
        settled = c.assert_converged()
        for region in REGIONS:
            await c.replicator(region).compact()
        assert c.assert_converged() == settled

    run(tmp_path, REGIONS, body)


def test_nothing_is_compacted_before_every_peer_is_known(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("group", "staff", {"name": "Staff"}))
        await c.write("eu", commands.create("user", "u0", person("u0")))
        await c.write("eu", raw_add("staff", "u0"))
        await c.write("eu", commands.remove_member("staff", "u0"))
        assert await c.sync("eu", "us")  # ap has never been heard from
        assert c.replicator("eu").stable() is None
        stored = members_db(c, "eu")
        assert await c.replicator("eu").compact() == 0
        assert members_db(c, "eu") == stored

    run(tmp_path, REGIONS, body)
