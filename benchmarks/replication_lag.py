"""Replication lag at a steady write rate across three live nodes.

Three real ``replica node`` processes on loopback (``simulations.cluster.LocalCluster``,
every peer link through its fault proxy, no fault set), product defaults for every node
flag. A paced, open-loop client writes ~1,000 PATCHes per second spread evenly over the
regions (one profile key each, so one event per write) to users created beforehand, and
follows every region's change feed (``GET /changes?wait=`` long-polls). A write's dot comes
from its ``X-Consistency-Token`` (``{origin: counter}``, the last dot it wrote); the feeds'
items carry ``"dot": "origin:counter"``; so each write is matched to the moment it became
visible in each other region.

Lag of one write = the time from sending it until it is visible in *every* other region
(the later of the two), measured on the client's clock: it includes the local commit and
the feed's long-poll answer, so it is an upper bound of commit-to-visible. The same
figure from the write's acknowledgement (a lower bound) is reported too. Baseline in the
same run: the same writes' own latency (the PATCH round trip, sent to acknowledged).
At most ``CONNECTIONS_PER_REGION`` writes are in flight per region; a write due while all
are busy waits in the client, and that wait is reported on its own row, not in the
latencies (if it grows, the nodes did not keep up with the rate: see the rate row).

The client (writer and feed followers) runs in its own process, so the six link proxies,
which live in this process's event loop, do not share its loop. Writes of a warm-up
second are not counted. Loops are bounded by count and by deadlines.

Latencies on a small shared machine say as much about the neighbours as about the code,
so the rows also say how busy the CPUs were: the cores used by nodes, client and proxies,
the share of time some task waited for a CPU (Linux PSI), how long the nodes' threads sat
runnable in a run queue against how long they ran (schedstat), and the nodes' CPU per
write, which hardly depends on the neighbours.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import Row, percentile, row, scratch_dir
from node.event_loop import EVENT_LOOP_DEFAULT, run_on
from node.tokens import decode_token
from simulations.cluster import LocalCluster

NAME = "replication lag"
REGIONS = ("eu", "us", "ap")
RATE = 1_000.0  # writes per second, over all regions
USERS_PER_REGION = 100
CONNECTIONS_PER_REGION = 64
FEED_WAIT_MS = 500
FEED_LIMIT = 1_000
DRAIN_S = 10.0  # after the last write: how long its events may take to show up elsewhere
CONVERGE_WAIT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
HEADERS = {"Content-Type": "application/json"}
NODE_ARGS: tuple[str, ...] = ()  # product defaults (gossip 500 ms; eager push on commit)


@dataclass(frozen=True)
class Plan:
    rate: float
    warmup_s: float
    duration_s: float

    @property
    def writes(self) -> int:
        return int(self.rate * (self.warmup_s + self.duration_s))

    @property
    def warmup_writes(self) -> int:
        return int(self.rate * self.warmup_s)


def plan_for(quick: bool) -> Plan:
    return Plan(RATE, 1.0, 3.0) if quick else Plan(RATE, 1.0, 15.0)


# --------------------------------------------------------------------------- cluster side


async def create_users(
    http: aiohttp.ClientSession,
    urls: dict[str, str],
    per_region: int,
    prefix: str,
    *,
    concurrency: int = 32,
) -> dict[str, list[str]]:
    """``per_region`` users created in each region (in that region); their ids by region."""
    ids = {r: [f"{prefix}{r}{i}" for i in range(per_region)] for r in urls}
    gate = asyncio.Semaphore(concurrency)

    async def create(region: str, uid: str) -> None:
        body = {"id": uid, "name": f"User {uid}", "username": uid, "email": f"{uid}@x.org"}
        async with gate, http.post(urls[region] + "/users", json=body) as r:
            await r.read()
            if r.status != 201:
                raise RuntimeError(f"create {uid} in {region}: {r.status}")

    await asyncio.gather(*(create(r, u) for r, users in ids.items() for u in users))
    return ids


async def wait_converged(
    cluster: LocalCluster, http: aiohttp.ClientSession, limit_s: float
) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await cluster.converged(http):
            return True
        await asyncio.sleep(0.05)
    return False


async def _measure(plan: Plan, root: Path) -> dict[str, Any]:
    cluster = LocalCluster(list(REGIONS), root, node_args=list(NODE_ARGS))
    await cluster.start()
    try:
        urls = {r: cluster.url(r) for r in REGIONS}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            users = await create_users(http, urls, USERS_PER_REGION, "lag")
            if not await wait_converged(cluster, http, CONVERGE_WAIT_S):
                raise RuntimeError("the cluster did not converge after creating the users")
            spec = {
                "urls": urls,
                "users": users,
                "rate": plan.rate,
                "writes": plan.writes,
                "warmup_writes": plan.warmup_writes,
                "connections": CONNECTIONS_PER_REGION,
            }
            pids = [n.proc.pid for n in cluster.nodes.values() if n.proc is not None]
            load, stall = os.getloadavg()[0], cpu_stall_us()
            nodes_cpu, own_cpu, started = cpu_s(pids), cpu_s([os.getpid()]), time.monotonic()
            nodes_sched = sched_s(pids)
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.replication_lag",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            limit_s = plan.warmup_s + plan.duration_s + DRAIN_S + 60
            try:
                out, _ = await asyncio.wait_for(
                    proc.communicate(json.dumps(spec).encode()), limit_s
                )
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            if proc.returncode != 0:
                raise RuntimeError(f"the lag client failed (exit {proc.returncode})")
            wall = time.monotonic() - started
            result: dict[str, Any] = json.loads(out)
            result["nodes_cpu_s"] = cpu_s(pids) - nodes_cpu
            ran, waited = sched_s(pids)
            result["nodes_ran_s"] = ran - nodes_sched[0]
            result["nodes_waited_s"] = waited - nodes_sched[1]
            result["nodes_cores"] = result["nodes_cpu_s"] / wall
            result["proxies_cores"] = (cpu_s([os.getpid()]) - own_cpu) / wall
            result["client_cores"] = result["client_cpu_s"] / wall
            result["load_before"] = load
            result["cpu_stall"] = stall_share(stall, cpu_stall_us(), wall)
            statuses = await cluster.statuses(http)
            result["pushes_dropped"] = sum(
                s.get("replication", {}).get("pushes_dropped", 0) for s in statuses.values()
            )
            result["commits"] = sum(s["writer"]["commits"] for s in statuses.values())
            return result
    finally:
        await cluster.stop()


def cpu_stall_us() -> int | None:
    """Linux PSI: microseconds so far during which some runnable task waited for a CPU
    (``/proc/pressure/cpu``, "some total"); None where not available. Its growth over a
    run, per second of the run, says how contended the machine was meanwhile."""
    try:
        with open("/proc/pressure/cpu") as f:
            for line in f:
                if line.startswith("some "):
                    return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def stall_share(before: int | None, after: int | None, wall_s: float) -> float:
    """The share of ``wall_s`` during which some task waited for a CPU (NaN if unknown)."""
    if before is None or after is None or wall_s <= 0:
        return float("nan")
    return (after - before) / 1e6 / wall_s


def sched_s(pids: list[int]) -> tuple[float, float]:
    """(running, waiting in a run queue) seconds so far, summed over every thread of these
    processes (Linux ``/proc/<pid>/task/<tid>/schedstat``); waiting = runnable, no CPU."""
    running = waiting = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ran, waited, _ = f.read().split()
            except (OSError, ValueError):
                continue
            running += int(ran)
            waiting += int(waited)
    return running / 1e9, waiting / 1e9


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (Linux /proc)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


# --------------------------------------------------------------------------- client side


def _dot_of(token: str) -> str:
    ((origin, counter),) = decode_token(token).items()
    return f"{origin}:{counter}"


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client(spec: dict[str, Any]) -> dict[str, Any]:
    cpu_at_start = _own_cpu_s()
    urls: dict[str, str] = spec["urls"]
    users: dict[str, list[str]] = spec["users"]
    rate, writes = float(spec["rate"]), int(spec["writes"])
    warmup, connections = int(spec["warmup_writes"]), int(spec["connections"])
    regions = list(urls)
    ready_at = [0.0] * writes
    sent = [0.0] * writes
    acked = [0.0] * writes
    dots: list[str | None] = [None] * writes
    errors = 0
    seen: dict[str, dict[str, float]] = {r: {} for r in regions}
    writing_done = asyncio.Event()
    gates = {r: asyncio.Semaphore(connections) for r in regions}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    sessions = {
        r: aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections), timeout=timeout)
        for r in regions
    }
    feed_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=len(regions)), timeout=timeout
    )
    try:
        cursors = {}
        for r in regions:
            async with feed_session.get(urls[r] + "/status") as resp:
                cursors[r] = int((await resp.json())["seq"])

        async def follow(region: str) -> None:
            """Record when each dot shows up in ``region``'s change feed."""
            cursor, found = cursors[region], seen[region]
            hard_deadline = time.perf_counter() + writes / rate + DRAIN_S + 30
            url = urls[region] + "/changes"
            while time.perf_counter() < hard_deadline:
                if writing_done.is_set() and _all_seen(region):
                    return
                params = {"since": str(cursor), "wait": str(FEED_WAIT_MS), "limit": str(FEED_LIMIT)}
                try:
                    async with feed_session.get(url, params=params) as resp:
                        page = await resp.json()
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    await asyncio.sleep(0.01)  # a failed poll; the deadline bounds the retries
                    continue
                now = time.perf_counter()
                for item in page["changes"]:
                    found.setdefault(item["dot"], now)
                cursor = int(page["next_cursor"])

        def _all_seen(region: str) -> bool:
            found = seen[region]
            return all(d is None or d in found for d in dots)

        async def write(i: int) -> None:
            nonlocal errors
            region = regions[i % len(regions)]
            pool = users[region]
            uid = pool[(i // len(regions)) % len(pool)]
            body = json.dumps({"profile": {"lag": f"w{i}"}}).encode()
            ready_at[i] = time.perf_counter()
            # At most ``connections`` writes in flight per region: one waiting for a free
            # connection is not sent yet (its wait is reported apart, as client queueing).
            async with gates[region]:
                sent[i] = time.perf_counter()
                try:
                    async with sessions[region].patch(
                        f"{urls[region]}/users/{uid}", data=body, headers=HEADERS
                    ) as resp:
                        await resp.read()
                        acked[i] = time.perf_counter()
                        if resp.status != 200:
                            errors += 1
                            return
                        dots[i] = _dot_of(resp.headers["X-Consistency-Token"])
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1

        followers = [asyncio.create_task(follow(r)) for r in regions]
        tasks: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        i = 0
        while i < writes:  # open loop: launch every write whose time has come
            now = time.perf_counter()
            due = min(writes, int((now - started) * rate) + 1)
            while i < due:
                task = asyncio.create_task(write(i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        launched_s = time.perf_counter() - started
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        writing_done.set()
        await asyncio.wait(followers, timeout=writes / rate + DRAIN_S + 40)
        for task in followers:
            task.cancel()
    finally:
        for s in sessions.values():
            await s.close()
        await feed_session.close()

    latencies, lag_sent, lag_acked, queued = [], [], [], []
    unseen = 0
    measured = range(warmup, writes)
    for i in measured:
        dot = dots[i]
        if dot is None:
            continue
        latencies.append(acked[i] - sent[i])
        queued.append(sent[i] - ready_at[i])
        origin = regions[i % len(regions)]
        times = [seen[r].get(dot) for r in regions if r != origin]
        if any(t is None for t in times):
            unseen += 1
            continue
        visible = max(t for t in times if t is not None)
        lag_sent.append(visible - sent[i])
        lag_acked.append(visible - acked[i])
    acks = sorted(acked[i] for i in measured if dots[i] is not None)
    window = acks[-1] - acks[0] if len(acks) > 1 else 0.0
    return {
        "client_cpu_s": _own_cpu_s() - cpu_at_start,
        "writes": len(measured),
        "acknowledged": len(latencies),
        "errors": errors,
        "unseen": unseen,
        "rate": (len(acks) - 1) / window if window > 0 else 0.0,
        "queued_p50_ms": percentile(queued, 50) * 1e3,
        "queued_p99_ms": percentile(queued, 99) * 1e3,
        "launched_s": launched_s,
        "write_p50_ms": percentile(latencies, 50) * 1e3,
        "write_p99_ms": percentile(latencies, 99) * 1e3,
        "lag_p50_ms": percentile(lag_sent, 50) * 1e3,
        "lag_p99_ms": percentile(lag_sent, 99) * 1e3,
        "lag_max_ms": max(lag_sent, default=float("nan")) * 1e3,
        "lag_acked_p50_ms": percentile(lag_acked, 50) * 1e3,
        "lag_acked_p99_ms": percentile(lag_acked, 99) * 1e3,
    }


# --------------------------------------------------------------------------- the benchmark


def run(quick: bool) -> list[Row]:
    plan = plan_for(quick)
    with scratch_dir("replication-lag") as tmp:
        got = run_on(EVENT_LOOP_DEFAULT, _measure(plan, Path(tmp)))
    name = NAME + (" (quick)" if quick else "")
    what = (
        f"{got['rate']:,.0f} writes/s over 3 nodes, {got['acknowledged']:,} writes"
        f"{' (quick: ' + str(plan.duration_s) + ' s)' if quick else ''}"
    )
    print(f"replication lag: {json.dumps(got)}", file=sys.stderr)
    return [
        row(
            name,
            f"p50 lag to every other region, from sent; {what}",
            got["lag_p50_ms"],
            "ms",
            got["write_p50_ms"],
        ),
        row(
            name,
            f"p99 lag to every other region, from sent; {what}",
            got["lag_p99_ms"],
            "ms",
            got["write_p99_ms"],
            at_most=50,
            absolute=True,
        ),
        row(
            name,
            "p50 lag from acknowledged (lower bound)",
            got["lag_acked_p50_ms"],
            "ms",
            got["write_p50_ms"],
        ),
        row(
            name,
            "p99 lag from acknowledged (lower bound)",
            got["lag_acked_p99_ms"],
            "ms",
            got["write_p99_ms"],
        ),
        row(name, "writes/s acknowledged vs asked", got["rate"], "writes/s", plan.rate),
        row(
            name,
            f"p99 wait in the client for one of {CONNECTIONS_PER_REGION} connections per region"
            " (not in the latencies above; p50 " + f"{got['queued_p50_ms']:.1f} ms)",
            got["queued_p99_ms"],
            "ms",
        ),
        row(
            name,
            f"writes not visible everywhere within {DRAIN_S:g} s (+ errors)",
            got["unseen"] + got["errors"],
            "writes",
            at_most=0,
            absolute=True,
        ),
        row(
            name,
            f"CPU in use during the run: nodes {got['nodes_cores']:.2f} + client "
            f"{got['client_cores']:.2f} + proxies {got['proxies_cores']:.2f}, of the cores here"
            f" (load average {got['load_before']:.1f} before the run; some task waited for a"
            f" CPU {got['cpu_stall']:.0%} of the time)",
            got["nodes_cores"] + got["client_cores"] + got["proxies_cores"],
            "cores",
            float(cores()),
        ),
        row(
            name,
            "time the nodes' threads were runnable but waited for a CPU, vs time they ran"
            " (Linux schedstat; a wait far above 0 means the latencies are run-queue waits)",
            got["nodes_waited_s"],
            "s",
            got["nodes_ran_s"],
        ),
        row(
            name,
            "CPU of the 3 nodes per write, all of it (HTTP, commit, replication, change"
            " feeds); ms per write x 1,000 writes/s = cores kept busy",
            got["nodes_cpu_s"] / plan.writes * 1e3,
            "ms",
        ),
    ]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(run_on(EVENT_LOOP_DEFAULT, client(spec))))


if __name__ == "__main__":
    main()
