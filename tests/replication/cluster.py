"""An in-process cluster for replication tests: real nodes, a controlled network, virtual time.

Each node is a real ``Replica`` on LMDB in its own temporary directory and a real
``Replicator``; nodes reach each other through one ``MemoryTransport`` each, whose
handlers pass through directed links the test controls. A request from ``a`` to ``b``
travels link ``a->b`` and its answer travels ``b->a``: cutting ``a->b`` fails the request
before ``b`` sees it, cutting ``b->a`` loses the answer after ``b`` acted on it (the nastier
half of a partition). A link can also deliver every request twice, and deliveries can yield
to the loop a seeded number of times first, so that concurrent pushes reorder.

Time is a virtual clock (``now_ms``, a one-element list the test advances, plus a per-node
skew) shared by each node's hybrid logical clock and its replicator (backoff, lag), and
every replicator draws its jitter from a seeded ``random.Random``: a run replays exactly.
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from crdt import VersionVector
from node import log, views
from node.counter_record import CounterRecord
from node.events import Event, Op, Value, stream_of
from node.replica import Replica
from node.writer import Decide, Draft
from replication import protocol
from replication.protocol import Tag
from replication.replicator import Limits, Replicator
from replication.transport import Handler, MemoryTransport, TransportError

NOW_MS = 1_700_000_000_000
SYNC_ROUNDS_MAX = 8
SETTLE_WAIT_S_MAX = 20.0
# Databases that hold the query views; the log's own tables are compared by summary.
INDEX_DBS = ("user_groups", "unique_email", "unique_username", "idx_search")


@dataclass
class Link:
    """One direction between two nodes."""

    cut: bool = False
    duplicate: bool = False
    attempts: int = 0  # requests sent into it, delivered or not
    requests: int = 0  # requests that crossed it and reached the handler
    answer_event_bytes_max: int = 0  # the most event bytes one answer carried back


@dataclass
class Node:
    region: str
    path: Path
    replica: Replica
    replicator: Replicator
    transport: MemoryTransport
    started: bool = False


@dataclass
class Cluster:
    """Use as ``async with Cluster(tmp_path, ["eu", "us"]) as c:``; every replica is closed
    on the way out, whatever happened inside."""

    root: Path
    regions: Sequence[str]
    limits: Limits = field(default_factory=Limits)
    seed: int = 0
    reorder_yields_max: int = 0
    now_ms: list[int] = field(default_factory=lambda: [NOW_MS])
    skew_ms: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    links: dict[tuple[str, str], Link] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert len(set(self.regions)) == len(self.regions) >= 1
        self.rng = random.Random(self.seed)
        self.busy = 0  # pushes and gossip rounds of started nodes, running now
        self.links = {(a, b): Link() for a in self.regions for b in self.regions if a != b}

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Cluster:
        try:
            for region in self.regions:
                self.open(region)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def time_of(self, region: str) -> int:
        return self.now_ms[0] + self.skew_ms.get(region, 0)

    def advance(self, ms: int) -> None:
        assert ms >= 0, "virtual time never goes back"
        self.now_ms[0] += ms

    def run_dir(self, region: str) -> Path:
        """Where ``region``'s machine keeps its counter record (``node.counter_record``)."""
        return self.root / f"{region}.run"

    def open(self, region: str) -> Node:
        """Open (or reopen) ``region``'s node from its data directory, bound to this loop."""
        assert region in self.regions
        assert region not in self.nodes

        def clock() -> int:
            return self.time_of(region)

        path = self.root / region
        # Each node a machine of its own, its counter record in its own run directory.
        record = CounterRecord(self.run_dir(region), log.current_boot() or b"boot")
        replica = Replica.open(path, region, now_ms=clock, counter_record=record)
        try:
            replica.bind(asyncio.get_running_loop())
            peers = [p for p in self.regions if p != region]
            transport = MemoryTransport()
            for peer in peers:
                transport.handlers[peer] = self._deliverer(region, peer)
            replicator = Replicator(
                replica,
                transport,
                peers,
                limits=self.limits,
                now_ms=clock,
                rng=random.Random(f"{self.seed}/{region}/{replica.identity.replica_id}"),
            )
        except BaseException:
            replica.close()
            raise
        node = Node(region, path, replica, replicator, transport)
        self.nodes[region] = node
        return node

    def start(self, region: str) -> None:
        """Run the replicator's background tasks (eager push, gossip, compaction).

        Its pushes and gossip rounds are counted while they run, so ``settle`` can wait
        for them without guessing how long they take.
        """
        node = self.nodes[region]
        replicator = node.replicator
        push, gossip = replicator.push, replicator.anti_entropy_with

        async def counted_push(name: str) -> None:
            self.busy += 1
            try:
                await push(name)
            finally:
                self.busy -= 1

        async def counted_gossip(name: str) -> bool:
            self.busy += 1
            try:
                return await gossip(name)
            finally:
                self.busy -= 1

        replicator.push = counted_push  # type: ignore[method-assign]
        replicator.anti_entropy_with = counted_gossip  # type: ignore[method-assign]
        replicator.start()
        node.started = True

    async def settle(self, *, wait_s_max: float = SETTLE_WAIT_S_MAX) -> None:
        """Wait until no started node has a push queued or a push or gossip round running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s_max
        while True:
            await asyncio.sleep(0)
            queued = sum(
                p["push_queue_events"]
                for node in self.nodes.values()
                if node.started
                for p in node.replicator.status()["peers"]
            )
            if not queued and not self.busy:
                return
            assert loop.time() < deadline, f"still busy after {wait_s_max} s"
            await asyncio.sleep(0.001)

    async def shut(self, region: str) -> None:
        """Stop ``region``'s node and close its replica; its peers now find it unreachable."""
        node = self.nodes.pop(region)
        try:
            if node.started:
                await node.replicator.stop()
        finally:
            node.replica.close()

    async def restart(self, region: str, *, wipe: bool = False) -> Node:
        """Close and reopen ``region``; ``wipe`` loses its data directory first."""
        await self.shut(region)
        if wipe:
            shutil.rmtree(self.root / region)
        return self.open(region)

    async def close(self) -> None:
        errors: list[BaseException] = []
        for region in list(self.nodes):
            try:
                await self.shut(region)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- the network -------------------------------------------------------------

    def _deliverer(self, sender: str, receiver: str) -> Handler:
        async def deliver(body: bytes) -> bytes:
            there, back = self.links[(sender, receiver)], self.links[(receiver, sender)]
            there.attempts += 1
            target = self.nodes.get(receiver)
            if there.cut or target is None:
                raise TransportError(f"{sender}->{receiver} is cut")
            for _ in range(self.rng.randint(0, self.reorder_yields_max)):
                await asyncio.sleep(0)
            there.requests += 1
            answer = await target.replicator.handle(body)
            if there.duplicate:
                there.requests += 1
                answer = await target.replicator.handle(body)
            if back.cut:
                raise TransportError(f"{receiver}->{sender} is cut: the answer was lost")
            carried = protocol.decode(answer, expect=Tag.SYNC_RESPONSE).event_bytes()
            there.answer_event_bytes_max = max(there.answer_event_bytes_max, carried)
            return answer

        return deliver

    def cut(self, a: str, b: str, *, both: bool = True) -> None:
        self.links[(a, b)].cut = True
        if both:
            self.links[(b, a)].cut = True

    def isolate(self, region: str) -> None:
        for other in self.regions:
            if other != region:
                self.cut(region, other)

    def heal(self) -> None:
        for link in self.links.values():
            link.cut = False
            link.duplicate = False

    def connected(self, a: str, b: str) -> bool:
        return (
            a in self.nodes
            and b in self.nodes
            and not self.links[(a, b)].cut
            and not self.links[(b, a)].cut
        )

    # -- driving -----------------------------------------------------------------

    def replica(self, region: str) -> Replica:
        return self.nodes[region].replica

    def replicator(self, region: str) -> Replicator:
        return self.nodes[region].replicator

    async def write(self, region: str, decide: Decide, *, actor: str = "test") -> list[Event]:
        return await self.replica(region).write(decide, actor=actor)

    async def sync(self, a: str, b: str) -> bool:
        """One anti-entropy exchange started by ``a`` with ``b`` (paged to the end)."""
        return await self.replicator(a).sync_with(b)

    def summaries(self) -> dict[str, VersionVector]:
        return {region: node.replica.summary for region, node in self.nodes.items()}

    async def sync_all_until_quiet(
        self, *, rounds_max: int = SYNC_ROUNDS_MAX, concurrent: bool = False
    ) -> int:
        """Sync every connected ordered pair, round after round, until a round changes no
        summary; return the rounds it took. Fails if that takes more than ``rounds_max``.
        ``concurrent`` runs a round's exchanges at once, so their deliveries interleave."""
        for rounds in range(1, rounds_max + 1):
            before = self.summaries()
            pairs = [
                (a, b)
                for a in sorted(self.nodes)
                for b in sorted(self.nodes)
                if a != b and self.connected(a, b)
            ]
            if concurrent:
                done = await asyncio.gather(*(self.sync(a, b) for a, b in pairs))
            else:
                done = [await self.sync(a, b) for a, b in pairs]
            assert all(done), f"some syncs failed: {list(zip(pairs, done, strict=True))}"
            if self.summaries() == before:
                return rounds
        raise AssertionError(f"still not quiet after {rounds_max} rounds")

    # -- observing ---------------------------------------------------------------

    def views_of(self, region: str) -> dict[str, Any]:
        """A canonical dump of everything a client can read from ``region``'s views.

        Member slices appear as their live elements and those elements' add dots only:
        compaction may legitimately rewrite what a slice remembers of removed dots.
        """
        replica = self.replica(region)
        with replica.kv.read() as txn:
            entities = {}
            for key, _ in txn.scan("views"):
                state = views.entity(txn, key.decode())
                entities[key.decode()] = {
                    "exists": state.exists,
                    "fields": dict(sorted(state.values().items())),
                    "etag": state.etag,
                }
            members: dict[str, dict[str, list[str]]] = {}
            for key, _ in txn.scan("members"):
                group_id, _, user_id = key.decode().partition("\0")
                dots = views.member_slice(txn, group_id, user_id).dots(user_id)
                if dots:
                    members.setdefault(group_id, {})[user_id] = sorted(str(d) for d in dots)
            for group_id, live in members.items():
                assert sorted(live) == list(views.members(txn, group_id)), "members() disagrees"
            indexes = {  # keys, and the holders under a unique value's key
                db: [(k + b" -> " + v if v else k).decode() for k, v in txn.scan(db)]
                for db in INDEX_DBS
            }
            conflicts = sorted(views.conflicts(txn))
        return {
            "entities": entities,
            "members": members,
            **indexes,
            "conflicts": conflicts,
        }

    def assert_converged(self, regions: Iterable[str] | None = None) -> dict[str, Any]:
        """Every named (default: every open) node has the same summary and the same views;
        return those views."""
        chosen = sorted(self.nodes if regions is None else regions)
        first = chosen[0]
        expected = self.views_of(first)
        for region in chosen[1:]:
            assert self.replica(region).summary == self.replica(first).summary, (
                f"{region} and {first} hold different events"
            )
            assert self.views_of(region) == expected, f"{region}'s views differ from {first}'s"
        return expected


def run(
    root: Path,
    regions: Sequence[str],
    body: Callable[[Cluster], Awaitable[None]],
    *,
    limits: Limits | None = None,
    seed: int = 0,
    reorder_yields_max: int = 0,
) -> None:
    """Run ``body`` against a fresh cluster in its own event loop (the tests are sync)."""

    async def main() -> None:
        cluster = Cluster(
            root,
            regions,
            limits=Limits() if limits is None else limits,
            seed=seed,
            reorder_yields_max=reorder_yields_max,
        )
        async with cluster:
            await body(cluster)

    asyncio.run(main())


def person(user_id: str) -> dict[str, Value]:
    """Fields for a new user, unique per id."""
    return {"name": user_id.title(), "username": user_id, "email": f"{user_id}@example.org"}


def raw_add(group_id: str, user_id: str) -> Decide:
    """A fresh add of ``user_id``, whether or not it is a member already (what a client's
    PUT does in some region while a remove happens elsewhere)."""

    def decide(_: object) -> list[Draft]:
        return [Draft(stream_of("group", group_id), Op.ADD, "members", user_id)]

    return decide
