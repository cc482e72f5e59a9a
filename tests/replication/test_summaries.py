"""Summaries sent as changes: what a round between peers that agree costs, and that every
way a peer can lose the base (restart, new incarnation, a stale check, forgetting) ends
in a whole summary, never in a guess."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from crdt import VersionVector
from crdt.version_vector import OriginSeen
from node import commands
from node import events as ev
from replication import protocol
from replication.protocol import BadMessage, RawEvent, Received, Sync, Tag
from replication.replicator import Limits
from tests.replication.cluster import Cluster, person, run


def capture(c: Cluster, sender: str, receiver: str) -> list[tuple[bytes, bytes]]:
    """Every (request, answer) body ``sender`` exchanges with ``receiver`` from now on."""
    seen: list[tuple[bytes, bytes]] = []
    deliver = c.nodes[sender].transport.handlers[receiver]

    async def recording(body: bytes) -> bytes:
        answer = await deliver(body)
        seen.append((body, answer))
        return answer

    c.nodes[sender].transport.handlers[receiver] = recording
    return seen


def read(exchange: tuple[bytes, bytes]) -> tuple[Received, Received]:
    request, answer = exchange
    return (
        protocol.decode(request, expect=Tag.SYNC_REQUEST),
        protocol.decode(answer, expect=Tag.SYNC_RESPONSE),
    )


async def users(c: Cluster, region: str, *names: str) -> None:
    for name in names:
        await c.write(region, commands.create("user", name, person(name)))


def test_peers_that_agree_exchange_a_check_and_nothing_else(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        for region in c.regions:
            await users(c, region, f"{region}1", f"{region}2")
        await c.sync_all_until_quiet()
        seen = capture(c, "eu", "us")
        assert await c.sync("eu", "us")
        ((request, answer),) = map(read, seen)
        assert request.check is not None
        assert (request.changes, request.events) == ({}, ())
        assert (answer.replica_id, answer.changes, answer.events) == (None, {}, ())
        assert sum(len(body) for body in seen[0]) < 40

    run(tmp_path, ("eu", "us", "ap"), body)


async def renamed(c: Cluster, region: str, user_id: str, name: str) -> RawEvent:
    """One event, as the pusher queues it."""
    (event,) = await c.write(region, commands.patch("user", user_id, {"name": name}, None))
    return RawEvent(event.dot, ev.encode(event))


def test_a_push_sends_no_entry_its_events_already_say(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        await c.sync_all_until_quiet()
        seen = capture(c, "eu", "us")
        eu = c.replicator("eu")
        eu.enqueue([await renamed(c, "eu", "homer", "Homer J.")])
        await eu.push("us")
        ((request, answer),) = map(read, seen)
        assert (request.changes, len(request.events)) == ({}, 1)
        assert (answer.replica_id, answer.changes, answer.events) == (None, {}, ())
        assert c.replica("us").summary == c.replica("eu").summary

    run(tmp_path, ("eu", "us"), body)


def test_a_responder_lists_what_it_holds_less_of_and_is_rebuilt_exactly(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        assert await c.sync("eu", "us")  # and eu now sends changes over what us confirmed
        await users(c, "ap", "ada")
        assert await c.sync("eu", "ap")  # eu now holds ap's events; us holds none
        eu, us = c.replicator("eu"), c.replicator("us")
        # A push alone, without ap's events: over a base, eu lists ap's entry...
        request = eu.request_for("us", [await renamed(c, "eu", "homer", "Homer J.")])
        ap_id = c.replica("ap").identity.replica_id
        assert set(protocol.decode(protocol.encode(request), expect=Tag.SYNC_REQUEST).changes) == {
            ap_id
        }
        # ...and us, holding less of ap than that, lists ap as held not at all.
        answer = await us.handle(protocol.encode(request))
        response = protocol.decode(answer, expect=Tag.SYNC_RESPONSE)
        assert (response.replica_id, response.changes) == (None, {ap_id: OriginSeen()})
        assert await eu.absorb("us", request, answer)  # us still lacks ap's events
        assert eu.peers["us"].summary == c.replica("us").summary
        await c.sync_all_until_quiet()
        c.assert_converged()

    run(tmp_path, ("eu", "us", "ap"), body)


def test_a_responder_that_restarted_answers_whole_and_the_requester_starts_over(
    tmp_path: Path,
) -> None:
    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        await users(c, "us", "bart")
        await c.sync_all_until_quiet()
        await c.restart("us")  # the same incarnation, but it forgot every base
        seen = capture(c, "eu", "us")
        await users(c, "eu", "marge")
        await users(c, "us", "lisa")
        assert await c.sync("eu", "us")
        (checked, unread), (whole, answer) = map(read, seen[:2])
        us_id = c.replica("us").identity.replica_id
        assert checked.check is not None
        assert (unread.replica_id, unread.events) == (us_id, ())  # whole, and pulls nothing
        assert unread.summary == c.replica("us").summary
        assert whole.check is None
        assert answer.replica_id == us_id
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


def test_a_check_made_for_another_receiver_is_not_trusted(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        await c.sync_all_until_quiet()
        eu, us = c.replicator("eu"), c.replicator("us")
        good = eu.request_for("us")
        assert good.receiver == c.replica("us").identity.replica_id
        # What eu would send believing it talks to an older incarnation of us.
        stale = Sync(
            Tag.SYNC_REQUEST,
            good.replica_id,
            good.summary,
            base=good.base,
            receiver="us~0ld0",
        )
        response = protocol.decode(
            await us.handle(protocol.encode(stale)), expect=Tag.SYNC_RESPONSE
        )
        assert response.replica_id == c.replica("us").identity.replica_id
        assert response.summary == c.replica("us").summary
        answer = protocol.decode(await us.handle(protocol.encode(good)), expect=Tag.SYNC_RESPONSE)
        assert answer.replica_id is None

    run(tmp_path, ("eu", "us"), body)


def test_a_late_duplicate_of_an_older_whole_request_costs_one_round_trip(
    tmp_path: Path,
) -> None:
    """A whole request replaces what us heard of eu (a node restored from a copy holds
    less than it did): a late duplicate of an older one takes back what us heard, so eu's
    next request, checked over more, is not read and eu asks again whole; then the checks
    go on. (Merged instead, a restored requester's checks failed every other round for
    as long as the peer ran: found by a review.)"""

    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        await c.sync_all_until_quiet()
        eu, us = c.replicator("eu"), c.replicator("us")
        eu_id = c.replica("eu").identity.replica_id
        older = protocol.encode(Sync(Tag.SYNC_REQUEST, eu_id, c.replica("eu").summary))
        await users(c, "eu", "marge")
        newer = eu.request_for("us")
        assert not await eu.absorb("us", newer, await us.handle(protocol.encode(newer)))
        await us.handle(older)  # whole: what us heard of eu is what it says
        after = eu.request_for("us")
        assert after.receiver is not None  # checked over what eu told us last
        answer = await us.handle(protocol.encode(after))
        assert protocol.decode(answer, expect=Tag.SYNC_RESPONSE).replica_id is not None
        assert await eu.absorb("us", after, answer)  # not read: ask again, whole
        whole = eu.request_for("us")
        assert whole.receiver is None
        assert not await eu.absorb("us", whole, await us.handle(protocol.encode(whole)))
        checked = eu.request_for("us")
        assert checked.receiver is not None
        answer = await us.handle(protocol.encode(checked))
        assert protocol.decode(answer, expect=Tag.SYNC_RESPONSE).replica_id is None  # read

    run(tmp_path, ("eu", "us"), body)


def test_a_whole_request_taken_after_a_newer_one_sets_nothing_back(tmp_path: Path) -> None:
    """Two whole requests from eu: the older carries events, whose ingest takes a while,
    and is taken after the newer. What us knows of eu stays the newer's."""

    async def body(c: Cluster) -> None:
        await users(c, "eu", "homer")
        await c.sync_all_until_quiet()
        eu, us = c.replica("eu"), c.replicator("us")
        marge = await c.write("eu", commands.create("user", "marge", person("marge")))
        older = Sync(  # whole, carrying marge's events, which us lacks
            Tag.SYNC_REQUEST,
            eu.identity.replica_id,
            eu.summary,
            tuple(RawEvent(e.dot, ev.encode(e)) for e in marge),
        )
        await users(c, "eu", "bart")
        newer = Sync(Tag.SYNC_REQUEST, eu.identity.replica_id, eu.summary)
        await asyncio.gather(us.handle(protocol.encode(older)), us.handle(protocol.encode(newer)))
        known = us.peers["eu"].summary
        assert known is not None
        assert known.highest(eu.identity.replica_id) == eu.state.counter  # bart's, the newer's
        assert us._heard[eu.identity.replica_id] == eu.summary

    run(tmp_path, ("eu", "us"), body)


