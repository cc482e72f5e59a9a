"""Deterministic simulation: real nodes (real LMDB, real replication code) in one process
on a simulated network and a virtual clock, all randomness drawn from one seed.

Every action is one discrete event run to completion before the next, in virtual-time
order: a client operation, a gossip tick, a message delivery, a partition starting or
ending, a crash, a restart. The network loses, duplicates, delays (and so reorders)
messages and honours partitions, including one-way cuts. Each node's clock is the
virtual clock plus its own skew. A crash loses the node's memory (peer table, push
queues, messages in flight to it) and keeps its durable LMDB state; a restart opens it
again. Same seed, same run: the trace is identical, event for event.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from crdt import Dot, VersionVector
from node import log as node_log
from node.counter_record import CounterRecord
from node.events import Event
from node.events import decode as decode_event
from node.events import encode as encode_event
from node.lmdb_kv import LmdbKV
from node.replica import Replica
from node.writer import Rejected
from replication import protocol
from replication.protocol import BadMessage, RawEvent, Sync
from replication.replicator import Limits, Replicator
from simulations.checker import Report, check
from simulations.snapshot import entities_of, snapshot_of_replica
from simulations.workload import Mix, Workload

EPOCH_MS = 1_700_000_000_000  # virtual time starts here, so stamps look like real ones
REQUEST_TIMEOUT_MS = 1_000
HEAL_WAIT_MS_MAX = 120_000
CONVERGE_CHECK_MS = 50
EVENTS_MAX = 10_000_000  # a bound on one run's events, far above any scenario


@dataclass(frozen=True, slots=True)
class Cut:
    """From ``start_ms`` to ``end_ms``, messages from ``source`` to ``target`` are lost."""

    start_ms: int
    end_ms: int
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Faults:
    loss: float = 0.05
    duplicate: float = 0.02
    delay_ms_min: int = 1
    delay_ms_max: int = 60
    partitions: int = 2  # how many partition windows the seed schedules
    one_way: float = 0.3  # chance that a partition window cuts one direction only
    skew_ms_max: int = 250
    crashes: int = 1  # how many crash-and-restart windows the seed schedules
    down_ms_max: int = 2_000
    # How many rollbacks the seed schedules: a node's data directory put back to a copy
    # taken up to ``rollback_ms_max`` earlier (a virtual machine's snapshot restored), its
    # last commits undone. Its writes acknowledged since the copy may be lost (the
    # operator's doing, not the store's), and are not held against it; every other
    # acknowledged write must survive, and the regions must converge.
    rollbacks: int = 0
    rollback_ms_max: int = 2_000
    # The chance that a rollback keeps the machine's boot (a copy restored on the same
    # machine): the node finds its counter below the machine's record of it and renews
    # at start (``node.counter_record``), or, if the record is lost too (the chance
    # ``record_lost``: a run directory emptied), only its peers can tell it, and its
    # writes wait for them.
    same_boot: float = 0.0
    record_lost: float = 0.0

    @classmethod
    def none(cls) -> Faults:
        return cls(0.0, 0.0, 1, 1, 0, 0.0, 0, 0, 0)

    @classmethod
    def parse(cls, text: str) -> Faults:
        """``loss=0.1,duplicate=0.05,partitions=3,...`` over the defaults; ``none`` for none."""
        if text.strip() == "none":
            return cls.none()
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, raw = part.partition("=")
            if name not in cls.__dataclass_fields__:
                raise ValueError(
                    f"unknown fault {name!r}; known: {', '.join(cls.__dataclass_fields__)}"
                )
            kind = type(getattr(cls(), name))
            chance = kind is float  # the float faults are chances; the others counts or ms
            bounds = "a chance from 0 to 1" if chance else "a whole number, 0 or more"
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{name} must be {bounds}, got {raw!r}") from None
            if value < 0 or (chance and value > 1):
                raise ValueError(f"{name} must be {bounds}, got {raw!r}")
            values[name] = value
        faults = cls(**values)
        if faults.delay_ms_min > faults.delay_ms_max:
            raise ValueError("delay_ms_min must not exceed delay_ms_max")
        return faults


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int
    regions: tuple[str, ...] = ("eu", "us", "ap")
    ops: int = 300
    duration_ms: int = 10_000
    mix: Mix = field(default_factory=Mix)
    faults: Faults = field(default_factory=Faults)
    gossip_interval_ms: int = 200
    heal_wait_ms_max: int = HEAL_WAIT_MS_MAX  # not converged by then after a heal: a failure
    sample_ms: int = 0  # > 0: sample divergence that often, for the plot
    # Regions whose nodes write as the version before (``--previous-format``): a cluster
    # in the middle of a rolling upgrade, field writes naming their creates and not.
    previous_format: tuple[str, ...] = ()

    def command(self) -> str:
        """The command line that replays exactly this run."""
        f, m = self.faults, self.mix
        faults = ",".join(f"{k}={getattr(f, k)}" for k in f.__dataclass_fields__)
        mix = ",".join(f"{k}={getattr(m, k)}" for k in m.__dataclass_fields__)
        upgrading = f" --previous-format {','.join(self.previous_format)}"
        return (
            f"replica simulate --seed {self.seed} --regions {','.join(self.regions)} "
            f"--ops {self.ops} --duration-ms {self.duration_ms} --faults {faults} --workload {mix}"
            f"{upgrading if self.previous_format else ''}"
        )


@dataclass
class Result:
    scenario: Scenario
    acknowledged: list[Event] = field(default_factory=list)
    undone: list[Event] = field(default_factory=list)  # acknowledged, then rolled back
    cloud_max: int = 0  # the most counters any final summary holds beyond a gap, per origin
    rejected: int = 0
    refused: int = 0  # sync messages a node refused as bad (none of an honest cluster's)
    union: dict[Dot, Event] = field(default_factory=dict)
    converged: bool = False
    heal_to_converge_ms: int | None = None
    wall_s: float = 0.0
    rounds: int = 0
    messages: int = 0
    bytes_sent: int = 0
    trace_digest: str = ""
    trace: list[str] = field(default_factory=list)
    divergence: list[tuple[int, int]] = field(default_factory=list)  # (virtual ms, keys)
    windows: list[tuple[int, int]] = field(default_factory=list)  # partition windows, ms
    report: Report | None = None

    @property
    def bytes_per_event(self) -> float:
        return self.bytes_sent / max(1, len(self.union))

    @property
    def ok(self) -> bool:
        return self.converged and self.report is not None and self.report.ok


class SimNode:
    # Honest nodes acknowledge a write only once it is durable, so a crash loses nothing
    # acknowledged. A broken variant (simulations.variants) acknowledges before its data
    # is flushed: it flushes every N commits, and a crash rolls back to the last flush.
    flush_every_commits = 1

    def __init__(
        self, sim: Simulation, region: str, data_dir: Path, skew_ms: int, seed: int
    ) -> None:
        self.sim, self.region, self.data_dir, self.skew_ms = sim, region, data_dir, skew_ms
        self.incarnation = f"{seed % 0xFFFFFFFF:08x}"
        self.replica: Replica | None = None
        self.replicator: Replicator | None = None
        self.generation = 0  # bumps at each restart: answers to a dead incarnation are void
        # Incarnations of the renewals (a rollback found out), drawn from the seed, and
        # the machine's boot: a rollback boots it again (a crash restarts the node alone).
        self._incarnations = random.Random(f"{seed}/{region}/incarnations")
        self._boots = random.Random(f"{seed}/{region}/boots")
        self.boot = self._boots.randbytes(16)
        self._replica_id = ""
        self.writes_wait_until_ms = 0
        self.snapshot: Path | None = None  # the copy a rollback puts back
        self.snapshot_acknowledged = 0  # how many writes the run had acknowledged then
        self.snapshot_id = ""  # the id it ran as then

    def now_ms(self) -> int:
        return self.sim.now_ms + self.skew_ms

    @property
    def alive(self) -> bool:
        return self.replica is not None

    def open(self) -> None:
        self.replica = Replica.open(
            self.data_dir,
            self.region,
            durable=False,
            threaded_writer=False,  # one action at a time: no hand-off to a thread
            now_ms=self.now_ms,
            incarnation=self.incarnation,
            incarnations=lambda: f"{self._incarnations.getrandbits(32):08x}",
            boot=self.boot,
            counter_record=CounterRecord(self.run_dir, self.boot),
            previous_format=self.region in self.sim.scenario.previous_format,
        )
        self.replica.bind(asyncio.get_running_loop())
        self._replica_id = self.replica.identity.replica_id
        peers = [r for r in self.sim.scenario.regions if r != self.region]
        limits = Limits(gossip_interval_ms=self.sim.scenario.gossip_interval_ms)
        rng = random.Random(f"{self.sim.scenario.seed}/{self.region}/{self.generation}")
        self.replicator = Replicator(
            self.replica, _NoTransport(), peers, limits=limits, now_ms=self.now_ms, rng=rng
        )
        if self.generation:  # a restart: client writes wait for every peer's first word
            self.replicator.await_every_peer()
            self.writes_wait_until_ms = self.sim.now_ms + limits.start_writes_wait_ms_max
        self.generation += 1
        if self.flush_every_commits > 1:
            self._commits = 0
            self._flush()
            self.replica.listeners.append(self._on_commit)

    @property
    def run_dir(self) -> Path:
        """The node's machine's run directory, where its counter record is kept."""
        return self.data_dir.parent / f"{self.region}.run"

    @property
    def _flushed(self) -> Path:
        return self.data_dir.parent / f"{self.region}.flushed"

    def _flush(self) -> None:
        assert self.replica is not None
        shutil.rmtree(self._flushed, ignore_errors=True)
        self._flushed.mkdir()
        self.replica.kv.env.copy(str(self._flushed))  # type: ignore[attr-defined]

    def _on_commit(self, _: object) -> None:
        self._commits += 1
        if self._commits % self.flush_every_commits == 0:
            self._flush()

    def crash(self) -> None:
        assert self.replica is not None
        self._replica_id = self.replica.identity.replica_id
        self.replica.close()
        self.replica = None
        self.replicator = None
        if self.flush_every_commits > 1:  # what was never flushed is gone
            shutil.copyfile(self._flushed / "data.mdb", self.data_dir / "data.mdb")

    @property
    def replica_id(self) -> str:
        """The id it writes as, or last wrote as (down)."""
        if self.replica is not None:
            self._replica_id = self.replica.identity.replica_id
        return self._replica_id

    def held(self) -> VersionVector:
        """The summary of what this node holds: in its replica, or on disk if it is down."""
        if self.replica is not None:
            return self.replica.summary
        kv = LmdbKV(self.data_dir, durable=False)
        try:
            with kv.read() as txn:
                return node_log.stored_summary(txn)
        finally:
            kv.close()

    def take_snapshot(self, acknowledged: int) -> None:
        assert self.replica is not None
        self.snapshot = self.data_dir.parent / f"{self.region}.snapshot"
        shutil.rmtree(self.snapshot, ignore_errors=True)
        self.snapshot.mkdir()
        self.replica.kv.env.copy(str(self.snapshot))  # type: ignore[attr-defined]
        self.snapshot_acknowledged = acknowledged
        self.snapshot_id = self.replica.identity.replica_id  # renewed since, it comes back

    def roll_back(self, *, same_boot: bool, record_lost: bool = False) -> None:
        """Put the data directory back to the snapshot (the node must be down), as a
        virtual machine's disk is restored (the machine boots again), or a copy on the
        same machine (``same_boot``), where the machine's counter record may be lost too
        (``record_lost``)."""
        assert self.replica is None
        assert self.snapshot is not None
        shutil.copyfile(self.snapshot / "data.mdb", self.data_dir / "data.mdb")
        self.snapshot = None
        self._replica_id = self.snapshot_id  # the id on disk now: a restart renews from it
        if not same_boot:
            self.boot = self._boots.randbytes(16)
        if record_lost:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class _NoTransport:
    """The simulation carries messages itself; the replicator never sends on its own."""

    async def send(self, peer: str, body: bytes) -> bytes:
        raise AssertionError("simulated nodes do not use a transport")

    async def close(self) -> None:
        pass


Action = Callable[[], Awaitable[None]]


class Simulation:
    def __init__(self, scenario: Scenario, root: Path) -> None:
        self.scenario = scenario
        self.rng = random.Random(scenario.seed)
        self.now_ms = EPOCH_MS
        self._queue: list[tuple[int, int, str, Action]] = []
        self._seq = 0
        self._trace = hashlib.sha256()
        self.result = Result(scenario)
        # Every write acknowledged, in order, never taken from (a snapshot's place in it
        # stays put), and the rollbacks' accounting (``_roll_back``).
        self._acknowledged_log: list[Event] = []
        self._held_when_undone: set[Dot] = set()
        self._excused: set[Dot] = set()
        self.keep_trace = False
        skews = {
            r: self.rng.randint(-scenario.faults.skew_ms_max, scenario.faults.skew_ms_max)
            for r in scenario.regions
        }
        self.nodes = {
            r: SimNode(self, r, root / r, skews[r], self.rng.getrandbits(32))
            for r in scenario.regions
        }
        self.cuts: list[Cut] = []
        self.manual_cuts: set[tuple[str, str]] = set()
        self.healed = False
        self._pending: dict[int, tuple[str, str, int]] = {}  # request id -> (from, to, gen)
        self._pushes: set[int] = set()  # eager pushes: one round trip, no follow-up
        self._next_sample_ms: int | None = None  # the next divergence sample's time
        self.workload = Workload(
            list(scenario.regions), random.Random(self.rng.getrandbits(64)), scenario.mix
        )

    # -- scheduling ------------------------------------------------------------------

    def at(self, when_ms: int, label: str, action: Action) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (when_ms, self._seq, label, action))

    def log(self, text: str) -> None:
        line = f"{self.now_ms - EPOCH_MS} {text}"
        self._trace.update(line.encode() + b"\n")
        if self.keep_trace:
            self.result.trace.append(line)

    async def _step(self) -> bool:
        if not self._queue:
            return False
        when, _, _, action = heapq.heappop(self._queue)
        self._sample_until(when)
        self.now_ms = max(self.now_ms, when)
        await action()
        return True

    # -- the network -----------------------------------------------------------------

    def _cut(self, source: str, target: str) -> bool:
        now = self.now_ms - EPOCH_MS
        return not self.healed and (
            (source, target) in self.manual_cuts
            or any(
                c.source == source and c.target == target and c.start_ms <= now < c.end_ms
                for c in self.cuts
            )
        )

    def _deliveries(self, source: str, target: str) -> list[int]:
        """When (if ever) a message sent now arrives: lost, once, or duplicated."""
        f = self.scenario.faults
        if self._cut(source, target) or (not self.healed and self.rng.random() < f.loss):
            return []
        copies = 2 if not self.healed and self.rng.random() < f.duplicate else 1
        return [
            self.now_ms + self.rng.randint(f.delay_ms_min, f.delay_ms_max) for _ in range(copies)
        ]

    def send_request(self, source: str, target: str, request: Sync, *, push: bool = False) -> None:
        node = self.nodes[source]
        body = protocol.encode(request)
        self._seq += 1
        request_id = self._seq
        self._pending[request_id] = (source, target, node.generation)
        if push:
            self._pushes.add(request_id)
        self.result.rounds += 1
        self.log(
            f"send {source}->{target} #{request_id} events={len(request.events)} bytes={len(body)}"
        )
        for when in self._deliveries(source, target):
            self.at(
                when,
                "deliver",
                partial(self._deliver_request, source, target, body, request, request_id),
            )
        self.at(self.now_ms + REQUEST_TIMEOUT_MS, "timeout", partial(self._timeout, request_id))

    async def _deliver_request(
        self, source: str, target: str, body: bytes, request: Sync, request_id: int
    ) -> None:
        node = self.nodes[target]
        self.result.messages += 1
        self.result.bytes_sent += len(body)
        if node.replicator is None:
            self.log(f"drop #{request_id} at {target}: down")
            return
        before = node.replica_id
        try:
            answer = await node.replicator.handle(body)
        except BadMessage as exc:
            self.log(f"refused #{request_id} at {target}: {exc}")
            self.result.refused += 1
            return
        self._renewed(target, before)
        self.log(f"handled #{request_id} at {target} answer={len(answer)}")
        for when in self._deliveries(target, source):
            self.at(
                when,
                "answer",
                partial(self._deliver_answer, source, target, request, answer, request_id),
            )

    async def _deliver_answer(
        self, source: str, target: str, request: Sync, answer: bytes, request_id: int
    ) -> None:
        self.result.messages += 1
        self.result.bytes_sent += len(answer)
        pending = self._pending.pop(request_id, None)
        node = self.nodes[source]
        if pending is None or node.replicator is None or pending[2] != node.generation:
            self.log(f"late answer #{request_id} at {source}")
            return
        before = node.replica_id
        try:
            more = await node.replicator.absorb(target, request, answer)
        except BadMessage as exc:
            self.log(f"refused answer #{request_id} at {source}: {exc}")
            self.result.refused += 1
            return
        self._renewed(source, before)
        self.log(f"absorbed #{request_id} at {source} more={more}")
        if more and request_id not in self._pushes:
            request = node.replicator.request_for(target, answered=True)
            self.send_request(source, target, request)

    def _renewed(self, region: str, before: str) -> None:
        """Trace a renewal of ``region``'s id while it runs (its own events found beyond
        its log, in what a peer sent it)."""
        after = self.nodes[region].replica_id
        if after != before:
            self.log(f"renewed {region} as {after}")

    async def _timeout(self, request_id: int) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        source, target, generation = pending
        node = self.nodes[source]
        if node.replicator is not None and generation == node.generation:
            node.replicator.failed(target, "timed out")
            self.log(f"timeout #{request_id} {source}->{target}")

    # -- what nodes do -----------------------------------------------------------------

    async def _gossip(self, region: str) -> None:
        node = self.nodes[region]
        if node.replicator is not None:
            peer = node.replicator.choose_peer()
            if peer is not None:
                self.send_request(region, peer, node.replicator.request_for(peer))
        jitter = self.rng.randint(0, self.scenario.gossip_interval_ms // 2)
        self.at(
            self.now_ms + self.scenario.gossip_interval_ms + jitter,
            "gossip",
            partial(self._gossip, region),
        )

    async def _client(self, region: str, label: str, decide: Any) -> None:
        node = self.nodes[region]
        if node.replica is None or node.replicator is None:
            self.log(f"client {region} {label}: node down")
            self.result.rejected += 1
            return
        if node.replicator.unheard and self.now_ms < node.writes_wait_until_ms:
            # As a node holds client writes after a start until every peer has answered
            # once (at most ``start_writes_wait_ms_max``): this one comes back later.
            self.log(f"client {region} {label}: held")
            again = partial(self._client, region, label, decide)
            self.at(self.now_ms + CONVERGE_CHECK_MS, "client", again)
            return
        try:
            written = await node.replica.write(decide, actor="sim")
        except Rejected as exc:
            self.log(f"client {region} {label}: {exc.status}")
            self.result.rejected += 1
            return
        self.log(f"client {region} {label}: ok {[str(e.dot) for e in written]}")
        self.result.acknowledged += written
        self._acknowledged_log += written
        fresh = [RawEvent(e.dot, encode_event(e)) for e in written]
        node.replicator.enqueue(fresh)
        for peer in sorted(node.replicator.peers):
            batch = node.replicator.take_push(peer)
            if batch:
                self.send_request(region, peer, node.replicator.request_for(peer, batch), push=True)

    async def _crash(self, region: str, down_ms: int) -> None:
        node = self.nodes[region]
        if node.replica is None:
            return
        self.log(f"crash {region} for {down_ms} ms")
        node.crash()
        self.at(self.now_ms + down_ms, "restart", partial(self._restart, region))

    async def _snapshot(self, region: str) -> None:
        node = self.nodes[region]
        if node.replica is not None:
            node.take_snapshot(len(self._acknowledged_log))
            self.log(f"snapshot {region} at {node.replica.state.counter}")

    async def _roll_back(
        self, region: str, down_ms: int, *, same_boot: bool, record_lost: bool = False
    ) -> None:
        node = self.nodes[region]
        if node.snapshot is None:
            return  # it was down when the snapshot was due
        if node.replica is not None:
            node.crash()
        node.roll_back(same_boot=same_boot, record_lost=record_lost)
        # Its writes acknowledged since the copy that no other node holds: the rollback
        # lost them (the operator's doing). Those another node holds must come back to
        # it, unless every node holding them is rolled back too, later.
        since = self._acknowledged_log[node.snapshot_acknowledged :]
        mine = {e.dot for e in since if e.dot.origin.partition("~")[0] == region}
        held = self._held(but=region)
        kept = {dot for dot in mine if any(summary.contains(dot) for summary in held)}
        self._held_when_undone |= kept
        everywhere = self._held(but=None)
        gone = {
            dot
            for dot in self._held_when_undone
            if not any(summary.contains(dot) for summary in everywhere)
        }
        self._held_when_undone -= gone
        undone = (mine - kept | gone) - self._excused
        self._excused |= undone
        self.result.undone += [e for e in self._acknowledged_log if e.dot in undone]
        self.result.acknowledged = [e for e in self.result.acknowledged if e.dot not in undone]
        boot = "the same boot" if same_boot else "a new boot"
        boot += ", its counter record lost" if record_lost else ""
        self.log(f"roll back {region} for {down_ms} ms, {boot}: {len(undone)} writes undone")
        self.at(self.now_ms + down_ms, "restart", partial(self._restart, region))

    def _held(self, *, but: str | None) -> list[VersionVector]:
        """What each node but ``but`` holds (on disk, if it is down)."""
        return [node.held() for region, node in sorted(self.nodes.items()) if region != but]

    async def _restart(self, region: str) -> None:
        node = self.nodes[region]
        if node.replica is None:
            before = node.replica_id
            node.open()
            renewed = "" if node.replica_id == before else f" as {node.replica_id}"
            self.log(f"restart {region}{renewed}")

    # -- the run ---------------------------------------------------------------------

    def _schedule(self) -> None:
        s, f = self.scenario, self.scenario.faults
        regions = list(s.regions)
        for op in self.workload.setup():
            self.at(self.now_ms, "client", partial(self._client, op.region, op.label, op.decide))
        for _ in range(s.ops):
            op = self.workload.next()
            when = EPOCH_MS + 1 + self.rng.randrange(s.duration_ms)
            self.at(when, "client", partial(self._client, op.region, op.label, op.decide))
        for _ in range(f.partitions if len(regions) > 1 else 0):
            start = self.rng.randrange(s.duration_ms)
            end = min(
                s.duration_ms, start + self.rng.randint(s.duration_ms // 10, s.duration_ms // 2)
            )
            side = set(self.rng.sample(regions, self.rng.randint(1, len(regions) - 1)))
            one_way = self.rng.random() < f.one_way
            for a in regions:
                for b in regions:
                    if (a in side) != (b in side) and (not one_way or a in side):
                        self.cuts.append(Cut(start, end, a, b))
            self.result.windows.append((start, end))
        for _ in range(f.crashes):
            region = self.rng.choice(regions)
            when = EPOCH_MS + self.rng.randrange(s.duration_ms)
            down = self.rng.randint(1, max(1, f.down_ms_max))
            self.at(when, "crash", partial(self._crash, region, down))
        for _ in range(f.rollbacks):
            region = self.rng.choice(regions)
            when = EPOCH_MS + 1 + self.rng.randrange(s.duration_ms)
            back = self.rng.randint(1, max(1, f.rollback_ms_max))
            down = self.rng.randint(1, max(1, f.down_ms_max))
            same_boot = self.rng.random() < f.same_boot
            # Drawn only when it may be: a seed's run stays what it was without it.
            record_lost = same_boot and f.record_lost > 0 and self.rng.random() < f.record_lost
            self.at(max(EPOCH_MS, when - back), "snapshot", partial(self._snapshot, region))
            rollback = partial(
                self._roll_back, region, down, same_boot=same_boot, record_lost=record_lost
            )
            self.at(when, "rollback", rollback)
        self._next_sample_ms = EPOCH_MS if s.sample_ms else None

    def _sample_until(self, when_ms: int) -> None:
        """Divergence at every sampling time up to ``when_ms``, the time of the next event:
        the state then is the state now. Taken outside the event queue, so that a run with
        samples (for a plot) steps, checks and ends as one without (the seed's trace
        digest differed with --plot: samples moved when convergence was checked)."""
        step = self.scenario.sample_ms
        while self._next_sample_ms is not None and self._next_sample_ms <= when_ms:
            at = self._next_sample_ms
            self.result.divergence.append((at - EPOCH_MS, self.divergence()))
            done = at - EPOCH_MS >= self.scenario.duration_ms and self.result.converged
            self._next_sample_ms = None if done else at + step

    def divergence(self) -> int:
        """Entity and membership keys whose visible state is not the same on every live node."""
        seen: dict[bytes, set[int]] = {}
        live = [n.replica for n in self.nodes.values() if n.replica is not None]
        for replica in live:
            for key, value in replica.fingerprints().items():
                seen.setdefault(key, set()).add(value)
        counts = {key: len(values) for key, values in seen.items()}
        present = {key: sum(1 for r in live if key in r.fingerprints()) for key in seen}
        return sum(1 for key in seen if counts[key] > 1 or present[key] != len(live))

    def converged(self) -> bool:
        live = [n.replica for n in self.nodes.values() if n.replica is not None]
        if len(live) != len(self.nodes):
            return False
        first = live[0]
        return all(r.digest() == first.digest() and r.summary == first.summary for r in live)

    # -- driving it step by step (the scripted run below, and stateful tests) ----------

    async def start(self) -> None:
        """Open every node and start its gossip."""
        for region, node in self.nodes.items():
            node.open()
            self.at(
                EPOCH_MS + self.rng.randrange(self.scenario.gossip_interval_ms),
                "gossip",
                partial(self._gossip, region),
            )

    async def client(self, region: str, decide: Any, label: str = "") -> None:
        await self._client(region, label, decide)

    def partition(self, *sides: set[str]) -> None:
        """Cut every link between regions on different sides, until heal()."""
        side_of = {r: i for i, side in enumerate(sides) for r in side}
        for a in self.scenario.regions:
            for b in self.scenario.regions:
                if a != b and side_of.get(a, -1) != side_of.get(b, -2):
                    self.manual_cuts.add((a, b))
        self.log(f"partition {sorted(self.manual_cuts)}")

    def cut(self, source: str, target: str) -> None:
        """A one-way cut: ``source`` cannot reach ``target``."""
        self.manual_cuts.add((source, target))
        self.log(f"cut {source}->{target}")

    async def crash(self, region: str) -> None:
        if self.nodes[region].replica is not None:
            self.log(f"crash {region}")
            self.nodes[region].crash()

    async def restart(self, region: str) -> None:
        await self._restart(region)

    async def advance(self, ms: int) -> None:
        """Let ``ms`` of virtual time pass, running everything due in it."""
        end = self.now_ms + ms
        while self._queue and self._queue[0][0] <= end:
            await self._step()
        self.now_ms = max(self.now_ms, end)

    async def settle(self) -> bool:
        """Heal every fault, restart crashed nodes, and run until converged (bounded).

        Faults scheduled by the seed resume afterwards if there are any left to run.
        """
        self.healed = True
        self.manual_cuts.clear()
        self.log("heal")
        for region in sorted(self.nodes):
            await self._restart(region)  # those that are down
        healed_at = next_check = self.now_ms
        converged = False
        while self.now_ms - healed_at <= self.scenario.heal_wait_ms_max and self._queue:
            if self.now_ms >= next_check:
                next_check = self.now_ms + CONVERGE_CHECK_MS
                if self.converged() and not self._pending:
                    converged = True
                    break
            await self._step()
        self.result.converged = converged
        self.result.heal_to_converge_ms = self.now_ms - healed_at if converged else None
        self.log(f"settled converged={converged}")
        self.healed = False
        return converged

    def finish(self) -> Result:
        """Check the final state of every region (after settle)."""
        self._finish()
        return self.result

    async def run(self) -> Result:
        """The scripted run: the seed's workload and faults, then the final heal."""
        started = time.monotonic()
        await self.start()
        self._schedule()
        await self.advance(self.scenario.duration_ms)
        await self.settle()
        if self._next_sample_ms is not None:  # the plot's last point: where it settled
            self.result.divergence.append((self.now_ms - EPOCH_MS, self.divergence()))
        self.healed = True  # nothing more of the seed's faults after the final heal
        self.finish()
        self.result.wall_s = time.monotonic() - started
        return self.result

    def _finish(self) -> None:
        """Collect every event, then check the final state of every region."""
        replicas = {region: node.replica for region, node in self.nodes.items()}
        for replica in replicas.values():
            assert replica is not None
            union = self.result.union
            with replica.kv.read() as txn:
                for _, data in node_log.event_bytes_after(txn, 0, limit=EVENTS_MAX):
                    dot = protocol.dot_of(data)  # regions hold mostly the same events:
                    if dot not in union:  # decode each dot's once
                        union[dot] = decode_event(data)
        entities = entities_of(self.result.union.values())
        live = {region: r for region, r in replicas.items() if r is not None}
        self.result.cloud_max = max(
            (len(seen.cloud) for r in live.values() for seen in r.summary.origins.values()),
            default=0,
        )
        self.result.report = check(
            snapshots={region: snapshot_of_replica(r, entities) for region, r in live.items()},
            summaries={region: r.summary for region, r in live.items()},
            digests={region: r.digest() for region, r in live.items()},
            acknowledged=self.result.acknowledged,
            union=self.result.union.values(),
        )
        self.result.trace_digest = self._trace.hexdigest()


def run_scenario(scenario: Scenario, *, keep_trace: bool = False) -> Result:
    """Run one seed in a fresh temporary directory, check it, and clean up."""
    root = Path(tempfile.mkdtemp(prefix=f"sim-{scenario.seed}-"))
    sim = Simulation(scenario, root)
    sim.keep_trace = keep_trace

    async def main() -> None:
        # Returns nothing: asyncio.run formats the repr of its main task (result and
        # all) when it restores the SIGINT handler, and a whole Result's repr is slow.
        try:
            await sim.run()
        finally:
            for node in sim.nodes.values():
                if node.replica is not None:
                    node.replica.close()

    try:
        asyncio.run(main())
        return sim.result
    finally:
        shutil.rmtree(root, ignore_errors=True)
