"""The single writer: concurrent requests share one durable LMDB commit (group commit).

Requests queue up while a commit is in flight; the writer thread takes all that are
waiting (up to ``batch_requests_max``), runs them in one write transaction, commits
(fsync), and only then resolves their futures on the event loop: a write is
acknowledged only once it is durable. A local write is a *decision* that reads the
transaction and returns drafts; the writer stamps them with this replica's next dots
and clock inside the commit, so a rejected request consumes no dot and the replica's
own counters never have gaps. Ingested events (from peers) pass the same path.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from crdt import Dot, HybridLogicalClock
from crdt.clock import STAMP_MAX
from node import log, views
from node.events import Event, Op, Value, validate
from node.kv import KV, ReadTxn, StorageFailed, WriteTxn
from node.log import LogState

logger = logging.getLogger(__name__)

BATCH_REQUESTS_MAX = 512
QUEUE_REQUESTS_MAX = 10_000
# While commits fail (the storage refuses them), one log line at most this often.
STORAGE_FAILURE_LOG_INTERVAL_S = 10.0
# How long after the last refusal a commit that goes through ends the failing state: on
# a full disk, a small commit finds a freed page now and then, between refusals.
STORAGE_FAILING_QUIET_S = 5.0


class Rejected(Exception):
    """A decision refused the request; nothing of it is written. Carries the HTTP answer."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class Overloaded(Exception):
    """The write queue is full: the client should back off and retry."""


@dataclass(frozen=True, slots=True)
class Draft:
    """An event before the writer gives it a dot and a stamp."""

    stream: str
    op: Op
    field: str | None = None
    value: Value = None
    observed: frozenset[Dot] = frozenset()
    # The greatest stamp of what it observed: it is stamped after it, even where that
    # stamp is ahead of this node's clock (beyond the drift it follows), so that a write
    # made knowing a value never loses to it.
    after: int = 0
    # set: the creates it is written under (``Event.lives``); ``new_life``: under the
    # create drafted before it in the same decision, whose dot the writer gives.
    lives: frozenset[Dot] = frozenset()
    new_life: bool = False


Decide = Callable[[ReadTxn], list[Draft]]
# Run in the same commit after a decision's events are appended, with them and their
# seqs: what a decision records beside its events (``commands.delete_group``).
Then = Callable[[WriteTxn, list[tuple[int, Event]]], None]


@dataclass
class Committed:
    """What one commit appended, handed to listeners after it is durable."""

    events: list[tuple[int, Event]]
    state: LogState
    drifted: int = 0
    # Renewals of the replica id (``Writer.renew``): the old id, and its highest counter
    # found beyond the log.
    renewed: list[tuple[str, int]] = field(default_factory=list)
    # Counters moved past a claim instead (``Writer.renew``, after a renewal this run).
    skipped: list[tuple[str, int]] = field(default_factory=list)
    # Events put in quarantine (a format this node cannot read), and taken out of it.
    quarantined: list[Dot] = field(default_factory=list)
    released: int = 0


Maintain = Callable[[WriteTxn, LogState], None]


@dataclass
class Failing:
    """Commits the storage refuses since the last that went through (``StorageFailed``)."""

    error: str  # the latest refusal
    full: bool  # the latest: the file could not grow
    since_s: float  # the first refusal, wall clock
    commits: int = 0
    requests: int = 0
    last_s: float = 0.0  # monotonic: the latest refusal
    went_through: bool = False  # a commit went through since the latest refusal


@dataclass
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Event]]
    decide: Decide | None = None
    actor: str = ""
    incoming: list[Event] = field(default_factory=list)
    quarantined: Sequence[tuple[Dot, bytes]] = ()
    released: Sequence[Dot] = ()
    validated: bool = False  # every incoming event has passed ``validate`` already
    maintain: Maintain | None = None
    then: Then | None = None


_STOP = object()
_GENERATIONS = itertools.count(1)  # shared by every writer of the process


