"""What a node sends a peer is computed from what the peer has shown it holds, less what
is already on its way to it.

After a heal every node syncs with every other at once. Without these rules a node
relays events the peer got from their origin meanwhile, answers with events its own
request to that peer carries, and pushes what it answered the peer with a moment ago
(the convergence benchmark counts the events sent against those needed).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from crdt import VersionVector
from node import commands
from replication import protocol
from replication.protocol import RawEvent, Sync, Tag
from replication.replicator import Limits
from replication.transport import Handler, TransportError
from tests.replication.cluster import Cluster, person, run


def origins(body: bytes, tag: Tag) -> Counter[str]:
    """How many events of each region a request or an answer carries."""
    return Counter(
        raw.dot.origin.partition("~")[0] for raw in protocol.decode(body, expect=tag).events
    )


def record(c: Cluster, sender: str, receiver: str) -> list[tuple[Counter[str], Counter[str]]]:
    """From now on, the regions of the events each exchange ``sender`` starts with
    ``receiver`` carries: (in its request, in the answer)."""
    seen: list[tuple[Counter[str], Counter[str]]] = []
    deliver = c.nodes[sender].transport.handlers[receiver]

    async def recording(body: bytes) -> bytes:
        answer = await deliver(body)
        seen.append((origins(body, Tag.SYNC_REQUEST), origins(answer, Tag.SYNC_RESPONSE)))
        return answer

    c.nodes[sender].transport.handlers[receiver] = recording
    return seen


class Held:
    """From now on, the requests ``sender`` sends ``receiver`` wait on their way until
    ``release`` is set; ``on_its_way`` is set once one has left. The regions of the events
    each request and each answer carried are kept."""

    def __init__(self, c: Cluster, sender: str, receiver: str) -> None:
        self.on_its_way, self.release = asyncio.Event(), asyncio.Event()
        self.requests: list[Counter[str]] = []
        self.answers: list[Counter[str]] = []
        deliver = c.nodes[sender].transport.handlers[receiver]

        async def held(body: bytes) -> bytes:
            self.requests.append(origins(body, Tag.SYNC_REQUEST))
            self.on_its_way.set()
            await self.release.wait()
            answer = await deliver(body)
            self.answers.append(origins(answer, Tag.SYNC_RESPONSE))
            return answer

        c.nodes[sender].transport.handlers[receiver] = held


async def users(c: Cluster, region: str, count: int, *, first: int = 0) -> None:
    for n in range(first, first + count):
        name = f"{region}{n}"
        await c.write(region, commands.create("user", name, person(name)))


def test_others_events_are_relayed_only_once_the_peer_answered_that_it_lacks_them(
    tmp_path: Path,
) -> None:
    async def body(c: Cluster) -> None:
        await c.sync_all_until_quiet()  # every node knows every peer's (empty) summary
        for region in c.regions:
            await users(c, region, 3)  # 12 events each
        assert await c.sync("eu", "ap")  # eu now holds ap's events
        seen = record(c, "eu", "us")

        # The opening request pushes eu's own events only; us's answer shows it lacks
        # ap's, and the next round relays them.
        assert await c.sync("eu", "us")
        assert seen[0] == (Counter(eu=12), Counter(us=12))
        assert seen[1][0] == Counter(ap=12)
        c.assert_converged(["eu", "us"])

        # What eu knows of ap is now old: ap got us's events from their origin since.
        await users(c, "us", 2, first=3)
        assert await c.sync("ap", "us")
        seen = record(c, "eu", "ap")
        assert await c.sync("eu", "ap")
        relayed = sum((request for request, _ in seen), Counter[str]())
        assert relayed["us"] == 0, f"eu relayed us's events that ap held: {seen}"
        c.assert_converged()

    run(tmp_path, ("ap", "eu", "us"), body)


def test_an_answer_leaves_out_what_our_own_request_to_that_peer_carries(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.sync_all_until_quiet()
        await users(c, "eu", 5)  # 20 events
        await users(c, "us", 2)
        # eu's request to us is held on the way while us's request reaches eu.
        held = Held(c, "eu", "us")
        eu_to_us = asyncio.create_task(c.sync("eu", "us"))
        await held.on_its_way.wait()
        assert held.requests[0] == Counter(eu=20)
        answers = record(c, "us", "eu")
        assert await c.sync("us", "eu")
        assert all(answer["eu"] == 0 for _, answer in answers), answers
        held.release.set()
        assert await eu_to_us
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


def test_an_answer_leaves_out_what_the_requester_got_while_its_request_waited(
    tmp_path: Path,
) -> None:
    async def body(c: Cluster) -> None:
        await c.sync_all_until_quiet()
        await users(c, "eu", 5)  # 20 events
        # us's request leaves, and waits on its way to eu (say, behind eu's writer)...
        held = Held(c, "us", "eu")
        us_to_eu = asyncio.create_task(c.sync("us", "eu"))
        await held.on_its_way.wait()
        # ...while eu's own push lands at us: eu's answer must not carry those again.
        assert await c.sync("eu", "us")
        held.release.set()
        assert await us_to_eu
        assert held.answers
        assert all(answer["eu"] == 0 for answer in held.answers), held.answers
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


def test_what_a_node_answered_a_peer_with_it_does_not_push_again_while_held(
    tmp_path: Path,
) -> None:
    async def body(c: Cluster) -> None:
        await c.sync_all_until_quiet()
        await users(c, "eu", 3)  # 12 events
        # us asks eu and gets eu's events; eu heard us's summary from before them.
        assert await c.sync("us", "eu")
        pushed = record(c, "eu", "us")
        assert await c.sync("eu", "us")
        assert all(request["eu"] == 0 for request, _ in pushed), pushed
        c.assert_converged()

        # An answer lost on the way: us asking again gets the events at once; eu pushes
        # them itself only once the hold is over.
        await users(c, "eu", 1, first=3)
        lose_answer(c, "us", "eu")
        assert not await c.sync("us", "eu")
        assert await c.sync("eu", "us")
        assert "eu0" in c.replica("us").entity_ids("user", after="", limit=10)[0]
        assert len(c.replica("us").entity_ids("user", after="", limit=10)[0]) == 3
        c.advance(c.limits.answered_hold_ms + 1)
        c.nodes["us"].replicator.peers["eu"].next_attempt_ms = 0  # its backoff is not tested here
        pushed = record(c, "eu", "us")
        assert await c.sync("eu", "us")
        assert pushed[0][0] == Counter(eu=4)
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)


def lose_answer(c: Cluster, sender: str, receiver: str) -> None:
    """The next answer ``receiver`` gives ``sender`` is lost after ``receiver`` sent it."""
    deliver: Handler = c.nodes[sender].transport.handlers[receiver]

    async def losing(body: bytes) -> bytes:
        await deliver(body)
        c.nodes[sender].transport.handlers[receiver] = deliver
        raise TransportError("the answer was lost")

    c.nodes[sender].transport.handlers[receiver] = losing


def test_a_peer_backing_off_is_synced_again_when_its_backoff_ends(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        replicator = c.replicator("eu")
        interval = c.limits.gossip_interval_ms
        assert replicator.gossip_wait_ms("us", 1.0) == interval
        assert replicator.gossip_wait_ms("us", 1.25) == 1.25 * interval
        c.cut("eu", "us")
        assert not await c.sync("eu", "us")
        backoff = replicator.peers["us"].next_attempt_ms - c.now_ms[0]
        assert 0 < backoff < interval
        assert replicator.gossip_wait_ms("us", 1.25) == backoff  # not an interval later
        assert replicator.gossip_wait_ms("ap", 1.25) == 1.25 * interval  # the others: as ever
        assert not await replicator.anti_entropy_with("us")  # not before its time
        assert c.links[("eu", "us")].attempts == 1
        c.advance(backoff)
        assert replicator.gossip_wait_ms("us", 1.25) == 0
        c.heal()
        assert await replicator.anti_entropy_with("us")
        assert replicator.gossip_wait_ms("us", 1.25) == 1.25 * interval

    run(tmp_path, ("ap", "eu", "us"), body, limits=Limits(gossip_interval_ms=500))


def test_exchanges_that_overlap_send_each_event_once(tmp_path: Path) -> None:
    """Both ends sync each other at once (after a heal): a page is read between turns of
    the event loop, and what went to the peer meanwhile, in an answer of ours to its
    request or in a request of ours, is not sent again (found by a review: a page of
    10,000 events went twice)."""
    sent: Counter[str] = Counter()

    async def body(c: Cluster) -> None:
        await c.sync_all_until_quiet()
        await users(c, "eu", 300)  # 1,200 events of eu: pages read in two slices
        deliver_eu = c.nodes["eu"].transport.handlers["us"]
        deliver_us = c.nodes["us"].transport.handlers["eu"]

        async def eu_to_us(body: bytes) -> bytes:  # eu's requests carry eu's events
            sent["requests"] += len(protocol.decode(body, expect=Tag.SYNC_REQUEST).events)
            return await deliver_eu(body)

        async def us_to_eu(body: bytes) -> bytes:  # and its answers to us's requests
            answer = await deliver_us(body)
            sent["answers"] += len(protocol.decode(answer, expect=Tag.SYNC_RESPONSE).events)
            return answer

        c.nodes["eu"].transport.handlers["us"] = eu_to_us
        c.nodes["us"].transport.handlers["eu"] = us_to_eu
        assert all(await asyncio.gather(c.sync("eu", "us"), c.sync("us", "eu")))
        c.assert_converged()

    run(tmp_path, ("eu", "us"), body)
    assert sum(sent.values()) == 1_200, dict(sent)


def test_of_two_whole_requests_taken_at_once_the_later_is_the_latest(tmp_path: Path) -> None:
    """A large whole request and a smaller one sent after it, taken at once: the smaller
    one is decoded first, yet the later summary is what is kept of its sender (the
    older one replaced it, and the sender's next request, sent over what it told, could
    not be read: a round trip more; found by a review)."""

    async def body(c: Cluster) -> None:
        us, eu = c.replica("us"), c.replicator("eu")
        own = us.identity.replica_id
        await users(c, "us", 500)  # 2,000 events
        older = us.summary
        pairs, _ = c.replicator("us")._missing(VersionVector(), None)
        first = Sync(Tag.SYNC_REQUEST, own, older, tuple(RawEvent(d, b) for d, b in pairs))
        await users(c, "us", 1, first=500)
        newer = us.summary
        fresh = tuple(RawEvent(d, b) for d, b in c.replicator("us")._missing(older, None)[0])
        later = Sync(Tag.SYNC_REQUEST, own, newer, fresh)
        taken = [asyncio.ensure_future(eu.handle(protocol.encode(m))) for m in (first, later)]
        answers = [await t for t in taken]
        assert eu._heard[own] == newer
        assert eu.peers["us"].summary == newer
        theirs = c.replicator("us")
        for sent, answer in zip((first, later), answers, strict=True):
            await theirs.absorb("eu", sent, answer)
        following = theirs.request_for("eu")
        assert following.receiver is not None  # sent over what eu was told
        read = protocol.decode(
            await eu.handle(protocol.encode(following)), expect=Tag.SYNC_RESPONSE
        )
        assert read.replica_id is None  # read over its base: not answered whole

    run(tmp_path, ("eu", "us"), body)
