"""The README's main job: a three-region session on a real local cluster.

Writes land in different regions and are read everywhere; a partition cuts one region
off; both sides keep accepting writes, some of them in conflict; the partition heals;
every region converges to the same state, and the history says which write won and why.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from node.event_loop import EVENT_LOOP_DEFAULT, run_on
from node.process import NodeDidNotStart
from simulations.cluster import LocalCluster

CONVERGE_WAIT_S = 30.0


class Regions:
    def __init__(self, cluster: LocalCluster, http: aiohttp.ClientSession) -> None:
        self.cluster, self.http = cluster, http

    async def call(
        self,
        region: str,
        method: str,
        path: str,
        body: Any = None,
        quiet: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        url = self.cluster.url(region) + path
        async with self.http.request(method, url, json=body, headers=headers) as r:
            data = await r.json() if r.content_type == "application/json" else None
            if not quiet:
                print(f"  [{region}] {method:6} {path:38} -> {r.status}")
            return r.status, data, r.headers


def iso_now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def say(text: str) -> None:
    print(f"\n{text}")


async def wait_converged(cluster: LocalCluster, http: aiohttp.ClientSession) -> float:
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_WAIT_S:
        if await cluster.converged(http):
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise RuntimeError("the cluster did not converge")


async def session(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession() as http:
        c = Regions(cluster, http)
        say("1. Write anywhere, read everywhere")
        family = [
            ("homer", "Homer", "eu"),
            ("marge", "Marge", "us"),
            ("bart", "Bart", "ap"),
            ("lisa", "Lisa", "eu"),
        ]
        token = ""
        for user_id, name, region in family:
            _, _, headers = await c.call(
                region,
                "POST",
                "/users",
                {
                    "id": user_id,
                    "name": name,
                    "username": user_id,
                    "email": f"{user_id}@springfield.example",
                },
            )
            token = headers["X-Consistency-Token"]
        _, _, headers = await c.call(
            "us",
            "POST",
            "/groups",
            {"id": "simpsons", "name": "The Simpsons"},
            headers={"X-Consistency-Token": token},
        )
        for user_id, *_ in family:
            _, _, headers = await c.call(
                "us",
                "PUT",
                f"/groups/simpsons/members/{user_id}",
                quiet=True,
                headers={"X-Consistency-Token": token},
            )
        print("  [us] PUT    /groups/simpsons/members/{homer,marge,bart,lisa}")
        _, members, _ = await c.call(
            "ap",
            "GET",
            "/groups/simpsons/members",
            headers={"X-Consistency-Token": headers["X-Consistency-Token"]},
        )
        print(f"    ap sees the group written in us: {members['members']}")
        print(f"    converged in {await wait_converged(cluster, http) * 1000:.0f} ms")

        before_partition = iso_now()
        say("2. Partition: eu is cut off from us and ap")
        cluster.partition(["eu"], ["us", "ap"])

        say("3. Both sides keep writing, some writes in conflict")
        await c.call("eu", "PATCH", "/users/homer", {"name": "Homer (renamed in eu)"})
        await asyncio.sleep(0.01)
        await c.call("us", "PATCH", "/users/homer", {"name": "Homer (renamed in us)"})
        await c.call("eu", "DELETE", "/groups/simpsons/members/bart")
        await c.call("ap", "PUT", "/groups/simpsons/members/bart")
        await c.call("eu", "DELETE", "/users/lisa")
        await c.call("us", "PATCH", "/users/lisa", {"profile": {"instrument": "saxophone"}})
        await c.call(
            "eu",
            "POST",
            "/users",
            {
                "id": "bartman",
                "name": "Bartman",
                "username": "bartman",
                "email": "el.barto@springfield.example",
            },
        )
        await c.call(
            "ap",
            "POST",
            "/users",
            {
                "id": "elbarto",
                "name": "El Barto",
                "username": "elbarto",
                "email": "el.barto@springfield.example",
            },
        )
        for region in ("eu", "us"):
            _, homer, _ = await c.call(region, "GET", "/users/homer", quiet=True)
            print(f"    {region} now says homer is {homer['name']!r}")

        say("4. Heal the partition")
        cluster.heal()
        print(f"    converged {await wait_converged(cluster, http) * 1000:.0f} ms after the heal")

        say("5. The same state everywhere, and why")
        statuses = await cluster.statuses(http)
        for region in cluster.regions:
            _, homer, _ = await c.call(region, "GET", "/users/homer", quiet=True)
            _, members, _ = await c.call(region, "GET", "/groups/simpsons/members", quiet=True)
            lisa, _, _ = await c.call(region, "GET", "/users/lisa", quiet=True)
            lisa_is = "deleted" if lisa == 404 else "present"
            digest = str(statuses[region]["digest"])[:12]
            print(
                f"    {region}: homer={homer['name']!r} members={members['members']} "
                f"lisa={lisa_is} digest={digest}"
            )
        _, trail, _ = await c.call("ap", "GET", "/users/homer/history", quiet=True)
        print("    homer's name, from ap's audit trail:")
        for e in trail["events"]:
            if e.get("field") == "name":
                outcome = "WON" if e["won"] else e["why"]  # overwritten, lost or cleared
                value, origin = repr(e["value"]), e["origin"]
                print(f"      {value:26} written by {origin:14} at {e['time']}  {outcome}")
        _, then, _ = await c.call("ap", "GET", f"/users/homer?at={before_partition}", quiet=True)
        print(f"    time travel: homer as of {before_partition} was {then['name']!r}")
        print("    bart: removed in eu while re-added in ap -> add wins, he stays a member")
        print("    lisa: deleted in eu while her profile changed in us -> the delete wins")
        _, conflicts, _ = await c.call("us", "GET", "/conflicts", quiet=True)
        for conflict in conflicts["conflicts"]:
            print(
                f"    conflict reported, not lost: {conflict['field']} {conflict['value']!r} "
                f"is claimed by {conflict['ids']}"
            )


REGIONS = ["eu", "us", "ap"]  # the session's steps name them


async def run(root: Path, regions: list[str], base_port: int = 0) -> int:
    cluster = LocalCluster(
        regions, root, base_port=base_port, node_args=["--gossip-interval-ms", "200"]
    )
    print(f"Starting a local cluster: {', '.join(regions)} (real processes, LMDB in {root})")
    try:
        await cluster.start()
    except NodeDidNotStart as error:
        print(f"replica: error: {error}; every node started is stopped", file=sys.stderr)
        return 1
    try:
        for region in regions:
            print(f"  {region}: {cluster.url(region)}")
        await session(cluster)
    finally:
        try:
            say("6. Stopping every node (SIGTERM: drain writes, close LMDB)")
        finally:  # a closed stdout must not leave the nodes running
            await cluster.stop()
    codes = {r: n.returncode for r, n in cluster.nodes.items()}
    print(f"  exit codes {codes}; data stays in {root}")
    return 0 if all(code == 0 for code in codes.values()) else 1


def main(root: Path | None = None, base_port: int = 0) -> int:
    root = root or Path(tempfile.mkdtemp(prefix="replica-cluster-"))
    return run_on(EVENT_LOOP_DEFAULT, run(root, REGIONS, base_port))