class Writer:
    def __init__(
        self,
        kv: KV,
        state: LogState,
        clock: HybridLogicalClock,
        *,
        on_commit: Callable[[Committed], None],
        batch_requests_max: int = BATCH_REQUESTS_MAX,
        queue_requests_max: int = QUEUE_REQUESTS_MAX,
        threaded: bool = True,
        incarnations: Callable[[], str | None] = lambda: None,
        on_fatal: Callable[[StorageFailed], None] = lambda refused: None,
    ) -> None:
        """``threaded=False`` commits each request in the caller's thread, one by one: for
        simulations, which run one action at a time and gain nothing from a hand-off.
        ``incarnations``: the incarnation of each renewal (``renew``), or None for a
        random one; simulations choose them, so that a seed's run is the same each time."""
        assert batch_requests_max >= 1
        self.kv, self.clock = kv, clock
        self.incarnations = incarnations
        self.committed = state
        self.on_commit = on_commit
        self.batch_requests_max = batch_requests_max
        # A SimpleQueue (C, no condition variables in Python): a hand-off costs a third of
        # a Queue's on each side. Its bound is checked before each put, by the node's one
        # event loop, so no other put comes in between.
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self.queue_requests_max = queue_requests_max
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)
        self.commits = 0
        # Which commit the views are at: a number no other commit of any writer in this
        # process takes, 0 while a commit is under way. Read before a read of the views,
        # it tells a cache of what was read (``api._RENDERED``) that no commit has changed
        # them since, if it is still this and not 0.
        self.generation = next(_GENERATIONS)
        self.requests = 0
        # Times this node's own events came back beyond its counter, or a peer's summary
        # showed them (``Replicator``): its last commits were undone. Each renewed its id.
        self.undone_found = 0
        # Times a peer showed this node's id beyond its counter after it had renewed in
        # this run: its counter moved past them (``renew``).
        self.claims_skipped = 0
        self.stamped_past_clock = 0  # events stamped after what they observed (``Draft``)
        # Whether field writes name the creates they are written under (event format 2);
        # not while a rolling upgrade from the version before goes on (``previous_format``).
        self.name_lives = True
        self._renewed: list[tuple[str, int]] = []  # in the commit under way
        self._skipped: list[tuple[str, int]] = []  # likewise
        self._quarantined: list[Dot] = []  # likewise
        self._released = 0  # likewise
        # Commits the storage refused: every one ever, and those since the last success.
        self.storage_failures = 0
        self.failing: Failing | None = None
        # The writer's thread refuses and succeeds; the loop reads (``storage_failing``).
        self._failing_lock = threading.Lock()
        self._refusal_logged_s = -math.inf  # monotonic: when a line last said so
        # Set once the storage refuses everything until it is opened again (LMDB gave up
        # on it): ``on_fatal`` is called once, and the node stops so that a start opens it.
        self.fatal: StorageFailed | None = None
        self.on_fatal = on_fatal
        self.threaded = threaded
        if threaded:
            self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def write(self, decide: Decide, *, actor: str, then: Then | None = None) -> list[Event]:
        """Run ``decide`` and commit its drafts (and ``then``, in the same commit); raise
        ``Rejected`` if it refused."""
        request = _Request(asyncio.get_running_loop(), _future(), decide, actor, then=then)
        return await self._submit(request)

    async def ingest(
        self,
        incoming: list[Event],
        *,
        quarantined: Sequence[tuple[Dot, bytes]] = (),
        released: Sequence[Dot] = (),
        validated: bool = False,
    ) -> list[Event]:
        """Append (idempotently) and fold events from peers; return those that were new.

        ``quarantined`` events (a format this node cannot read) are kept aside, and
        ``released`` ones (now readable, among ``incoming``) leave the quarantine.
        ``validated``: the caller decoded every event with ``events.decode``, which
        validates, so they are not validated a second time.
        """
        request = _Request(
            asyncio.get_running_loop(),
            _future(),
            incoming=incoming,
            quarantined=quarantined,
            released=released,
            validated=validated,
        )
        return await self._submit(request)

    async def maintain(self, work: Maintain) -> None:
        """Run ``work`` in a commit of its own turn (e.g. compaction); it writes no events."""
        await self._submit(_Request(asyncio.get_running_loop(), _future(), maintain=work))

    async def _submit(self, request: _Request) -> list[Event]:
        if not self.threaded:
            self._commit([request])
            return await request.future
        if self._queue.qsize() >= self.queue_requests_max:
            raise Overloaded
        self._queue.put(request)
        return await request.future

    def stop(self) -> None:
        """Drain every queued request, then end the thread."""
        if self.threaded:
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[_Request] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    assert isinstance(item, _Request)
                    batch.append(item)
                if stopping or len(batch) >= self.batch_requests_max:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        bulk = any(request.incoming for request in batch)
        # No generation while the commit is under way: its changes show in LMDB as it
        # commits, before this thread runs again, and a read then must not take what it
        # kept as current. A new one once it is over (failed too), before anything of it
        # is published (its state, its answers).
        self.generation = 0
        try:
            with gc_paused() if bulk else nullcontext():
                outcomes, committed = self.kv.write(lambda txn: self._apply(txn, batch))
        except StorageFailed as refused:
            # Not the requests' doing: each alone would be refused the same way.
            self.generation = next(_GENERATIONS)
            self._storage_refused(refused, len(batch))
            _settle([(request, refused) for request in batch])
            return
        except Exception as exc:
            self.generation = next(_GENERATIONS)
            if len(batch) == 1:
                logger.exception("write failed")
                _settle([(batch[0], exc)])
                return
            logger.warning("batch of %d failed (%s); retrying one by one", len(batch), exc)
            failed = True
        else:
            self.generation = next(_GENERATIONS)
            failed = False
        if failed:  # out of the handler: a retry that fails too logs its own error alone
            for request in batch:
                self._commit([request])
            return
        if self.failing is not None:
            with self._failing_lock:
                if self.failing is not None:
                    self.failing.went_through = True
            self.storage_failing()  # over, if the last refusal is old enough
        self.committed = committed.state
        self.commits += 1
        self.requests += len(batch)
        for old, highest in committed.renewed:  # once committed: an _apply may run again
            self.undone_found += 1
            logger.warning(
                "this node's events are known up to %s:%d, beyond its log: its last commits "
                "were undone (a copy restored, a snapshot rolled back); it serves as a new "
                "incarnation, %s, so that no dot of %s is used twice (its events that peers "
                "hold come back from them)",
                old,
                highest,
                committed.state.replica_id,
                old,
            )
        for replica_id, highest in committed.skipped:
            self.claims_skipped += 1
            logger.error(
                "a peer holds events of this node's id %s up to counter %d, beyond its own, "
                "though the node renewed its id in this run: a faulty peer, or a copy of this "
                "node running elsewhere; its counter moves past them (no dot is used twice "
                "here) and they are taken as any peer's events",
                replica_id,
                highest,
            )
        try:
            self.on_commit(committed)
        except Exception:  # durable all the same: its requests are answered, not left hanging
            logger.exception("publishing a commit failed")
        _settle(list(zip(batch, outcomes, strict=True)))

    def storage_quiet(self) -> bool:
        """Whether commits are being refused, none was tried since the last refusal, and
        that was ``STORAGE_FAILING_QUIET_S`` ago: a commit that tries the storage again
        (``probe_storage``) can tell whether it takes commits again, on an idle node too."""
        failing = self.failing
        return (
            failing is not None
            and not failing.went_through
            and time.monotonic() - failing.last_s >= STORAGE_FAILING_QUIET_S
        )

    async def probe_storage(self) -> None:
        """A small commit (the time of the probe, in meta), to see whether the storage
        takes commits again; refused, it is counted like any other."""
        stamp = str(time.time()).encode()
        await self.maintain(lambda txn, state: txn.put("meta", b"storage_probe", stamp))

    def storage_failing(self) -> Failing | None:
        """Commits the storage refuses (``Failing``), or None: none since a commit went
        through, the last refusal ``STORAGE_FAILING_QUIET_S`` ago or more (on a full
        disk, commits that go through and refusals alternate)."""
        with self._failing_lock:
            failing = self.failing
            if failing is None or not failing.went_through:
                return failing
            if time.monotonic() - failing.last_s < STORAGE_FAILING_QUIET_S:
                return failing
            self.failing = None
            self._refusal_logged_s = -math.inf  # the next refusal starts a new story
        logger.warning(
            "commits go through again, after %d refused by the storage (%d requests)",
            failing.commits,
            failing.requests,
        )
        return None

    def _storage_refused(self, refused: StorageFailed, requests: int) -> None:
        """Count a commit the storage refused, and say so (at most once a while)."""
        self.storage_failures += 1
        now = time.monotonic()
        with self._failing_lock:
            failing = self.failing
            if failing is None:
                failing = self.failing = Failing(str(refused), refused.full, time.time())
            failing.error, failing.full, failing.last_s = str(refused), refused.full, now
            failing.went_through = False
            failing.commits += 1
            failing.requests += requests
        if refused.fatal and self.fatal is None:
            self.fatal = refused
            logger.critical(
                "the storage refuses every transaction until it is opened again (%s): "
                "the node stops, to be started again",
                refused,
            )
            self.on_fatal(refused)
        if now - self._refusal_logged_s >= STORAGE_FAILURE_LOG_INTERVAL_S:
            self._refusal_logged_s = now
            logger.error(
                "the storage refused a commit (%s): nothing of it is written, its %d "
                "requests are refused (%d commits refused since the first, some may have "
                "gone through between them); commits go on being tried",
                refused,
                requests,
                failing.commits,
            )

    def _apply(
        self, txn: WriteTxn, batch: list[_Request]
    ) -> tuple[list[list[Event] | Exception], Committed]:
        state = self.committed.copy()
        self._renewed, self._skipped, self._quarantined, self._released = [], [], [], 0
        appended: list[tuple[int, Event]] = []
        outcomes: list[list[Event] | Exception] = []
        drifted = 0
        # Entity views folded in this commit, stored once each at the end; a decision
        # reads them through the pending states, maintenance after a flush.
        pending = views.Pending()
        for request in batch:
            if request.maintain is not None:
                pending.flush(txn)
                request.maintain(txn, state)
                outcomes.append([])
                continue
            if request.decide is None:
                new, n_drifted = self._ingest(txn, state, request, appended, pending)
                drifted += n_drifted
                outcomes.append(new)
                continue
            try:
                drafts = request.decide(views.PendingReads(txn, pending))
            except Rejected as rejection:
                outcomes.append(rejection)
                continue
            written = []
            first = len(appended)
            least = 0  # a request's events in the order it drafted them
            created: dict[str, Dot] = {}  # stream -> the create drafted for it here
            for draft in drafts:
                state.counter += 1
                stamp = self.clock.tick()
                if stamp <= draft.after or stamp <= least:
                    # Past the clock, for this event alone: the clock does not follow it.
                    # (Never past the greatest stamp: a peer's event stamped there ties.)
                    stamp = min(max(draft.after, least) + 1, STAMP_MAX)
                    self.stamped_past_clock += 1
                least = stamp
                dot = Dot(state.replica_id, state.counter)
                if draft.op is Op.CREATE:
                    created[draft.stream] = dot
                event = Event(
                    dot,
                    stamp,
                    draft.stream,
                    draft.op,
                    draft.field,
                    draft.value,
                    draft.observed,
                    request.actor,
                    frozenset()
                    if not self.name_lives
                    else frozenset((created[draft.stream],))
                    if draft.new_life
                    else draft.lives,
                )
                self._append(txn, state, event, appended, pending)
                written.append(event)
            if request.then is not None:
                request.then(txn, appended[first:])
            outcomes.append(written)
        pending.flush(txn)
        log.save_state(txn, state)
        return outcomes, Committed(
            appended,
            state,
            drifted,
            self._renewed,
            self._skipped,
            self._quarantined,
            self._released,
        )

    def _ingest(
        self,
        txn: WriteTxn,
        state: LogState,
        request: _Request,
        appended: list[tuple[int, Event]],
        pending: views.Pending,
    ) -> tuple[list[Event], int]:
        if not request.validated:
            for event in request.incoming:
                validate(event)  # the whole batch is refused before anything of it is put
        for dot, data in request.quarantined:
            if dot not in state.summary and log.quarantine(txn, dot, data):
                self._quarantined.append(dot)
        for dot in request.released:
            if txn.get("quarantine", log.dot_key(dot)) is not None:
                txn.delete("quarantine", log.dot_key(dot))
                self._released += 1
        fresh = log.append_all(txn, state, request.incoming, validated=True)
        for _, event in fresh:
            views.apply(txn, event, pending)  # folds read no table the appends wrote
        appended.extend(fresh)
        new = [event for _, event in fresh]
        drifted = self.clock.observe_all([event.hlc for event in new])
        state.hlc = max(state.hlc, self.clock.last)
        # Our own events came back beyond our counter: our last commits were undone.
        highest = state.summary.highest(state.replica_id)
        if highest > state.counter:
            self.renew(txn, state, highest)
        return new, drifted

    def renew(self, txn: WriteTxn, state: LogState, highest: int) -> None:
        """Serve as a new incarnation from this commit on (``log.renew``): the node's own
        events are known up to ``highest``, beyond its log. In the writer's thread, in a
        commit (counted and logged once it is committed).

        Once it has renewed in this run, a claim of its new id's events beyond its
        counter is no undone commit (the new id's commits cannot have been undone while it
        runs): a faulty or forged peer's, or a copy of this node running elsewhere. The
        counter moves past it then, so that no write here takes a dot a peer holds, and
        the claimed events are taken as any peer's: every region holds the same. (They
        were refused, which stopped replication to this node for good while its next
        write took the claimed dot: a review.) Not a renewal each time: each would add an
        origin to every summary and token."""
        if self.undone_found or self._renewed:
            state.counter = highest
            self._skipped.append((state.replica_id, highest))
            return
        old = log.renew(txn, state, incarnation=self.incarnations())
        self._renewed.append((old, highest))

    def _append(
        self,
        txn: WriteTxn,
        state: LogState,
        event: Event,
        appended: list[tuple[int, Event]],
        pending: views.Pending,
    ) -> None:
        seq = log.append(txn, state, event)
        if seq is not None:
            views.apply(txn, event, pending)
            appended.append((seq, event))
        state.hlc = max(state.hlc, self.clock.last)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for a bulk fold (an ingested batch, a rebuild).

    Folding allocates a great many short-lived objects, which reference counting frees;
    the collector would only scan the survivors again and again (a quarter of a rebuild's
    time). Nothing a fold makes is cyclic, so nothing waits on the collector meanwhile.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _future() -> asyncio.Future[list[Event]]:
    return asyncio.get_running_loop().create_future()


def call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    """Run ``callback`` in ``loop`` soon, from any thread: from another (the writer's
    thread) the loop is woken up; from the loop's own (an inline writer) it needs not
    be, and waking it would cost a write and a read of its self-pipe."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.call_soon(callback)
        return
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        # The loop closed while the commit was under way (the node stopped): no one is
        # left to answer, and the commit stands. The writer must go on to drain the rest.
        if not loop.is_closed():
            raise


Outcome = list[Event] | BaseException


def _settle(outcomes: list[tuple[_Request, Outcome]]) -> None:
    """Answer each request with its outcome: one wake-up of each loop per commit, not
    one per request (each costs a write to the loop's self-pipe)."""
    per_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Outcome]]] = {}
    for request, outcome in outcomes:
        per_loop.setdefault(request.loop, []).append((request, outcome))
    for loop, settled in per_loop.items():
        call_soon(loop, functools.partial(_resolve, settled))


def _resolve(settled: list[tuple[_Request, Outcome]]) -> None:
    for request, outcome in settled:
        if request.future.done():
            continue  # the client went away
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)
