"""Nodes away and back: a peer cut off while thousands of events are written elsewhere
(bounded push queues, capped backoff, paged catch-up), a brand-new node bootstrapping
from an existing cluster, and a node whose data directory was lost."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, cast

import pytest

from crdt import Dot, VersionVector
from node import commands, log
from node.events import Event, Op, stream_of
from node.kv import StorageFailed
from node.lmdb_kv import LmdbKV
from node.replica import Replica
from node.writer import Decide, Draft
from replication import protocol
from replication.protocol import Sync, Tag
from replication.replicator import Limits
from tests.replication.cluster import Cluster, person, run

HOUR_MS = 3_600_000


def bulk_users(prefix: str, count: int) -> Decide:
    """``count`` users in one commit: a create and a name each (two events per user)."""

    def decide(_: object) -> list[Draft]:
        drafts = []
        for n in range(count):
            stream = stream_of("user", f"{prefix}-{n}")
            drafts.append(Draft(stream, Op.CREATE))
            drafts.append(Draft(stream, Op.SET, "name", f"{prefix} number {n}"))
        return drafts

    return decide


def dots(events: list[Event]) -> set[Dot]:
    return {e.dot for e in events}


def test_a_peer_away_for_long_catches_up_in_pages_with_bounded_queues(tmp_path: Path) -> None:
    limits = Limits(
        push_queue_events_max=100,
        batch_bytes_max=16 * 1024,
        backoff_max_ms=30_000,
        gossip_interval_ms=HOUR_MS,
        compaction_interval_ms=HOUR_MS,
    )

    async def body(c: Cluster) -> None:
        for region in c.regions:
            c.start(region)
        await c.settle()
        c.isolate("ap")
        acked: set[Dot] = set()
        queue_lengths: list[int] = []
        for step in range(64):
            region = ("eu", "us")[step % 2]
            # Most commits fit the push queue; one in eight is larger than it can ever hold.
            users = 75 if step % 16 >= 14 else 25
            acked |= dots(await c.write(region, bulk_users(f"{region}{step}", users)))
            queue_lengths += [
                p["push_queue_events"]
                for r in ("eu", "us")
                for p in c.replicator(r).status()["peers"]
            ]
            c.advance(5_000)  # 64 steps: more than five minutes away
            if step % 4 == 3:  # otherwise commits pile up while pushes are in flight
                await c.settle()
        await c.settle()
        assert len(acked) == 2 * (56 * 25 + 8 * 75) == 4_000
        assert max(queue_lengths) <= limits.push_queue_events_max
        for region in ("eu", "us"):
            replicator = c.replicator(region)
            assert replicator.pushes_dropped > 0
            away = replicator.peers["ap"]
            assert away.failures >= 5
            # Retries are spaced by the capped backoff, not made for every commit.
            attempts = c.links[(region, "ap")].attempts
            assert 5 <= attempts <= 20, attempts
            assert away.next_attempt_ms - c.now_ms[0] < 1.5 * limits.backoff_max_ms
        # What a push dropped, the next push's second round or an anti-entropy round carries.
        assert await c.sync("eu", "us")
        assert c.replica("eu").summary == c.replica("us").summary
        assert c.replica("ap").state.seq == 0

        c.heal()
        c.advance(2 * limits.backoff_max_ms)
        peers = c.replicator("ap").peers
        rounds_before = {name: p.rounds for name, p in peers.items()}
        chosen = await c.replicator("ap").anti_entropy_once()
        assert chosen is not None
        pages = peers[chosen].rounds - rounds_before[chosen]
        assert pages >= 10, f"{pages} round trips for 4000 events at 16 KiB a batch"
        assert c.links[("ap", chosen)].answer_event_bytes_max <= limits.batch_bytes_max
        ap = c.replica("ap")
        assert all(d in ap.summary for d in acked)
        await c.settle()
        await c.sync_all_until_quiet()
        c.assert_converged()

    run(tmp_path, ("ap", "eu", "us"), body, limits=limits)


def test_a_new_node_bootstraps_from_the_cluster_before_serving(tmp_path: Path) -> None:
    limits = Limits(
        batch_bytes_max=64 * 1024, gossip_interval_ms=HOUR_MS, compaction_interval_ms=HOUR_MS
    )

    async def body(c: Cluster) -> None:
        acked: set[Dot] = set()
        for step in range(10):
            region = ("eu", "us")[step % 2]
            acked |= dots(await c.write(region, bulk_users(f"{region}{step}", 150)))
        await c.write("eu", commands.create("group", "all", {"name": "All"}))
        await c.write("eu", commands.add_member("all", "eu0-0"))
        assert await c.sync("eu", "us")
        await c.restart("ap", wipe=True)  # a fresh data directory: a brand-new node
        ap = c.replica("ap")
        assert ap.state.seq == 0
        assert ap.not_ready is None

        c.start("ap")
        assert ap.not_ready == "bootstrapping from peers"
        assert c.replicator("ap").status()["bootstrap"]["active"] is True
        await c.settle()  # its first gossip round runs at once and pages everything in
        assert ap.not_ready is None
        status = c.replicator("ap").status()
        assert status["bootstrap"] == {"active": False, "events_received": len(acked) + 2 + 1}
        # From one peer at a time: each event came once, not once from each peer.
        sent = [c.replicator(peer).peers["ap"].events_sent for peer in ("eu", "us")]
        assert sum(sent) == len(acked) + 2 + 1, sent
        assert all(d in ap.summary for d in acked)
        c.assert_converged()

    run(tmp_path, ("ap", "eu", "us"), body, limits=limits)


def test_a_bootstrap_mark_the_storage_refused_is_tried_again(tmp_path: Path) -> None:
    """A new node whose first commit of its bootstrap, the mark, the storage refuses (a
    full disk) tries it again with the next batch it is sent, once the storage takes
    commits: waiting on the refused one refused every batch for good (found by a
    review: the node served an empty store after the bootstrap wait, and never caught
    up). Nor is it blamed on the peer."""
    limits = Limits(gossip_interval_ms=HOUR_MS, compaction_interval_ms=HOUR_MS)

    async def body(c: Cluster) -> None:
        acked = dots(await c.write("eu", bulk_users("eu", 50)))
        await c.restart("ap", wipe=True)
        writer = c.replica("ap").writer
        maintain = writer.maintain
        refused: list[Any] = []

        async def refuse_the_first(work: Any) -> None:
            if not refused:  # the storage full for this commit alone
                refused.append(work)
                raise StorageFailed("mdb_txn_commit: No space left on device", full=True)
            await maintain(work)

        writer.maintain = refuse_the_first  # type: ignore[method-assign]
        c.replicator("ap").gate_clients()  # the mark: refused
        await asyncio.sleep(0)
        assert refused
        assert not await c.replicator("ap").sync_with("eu")  # the batch waits on the mark
        assert c.replicator("ap").peers["eu"].failures == 0  # no fault of eu's
        assert await c.replicator("ap").sync_with("eu")  # the mark again, then the batch
        ap = c.replica("ap")
        assert all(d in ap.summary for d in acked)
        assert ap.not_ready is None
        c.assert_converged()

    run(tmp_path, ("ap", "eu"), body, limits=limits)


def test_a_node_stopped_part_way_through_its_bootstrap_bootstraps_again_when_it_starts(
    tmp_path: Path,
) -> None:
    """A node killed while it pulls the history holds part of it: started again, it
    must not serve that part as the whole (a lookup would miss users, a create would
    take an id that is taken), so it waits again until it has caught up; once it has,
    it serves at once whenever it starts."""
    limits = Limits(
        batch_events_max=100,
        gossip_interval_ms=HOUR_MS,
        compaction_interval_ms=HOUR_MS,
        bootstrap_wait_ms_max=HOUR_MS,
    )

    async def body(c: Cluster) -> None:
        acked = dots(await c.write("eu", bulk_users("eu", 300)))
        await c.restart("ap", wipe=True)
        c.isolate("ap")
        c.start("ap")  # its first round finds no peer; it backs off in virtual time
        await c.settle()
        c.heal()
        assert await c.replicator("ap").sync_with("eu", rounds_max=1)  # one page of 100
        ap = c.replica("ap")
        assert 0 < ap.state.seq < len(acked)
        await c.restart("ap")  # as after kill -9: every commit so far is on disk

        c.start("ap")
        assert c.replica("ap").not_ready == "bootstrapping from peers"
        await c.settle()
        assert c.replica("ap").not_ready is None
        assert all(d in c.replica("ap").summary for d in acked)
        await c.restart("ap")
        c.start("ap")
        assert c.replica("ap").not_ready is None  # caught up: nothing to wait for
        c.assert_converged()

    run(tmp_path, ("ap", "eu"), body, limits=limits)


def test_a_bootstrap_whose_wait_ran_out_is_over_once_the_node_catches_up(tmp_path: Path) -> None:
    """A node that found no peer serves once the bootstrap wait runs out, holding less
    than the whole history; once a sync catches it up, the bootstrap is over for good:
    started again (while its peers are away, say), it serves at once."""
    limits = Limits(bootstrap_wait_ms_max=300, gossip_interval_ms=HOUR_MS)

    async def body(c: Cluster) -> None:
        await c.write("us", bulk_users("us", 20))
        c.isolate("eu")
        c.start("eu")
        await c.settle()
        await asyncio.sleep(0.6)
        assert c.replica("eu").not_ready is None  # the wait ran out: serving
        c.heal()
        assert await c.sync("eu", "us")
        c.assert_converged()
        await c.restart("eu")
        c.isolate("eu")
        c.start("eu")
        assert c.replica("eu").not_ready is None

    run(tmp_path, ("eu", "us"), body, limits=limits)


def test_a_node_that_reaches_no_peer_serves_after_the_bootstrap_wait(tmp_path: Path) -> None:
    limits = Limits(bootstrap_wait_ms_max=300, gossip_interval_ms=HOUR_MS)

    async def body(c: Cluster) -> None:
        c.isolate("eu")
        c.start("eu")
        assert c.replica("eu").not_ready is not None
        await c.settle()
        assert c.replica("eu").not_ready is not None  # no peer answered
        await asyncio.sleep(0.6)
        assert c.replica("eu").not_ready is None

    run(tmp_path, ("eu", "us"), body, limits=limits)


def test_a_wiped_node_returns_as_a_new_incarnation_and_catches_up(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", bulk_users("eu", 200))
        await c.write("us", bulk_users("us", 50))
        await c.write("eu", commands.create("group", "g", {"name": "G"}))
        await c.sync_all_until_quiet()
        await c.write("us", commands.add_member("g", "eu-1"))
        await c.sync_all_until_quiet()
        old = c.replica("eu")
        old_id, old_counter = old.identity.replica_id, old.state.counter
        views = c.views_of("us")

        await c.restart("eu", wipe=True)
        eu = c.replica("eu")
        assert eu.identity.replica_id != old_id
        assert eu.identity.region == "eu"
        assert eu.state.seq == 0

        # The peer starts the exchange: what it knew of the old incarnation must not make
        # it believe the new one already holds those events.
        assert await c.sync("us", "eu")
        assert eu.summary == c.replica("us").summary
        assert eu.summary.contiguous(old_id) == old_counter
        assert c.views_of("eu") == views
        lag = [p for p in c.replicator("us").status()["peers"] if p["name"] == "eu"]
        assert lag[0]["events_lacking"] == 0
        assert lag[0]["replica_id"] == eu.identity.replica_id

        written = await c.write("eu", commands.create("user", "fresh", person("fresh")))
        assert [e.dot for e in written] == [Dot(eu.identity.replica_id, n) for n in (1, 2, 3, 4)]
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert views["entities"]["user/fresh"]["exists"]

    run(tmp_path, ("eu", "us"), body)


def test_status_of_a_wiped_peer_counts_what_it_lacks(tmp_path: Path) -> None:
    """Found writing these tests: a peer's summary was merged across incarnations, so the
    wiped node looked caught up (0 events lacking) and its peers pushed it nothing."""

    async def body(c: Cluster) -> None:
        await c.write("us", bulk_users("us", 30))
        await c.sync_all_until_quiet()
        await c.restart("eu", wipe=True)
        eu_id = c.replica("eu").identity.replica_id
        hello = Sync(Tag.SYNC_REQUEST, eu_id, VersionVector())
        answer = await c.replicator("us").handle(protocol.encode(hello))
        page = protocol.decode(answer, expect=Tag.SYNC_RESPONSE)
        assert page.more
        assert len(page.events) == 10
        [lag] = [p for p in c.replicator("us").status()["peers"] if p["name"] == "eu"]
        assert lag["replica_id"] == eu_id
        # The page may be lost on its way: until eu's next request says it holds those
        # 10, us counts all 60 as lacking and nothing of it as stable.
        assert lag["events_lacking"] == 60
        assert c.replicator("us").stable() == VersionVector()

    run(tmp_path, ("eu", "us"), body, limits=Limits(batch_events_max=10))


def test_after_an_os_restart_a_node_without_metasync_comes_back_as_a_new_incarnation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without metasync an OS crash may undo a node's last commit after a peer got it;
    a node that then wrote under those dots would never converge with that peer (it
    did, writing before its first sync). Started on another boot than its last run
    without metasync, it serves as a new incarnation: writes at once take new dots,
    and the undone events come back from the peer as any other origin's."""
    boot = [b"boot-1"]
    monkeypatch.setattr(log, "current_boot", lambda: boot[0])
    opened = Replica.open.__func__  # type: ignore[attr-defined]

    def without_metasync(cls: type[Replica], *args: Any, **options: Any) -> Replica:
        return cast(Replica, opened(cls, *args, metasync=False, **options))

    monkeypatch.setattr(Replica, "open", classmethod(without_metasync))

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "homer", person("homer")))
        await c.sync_all_until_quiet()
        old_id = c.replica("eu").identity.replica_id
        await c.shut("eu")
        shutil.copytree(c.root / "eu", tmp_path / "before-the-crash")
        _as_if_it_died_running(tmp_path / "before-the-crash", b"boot-1")
        c.open("eu")
        (undone,) = await c.write("eu", commands.patch("user", "homer", {"name": "W1"}, None))
        assert await c.sync("eu", "us")  # us holds the commit the crash undoes
        await c.shut("eu")
        shutil.rmtree(c.root / "eu")
        shutil.copytree(tmp_path / "before-the-crash", c.root / "eu")
        boot[0] = b"boot-2"  # the machine restarted
        eu = c.open("eu").replica
        assert eu.identity.replica_id != old_id
        assert eu.identity.region == "eu"
        assert undone.dot not in eu.summary
        c.advance(1_000)  # the reboot took a while: W2 is stamped after W1
        (later,) = await c.write("eu", commands.patch("user", "homer", {"name": "W2"}, None))
        assert later.dot == Dot(eu.identity.replica_id, 1)  # before any sync
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert undone.dot in eu.summary
        assert views["entities"]["user/homer"]["fields"]["name"] == "W2"
        await c.restart("eu")  # the same boot: the same incarnation
        assert c.replica("eu").identity == eu.identity
        boot[0] = b"boot-3"  # after a clean stop (all synced), another boot changes nothing
        await c.restart("eu")
        assert c.replica("eu").identity == eu.identity

    run(tmp_path, ("eu", "us"), body)


