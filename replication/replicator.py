"""Anti-entropy between one node and its peers, over any transport.

Three ways events move, all through the same round trip and the same writer path:
- **eager push**: each durable local commit is queued (bounded) for every peer and
  sent at once, so lag is a round trip when the network is up;
- **anti-entropy**: every ``gossip_interval_ms`` each reachable peer is synced from
  summaries, repairing whatever a push lost; paged until both sides caught up;
- **serving**: a peer's request is ingested, and answered with what the peer lacks.
What a node sends a peer is what the peer last showed it lacks, less what is on its way
to it already; relays of other origins' events wait for a fresh answer (``request_for``).
The stable point (the meet of every summary) bounds what compaction may drop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from crdt import Dot, OriginSeen, VersionVector
from crdt.clock import physical_ms
from node import events as ev
from node import views
from node.audit import iso_of
from node.kv import StorageFailed, WriteTxn
from node.log import LogState
from node.pacing import Slices, run_paced, run_through
from node.replica import Replica
from node.writer import Committed, Overloaded, call_soon
from replication import protocol
from replication.peers import BACKOFF_BASE_MS, BACKOFF_MAX_MS, PeerState
from replication.protocol import BadMessage, RawEvent, Sync, Tag
from replication.transport import Transport, TransportError

logger = logging.getLogger(__name__)
COLLISIONS_LOGGED_EVERY_S = 10.0
FAILURES_WARNED_EVERY = 60  # a peer's failed rounds in a row logged at warning: 1st, 61st, ...


# In ``meta`` while a node bootstraps: set before the first event of the history it pulls
# is ingested, deleted once it has caught up with a peer.
BOOTSTRAP_KEY = b"bootstrapping"


def _mark(txn: WriteTxn, _: LogState) -> None:
    txn.put("meta", BOOTSTRAP_KEY, b"")


def _unmark(txn: WriteTxn, _: LogState) -> None:
    txn.delete("meta", BOOTSTRAP_KEY)


@dataclass(frozen=True, slots=True)
class Limits:
    gossip_interval_ms: int = 500
    batch_bytes_max: int = 1_048_576
    batch_events_max: int = 10_000
    push_queue_events_max: int = 10_000
    sync_rounds_max: int = 1_000
    backoff_base_ms: int = BACKOFF_BASE_MS
    backoff_max_ms: int = BACKOFF_MAX_MS
    bootstrap_wait_ms_max: int = 120_000
    # At start, client writes wait until every peer has answered once, so that our own
    # events newer than our log (a copy restored) that a peer holds renew the replica
    # id (``_renew_if_undone``) before a write takes one of their dots; at most this long.
    start_writes_wait_ms_max: int = 3_000
    compaction_interval_ms: int = 10_000
    requesters_max: int = 64
    # Events we answered a peer with are not pushed to it again for this long: it is
    # likely still ingesting them. If it lost them, its next request asks again.
    answered_hold_ms: int = 2_000


def _not_in(pairs: list[tuple[Dot, bytes]], held: VersionVector) -> list[tuple[Dot, bytes]]:
    return [(dot, data) for dot, data in pairs if dot not in held]


def _raw(pairs: Sequence[tuple[Dot, bytes]]) -> tuple[RawEvent, ...]:
    return tuple(RawEvent(dot, data) for dot, data in pairs)


def _same_event(stored: bytes, sent: bytes) -> bool:
    """Whether two encodings are of one event (one may be of an older format)."""
    try:
        return ev.decode(stored) == ev.decode(sent)
    except ev.InvalidEvent:  # the peer's is no event: not this one
        return False


def _summary_of(events: Sequence[RawEvent]) -> VersionVector:
    return VersionVector.of(e.dot for e in events)


class Replicator:
    def __init__(
        self,
        replica: Replica,
        transport: Transport,
        peers: Sequence[str],
        *,
        limits: Limits = Limits(),
        now_ms: Callable[[], int],
        rng: random.Random | None = None,
    ) -> None:
        self.replica, self.transport, self.limits = replica, transport, limits
        self.now_ms = now_ms
        self.rng = rng or random.Random()
        self.peers = {name: PeerState(name) for name in peers}
        self._queues: dict[str, deque[RawEvent]] = {name: deque() for name in peers}
        self._queued = {name: asyncio.Event() for name in peers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.pushes_dropped = 0
        self.batches_refused = 0
        self.bootstrap_received = 0
        self._misnamed: set[str] = set()  # peers warned of answering as another region
        self.dot_collisions = 0  # events met under a dot of another event here
        self._collision_logged = -COLLISIONS_LOGGED_EVERY_S
        self._compaction_cursor = b""
        # The last whole summary each requester sent or proved (by its check): the base
        # its next changes are read over. And per peer, the last of ours it confirmed,
        # with the replica id we sent it as (the peer keeps it under that id: a renewed
        # one starts whole).
        self._heard: dict[str, VersionVector] = {}
        self._told: dict[str, tuple[str | None, VersionVector]] = {}
        # Per peer, what is on its way to it and its summary may not show yet: what our
        # requests to it carry now, and what we answered it with lately (sent at, dots).
        self._carrying: dict[str, list[VersionVector]] = {name: [] for name in peers}
        self._answered: dict[str, deque[tuple[int, str, VersionVector]]] = {
            name: deque() for name in peers
        }
        self._bootstrapping = asyncio.Lock()
        # The bootstrap's durable mark (see ``start``): being written, and whether it is set.
        self._marking: asyncio.Future[None] | None = None
        self._marked = False
        # Per sender, the whole requests that came in while some are being taken.
        self._whole_arrivals: dict[str, int] = {}
        self._arrivals = 0  # requests taken so far: each one's number, as it arrives
        # Peers that have not yet answered this node since it started (``gate_clients``).
        self._unheard: set[str] = set()
        self._release_timer: asyncio.TimerHandle | None = None
        self._gated = False

    # -- serving a peer ----------------------------------------------------------

    async def handle(self, body: bytes) -> bytes:
        """Answer one sync request. Raises BadMessage (nothing written) or Overloaded."""
        # Numbered as it arrives, before its decode lets others run: a smaller request
        # that came after it may be decoded first, and is still the later one.
        self._arrivals += 1
        arrived = self._arrivals
        request = await run_paced(protocol.decode_slices(body, expect=Tag.SYNC_REQUEST))
        sender = request.replica_id
        assert sender is not None, "decode refuses a request without its sender"
        own = self.replica.identity.replica_id
        if sender == own:
            raise BadMessage("a node does not sync with itself")
        # A whole request replaces what we knew of its sender (``_rebuilt``), unless one
        # that came after it has been taken meanwhile (its ingest took longer): that one
        # is newer, and is only added to.
        arrival = 0
        if request.check is None:
            arrival = arrived
            self._whole_arrivals[sender] = max(self._whole_arrivals.get(sender, 0), arrived)
        received = await self._ingest(await self._batch_of(request, sender))
        latest = arrival > 0 and self._whole_arrivals.get(sender) == arrival
        if latest:
            del self._whole_arrivals[sender]
        theirs = self._rebuilt(sender, request, replace=latest)
        peer = self.peers.get(sender.partition("~")[0])
        # Events it pushed count as received as those of our own requests' answers do (a
        # review's bootstrap said 24,020 received of 56,148 ingested).
        if self.replica.not_ready is not None:
            self.bootstrap_received += received
        if peer is not None:
            peer.events_received += received
            # Unchecked, what the request alone shows is still a lower bound of theirs.
            peer.contacted(
                self.now_ms(),
                sender,
                request.summary if theirs is None else theirs,
                whole=latest,
            )
        if theirs is not None:
            await self._renew_if_undone(theirs)
            if peer is not None:
                self._heard_from(peer.name)
        own = self.replica.identity.replica_id  # renewed, maybe, by this very request
        if theirs is None:
            return protocol.encode(Sync(Tag.SYNC_RESPONSE, own, self._advertised()))
        # Not what the peer holds as far as we know by now (the request may have waited
        # while our pushes to the peer landed), nor what our requests to it carry now.
        holds = theirs if peer is None or peer.summary is None else peer.summary
        # Of its own events, what the request itself shows: a node whose last commits
        # were undone (an OS crash without metasync, a restored backup) gets back those
        # that reached us, and serves as a new incarnation instead of reusing their dots.
        own_seen = theirs.origins.get(sender, OriginSeen())
        pairs, more = await self._missing_paced(
            self._on_the_way(holds, peer, answers=False), sender, own_seen=own_seen
        )
        if peer is not None:
            # What went on its way to the peer while the page was read (a request of
            # ours, as both ends sync each other after a heal) does not go twice.
            gone = self._on_the_way(peer.summary or holds, peer, answers=False)
            pairs = _not_in(pairs, self._lacks(gone, sender, own_seen))
        if peer is not None:
            # Not learned() here: the answer may be lost; the peer's next request says.
            peer.events_sent += len(pairs)
            if pairs:
                answered = VersionVector.of(dot for dot, _ in pairs)
                self._answered_lately(peer.name).append((self.now_ms(), sender, answered))
        checked = request.check is not None
        response = Sync(
            Tag.SYNC_RESPONSE,
            None if checked else own,
            self._advertised(),
            _raw(pairs),
            more,
            base=theirs if checked else None,
        )
        return protocol.encode(response)

    def _on_the_way(
        self, theirs: VersionVector, peer: PeerState | None, *, answers: bool
    ) -> VersionVector:
        """``theirs`` joined with what our requests to ``peer`` carry now, and with what we
        answered it with within ``answered_hold_ms`` if ``answers``."""
        if peer is None:
            return theirs
        for carried in self._carrying[peer.name]:
            theirs = theirs.merge(carried)
        if answers:
            for _, replica_id, answered in self._answered_lately(peer.name):
                if replica_id == peer.replica_id:  # not a lost incarnation's
                    theirs = theirs.merge(answered)
        return theirs

    def _answered_lately(self, name: str) -> deque[tuple[int, str, VersionVector]]:
        """What we answered ``name`` with within ``answered_hold_ms``, and to which of its
        incarnations (older answers are dropped)."""
        answered, since = self._answered[name], self.now_ms() - self.limits.answered_hold_ms
        while answered and answered[0][0] < since:
            answered.popleft()
        return answered

    def _rebuilt(
        self, sender: str, request: protocol.Received, *, replace: bool
    ) -> VersionVector | None:
        """The requester's whole summary, or None if it was sent over a base we lack.
        ``replace``: a whole request, the latest to come, replaces what we heard."""
        heard = self._heard.get(sender)
        if request.check is None:
            theirs = request.summary
        elif heard is None:
            return None
        else:
            theirs = request.over(heard)
            if protocol.digest(self.replica.identity.replica_id, theirs) != request.check:
                return None
        # Merged, not replaced: a late duplicate of an older request takes nothing back.
        # But replaced by a whole one: a requester restored from a copy holds less than it
        # did (a late duplicate of a whole one costs a round trip: the next check fails).
        self._heard.pop(sender, None)
        self._heard[sender] = theirs if heard is None or replace else heard.merge(theirs)
        while len(self._heard) > self.limits.requesters_max:
            del self._heard[next(iter(self._heard))]  # the longest unheard of
        return theirs

    def _advertised(self) -> VersionVector:
        """Our summary plus the dots kept in quarantine: we hold those too. Left out, a
        peer would send them again in every round, ahead of all else, and a page full of
        them would stall anti-entropy."""
        replica = self.replica
        if not replica.quarantine_size:
            return replica.summary
        return replica.summary.merge(replica.quarantine_dots)

    def _missing(
        self,
        theirs: VersionVector,
        peer_id: str | None,
        *,
        own_only: bool = False,
        own_seen: OriginSeen | None = None,
    ) -> tuple[list[tuple[Dot, bytes]], bool]:
        """The events (a page of them) that a peer summarised by ``theirs`` lacks.

        Of the peer's own events: those ``own_seen`` (what its request just showed it
        holds of them) lacks; without it, none. A replica holds its own events unless
        its last commits were undone, and what we know of it may be older than its
        latest writes, which would all be sent back.
        """
        return run_through(self._page(theirs, peer_id, own_only, own_seen))

    async def _missing_paced(
        self,
        theirs: VersionVector,
        peer_id: str | None,
        *,
        own_only: bool = False,
        own_seen: OriginSeen | None = None,
    ) -> tuple[list[tuple[Dot, bytes]], bool]:
        """``_missing``, read in slices between turns of the event loop (a page of a
        catch-up held every request of the node some 17 ms)."""
        return await run_paced(self._page(theirs, peer_id, own_only, own_seen))

    def _page(
        self,
        theirs: VersionVector,
        peer_id: str | None,
        own_only: bool,
        own_seen: OriginSeen | None,
    ) -> Slices[tuple[list[tuple[Dot, bytes]], bool]]:
        return self.replica.missing_slices(
            self._lacks(theirs, peer_id, own_seen),
            self.limits.batch_bytes_max,
            self.limits.batch_events_max,
            self.replica.identity.replica_id if own_only else None,
        )

    def _lacks(
        self, theirs: VersionVector, peer_id: str | None, own_seen: OriginSeen | None
    ) -> VersionVector:
        if peer_id is None:
            return theirs
        if own_seen is None:
            own_seen = OriginSeen(self.replica.summary.highest(peer_id))
        return VersionVector({**theirs.origins, peer_id: own_seen})

    async def _batch_of(self, message: protocol.Received, source: str) -> protocol.Batch:
        """The events of a request or answer we lack, each validated, or ``BadMessage``
        (counted) refusing the batch whole. Read in slices between turns of the event
        loop: a page of 10,000 events takes some 30 ms to decode."""
        try:
            known = self.replica.summary
            batch = await run_paced(protocol.batch_slices(message, known=known))
        except BadMessage:
            self.batches_refused += 1
            raise
        self._compare_again(batch.again, source)
        return batch

    def _compare_again(self, again: list[RawEvent], source: str) -> None:
        """Of events whose dots are here, count and report any that is another event: two
        events under one dot (a faulty or forged peer, or a node's copy writing beside
        it) are never merged, the regions holding either keep it, and their digests
        differ for good while their summaries agree. Found, the operator is told (it
        went unnoticed: a review). Bytes first, decoded only where they differ (an
        event stored in a newer format is the same event)."""
        if not again:
            return
        stored = self.replica.events_bytes_of(raw.dot for raw in again)
        for raw, data in zip(again, stored, strict=True):
            if data is None or data == raw.data or _same_event(data, raw.data):
                continue
            self.dot_collisions += 1
            now = time.monotonic()
            if now - self._collision_logged >= COLLISIONS_LOGGED_EVERY_S:
                self._collision_logged = now
                logger.error(
                    "%s sent an event of dot %s other than this node's event of that dot: "
                    "two events share a dot (a faulty or forged peer, or a copy of a node "
                    "writing beside it); the regions cannot agree on it (dot_collisions in "
                    "/status: %d so far)",
                    source,
                    raw.dot,
                    self.dot_collisions,
                )

    async def _ingest(self, batch: protocol.Batch) -> int:
        quarantined = [(raw.dot, raw.data) for raw in batch.quarantined]
        if not batch.events and not quarantined:
            return 0
        await self._marked_first()
        # read_batch decoded, and so validated, every event
        new = await self.replica.ingest(batch.events, quarantined=quarantined, validated=True)
        return len(new)

    # -- syncing with a peer -----------------------------------------------------

    def request_for(
        self, name: str, push: Sequence[RawEvent] = (), *, answered: bool = False
    ) -> Sync:
        """A request to ``name``: our summary, and ``push`` or what the peer lacks.

        Until the peer has ``answered`` an earlier round of the same sync, only our own
        events are pushed: what we know of the peer may be old, and the other origins
        (or other relays) may have sent it theirs since. Its answer's summary is fresh;
        the next round pushes whatever else it still lacks. Never pushed: what our other
        requests to it carry now, or what we answered it with lately.

        The summary goes as changes over what the peer confirmed our requests showed it,
        when there is such a thing; whole otherwise.
        """
        peer = self.peers[name]
        if not push and peer.summary is not None:
            lacks = self._on_the_way(peer.summary, peer, answers=True)
            pairs, _ = self._missing(lacks, peer.replica_id, own_only=not answered)
            push = _raw(pairs)
        return self._request(name, push)

    async def request_paced(
        self, name: str, push: Sequence[RawEvent] = (), *, answered: bool = False
    ) -> Sync:
        """``request_for``, the events it pushes read in slices between turns of the event
        loop (``Replica.missing_slices``)."""
        peer = self.peers[name]
        if not push and peer.summary is not None:
            lacks = self._on_the_way(peer.summary, peer, answers=True)
            pairs, _ = await self._missing_paced(lacks, peer.replica_id, own_only=not answered)
            # What went on its way to the peer while the page was read (an answer of
            # ours to its own request, as both ends sync each other) does not go twice.
            gone = self._on_the_way(peer.summary, peer, answers=True)
            push = _raw(_not_in(pairs, self._lacks(gone, peer.replica_id, None)))
        return self._request(name, push)

    def _request(self, name: str, push: Sequence[RawEvent]) -> Sync:
        peer = self.peers[name]
        own, told = self.replica.identity.replica_id, self._told.get(name)
        mine, push = self._advertised(), tuple(push)
        if told is None or told[0] != own or peer.replica_id is None:
            return Sync(Tag.SYNC_REQUEST, own, mine, push)
        return Sync(Tag.SYNC_REQUEST, own, mine, push, base=told[1], receiver=peer.replica_id)

    async def absorb(self, name: str, sent: Sync, answer: bytes) -> bool:
        """Take ``name``'s answer to ``sent``; return whether another round is worth it.

        Raises BadMessage (nothing of the answer written) or Overloaded.
        """
        peer = self.peers[name]
        response = await run_paced(protocol.decode_slices(answer, expect=Tag.SYNC_RESPONSE))
        # An answer names its sender, unless our check proved whom we asked: then its
        # summary comes over ours. Named although we sent a check, it could not read ours.
        if response.replica_id is not None:
            replica_id, theirs = response.replica_id, response.summary
            self._check_named(name, replica_id)
        elif sent.receiver is not None:
            replica_id, theirs = sent.receiver, response.over(sent.summary)
        else:
            raise BadMessage("an answer to a whole summary must name its sender")
        unread = sent.receiver is not None and response.replica_id is not None
        batch = await self._batch_of(response, name)
        received = await self._ingest(batch)
        # Events newly kept aside are progress too: the next request advertises them.
        kept = any(raw.dot not in sent.summary for raw in batch.quarantined)
        if unread:
            self._told.pop(name, None)
        else:
            told = self._told.get(name)
            if told is None or told[0] != sent.replica_id:
                self._told[name] = (sent.replica_id, sent.summary)
            else:
                self._told[name] = (told[0], told[1].merge(sent.summary))
        before = peer.summary
        peer.contacted(self.now_ms(), replica_id, theirs)
        peer.learned(_summary_of(sent.events))
        peer.rounds += 1
        peer.events_sent += len(sent.events)
        peer.events_received += received
        if self.replica.not_ready is not None:
            self.bootstrap_received += received
        if unread:
            return True  # it sent nothing it holds: ask again, whole
        await self._renew_if_undone(theirs)
        self._heard_from(name)
        they_lack = bool(self.replica.summary.missing_from(theirs))
        if not response.more and not they_lack:
            if self._marked or self.replica.not_ready is not None:
                await self._caught_up(name)  # serving already if the wait ran out
            return False
        # What is left and made no progress, the peer cannot take (e.g. it quarantines it).
        return received > 0 or kept or before != peer.summary

    def failed(self, name: str, error: str) -> int:
        """Record that a round with ``name`` failed; return the backoff delay in ms."""
        delay = self.peers[name].failed(
            self.now_ms(),
            error,
            self.rng,
            base_ms=self.limits.backoff_base_ms,
            max_ms=self.limits.backoff_max_ms,
        )
        failures = self.peers[name].failures
        # A streak's first failure, and every FAILURES_WARNED_EVERY-th after it, at warning:
        # an operator sees a peer cut off without a line a second (at most) for good.
        level = logging.WARNING if failures % FAILURES_WARNED_EVERY == 1 else logging.DEBUG
        if level == logging.WARNING and failures > 1:
            error = f"{error}; {failures} failures in a row"
        logger.log(level, "sync with %s failed (%s); next try in %d ms", name, error, delay)
        return delay

    async def sync_with(
        self, name: str, push: Sequence[RawEvent] = (), *, rounds_max: int | None = None
    ) -> bool:
        """Round trips with ``name`` until neither side has more; False if it failed."""
        for round_ in range(rounds_max or self.limits.sync_rounds_max):
            request = await self.request_paced(name, push, answered=round_ > 0)
            push = ()
            carried = _summary_of(request.events)
            self._carrying[name].append(carried)
            try:
                answer = await self.transport.send(name, protocol.encode(request))
                if not await self.absorb(name, request, answer):
                    return True
            except (TransportError, BadMessage, Overloaded) as exc:
                self.failed(name, str(exc))
                return False
            except StorageFailed:
                # This node's storage refused what the peer sent (the writer says so):
                # no fault of the peer's. The next round tries again.
                return False
            finally:
                self._carrying[name].remove(carried)
        return True

    def take_push(self, name: str) -> list[RawEvent]:
        """One bounded batch of what is queued for ``name`` (empty if it is backing off)."""
        queue = self._queues[name]
        if not self.peers[name].available(self.now_ms()):
            queue.clear()  # the peer is away: anti-entropy repairs when it is back
            return []
        batch: list[RawEvent] = []
        size = 0
        while queue and len(batch) < self.limits.batch_events_max:
            if batch and size + len(queue[0].data) > self.limits.batch_bytes_max:
                break
            batch.append(queue.popleft())
            size += len(batch[-1].data)
        return batch

    def choose_peer(self) -> str | None:
        """A reachable peer at random (a simulation's gossip tick syncs with one)."""
        now = self.now_ms()
        ready = sorted(n for n, p in self.peers.items() if p.available(now))
        return self.rng.choice(ready) if ready else None

    async def anti_entropy_once(self) -> str | None:
        """Sync with one reachable peer chosen at random; return its name."""
        name = self.choose_peer()
        if name is not None:
            await self.sync_with(name)
        return name

    # -- eager push ----------------------------------------------------------------

    def on_commit(self, committed: Committed) -> None:
        """Writer-thread listener: queue this replica's new events for every peer."""
        own = self.replica.identity.replica_id
        fresh = [RawEvent(e.dot, ev.encode(e)) for _, e in committed.events if e.dot.origin == own]
        if fresh and self._loop is not None and not self._loop.is_closed():
            call_soon(self._loop, lambda: self.enqueue(fresh))

    def enqueue(self, fresh: Sequence[RawEvent]) -> None:
        for name, queue in self._queues.items():
            if len(queue) + len(fresh) > self.limits.push_queue_events_max:
                queue.clear()  # anti-entropy will carry them; memory stays bounded
                self.pushes_dropped += 1
                continue
            queue.extend(fresh)
            self._queued[name].set()

    async def push(self, name: str) -> None:
        """Send what is queued for ``name`` (one bounded batch per round trip)."""
        while batch := self.take_push(name):
            # One round trip a batch: what else either side lacks is anti-entropy's work,
            # or a push relays events the other peers are pushing already.
            await self.sync_with(name, batch, rounds_max=1)

    # -- running ----------------------------------------------------------------

    def gate_clients(self) -> None:
        """What clients wait for before this node serves them: a bootstrap (503 until it
        is done), or every peer's first answer before a write (see below). A node calls
        this as it begins to listen, before anything yields, so that no client comes
        first; ``start`` does if it was not."""
        if self._gated:
            return
        self._gated = True
        self._loop = asyncio.get_running_loop()
        marked = self.replica.kv.get("meta", BOOTSTRAP_KEY) is not None
        if self.peers and (self.replica.state.seq == 0 or marked):
            self.replica.not_ready = "bootstrapping from peers"
            # Marked durably before any of the history is ingested, and unmarked once all
            # of it is: a node stopped part-way (kill -9) holds some of the history, and
            # would otherwise serve it as the whole when it starts again.
            self._marked = True
            if not marked:
                self._marking = asyncio.ensure_future(self.replica.writer.maintain(_mark))
            self._loop.call_later(
                self.limits.bootstrap_wait_ms_max / 1000, self._ready, "bootstrap wait ran out"
            )
        elif self.peers and self.limits.start_writes_wait_ms_max > 0:
            # A node whose last commits were undone (a backup restored without
            # new-incarnation, an OS crash without metasync) would give a client's write
            # the dot of an event a peer holds: that peer would drop the write as known,
            # and the two would never converge. Each peer's first answer (or a request
            # we can read) shows what it holds of ours, and renews our replica id if it
            # is beyond our log (``_renew_if_undone``): writes wait for every peer's, or
            # for the wait to run out (a peer down or cut off).
            self.await_every_peer()
            self.replica.hold_writes(f"until every peer has answered: {', '.join(self.peers)}")
            self._release_timer = self._loop.call_later(
                self.limits.start_writes_wait_ms_max / 1000, self._release_writes
            )

    def start(self) -> None:
        self.gate_clients()
        self.replica.listeners.append(self.on_commit)
        self._tasks = [asyncio.create_task(self._gossip(name)) for name in self.peers]
        self._tasks += [asyncio.create_task(self._pusher(name)) for name in self.peers]
        self._tasks.append(asyncio.create_task(self._compactor()))

    async def _marked_first(self) -> None:
        """The bootstrap's mark goes before any of the history (see ``gate_clients``). A
        mark the storage refused (a full disk) is tried again by the next one to wait
        for it: waiting on the refused one would refuse every batch for good."""
        marking = self._marking
        if marking is None:
            return
        try:
            await marking
        except StorageFailed:
            if self._marking is marking:
                self._marking = asyncio.ensure_future(self.replica.writer.maintain(_mark))
            raise

    async def _caught_up(self, name: str) -> None:
        if self._marked:
            await self._marked_first()
            await self.replica.writer.maintain(_unmark)
            self._marked = False
        self._ready(f"caught up with {name}")

    async def _renew_if_undone(self, theirs: VersionVector) -> None:
        """Serve as a new incarnation, durably, before a write can take a dot of ours
        that a peer holds (``theirs``, its summary) beyond our counter: our last commits
        were undone (a copy restored without new-incarnation, a snapshot rolled back).
        The events themselves come back in later rounds (``handle``), as those of any
        other origin, as many pages as they take."""
        own = self.replica.identity.replica_id
        highest = theirs.highest(own)
        if highest <= self.replica.state.counter:
            return
        writer = self.replica.writer

        def renew(txn: WriteTxn, state: LogState) -> None:
            if state.replica_id == own and highest > state.counter:  # not renewed since
                writer.renew(txn, state, highest)

        await writer.maintain(renew)

    def await_every_peer(self) -> None:
        """Count every peer as not heard from since now (``unheard``): client writes wait
        for them after a start (``gate_clients``; a simulator's own clock ends the wait)."""
        self._unheard = set(self.peers)

    @property
    def unheard(self) -> frozenset[str]:
        """Peers not heard from since the start (while client writes wait for them)."""
        return frozenset(self._unheard)

    def _check_named(self, name: str, replica_id: str) -> None:
        """Warn, once a peer, that the node at ``name``'s URL is another region's (a URL
        pointed at the wrong node: its events still come, but ``name`` lacks its own)."""
        region = replica_id.partition("~")[0]
        if region != name and name not in self._misnamed:
            self._misnamed.add(name)
            logger.warning(
                "the peer configured as %r answers as %s, a node of region %r: check its URL",
                name,
                replica_id,
                region,
            )

    def _heard_from(self, name: str) -> None:
        if name in self._unheard:
            self._unheard.discard(name)
            if not self._unheard:
                self.replica.release_writes()

    def _release_writes(self) -> None:
        if self._unheard:
            logger.warning(
                "client writes taken before %s answered (wait ran out): if this node's last "
                "commits were undone (a backup restored without new-incarnation), a write "
                "may reuse the dot of one of its events a peer holds",
                ", ".join(sorted(self._unheard)),
            )
            self._unheard.clear()
        self.replica.release_writes()

    def _ready(self, why: str) -> None:
        if self.replica.not_ready is not None:
            logger.info("serving clients: %s", why)
            self.replica.not_ready = None

    async def stop(self) -> None:
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._unheard.clear()
        if self.replica.writes_held is not None:  # not let through: a dot may be a peer's
            self.replica.release_writes(refuse="this node is stopping; retry shortly")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()

    async def _gossip(self, name: str) -> None:
        """Anti-entropy with one peer for as long as the node runs: one loop per peer, so
        a long sync with one (say, paging in its partition's writes) delays no other."""
        while True:
            try:
                await self.anti_entropy_with(name)
            except StorageFailed:
                pass  # this node's storage refused a commit: the writer says so, not the peer
            except Exception as exc:
                logger.exception("anti-entropy with %s failed", name)
                self.failed(name, f"{type(exc).__name__}: {exc}")  # backs off, never spins
            jitter = 0.75 + self.rng.random() / 2
            await asyncio.sleep(self.gossip_wait_ms(name, jitter) / 1000)

    async def anti_entropy_with(self, name: str) -> bool:
        """Sync with ``name`` unless it is backing off; return whether a sync ran.

        A node still bootstrapping syncs with one peer at a time: every peer holds the
        whole history it lacks, and pulled from all at once it would come N times over.
        """
        if self.replica.not_ready is None:
            return await self._sync_if_available(name)
        async with self._bootstrapping:
            return await self._sync_if_available(name)

    async def _sync_if_available(self, name: str) -> bool:
        if not self.peers[name].available(self.now_ms()):
            return False
        await self.sync_with(name)
        return True

    def gossip_wait_ms(self, name: str, jitter: float) -> float:
        """How long ``name``'s anti-entropy loop waits before its next sync: an interval
        (times ``jitter``); while the peer is backing off, until its backoff ends, so a
        peer back from a partition is tried then, not up to an interval later."""
        peer = self.peers[name]
        if peer.failures:
            return max(0, peer.next_attempt_ms - self.now_ms())
        return self.limits.gossip_interval_ms * jitter

    async def _pusher(self, name: str) -> None:
        while True:
            await self._queued[name].wait()
            self._queued[name].clear()
            try:
                await self.push(name)
            except StorageFailed:
                pass  # as in _gossip
            except Exception:
                logger.exception("push to %s failed", name)

    async def _compactor(self) -> None:
        while True:
            await asyncio.sleep(self.limits.compaction_interval_ms / 1000)
            try:
                await self.compact()
            except StorageFailed:
                pass  # as in _gossip: the next round compacts
            except Exception:
                logger.exception("compaction failed")

    # -- stability and compaction --------------------------------------------------

    def stable(self) -> VersionVector | None:
        """The causally stable point: what every replica has seen, if all are known."""
        stable = self.replica.summary
        for peer in self.peers.values():
            if peer.summary is None:
                return None
            stable = stable.meet(peer.summary)
        return stable

    async def compact(self) -> int:
        """Drop tombstones below the stable point from the views; return how many."""
        stable = self.stable()
        if stable is None:
            return 0
        changed = 0

        def work(txn: WriteTxn, _: LogState) -> None:
            nonlocal changed
            changed, self._compaction_cursor = views.compact(
                txn, stable, start=self._compaction_cursor
            )

        await self.replica.writer.maintain(work)
        return changed

    # -- observability -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.now_ms()
        mine = self.replica.summary
        peers = []
        for name, peer in sorted(self.peers.items()):
            lacking = lag_s = None
            if peer.summary is not None:
                missing = mine.missing_from(peer.summary)
                lacking = sum(last - first + 1 for rs in missing.values() for first, last in rs)
                oldest = self.replica.oldest_missing_hlc(peer.summary) if lacking else None
                lag_s = 0.0 if oldest is None else max(0.0, (now - physical_ms(oldest)) / 1000)
            peers.append(
                {
                    "name": name,
                    "replica_id": peer.replica_id,
                    "last_contact": None
                    if peer.last_contact_ms is None
                    else iso_of(peer.last_contact_ms << 16),
                    "last_contact_s_ago": None
                    if peer.last_contact_ms is None
                    else (now - peer.last_contact_ms) / 1000,
                    "events_lacking": lacking,
                    "lag_s": lag_s,
                    "failures": peer.failures,
                    "last_error": peer.last_error,
                    "next_attempt_in_ms": max(0, peer.next_attempt_ms - now),
                    "rounds": peer.rounds,
                    "events_sent": peer.events_sent,
                    "events_received": peer.events_received,
                    "push_queue_events": len(self._queues[name]),
                }
            )
        stable = self.stable()
        return {
            "peers": peers,
            "stable": None
            if stable is None
            else {o: s.contiguous for o, s in sorted(stable.origins.items())},
            "bootstrap": {
                "active": self.replica.not_ready is not None,
                "events_received": self.bootstrap_received,
            },
            "pushes_dropped": self.pushes_dropped,
            "batches_refused": self.batches_refused,
            "undone_found": self.replica.writer.undone_found,
            "claims_skipped": self.replica.writer.claims_skipped,
            "dot_collisions": self.dot_collisions,
            "quarantined_events": self.replica.quarantine_count(),
        }