def test_a_requester_restored_from_a_copy_is_read_over_what_it_holds_now(
    tmp_path: Path,
) -> None:
    """us heard eu hold events eu no longer holds (restored from a copy; five of them
    reached no peer at all). eu's first request, whole, replaces what us heard, and so
    does its first under the id it renews when it sees us hold events of its own beyond
    its log: its checked requests are read from then on, none wasted."""

    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "homer", person("homer")))
        assert await c.sync("eu", "us")
        await c.shut("eu")
        shutil.copytree(c.root / "eu", tmp_path / "copy")
        c.open("eu")
        for n in range(40):
            await c.write("eu", commands.patch("user", "homer", {"name": f"W{n}"}, None))
        await c.sync_all_until_quiet()
        eu = c.replica("eu")
        eu_id, held = eu.identity.replica_id, eu.state.counter
        claimed = VersionVector({**eu.summary.origins, eu_id: OriginSeen(held + 5)})
        await c.replicator("us").handle(protocol.encode(Sync(Tag.SYNC_REQUEST, eu_id, claimed)))
        await c.shut("eu")
        shutil.rmtree(c.root / "eu")
        shutil.copytree(tmp_path / "copy", c.root / "eu")
        c.open("eu")
        us = c.replicator("us")
        rebuilt, unread = us._rebuilt, []

        def counted(sender: str, request: Received, *, replace: bool) -> VersionVector | None:
            theirs = rebuilt(sender, request, replace=replace)
            if theirs is None:
                unread.append(request)
            return theirs

        us._rebuilt = counted  # type: ignore[method-assign]
        for _ in range(20):
            await c.sync("eu", "us")
        assert unread == []  # its first request under its renewed id went whole too
        # It writes as a new incarnation: no dot us holds of it, nor claims, is taken.
        assert c.replica("eu").identity.replica_id != eu_id
        assert c.replica("eu").summary.highest(eu_id) == held
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body, limits=Limits(batch_events_max=8))


