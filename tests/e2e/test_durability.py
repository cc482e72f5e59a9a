"""What a node acknowledges survives: a clean restart, SIGTERM mid-load, kill -9 mid-load.

An acknowledged write is one whose 2xx reached the client. After a restart on the same
data directory, every acknowledged write must be there; a write that was in flight when
the node went down may or may not be, but nothing else may appear.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.e2e.helpers import Node, Nodes

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=30)
DOWN = (aiohttp.ClientError, OSError, asyncio.TimeoutError)  # what a client sees of a dead node


async def send(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> int | None:
    """The status, or None if the node went away before answering."""
    try:
        async with session.request(method, url, json=body) as response:
            await response.read()
            return response.status
    except DOWN:
        return None


def snapshot(node: Node, paths: list[str]) -> dict[str, Any]:
    return {path: (r.status, r.json()) for path in paths if (r := node.call("GET", path))}


def test_restart_keeps_all_data(nodes: Nodes) -> None:
    node = nodes.start("eu")
    for user_id in ("homer", "marge", "bart", "lisa", "maggie"):
        body = {"id": user_id, "name": f"{user_id.title()} Simpson", "username": user_id}
        body["email"] = f"{user_id}@springfield.example"
        assert node.call("POST", "/users", body).status == 201
    assert node.call("POST", "/groups", {"id": "simpsons", "name": "The Simpsons"}).status == 201
    for user_id in ("homer", "marge", "bart", "lisa", "maggie"):
        assert node.call("PUT", f"/groups/simpsons/members/{user_id}").status == 200
    assert node.call("PATCH", "/users/homer", {"name": "Homer J. Simpson"}).status == 200
    assert node.call("PATCH", "/users/lisa", {"profile": {"plays": "saxophone"}}).status == 200
    assert node.call("DELETE", "/groups/simpsons/members/maggie").status == 204
    assert node.call("DELETE", "/users/bart").status == 204
    paths = [
        "/status",
        "/changes?since=0&limit=1000",
        "/users?limit=100",
        "/users?q=simpson",
        "/users?email=marge%40springfield.example",
        "/users/homer",
        "/users/homer/history",
        "/users/lisa",
        "/users/bart",
        "/users/bart/history",
        "/groups/simpsons",
        "/groups/simpsons/members",
        "/groups/simpsons/history",
        "/users/lisa/groups",
        "/conflicts",
    ]
    before = snapshot(node, paths)
    assert before["/users/homer"][1]["name"] == "Homer J. Simpson"

    assert node.terminate() == 0, node.stderr()
    again = nodes.start("eu")
    after = snapshot(again, paths)

    status_before, status_after = before.pop("/status")[1], after.pop("/status")[1]
    assert status_after["replica_id"] == status_before["replica_id"]
    assert again.ready_line.split()[1] == status_before["replica_id"]
    for key in ("region", "seq", "summary", "token", "digest"):
        assert status_after.get(key) == status_before.get(key), key
    assert after == before
    # and it keeps working: the next write continues the same log
    assert again.call("PATCH", "/users/marge", {"name": "Marjorie Simpson"}).status == 200
    assert again.call("GET", "/status").json()["seq"] == status_before["seq"] + 1
    assert again.terminate() == 0, again.stderr()


def test_sigterm_drains_in_flight_writes(nodes: Nodes) -> None:
    node = nodes.start("eu")
    writes, workers, sigterm_after_acks = 400, 48, 40
    acked: dict[str, int] = {}
    answers: dict[int | None, int] = {}
    in_flight: set[str] = set()
    at_sigterm: set[str] = set()

    async def load() -> None:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(writes):
            todo.put_nowait(i)
        connector = aiohttp.TCPConnector(limit=workers)
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=connector) as session:

            async def worker() -> None:
                while not todo.empty():
                    i = todo.get_nowait()
                    user_id = f"d{i}"
                    body = {"id": user_id, "name": f"Drain {i}", "username": user_id}
                    body["email"] = f"{user_id}@drain.example"
                    in_flight.add(user_id)
                    status = await send(session, "POST", f"{node.url}/users", body)
                    in_flight.discard(user_id)
                    answers[status] = answers.get(status, 0) + 1
                    if status is not None and 200 <= status < 300:
                        acked[user_id] = i
                        if len(acked) == sigterm_after_acks:
                            at_sigterm.update(in_flight)
                            node.sigterm()

            await asyncio.gather(*(worker() for _ in range(workers)))

    asyncio.run(load())
    code = node.terminate()  # signalled already: this only waits for the exit
    counts = (
        f"{writes} writes, {len(acked)} acknowledged, {len(at_sigterm)} in flight at SIGTERM"
        f" ({len(at_sigterm & set(acked))} of them acknowledged), answers {answers}"
    )
    assert code == 0, f"{counts}\n{node.stderr()}"
    assert len(acked) >= sigterm_after_acks, counts
    assert at_sigterm, f"nothing was in flight at SIGTERM: {counts}"
    assert at_sigterm & set(acked), f"nothing in flight was drained: {counts}"
    assert all(s is None or s < 500 for s in answers), counts

    again = nodes.start("eu")
    feed = again.call("GET", "/changes?since=0&limit=1000").json()["changes"]
    created = {c["stream"].removeprefix("user/") for c in feed if c["op"] == "create"}
    missing = sorted(set(acked) - created)
    assert not missing, f"acknowledged but lost: {missing[:10]}; {counts}"
    for user_id, i in acked.items():
        reply = again.call("GET", f"/users/{user_id}")
        assert reply.status == 200, f"{user_id}: {reply.text}; {counts}"
        assert reply.json()["name"] == f"Drain {i}", counts
    assert created <= {f"d{i}" for i in range(writes)}, counts
    assert again.terminate() == 0, again.stderr()


@dataclass
class Client:
    """One writer: PATCHes its own user's profile.v, and now and then POSTs a new user."""

    number: int
    attempted: list[int] = field(default_factory=list)  # profile.v values sent by PATCH
    last_acked: int | None = None
    posts_attempted: dict[str, int] = field(default_factory=dict)
    posts_acked: dict[str, int] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)  # statuses other than 2xx

    @property
    def user_id(self) -> str:
        return f"k{self.number}"

    def allowed(self) -> set[str | None]:
        """What the user's profile.v may be after a crash: the last ack or a later attempt."""
        after = self.attempted
        if self.last_acked is not None:
            after = self.attempted[self.attempted.index(self.last_acked) :]
        allowed: set[str | None] = {str(v) for v in after}
        if self.last_acked is None:
            allowed.add(None)
        return allowed


