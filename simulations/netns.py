"""Partitions the kernel enforces: each node in its own network namespace.

Every region gets a namespace with one veth link to a bridge in the root namespace
(the workload's side), on a private test subnet that exists only inside this
machine's sandbox. Cutting ``a -> b`` installs a blackhole route to ``b`` inside
``a``'s namespace: packets are dropped by the kernel, not by a proxy. It needs root
and iproute2; links are cut and restored, not slowed (no queueing discipline needed).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from node.process import NodeProcess
from simulations.cluster import LocalCluster

SUBNET_PREFIX = "10.231"  # a /24 per run below it, only on this machine's own test bridge
NODE_PORT = 8000


def available() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the ip command)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsCluster(LocalCluster):
    def __init__(
        self, regions: Sequence[str], root: Path, *, node_args: Sequence[str] = ()
    ) -> None:
        why = available()
        if why is not None:
            raise RuntimeError(why)
        super().__init__(regions, root, node_args=node_args)
        self.links = {}  # no proxies: the kernel carries and cuts the traffic
        tag = f"{os.getpid() % 100_000}"
        self.bridge = f"rsbr{tag}"
        self.spaces = {r: f"rs{tag}-{r}" for r in regions}
        # Runs at once (two test suites) must not share a subnet: their routes would clash.
        self.subnet = f"{SUBNET_PREFIX}.{os.getpid() % 250}"
        self.addresses = {r: f"{self.subnet}.{10 + i}" for i, r in enumerate(regions)}
        self.api_token = secrets.token_urlsafe(24)
        self.headers = {"Authorization": f"Bearer {self.api_token}"}
        self._cut: set[tuple[str, str]] = set()

    def url(self, region: str) -> str:
        return f"http://{self.addresses[region]}:{NODE_PORT}"

    async def start(self) -> None:
        self._network_up()
        for region in self.regions:
            peers = [f"{b}={self.url(b)}" for b in self.regions if b != region]
            args = [arg for peer in peers for arg in ("--peer", peer)] + self.node_args
            self.nodes[region] = NodeProcess(
                region,
                self.root / region,
                NODE_PORT,
                *args,
                env={"REPLICA_CLUSTER_SECRET": self.secret, "REPLICA_API_TOKEN": self.api_token},
                host=self.addresses[region],
                prefix=("ip", "netns", "exec", self.spaces[region]),
            )
        try:
            await super()._start_nodes()
        except BaseException:
            self._network_down()
            raise

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            self._network_down()

    def _network_up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (region, space) in enumerate(self.spaces.items()):
            inside, outside = f"rsv{os.getpid() % 10_000}{i}a", f"rsv{os.getpid() % 10_000}{i}b"
            _ip("netns", "add", space)
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", space)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", space, "addr", "add", f"{self.addresses[region]}/24", "dev", inside)
            _ip("-n", space, "link", "set", inside, "up")
            _ip("-n", space, "link", "set", "lo", "up")

    def _network_down(self) -> None:
        for space in self.spaces.values():
            subprocess.run(["ip", "netns", "del", space], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def set_cut(self, a: str, b: str, cut: bool) -> None:
        if cut == ((a, b) in self._cut):
            return
        verb = "add" if cut else "del"
        _ip("-n", self.spaces[a], "route", verb, "blackhole", f"{self.addresses[b]}/32")
        (self._cut.add if cut else self._cut.discard)((a, b))

    def shape(self, delay_ms: int, loss: float, rng: object) -> None:
        """Links here are cut and restored only; delay and loss need the proxy mode."""

    def reset(self) -> None:
        """Connections are the kernel's here: resets need the proxy mode."""
