"""One region's replica: storage, identity, clock and writer, and the queries over them.

The HTTP API and replication talk to this object only. Reads open their own read
transaction and never wait for the writer; writes go through the writer and return
once durable. Commits wake whoever waits for a consistency token or the change feed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crdt import Dot, HybridLogicalClock, ORSet, VersionVector
from crdt import codec as crdt_codec
from crdt.clock import LOGICAL_MASK, make_stamp
from node import commands, log, views
from node.audit import Audits, Trail
from node.counter_record import CounterRecord
from node.events import Event, InvalidEvent, stream_of
from node.events import decode as decode_event
from node.fold import EntityState, decode_state
from node.kv import KV, StorageFailed, WriteTxn
from node.lmdb_kv import MAP_BYTES_INITIAL, LmdbKV
from node.log import Identity, LogState
from node.pacing import Slices, run_through
from node.rebuild import replay_views, replay_workers
from node.replay_workers import ReplayFailed
from node.tokens import Token, covers, encode_token, token_of
from node.writer import Committed, Decide, Overloaded, Rejected, Then, Writer, call_soon


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class At:
    """A point in the past: every event stamped up to ``stamp``, or covered by ``token``."""

    stamp: int | None = None
    token: Token | None = None

    @classmethod
    def time_ms(cls, ms: int) -> At:
        return cls(stamp=make_stamp(ms, LOGICAL_MASK))

    def includes(self, event: Event) -> bool:
        if self.stamp is not None:
            return event.hlc <= self.stamp
        assert self.token is not None
        return event.dot.counter <= self.token.get(event.dot.origin, 0)


logger = logging.getLogger(__name__)
# Who writes the removes a group's delete left when a stop cut it short.
GROUP_DELETE_ACTOR = "replica:group-delete"


@dataclass
class Metrics:
    writes: int = 0
    rejected: int = 0
    events_appended: int = 0
    events_ingested: int = 0
    stamps_drifted: int = 0


# The member slices a page of a group's members steps over at most (see ``members_page``).
MEMBERS_SCAN_MAX = 10_000
LIST_SCAN_MAX = 10_000  # entities a page of a list steps over (then short, with a cursor)
# Events a peer's page is read by between turns of the event loop (``missing_slices``):
# some 1.7 ms of reading on the 2-core machine this project is measured on.
READ_SLICE_EVENTS = 1_000


class Replica:
    def __init__(
        self,
        kv: KV,
        region: str,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        max_drift_ms: int = 60_000,
        batch_requests_max: int = 512,
        queue_requests_max: int = 10_000,
        incarnation: str | None = None,
        incarnations: Callable[[], str | None] = lambda: None,
        threaded_writer: bool = True,
        boot: bytes | None = None,
        counter_record: CounterRecord | None = None,
        previous_format: bool = False,
    ) -> None:
        """``boot`` (``log.current_boot``): the boot this run is on; a node whose last run
        did not stop cleanly and ran on another boot comes back as a new incarnation
        (``log.renew_after_reboot``). No ``boot``: no such check.
        ``counter_record``: this machine's record of how far each replica's counter went
        on this boot (``node.counter_record``); a start below it, or on a copy of a
        replica another process runs as, comes back as a new incarnation. None: no such
        check.
        ``incarnation`` (of a new directory) and ``incarnations`` (of each renewal while it
        runs, ``Writer.renew``): chosen by simulations; otherwise random."""
        self.kv = kv
        self.audits = Audits(kv)  # histories and past states, decoded between turns
        self._finishing: set[str] = set()  # groups whose delete's removes are under way
        # The events kept in quarantine (``log.quarantine``), known here once: a summary
        # advertised to peers counts them as held, in every sync round.
        with kv.read() as txn:
            kept = [dot for dot, _ in log.quarantined(txn)]
        self.quarantine_dots = VersionVector().add_all(kept)
        self.quarantine_size = len(kept)
        # On a known boot: a clean close syncs, and clears the mark of a run under way.
        self._run_marked = boot is not None
        self._closed = False

        self.counter_record = counter_record
        # Why the record made the start serve as a new incarnation (None: it did not).
        behind: str | None = None

        def identities(txn: WriteTxn) -> tuple[Identity, Identity, Identity]:
            # One commit: a start cut short between two would renew twice.
            nonlocal behind
            stored = log.open_identity(txn, region, incarnation=incarnation)
            opened = log.renew_if_backup(txn, stored, incarnation=incarnations())
            serving = opened
            if boot is not None:
                serving = log.renew_after_reboot(
                    txn, opened, boot=boot, incarnation=incarnations(), renewed=opened != stored
                )
            behind = None
            # Claimed whatever else renews the id (a renewal retires it below), but on a
            # backup's first start: its original runs as that id, or will.
            reached = None
            if counter_record is not None and opened == stored:
                reached = counter_record.claim(stored.replica_id)
            if counter_record is not None and serving == stored:
                counter = log.stored_counter(txn)
                if reached is None:
                    behind = f"another process on this machine runs as {stored.replica_id}"
                elif reached > counter:
                    behind = (
                        f"its counter reached {reached} on this boot, and its log holds "
                        f"{counter}: its data directory was put back to an earlier copy"
                    )
                if behind is not None:
                    serving = log.new_incarnation(txn, stored, incarnation=incarnations())
            return stored, opened, serving

        stored, opened, identity = kv.write(identities)
        if counter_record is not None and identity != stored:
            if opened == stored:
                # This directory's copies that still run as the old id, put back later,
                # renew too (a backup's renewal leaves it be: its original runs as it).
                counter_record.retire()
            # The new id's, held from now on: a copy of this directory started beside it
            # before its first commit would otherwise run as it too.
            counter_record.claim(identity.replica_id)
        if behind is not None:
            logger.warning(
                "%s: serving as a new incarnation, %s (was %s), so that no dot is used twice "
                "(its events that peers hold come back from them)",
                behind,
                identity.replica_id,
                stored.replica_id,
            )
        if opened != stored:
            logger.warning(
                "started on a backup of %s: serving as a new incarnation, %s, so that no dot "
                "is used twice (what the backup lacks comes back from the peers)",
                stored.replica_id,
                opened.replica_id,
            )
        if identity != opened and behind is None:
            logger.warning(
                "this node's last run did not stop cleanly, and the machine has booted "
                "since (a power loss, or its disk put back to a snapshot), which may have "
                "undone its last commits: serving as a new incarnation, %s (was %s), so "
                "that no dot is used twice",
                identity.replica_id,
                opened.replica_id,
            )
        self._identity = identity
        with kv.read() as txn:
            state = log.load_state(txn, identity)
            legacy = views.has_legacy_indexes(txn)
            folded = views.folded_by_these_rules(txn)
        if not folded and state.seq:
            # Views of an older version (say, before a create raised the floor) differ
            # from what this one folds: fold them again, or replicas would disagree.
            logger.info("views folded by other rules: folding the log's events again")
            started = time.perf_counter()
            data_dir = kv.path if isinstance(kv, LmdbKV) else None  # for its worker processes

            def refold(txn: WriteTxn) -> int:  # which also empties older unique indexes
                return replay_views(txn, data_dir=data_dir, workers=replay_workers())

            try:
                count = kv.write(refold)
            except ReplayFailed as exc:
                logger.warning("%s: folding the views again in this process", exc)
                count = kv.write(replay_views)
            elapsed_s = time.perf_counter() - started
            logger.info(
                "views folded again by this version's rules: %d events in %.2f s", count, elapsed_s
            )
        elif not folded:
            kv.write(views.mark_fold_rules)
        elif legacy:
            users = kv.write(views.convert_legacy_indexes)
            logger.info("unique indexes made in this version's form: %d users", users)
        self.clock = HybridLogicalClock(now_ms, max_drift_ms=max_drift_ms, last=state.hlc)
        self.metrics = Metrics()
        self._token_text: tuple[VersionVector, str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed = asyncio.Event()
        # Set when the node stops: long polls and token waits answer at once, not when
        # their time is up (a change feed's wait of 30 s would hold up the stop).
        self.stopping = False
        self.listeners: list[Callable[[Committed], None]] = []
        # Extra sections of /status and lines of /metrics from what runs beside the node.
        self.reporters: list[Callable[[], dict[str, Any]]] = []
        self.metric_reporters: list[Callable[[], list[str]]] = []
        # Why clients must wait (e.g. "bootstrapping from peers"), or None when serving.
        self.not_ready: str | None = None
        # Why client writes wait (the replicator's check at start, ``hold_writes``), or None.
        self.writes_held: str | None = None
        self._writes_released = asyncio.Event()
        self._held = 0  # writes waiting for the release, counted against the write queue
        # Set once the storage refuses everything until opened again (``Writer.fatal``):
        # what serves the node stops it then.
        self.storage_gave_up = asyncio.Event()
        self._refuse_held: str | None = None
        self.writer = Writer(
            kv,
            state,
            self.clock,
            on_commit=self._on_commit,
            batch_requests_max=batch_requests_max,
            threaded=threaded_writer,
            queue_requests_max=queue_requests_max,
            incarnations=incarnations,
            on_fatal=self._storage_fatal,
        )
        self.writer.name_lives = not previous_format

    @classmethod
    def open(
        cls,
        data_dir: Path,
        region: str,
        *,
        map_bytes_initial: int = MAP_BYTES_INITIAL,
        metasync: bool = True,
        durable: bool = True,
        boot: bytes | None = None,
        run_dir: Path | None = None,
        **options: Any,
    ) -> Replica:
        """``boot``: the machine's boot (a simulation's); by default this one's if
        ``durable``, with its counter record in ``run_dir`` (which must be usable, else
        ``RunDirUnusable``; by default the first of ``counter_record.run_dirs`` this process
        can use) unless ``counter_record`` is given."""
        if boot is None and durable:
            boot = log.current_boot()
            if boot is not None and "counter_record" not in options:
                options["counter_record"] = CounterRecord.of_this_machine(boot, told=run_dir)
        kv = LmdbKV(
            data_dir, map_bytes_initial=map_bytes_initial, metasync=metasync, durable=durable
        )
        return cls(kv, region, boot=boot, **options)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the event loop whose waiters commits must wake."""
        self._loop = loop
        self._changed = asyncio.Event()
        self.storage_gave_up = asyncio.Event()
        self._writes_released = asyncio.Event()
        if self.writes_held is None:
            self._writes_released.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.stop()
            if self._run_marked:
                # Stopped cleanly, nothing is left to undo: the next boot starts no new
                # incarnation (each one is an origin kept for good, in every token).
                try:
                    self.kv.write(log.clear_unsynced_boot)
                    self.kv.sync()
                except StorageFailed as refused:
                    logger.warning(
                        "the clean stop is not recorded (%s): a start on another boot "
                        "serves as a new incarnation",
                        refused,
                    )
        finally:
            if self.counter_record is not None:  # before the directory: then no start
                self.counter_record.release()  # finds it free and the record held
            self.kv.close()

    # -- state -----------------------------------------------------------------

    @property
    def state(self) -> LogState:
        return self.writer.committed

    @property
    def identity(self) -> Identity:
        """The region and the replica id this node writes as: a commit may renew the id
        (its own events found beyond its log, ``Writer.renew``)."""
        replica_id = self.writer.committed.replica_id
        if replica_id != self._identity.replica_id:
            self._identity = Identity(self._identity.region, replica_id)
        return self._identity

    @property
    def summary(self) -> VersionVector:
        return self.writer.committed.summary

    def token(self) -> Token:
        return token_of(self.summary)

    def token_text(self) -> str:
        """``token()`` encoded, as every response carries it; computed once per commit."""
        summary = self.writer.committed.summary  # self.summary, without its call
        cached = self._token_text
        if cached is None or cached[0] is not summary:
            cached = self._token_text = (summary, encode_token(token_of(summary)))
        return cached[1]

    # -- writes ----------------------------------------------------------------

    def hold_writes(self, why: str) -> None:
        """Make client writes wait (reads, and events from peers, go on) until
        ``release_writes``."""
        self.writes_held = why
        self._writes_released.clear()

    def release_writes(self, *, refuse: str | None = None) -> None:
        """Let the writes held go on, or with ``refuse`` answer each 503 with that reason
        (nothing of them written)."""
        self._refuse_held = refuse
        self.writes_held = None
        self._writes_released.set()

    async def write(self, decide: Decide, *, actor: str, then: Then | None = None) -> list[Event]:
        if self.writes_held is not None:
            if self._held + self.writer.queued >= self.writer.queue_requests_max:
                raise Overloaded  # as a full write queue: they wait in memory alike
            self._held += 1
            try:
                await self._writes_released.wait()
            finally:
                self._held -= 1
            if self._refuse_held is not None:
                raise Rejected(503, "stopping", self._refuse_held, headers={"Retry-After": "1"})
        written = await self.writer.write(decide, actor=actor, then=then)
        self.metrics.writes += 1
        return written

    async def delete_group(self, group_id: str, if_match: str | None, *, actor: str) -> list[Event]:
        """Delete a group and remove its members, ``GROUP_REMOVES_PER_COMMIT`` a commit
        (``commands.delete_group``): other writes go on between them."""
        decide, then = commands.delete_group(group_id, if_match)
        written = await self.write(decide, actor=actor, then=then)
        try:
            written += await self.finish_group_delete(group_id, actor=actor)
        except (StorageFailed, Overloaded, Rejected) as exc:  # the delete itself is done
            logger.warning("the member removes of group %s wait: %s", group_id, exc)
        return written

    async def finish_group_delete(self, group_id: str, *, actor: str) -> list[Event]:
        """Write the removes a group's delete has left (none if none is left)."""
        written: list[Event] = []
        self._finishing.add(group_id)
        try:
            while self.kv.get("meta", commands.group_cleanup_key(group_id)) is not None:
                decide, then = commands.finish_group_delete(group_id)
                # As a client's write: held at start as they are (see ``writes_held``).
                written += await self.write(decide, actor=actor, then=then)
        finally:
            self._finishing.discard(group_id)
        return written

    def group_deletes_left(self) -> bool:
        """Whether a group's delete left removes that no request is writing now."""
        return bool(self._group_deletes_left())

    def _group_deletes_left(self) -> list[str]:
        with self.kv.read() as txn:
            found = [commands.group_of_cleanup_key(key) for key, _ in commands.cleanups(txn)]
        return [group_id for group_id in found if group_id not in self._finishing]

    async def finish_group_deletes(self) -> int:
        """The removes of group deletes cut short (a stop, a client gone, a refused
        commit) that no request is writing now. How many groups."""
        left = self._group_deletes_left()
        for group_id in left:
            await self.finish_group_delete(group_id, actor=GROUP_DELETE_ACTOR)
        return len(left)

    async def ingest(
        self,
        incoming: list[Event],
        *,
        quarantined: Sequence[tuple[Dot, bytes]] = (),
        released: Sequence[Dot] = (),
        validated: bool = False,
    ) -> list[Event]:
        new = await self.writer.ingest(
            incoming, quarantined=quarantined, released=released, validated=validated
        )
        self.metrics.events_ingested += len(new)
        return new

    async def release_quarantine(self) -> int:
        """Apply quarantined events this version can now read (after an upgrade)."""
        readable: list[Event] = []
        with self.kv.read() as txn:
            for _, data in log.quarantined(txn):
                try:
                    readable.append(decode_event(data))
                except InvalidEvent:
                    continue  # still too new, or never readable: it stays kept aside
        if readable:
            await self.ingest(readable, released=[e.dot for e in readable], validated=True)
        return len(readable)

    def quarantine_count(self) -> int:
        return self.quarantine_size

    def read_missing(
        self,
        theirs: VersionVector,
        *,
        bytes_max: int,
        events_max: int,
        only: str | None = None,
    ) -> tuple[list[tuple[Dot, bytes]], bool]:
        """Stored events that a replica summarised by ``theirs`` lacks, in bounded batches;
        of origin ``only`` alone if it is given.

        Returns the batch and whether more were left out. This replica's own events
        come first, then the other origins' in the order of their names, each range in
        counter order: what only this replica may hold goes before what the requester
        is likely pulling from the other origins themselves at the same time.
        """
        return run_through(self.missing_slices(theirs, bytes_max, events_max, only))

    def missing_slices(
        self, theirs: VersionVector, bytes_max: int, events_max: int, only: str | None
    ) -> Slices[tuple[list[tuple[Dot, bytes]], bool]]:
        """``read_missing``'s reading, stopping (with no read transaction open) after every
        ``READ_SLICE_EVENTS`` events, for ``node.pacing.run_paced``: a page of a peer's
        catch-up (10,000 events, some 17 ms of reading) no longer holds every request of
        the node that long. The log only grows while the node runs, so a range read on in
        a new transaction goes on where the last one stopped."""
        found: list[tuple[Dot, bytes]] = []
        size = 0
        own = self.identity.replica_id
        lacking = self.summary.missing_from(theirs)
        if only is not None:
            lacking = {only: lacking[only]} if only in lacking else {}
        ranges = [
            (origin, first, last)
            for origin in sorted(lacking, key=lambda origin: (origin != own, origin))
            for first, last in lacking[origin]
        ]
        ranges.reverse()  # taken from the end
        while ranges:
            read = 0
            with self.kv.read() as txn:
                while ranges and read < READ_SLICE_EVENTS:
                    origin, first, last = ranges.pop()
                    for counter, data in log.origin_event_bytes(txn, origin, first, last):
                        if found and (size + len(data) > bytes_max or len(found) >= events_max):
                            return found, True
                        found.append((Dot(origin, counter), data))
                        size += len(data)
                        read += 1
                        if read >= READ_SLICE_EVENTS and counter < last:
                            ranges.append((origin, counter + 1, last))  # the rest: next slice
                            break
            if ranges:
                yield
        return found, False

    def oldest_missing_hlc(self, theirs: VersionVector) -> int | None:
        """The stamp of the oldest event a replica summarised by ``theirs`` lacks."""
        oldest: int | None = None
        with self.kv.read() as txn:
            for origin, ranges in self.summary.missing_from(theirs).items():
                for first, last in ranges:
                    for _, data in log.origin_event_bytes(txn, origin, first, last):
                        stamp = decode_event(data).hlc
                        oldest = stamp if oldest is None else min(oldest, stamp)
                        break
        return oldest

    def _on_commit(self, committed: Committed) -> None:
        """Runs on the writer thread once a commit is durable, before any of it is
        acknowledged."""
        if self.counter_record is not None:
            self.counter_record.note(committed.state.replica_id, committed.state.counter)
        self.metrics.events_appended += len(committed.events)
        self.metrics.stamps_drifted += committed.drifted
        if committed.quarantined or committed.released:
            size = self.quarantine_size + len(committed.quarantined) - committed.released
            self.quarantine_dots = (
                self.quarantine_dots.add_all(committed.quarantined) if size else VersionVector()
            )
            self.quarantine_size = size
        for listener in self.listeners:
            listener(committed)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            call_soon(loop, self._notify)

    def _storage_fatal(self, refused: StorageFailed) -> None:
        """On the writer's thread: the storage gave up (``Writer.fatal``)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            call_soon(loop, self.storage_gave_up.set)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def stop_waiting(self) -> None:
        """The node stops: every wait ends now with what it has, and every later one at
        once (see ``wait_until``)."""
        self.stopping = True
        self._notify()

    async def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (without polling) until ``ready()`` holds after some commit, or time out;
        at once, with what holds, once the node stops (``stop_waiting``)."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            left = deadline - time.monotonic()
            if left <= 0 or self.stopping:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return ready()
        return True

    async def wait_for_token(self, token: Token, timeout_s: float) -> bool:
        return await self.wait_until(lambda: covers(self.summary, token), timeout_s)

    # -- reads -----------------------------------------------------------------

    def entity(self, kind: str, entity_id: str) -> EntityState:
        return views.stored_entity(self.kv.get, stream_of(kind, entity_id))

    def entity_views(self, kind: str, entity_ids: Iterable[str]) -> list[bytes | None]:
        """Several entities' stored views, undecoded (as ``views.stored_view``), read in one
        transaction (one snapshot)."""
        with self.kv.read() as txn:
            get = txn.get
            return [views.stored_view(get, stream_of(kind, entity_id)) for entity_id in entity_ids]

    def events_bytes_of(self, dots: Iterable[Dot]) -> list[bytes | None]:
        """The stored bytes of each dot's event (None: not here), in one snapshot."""
        with self.kv.read() as txn:
            return [log.event_bytes_of(txn, dot) for dot in dots]

    def stream(self, kind: str, entity_id: str) -> list[tuple[int, Event]]:
        with self.kv.read() as txn:
            return list(log.stream_events(txn, stream_of(kind, entity_id)))

    async def entity_at(self, kind: str, entity_id: str, at: At) -> EntityState | None:
        """The entity as of ``at`` (None: no event of it here); see ``node.audit``."""
        return await self.audits.state_at(stream_of(kind, entity_id), at.includes)

    async def trail(self, kind: str, entity_id: str) -> Trail | None:
        """The entity's audit trail (None: no event of it here); see ``node.audit``."""
        return await self.audits.trail(stream_of(kind, entity_id))

    def entity_ids(self, kind: str, *, after: str, limit: int) -> tuple[list[str], str | None]:
        """Up to ``limit`` ids of the entities of ``kind`` that exist, in id order after
        the cursor, and the cursor of the next page (None: no more). A page steps over at
        most LIST_SCAN_MAX entities (deleted ones stay, for history): it may come back
        short, with a cursor (30,000 deleted users held the node 0.5 s a page)."""
        prefix = f"{kind}/".encode()
        start = prefix + after.encode() + b"\0" if after else None
        found: list[str] = []
        with self.kv.read() as txn:
            for n, (key, raw) in enumerate(txn.scan("views", prefix=prefix, start=start), 1):
                entity_id = key[len(prefix) :].decode()
                if decode_state(raw).exists:
                    found.append(entity_id)
                    if len(found) >= limit:
                        return found, entity_id
                if n >= LIST_SCAN_MAX:
                    return found, entity_id
        return found, None

    def members(self, group_id: str, *, after: str, limit: int) -> list[str]:
        """The group's members that exist, from ``after`` on: see ``members_page``."""
        return self.members_page(group_id, after=after, limit=limit)[0]

    def members_page(
        self, group_id: str, *, after: str, limit: int
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` of the group's members that exist, in id order after ``after``,
        and the cursor the next page starts from (None: no more).

        A user deleted while another region added it keeps that add (add wins) and is
        not listed while it does not exist. A page steps over at most
        ``MEMBERS_SCAN_MAX`` of the group's slices, those of such users and of removed
        members (kept until compacted) alike, so one page never holds the node for long
        however many there are: it may come back short, with a cursor.
        """
        found: list[str] = []
        with self.kv.read() as txn:
            for n, (user_id, live) in enumerate(views.member_slices(txn, group_id, after=after), 1):
                if live and views.entity(txn, stream_of("user", user_id)).exists:
                    found.append(user_id)
                    if len(found) >= limit:
                        return found, user_id
                if n >= MEMBERS_SCAN_MAX:
                    return found, user_id
        return found, None

    def groups_of(self, user_id: str) -> list[str]:
        with self.kv.read() as txn:
            return views.groups_of(txn, user_id)

    def lookup(self, field: str, value: str) -> list[str]:
        with self.kv.read() as txn:
            return views.lookup(txn, field, value)

    def look_up_views(self, field: str, value: str) -> list[tuple[str, bytes | None]]:
        """The users holding ``value`` in a unique field and their stored views, undecoded
        (as ``views.stored_view``), in one snapshot."""
        with self.kv.read() as txn:
            get = txn.get
            return [
                (user_id, views.stored_view(get, stream_of("user", user_id)))
                for user_id in views.lookup(txn, field, value)
            ]

    def search(self, query: str, *, after: bytes, limit: int) -> tuple[list[str], bytes | None]:
        """A page of users matching ``query`` and its cursor: see ``views.search``."""
        with self.kv.read() as txn:
            return views.search(txn, query, after=after, limit=limit)

    def digest(self) -> str:
        with self.kv.read() as txn:
            return f"{views.digest(txn):032x}"

    def fingerprints(self) -> dict[bytes, int]:
        """A hash per visible entity and per live membership: what the digest XORs."""
        found: dict[bytes, int] = {}
        with self.kv.read() as txn:
            for key, raw in txn.scan("views"):
                value = views.entity_digest(key.decode(), decode_state(raw))
                if value:
                    found[key] = value
            for key, raw in txn.scan("members"):
                if crdt_codec.decode_as(raw, ORSet).entries:
                    found[b"member\0" + key] = 1
        return found

    def conflicts(self) -> list[tuple[str, str, list[str]]]:
        with self.kv.read() as txn:
            return list(views.conflicts(txn))

    def conflicts_page(
        self, *, after: bytes, limit: int
    ) -> tuple[list[tuple[str, str, list[str]]], bytes | None]:
        """Up to ``limit`` conflicts after the key ``after``, and the next page's key."""
        page: list[tuple[str, str, list[str]]] = []
        last = b""
        with self.kv.read() as txn:
            for key, field, value, holders in views.conflict_entries(txn, after=after):
                if len(page) == limit:
                    return page, last
                page.append((field, value, holders))
                last = key
        return page, None

    def changes(self, after_seq: int, *, limit: int) -> list[tuple[int, Event]]:
        with self.kv.read() as txn:
            return list(log.events_after(txn, after_seq, limit=limit))
