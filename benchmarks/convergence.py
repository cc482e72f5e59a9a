"""Convergence after a heal: three live nodes, each region written while cut off.

Three real ``replica node`` processes on loopback (``simulations.cluster.LocalCluster``,
product defaults for every node flag). The three regions are partitioned from each other
(``partition(["eu"], ["us"], ["ap"])``), then each region takes ~10,000 events of writes:
user creates (4 events each: create, name, username, email) and profile PATCHes of
several keys (one event per key), many requests in flight at once. Then the links are
healed and ``LocalCluster.converged`` (every node: the same summary and the same view
digest) is polled every 10 ms; the figure is the time from the heal until it first holds.

No baseline (the target is absolute); the events total is reported beside the figure.
Each round is a fresh cluster; the full run takes several rounds and reports the median
and the worst. Also reported: the events the nodes sent each other until converged
against the events each region lacked (redundant transfer), the nodes' CPU per event
delivered (with the wall time it implies at best on this machine's cores), and how long
their threads waited in a run queue. Loops are bounded by count and by deadlines.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Row, row, scratch_dir
from benchmarks.replication_lag import cores as _cores
from benchmarks.replication_lag import cpu_s, cpu_stall_us, sched_s, stall_share
from node.event_loop import EVENT_LOOP_DEFAULT, run_on
from simulations.cluster import LocalCluster

NAME = "convergence after heal"
REGIONS = ("eu", "us", "ap")
POLL_S = 0.010
REQUEST_TIMEOUT_S = 30.0
CONVERGE_WAIT_S = 60.0
CONCURRENCY_PER_REGION = 32
PROFILE_KEYS = 8  # events per PATCH
NODE_ARGS: tuple[str, ...] = ()  # product defaults (gossip 500 ms, backoff up to 1 s)


@dataclass(frozen=True)
class Plan:
    rounds: int
    creates: int  # users created per region while partitioned (4 events each)
    patches: int  # PATCHes per region while partitioned (PROFILE_KEYS events each)

    @property
    def events_per_region(self) -> int:
        return 4 * self.creates + PROFILE_KEYS * self.patches


def plan_for(quick: bool) -> Plan:
    # full: 500 * 4 + 1,000 * 8 = 10,000 events per region; quick: a fifth of that
    return Plan(1, 100, 200) if quick else Plan(3, 500, 1_000)


async def _write_region(
    http: aiohttp.ClientSession, url: str, region: str, plan: Plan, tag: str
) -> int:
    """Write ``plan``'s events into one region; return the failed requests."""
    gate = asyncio.Semaphore(CONCURRENCY_PER_REGION)
    failed = 0
    ids = [f"{tag}{region}{i}" for i in range(plan.creates)]

    async def send(method: str, path: str, body: dict[str, Any], ok: int) -> None:
        nonlocal failed
        async with gate:
            try:
                async with http.request(method, url + path, json=body) as r:
                    await r.read()
                    failed += r.status != ok
            except (aiohttp.ClientError, TimeoutError):
                failed += 1

    await asyncio.gather(
        *(
            send(
                "POST",
                "/users",
                {"id": u, "name": f"User {u}", "username": u, "email": f"{u}@x.org"},
                201,
            )
            for u in ids
        )
    )
    await asyncio.gather(
        *(
            send(
                "PATCH",
                f"/users/{ids[i % len(ids)]}",
                {"profile": {f"k{k}": f"v{i}.{k}" for k in range(PROFILE_KEYS)}},
                200,
            )
            for i in range(plan.patches)
        )
    )
    return failed