def _as_if_it_died_running(data_dir: Path, boot: bytes) -> None:
    """What a node without metasync leaves on disk when it does not stop cleanly: the
    mark of the boot it ran on (a clean stop syncs, then clears it)."""
    kv = LmdbKV(data_dir)
    kv.write(lambda txn: txn.put("meta", log.UNSYNCED_BOOT_KEY, boot))
    kv.close()


def test_a_node_put_back_to_a_snapshot_of_its_disk_comes_back_as_a_new_incarnation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtual machine's disk restored from a snapshot taken while the node ran, and
    booted: its last commits are undone though it ran with metasync, and us holds one of
    them. Its last run did not stop cleanly, on another boot: it serves as a new
    incarnation from its start, before it hears from any peer (cut off here, for longer
    than writes wait at start), so a write at once takes a new dot. (It took the undone
    write's dot, us dropped it as known, and the regions never converged.)"""
    boot = [b"boot-1"]
    monkeypatch.setattr(log, "current_boot", lambda: boot[0])

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "homer", person("homer")))
        await c.sync_all_until_quiet()
        eu = c.replica("eu")
        old_id = eu.identity.replica_id
        (tmp_path / "snapshot").mkdir()
        eu.kv.env.copy(str(tmp_path / "snapshot"))  # type: ignore[attr-defined]
        (undone,) = await c.write("eu", commands.patch("user", "homer", {"name": "W1"}, None))
        assert await c.sync("eu", "us")
        await c.shut("eu")
        shutil.rmtree(c.root / "eu")
        shutil.copytree(tmp_path / "snapshot", c.root / "eu")
        boot[0] = b"boot-2"  # the machine booted from the restored disk
        c.isolate("eu")
        eu = c.open("eu").replica
        assert eu.identity.replica_id != old_id
        assert undone.dot not in eu.summary
        c.advance(1_000)
        (later,) = await c.write("eu", commands.patch("user", "homer", {"name": "W2"}, None))
        assert later.dot == Dot(eu.identity.replica_id, 1)
        c.heal()
        await c.sync_all_until_quiet()
        views = c.assert_converged()
        assert undone.dot in eu.summary
        assert views["entities"]["user/homer"]["fields"]["name"] == "W2"

    run(tmp_path, ("eu", "us"), body)


def test_a_node_keeps_its_incarnation_across_clean_restarts_and_crashes_on_one_boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    boot = [b"boot-1"]
    monkeypatch.setattr(log, "current_boot", lambda: boot[0])

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "homer", person("homer")))
        before = c.replica("eu").identity
        boot[0] = b"boot-2"
        await c.restart("eu")  # a clean stop, then another boot: nothing was undone
        assert c.replica("eu").identity == before
        await c.shut("eu")
        _as_if_it_died_running(c.root / "eu", b"boot-2")  # kill -9: the same boot
        c.open("eu")
        assert c.replica("eu").identity == before

    run(tmp_path, ("eu", "us"), body)
