"""A local multi-region cluster: one real ``replica node`` process per region on
loopback, each peer link passing through its own fault proxy so partitions can be
made and healed from outside. ``replica cluster`` runs one until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import shutil
import signal
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from node.process import NodeDidNotStart, NodeProcess, free_port
from simulations.proxy import LinkProxy

READY_WAIT_S = 30.0


class LocalCluster:
    def __init__(
        self,
        regions: Sequence[str],
        root: Path,
        *,
        base_port: int = 0,
        secret: str | None = None,
        node_args: Sequence[str] = (),
        scheme: str = "http",
        client_ssl: ssl.SSLContext | None = None,
        region_args: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``scheme`` "https" for nodes started with ``--tls-cert`` (TLS passes the proxies
        as plain bytes); ``client_ssl`` is what this object's own requests present then;
        ``region_args`` are extra flags for one region's node (e.g. its own certificate)."""
        assert len(set(regions)) == len(regions) >= 1
        assert scheme in ("http", "https")
        self.scheme, self.client_ssl = scheme, client_ssl
        self.regions, self.root = list(regions), root
        self.secret = secret or secrets.token_urlsafe(24)
        self.ports = {
            r: (base_port + i if base_port else free_port()) for i, r in enumerate(regions)
        }
        self.links = {
            (a, b): LinkProxy(f"{a}->{b}", "127.0.0.1", self.ports[b])
            for a in regions
            for b in regions
            if a != b
        }
        self.nodes: dict[str, NodeProcess] = {}
        self.headers: dict[str, str] = {}  # what a client must send (an API token, off loopback)
        self.node_args = list(node_args)
        self.region_args = {r: list(a) for r, a in (region_args or {}).items()}

    def url(self, region: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.ports[region]}"

    async def start(self) -> None:
        """Start the proxies and the nodes, and wait until every node serves; if one does
        not, stop what started (no node is left running) and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        proxy_ports = {link: await proxy.start() for link, proxy in self.links.items()}
        for region in self.regions:
            peers = [
                f"{b}={self.scheme}://127.0.0.1:{proxy_ports[(a, b)]}"
                for (a, b) in self.links
                if a == region
            ]
            args = [arg for peer in peers for arg in ("--peer", peer)] + self.node_args
            args += self.region_args.get(region, [])
            self.nodes[region] = NodeProcess(
                region,
                self.root / region,
                self.ports[region],
                *args,
                env={"REPLICA_CLUSTER_SECRET": self.secret},
            )
        await self._start_nodes()

    async def _start_nodes(self) -> None:
        started = await asyncio.gather(
            *(asyncio.to_thread(n.start) for n in self.nodes.values()), return_exceptions=True
        )
        for outcome in started:  # every start has ended: the caller stops them all
            if isinstance(outcome, BaseException):
                raise outcome
        await self.wait_serving()

    async def wait_serving(self) -> None:
        """Until every node has left bootstrap and serves clients; raises if one does not
        within ``READY_WAIT_S``."""
        connector = aiohttp.TCPConnector(ssl=self.client_ssl or True)
        async with aiohttp.ClientSession(connector=connector, headers=self.headers) as http:
            for region in self.regions:
                for _ in range(int(READY_WAIT_S * 10)):
                    async with http.get(self.url(region) + "/status") as r:
                        status = await r.json()
                        if status["serving"]:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise NodeDidNotStart(
                        f"node {region} is not serving after {READY_WAIT_S} s: "
                        f"{status['not_ready']}"
                    )

    async def stop(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(n.stop) for n in self.nodes.values()))
        for proxy in self.links.values():
            await proxy.stop()

    # -- faults ---------------------------------------------------------------------

    def kill(self, region: str) -> None:
        """kill -9: no drain, no clean close; LMDB must still hold every acknowledged write."""
        self.nodes[region].stop(signal.SIGKILL)

    async def restart(self, region: str, *, wipe: bool = False) -> None:
        """Start ``region`` again on its data directory, or on a fresh one (a lost disk)."""
        node = self.nodes[region]
        node.stop()
        if wipe:
            shutil.rmtree(node.data_dir, ignore_errors=True)
        await asyncio.to_thread(node.start)
        await self.wait_serving()

    def pairs(self) -> list[tuple[str, str]]:
        """Every directed peer link."""
        return [(a, b) for a in self.regions for b in self.regions if a != b]

    def set_cut(self, a: str, b: str, cut: bool) -> None:
        """Cut (or restore) the directed link: ``a`` can no longer reach ``b``."""
        self.links[(a, b)].cut(cut)

    def shape(self, delay_ms: int, loss: float, rng: random.Random) -> None:
        """Slow every link by ``delay_ms`` per chunk and drop connections at rate ``loss``."""
        for proxy in self.links.values():
            proxy.faults.delay_ms, proxy.faults.loss = delay_ms, loss
            proxy.rng = random.Random(rng.getrandbits(32))

    def reset(self) -> None:
        """Close every open peer connection now (the links stay up)."""
        for proxy in self.links.values():
            proxy.reset()

    def cut(self, a: str, b: str, *, both_ways: bool = True) -> None:
        self.set_cut(a, b, True)
        if both_ways:
            self.set_cut(b, a, True)

    def partition(self, *sides: Iterable[str]) -> None:
        """Cut every link between regions on different sides."""
        side_of = {r: i for i, side in enumerate(sides) for r in side}
        for a, b in self.pairs():
            if side_of.get(a, -1) != side_of.get(b, -2):
                self.set_cut(a, b, True)

    def heal(self) -> None:
        """Restore every link and lift every delay and loss."""
        for a, b in self.pairs():
            self.set_cut(a, b, False)
        self.shape(0, 0.0, random.Random(0))

    # -- looking -------------------------------------------------------------------

    async def statuses(self, http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        found = {}
        for region in self.regions:
            async with http.get(self.url(region) + "/status") as r:
                found[region] = await r.json()
        return found

    async def converged(self, http: aiohttp.ClientSession) -> bool:
        """Every node has seen the same events and shows the same views (digests)."""
        statuses = await self.statuses(http)
        summaries = {repr(s["summary"]) for s in statuses.values()}
        digests = {s["digest"] for s in statuses.values()}
        return len(summaries) == 1 and len(digests) == 1


async def run_until_stopped(regions: Sequence[str], root: Path, base_port: int) -> int:
    cluster = LocalCluster(regions, root, base_port=base_port)
    print(f"Starting {len(regions)} regions, data in {root}")
    try:
        await cluster.start()
    except NodeDidNotStart as error:
        print(f"replica: error: {error}; every node started is stopped", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, stop.set)
    try:  # whatever happens here (a closed stdout too), the nodes are stopped
        for region in regions:
            print(f"  {region:6} {cluster.url(region):24} data {root / region}")
        print(f"Each node's log is {root}/<region>.log; the cluster secret is in each node's")
        print("environment. Ctrl-C stops the cluster.", flush=True)
        await stop.wait()
        print("\nStopping (each node drains its writes and closes LMDB)...", flush=True)
    finally:
        await cluster.stop()
    codes = {r: n.returncode for r, n in cluster.nodes.items()}
    print(f"Stopped: exit codes {codes}")
    return 0 if all(c == 0 for c in codes.values()) else 1