def test_kill_9_under_load_loses_no_acknowledged_write(nodes: Nodes) -> None:
    node = nodes.start("eu")
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    kill_after_s = rng.uniform(1.0, 2.5)
    clients = [Client(n) for n in range(32)]
    for client in clients:
        body = {"id": client.user_id, "name": f"Client {client.number}"}
        body |= {"username": client.user_id, "email": f"{client.user_id}@load.example"}
        assert node.call("POST", "/users", body).status == 201

    async def load() -> None:
        killed = asyncio.Event()
        connector = aiohttp.TCPConnector(limit=len(clients))
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=connector) as session:

            async def write(client: Client) -> None:
                i = 0
                while not killed.is_set():
                    i += 1
                    if i % 5 == 0:
                        user_id = f"{client.user_id}n{i}"
                        body: dict[str, Any] = {"id": user_id, "name": f"New {i}"}
                        body |= {"username": user_id, "email": f"{user_id}@load.example"}
                        body["profile"] = {"v": str(i)}
                        client.posts_attempted[user_id] = i
                        status = await send(session, "POST", f"{node.url}/users", body)
                        if status is not None and 200 <= status < 300:
                            client.posts_acked[user_id] = i
                    else:
                        client.attempted.append(i)
                        url = f"{node.url}/users/{client.user_id}"
                        status = await send(session, "PATCH", url, {"profile": {"v": str(i)}})
                        if status is not None and 200 <= status < 300:
                            client.last_acked = i
                    if status is None:
                        return  # the node is gone
                    if not 200 <= status < 300:
                        client.refused.append(status)

            async def kill() -> None:
                await asyncio.sleep(kill_after_s)
                os.kill(node.proc.pid, signal.SIGKILL)
                killed.set()

            await asyncio.gather(kill(), *(write(client) for client in clients))

    asyncio.run(load())
    assert node.proc.wait(20) == -signal.SIGKILL
    patches_acked = sum(
        c.attempted.index(c.last_acked) + 1 for c in clients if c.last_acked is not None
    )
    counts = (
        f"seed {seed}, kill -9 after {kill_after_s:.2f} s: {len(clients)} clients,"
        f" {sum(len(c.attempted) for c in clients)} PATCHes sent, {patches_acked} acknowledged,"
        f" {sum(len(c.posts_attempted) for c in clients)} POSTs sent,"
        f" {sum(len(c.posts_acked) for c in clients)} acknowledged"
    )
    refused = {c.user_id: c.refused for c in clients if c.refused}
    assert not refused, f"writes refused under load: {refused}; {counts}"
    assert patches_acked > 0, counts

    again = nodes.start("eu")
    lost = []
    for client in clients:
        reply = again.call("GET", f"/users/{client.user_id}")
        assert reply.status == 200, f"{client.user_id}: {reply.text}; {counts}"
        value = reply.json()["profile"].get("v")
        if value not in client.allowed():
            lost.append((client.user_id, value, client.last_acked, client.attempted[-3:]))
        for user_id, i in client.posts_attempted.items():
            reply = again.call("GET", f"/users/{user_id}")
            if user_id in client.posts_acked:
                assert reply.status == 200, f"acknowledged POST {user_id} lost; {counts}"
            if reply.status == 200:
                assert reply.json()["profile"] == {"v": str(i)}, counts
            else:
                assert reply.status == 404, reply.text
    assert not lost, f"(user, value, last acked, last attempts) {lost}; {counts}"
    # and the recovered node takes writes again
    reply = again.call("PATCH", "/users/k0", {"profile": {"v": "after"}})
    assert reply.status == 200, reply.text
    assert again.terminate() == 0, again.stderr()