def test_an_answer_to_a_whole_summary_must_name_its_sender(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        eu = c.replicator("eu")
        whole = eu.request_for("us")
        assert whole.receiver is None
        nameless = Sync(Tag.SYNC_RESPONSE, None, c.replica("us").summary, base=whole.summary)
        with pytest.raises(BadMessage, match="must name its sender"):
            await eu.absorb("us", whole, protocol.encode(nameless))
        assert eu.peers["us"].summary is None

    run(tmp_path, ("eu", "us"), body)


def test_a_node_forgets_all_but_the_latest_requesters_and_still_converges(
    tmp_path: Path,
) -> None:
    async def body(c: Cluster) -> None:
        for round_ in range(3):
            for region in c.regions:
                await users(c, region, f"{region}{round_}")
            await c.sync_all_until_quiet()
            assert all(len(c.replicator(region)._heard) <= 1 for region in c.regions)
        c.assert_converged()

    run(tmp_path, ("eu", "us", "ap"), body, limits=Limits(requesters_max=1))


def test_a_replica_answers_with_its_own_events_first(tmp_path: Path) -> None:
    """What only the answering replica may hold goes first; events of other origins,
    which the requester may be pulling from those origins at the same time, after."""

    async def body(c: Cluster) -> None:
        await users(c, "ap", "ap1", "ap2")
        await c.sync_all_until_quiet()
        await users(c, "eu", "eu1", "eu2")
        eu = c.replica("eu")
        own = eu.identity.replica_id
        pairs, more = eu.read_missing(VersionVector(), bytes_max=1 << 20, events_max=100)
        origins = [dot.origin for dot, _ in pairs]
        assert not more
        assert set(origins) == {own, c.replica("ap").identity.replica_id}
        assert origins == sorted(origins, key=lambda origin: origin != own)  # "ap" < "eu"
        first, _ = eu.read_missing(VersionVector(), bytes_max=1 << 20, events_max=3)
        assert {dot.origin for dot, _ in first} == {own}

    run(tmp_path, ("eu", "ap"), body)
