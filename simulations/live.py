"""Live mode: the same workload and checks against real ``replica node`` processes.

Faults are injected between the processes by the fault proxy on every directed peer
link (cut, one-way cut, delay, connection loss, reset) and by kill -9 and restart,
on a schedule drawn from the seed. The workload runs over HTTP with several clients
at once; a write counts as acknowledged when the node answered 2xx. After the final
heal the checker compares every region with the others and with the oracle.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from crdt import Dot
from node.event_loop import EVENT_LOOP_DEFAULT, run_on
from node.events import Event, Op
from node.tokens import decode_token
from simulations import netns
from simulations.checker import check
from simulations.cluster import LocalCluster
from simulations.deterministic import Faults
from simulations.report import plot
from simulations.snapshot import entities_of, snapshot_over_http
from simulations.workload import Mix, Operation, Workload

CLIENTS = 8
CONVERGE_WAIT_S = 60.0
FEED_PAGE_EVENTS = 1_000
SAMPLE_S = 0.5


def _holds(contiguous: dict[str, int]) -> Callable[[Dot], bool]:
    """A region's summary from /status: every dot up to each origin's contiguous counter."""
    return lambda dot: dot.counter <= contiguous.get(dot.origin, 0)


def _dot(text: str) -> Dot:
    origin, _, counter = text.rpartition(":")
    return Dot(origin, int(counter))


def event_from_json(item: dict[str, Any]) -> Event:
    return Event(
        dot=_dot(item["dot"]),
        hlc=item["hlc"],
        stream=item["stream"],
        op=Op[item["op"].upper()],
        field=item["field"],
        value=item["value"],
        observed=frozenset(_dot(d) for d in item["observed"]),
        actor=item["actor"],
    )


async def feed(http: aiohttp.ClientSession, url: str) -> list[Event]:
    """Every event a node holds, through its change feed."""
    found: list[Event] = []
    since = "0"
    while True:
        async with http.get(
            f"{url}/changes", params={"since": since, "limit": str(FEED_PAGE_EVENTS)}
        ) as r:
            page = await r.json()
        found += [event_from_json(item) for item in page["changes"]]
        if len(page["changes"]) < FEED_PAGE_EVENTS:
            return found
        since = page["next_cursor"]


class LiveRun:
    def __init__(self, cluster: LocalCluster, rng: random.Random, faults: Faults) -> None:
        self.cluster, self.rng, self.faults = cluster, rng, faults
        self.acked: list[Dot] = []
        self.rejected = 0
        self.failed = 0
        self.windows: list[tuple[int, int]] = []
        self.divergence: list[tuple[int, int]] = []
        self.started = time.monotonic()

    def ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    async def do(self, http: aiohttp.ClientSession, op: Operation) -> None:
        method, path, body = op.request
        try:
            async with http.request(method, self.cluster.url(op.region) + path, json=body) as r:
                await r.read()
                if r.status >= 300:
                    self.rejected += 1
                    return
                token = decode_token(r.headers["X-Consistency-Token"])
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.failed += 1  # the node was down or cut: not acknowledged, not counted
            return
        if len(token) == 1:  # a write's own token: the last dot it wrote
            ((origin, counter),) = token.items()
            self.acked.append(Dot(origin, counter))

    async def faults_schedule(self, duration_ms: int) -> None:
        """Partition windows (some one-way), slow lossy links, and a kill -9 with restart."""
        f, regions, rng = self.faults, self.cluster.regions, self.rng
        self.cluster.shape(rng.randint(f.delay_ms_min, f.delay_ms_max) // 4, f.loss, rng)
        plan: list[tuple[int, str, Any]] = []
        for _ in range(f.partitions if len(regions) > 1 else 0):
            start = rng.randrange(duration_ms)
            end = min(duration_ms, start + rng.randint(duration_ms // 10, duration_ms // 2))
            side = set(rng.sample(regions, rng.randint(1, len(regions) - 1)))
            one_way = rng.random() < f.one_way
            links = [
                (a, b)
                for (a, b) in self.cluster.pairs()
                if (a in side) != (b in side) and (not one_way or a in side)
            ]
            plan += [(start, "cut", links), (end, "uncut", links)]
            self.windows.append((start, end))
        for _ in range(f.crashes):
            when = rng.randrange(duration_ms)
            plan += [(when, "kill", rng.choice(regions))]
        for _ in range(f.partitions):  # connections reset mid-flight, links left up
            plan += [(rng.randrange(duration_ms), "reset", None)]
        for when, what, arg in sorted(plan, key=lambda p: p[0]):
            await asyncio.sleep(max(0, when - self.ms()) / 1000)
            if what in ("cut", "uncut"):
                for a, b in arg:
                    self.cluster.set_cut(a, b, what == "cut")
            elif what == "reset":
                self.cluster.reset()
            else:
                self.cluster.kill(arg)
                await asyncio.sleep(rng.randint(1, max(1, f.down_ms_max)) / 1000)
                await self.cluster.restart(arg)

    async def sample(self, http: aiohttp.ClientSession, every_s: float) -> None:
        """Regions whose views digest differs from the most common one, over time."""
        while True:
            digests = []
            for region in self.cluster.regions:
                try:
                    async with http.get(self.cluster.url(region) + "/status") as r:
                        digests.append((await r.json())["digest"])
                except (aiohttp.ClientError, OSError):
                    digests.append(None)
            common = max(set(digests), key=digests.count)
            self.divergence.append((self.ms(), sum(d != common for d in digests)))
            await asyncio.sleep(every_s)


async def _run(args: argparse.Namespace) -> int:
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    seed = args.seed if args.seed is not None else int(str(args.seeds).partition("..")[0])
    faults = Faults.parse(args.faults) if args.faults else Faults()
    if faults.rollbacks:
        print("replica: error: rollbacks are a fault of the deterministic mode", file=sys.stderr)
        return 2
    mix = Mix.parse(args.workload) if args.workload else Mix()
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix=f"replica-live-{seed}-"))
    node_args = ["--gossip-interval-ms", "200"]
    cluster: LocalCluster
    if args.netns:
        why = netns.available()
        if why is not None:
            print(f"replica: error: --netns: {why}", file=sys.stderr)
            return 2
        cluster = netns.NetnsCluster(regions, root, node_args=node_args)
    else:
        cluster = LocalCluster(regions, root, node_args=node_args)
    print(f"Live simulation, seed {seed}: starting {', '.join(regions)} in {root}")
    await cluster.start()
    run = LiveRun(cluster, rng, faults)
    workload = Workload(regions, random.Random(rng.getrandbits(64)), mix)
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=cluster.headers) as http:
            for op in workload.setup():
                await run.do(http, op)
            await asyncio.sleep(0.5)
            run.started = time.monotonic()
            sampler = asyncio.create_task(run.sample(http, SAMPLE_S))
            schedule = asyncio.create_task(run.faults_schedule(args.duration_ms))
            ops = [workload.next() for _ in range(args.ops)]
            pace_s = args.duration_ms / 1000 / max(1, len(ops))

            async def client(k: int) -> None:
                for i in range(k, len(ops), CLIENTS):
                    await asyncio.sleep(max(0.0, i * pace_s - (time.monotonic() - run.started)))
                    await run.do(http, ops[i])

            await asyncio.gather(*(client(k) for k in range(CLIENTS)))
            await schedule
            cluster.heal()
            healed = time.monotonic()
            converged_s: float | None = None
            while time.monotonic() - healed < CONVERGE_WAIT_S:
                if await cluster.converged(http):
                    converged_s = time.monotonic() - healed
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(SAMPLE_S)
            sampler.cancel()
            union: dict[Dot, Event] = {}
            for region in regions:
                for event in await feed(http, cluster.url(region)):
                    union.setdefault(event.dot, event)
            entities = entities_of(union.values())
            snapshots = {
                r: await snapshot_over_http(http, cluster.url(r), entities) for r in regions
            }
            statuses = await cluster.statuses(http)
    finally:
        await cluster.stop()
    contiguous = {
        r: {o: int(v["contiguous"]) for o, v in s["summary"].items()} for r, s in statuses.items()
    }
    missing_from_union = [d for d in run.acked if d not in union]
    report = check(
        snapshots=snapshots,
        summaries={r: _holds(c) for r, c in contiguous.items()},
        digests={r: str(s["digest"]) for r, s in statuses.items()},
        acknowledged=[union[d] for d in run.acked if d in union],
        union=union.values(),
    )
    print(
        f"  {len(run.acked)} writes acknowledged, {run.rejected} refused by a node, "
        f"{run.failed} failed (node down or unreachable)"
    )
    after = "NOT" if converged_s is None else f"{converged_s * 1000:.0f} ms"
    print(f"  {len(union)} events; converged {after} after the final heal")
    lost = report.lost + len(missing_from_union)
    print(
        f"  superseded LWW writes {report.superseded}, lost {lost}, "
        f"conflicts resolved {report.conflicts_resolved}"
    )
    if args.plot is not None:
        row = {
            "partition_windows_ms": run.windows,
            "divergence": run.divergence,
            "duration_ms": args.duration_ms,
            "heal_to_converge_ms": None if converged_s is None else converged_s * 1000,
        }
        plot(args.plot, row, f"live seed {seed}: regions whose views differ")
        print(f"  plot: {args.plot}")
    violations = [f"{v.kind} at {v.region}: {v.detail}" for v in report.violations]
    violations += [f"missing_ack: acknowledged write {d} is nowhere" for d in missing_from_union]
    if converged_s is None:
        violations.append("did not converge after the final heal")
    for line in violations[:10]:
        print(f"  VIOLATION {line}")
    if violations:
        print(
            f"  replay: replica simulate --mode live --seed {seed} --regions {','.join(regions)}"
            f" --ops {args.ops} --duration-ms {args.duration_ms}"
            + (f" --faults {args.faults}" if args.faults else "")
        )
        return 1
    print(
        "  no violation: every region converged to the oracle's state, no acknowledged write lost"
    )
    return 0


def run_live(args: argparse.Namespace) -> int:
    return run_on(EVENT_LOOP_DEFAULT, _run(args))
