"""Two real replicas, the second serving its replication endpoints on loopback (a real
aiohttp server): what the HTTP and stream transport tests stand on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from node import commands
from node.config import Peer, Settings
from node.replica import Replica
from replication.replicator import Replicator
from replication.service import ReplicationService

SECRET = "a-cluster-secret-for-tests"

Install = Callable[[web.Application, ReplicationService], None]


def _whole(app: web.Application, service: ReplicationService) -> None:
    service.install(app)


@asynccontextmanager
async def served_pair(
    tmp_path: Path, *, install: Install = _whole, **settings: Any
) -> AsyncIterator[tuple[Replica, Replica, ReplicationService, str]]:
    """(eu, us, us's replication service, us's base URL). ``install`` puts the service's
    routes on us's app (all of them unless told); ``settings`` are us's, beside its
    region, data directory, peer and secret."""
    loop = asyncio.get_running_loop()
    eu = Replica.open(tmp_path / "eu", "eu")
    us = Replica.open(tmp_path / "us", "us")
    server: TestServer | None = None
    try:
        eu.bind(loop)
        us.bind(loop)
        service = ReplicationService(
            us,
            Settings(
                region="us",
                data_dir=tmp_path / "us",
                peers=(Peer("eu", "http://127.0.0.1:9"),),
                cluster_secret=SECRET,
                **settings,
            ),
        )
        app = web.Application()
        install(app, service)
        server = TestServer(app)
        await server.start_server()
        yield eu, us, service, str(server.make_url("/")).rstrip("/")
    finally:
        if server is not None:
            await service.stop()
            await server.close()
        eu.close()
        us.close()


async def assert_a_wrong_secret_is_refused(
    eu: Replica, us: Replica, replicator: Replicator
) -> None:
    """eu, whose secret is not the cluster's, syncs with us: refused (401), nothing written,
    and eu backs off."""
    await eu.write(commands.create("group", "staff", {"name": "Staff"}), actor="t")
    assert not await replicator.sync_with("us")
    peer = replicator.peers["us"]
    assert peer.failures == 1
    assert peer.last_error is not None
    assert "401" in peer.last_error
    assert us.state.seq == 0


async def assert_two_nodes_sync(
    eu: Replica, us: Replica, replicator: Replicator, *, rounds: int = 1
) -> None:
    """Each node writes; eu syncs with us ``rounds`` times; both hold both writes."""
    fields = {"name": "Homer", "username": "homer", "email": "homer@x.us"}
    await eu.write(commands.create("user", "homer", fields), actor="t")
    await us.write(commands.create("group", "staff", {"name": "Staff"}), actor="t")
    for _ in range(rounds):
        assert await replicator.sync_with("us")
    assert eu.summary == us.summary
    assert us.entity("user", "homer").value("name") == "Homer"
    assert eu.entity("group", "staff").exists
    assert replicator.peers["us"].failures == 0