async def _round(plan: Plan, root: Path) -> dict[str, Any]:
    cluster = LocalCluster(list(REGIONS), root, node_args=list(NODE_ARGS))
    await cluster.start()
    try:
        connector = aiohttp.TCPConnector(limit=CONCURRENCY_PER_REGION * len(REGIONS))
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            cluster.partition(*([r] for r in REGIONS))
            t0 = time.perf_counter()
            failed = await asyncio.gather(
                *(_write_region(http, cluster.url(r), r, plan, "c") for r in REGIONS)
            )
            write_s = time.perf_counter() - t0
            statuses = await cluster.statuses(http)
            events = sum(
                seen["contiguous"]
                for s in statuses.values()
                for origin, seen in s["summary"].items()
                if origin == s["replica_id"]
            )
            pids = [n.proc.pid for n in cluster.nodes.values() if n.proc is not None]
            stall, cpu, sched = cpu_stall_us(), cpu_s(pids), sched_s(pids)
            cluster.heal()
            healed = time.perf_counter()
            deadline = healed + CONVERGE_WAIT_S
            polls = 0
            converged_s: float | None = None
            while time.perf_counter() < deadline:
                polls += 1
                if await cluster.converged(http):
                    converged_s = time.perf_counter() - healed
                    break
                await asyncio.sleep(POLL_S)
            stalled = stall_share(stall, cpu_stall_us(), time.perf_counter() - healed)
            nodes_cpu_s = cpu_s(pids) - cpu
            ran, waited = sched_s(pids)
            statuses = await cluster.statuses(http)
            totals = {
                r: sum(seen["contiguous"] for seen in s["summary"].values())
                for r, s in statuses.items()
            }
            return {
                "events": events,
                "failed_requests": sum(failed),
                "write_s": write_s,
                "converged_s": converged_s,
                "polls": polls,
                "cpu_stall": stalled,
                "nodes_cpu_s": nodes_cpu_s,
                "nodes_ran_s": ran - sched[0],
                "nodes_waited_s": waited - sched[1],
                "sent": _events_sent(statuses),
                "events_held": totals,
            }
    finally:
        await cluster.stop()


def _events_sent(statuses: dict[str, dict[str, Any]]) -> int:
    """Events the nodes sent each other (pushes, answers, anti-entropy), as they count."""
    return sum(
        int(peer.get("events_sent", 0))
        for s in statuses.values()
        for peer in s.get("replication", {}).get("peers", [])
    )


def run(quick: bool) -> list[Row]:
    plan = plan_for(quick)
    results = []
    for i in range(plan.rounds):
        with scratch_dir("convergence") as tmp:
            got = run_on(EVENT_LOOP_DEFAULT, _round(plan, Path(tmp)))
        print(f"convergence round {i + 1}: {got}", file=sys.stderr)
        results.append(got)
    times = [r["converged_s"] for r in results]
    done = [t for t in times if t is not None]
    events = statistics.median(r["events"] for r in results)
    failed = sum(r["failed_requests"] for r in results)
    name = NAME + (" (quick)" if quick else "")
    stalled = statistics.median(r["cpu_stall"] for r in results)
    what = (
        f"3 nodes, {events:,.0f} events written in partition ({events / 3:,.0f} per region)"
        f"{', quick' if quick else ''}; some task waited for a CPU {stalled:.0%} of the time"
    )
    if len(done) < len(times):  # a round that never converged counts as the wait limit
        done += [CONVERGE_WAIT_S] * (len(times) - len(done))
    rows = [
        row(
            name,
            f"heal -> converged, median of {len(done)}; {what}",
            statistics.median(done) * 1e3,
            "ms",
            at_most=2_000,
            absolute=True,
        ),
    ]
    if len(done) > 1:
        rows.append(
            row(
                name,
                f"heal -> converged, worst of {len(done)}",
                max(done) * 1e3,
                "ms",
                at_most=2_000,
                absolute=True,
            )
        )
    rows.append(row(name, "events written while partitioned (all regions)", events, "events"))
    needed = events * (len(REGIONS) - 1)  # each event must reach every other region once
    rows.append(
        row(
            name,
            "events sent between nodes until converged (from /status) vs the events each"
            " region lacked",
            statistics.median(r["sent"] for r in results),
            "events",
            needed,
        )
    )
    rows.append(
        row(
            name,
            "CPU of the 3 nodes from heal to converged, per event delivered"
            f" (median; on {_cores()} cores that is >= "
            f"{statistics.median(r['nodes_cpu_s'] for r in results) / _cores():.1f} s of wall)",
            statistics.median(r["nodes_cpu_s"] for r in results) / needed * 1e6,
            "us/event",
        )
    )
    rows.append(
        row(
            name,
            "time the nodes' threads were runnable but waited for a CPU, vs time they ran,"
            " heal to converged (median; Linux schedstat)",
            statistics.median(r["nodes_waited_s"] for r in results),
            "s",
            statistics.median(r["nodes_ran_s"] for r in results),
        )
    )
    if failed:
        rows.append(row(name, "write requests that failed", failed, "requests"))
    return rows
