"""Run the HTTP API in-process for tests: a replica, its app and a client on one loop.

pytest-asyncio is not used: a test is a plain function calling ``run(body)``, where
``body`` is an async function receiving an ``Api`` (client, replica and settings).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient, TestServer

from node.api import build_app
from node.config import Settings
from node.kv import MemoryKV
from node.replica import Replica

Client = TestClient[web.Request, web.Application]


@dataclass
class Api:
    client: Client
    replica: Replica
    settings: Settings

    async def call(
        self, method: str, path: str, *, status: int | None = None, **kwargs: Any
    ) -> tuple[ClientResponse, Any]:
        """Send a request; return the response and its JSON body (None if not JSON)."""
        response = await self.client.request(method, path, **kwargs)
        body: Any = None
        if response.content_type == "application/json":
            body = await response.json()
        else:
            await response.read()
        if status is not None:
            assert response.status == status, (method, path, response.status, body)
        return response, body

    async def create_user(
        self,
        handle: str,
        *,
        status: int = 201,
        headers: dict[str, str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """POST /users as username ``handle``, email ``<handle>@example.com`` unless given."""
        body = {
            "name": handle.title(),
            "username": handle,
            "email": f"{handle}@example.com",
            **fields,
        }
        _, answer = await self.call("POST", "/users", json=body, status=status, headers=headers)
        assert isinstance(answer, dict)
        return answer

    async def create_group(self, group_id: str, name: str | None = None) -> dict[str, Any]:
        body = {"id": group_id, "name": name or group_id.title()}
        _, answer = await self.call("POST", "/groups", json=body, status=201)
        assert isinstance(answer, dict)
        return answer


@asynccontextmanager
async def api(data_dir: Path | None = None, **settings: Any) -> AsyncIterator[Api]:
    """A node of region "eu" (in memory, or LMDB under ``data_dir``) behind a test client."""
    if data_dir is None:
        replica = Replica(MemoryKV(), "eu")
    else:
        replica = Replica.open(data_dir, "eu", metasync=False)
    try:
        replica.bind(asyncio.get_running_loop())
        config = Settings(region="eu", data_dir=data_dir or Path("unused"), **settings)
        async with TestClient(TestServer(build_app(replica, config))) as client:
            yield Api(client, replica, config)
    finally:
        replica.close()


def run(
    body: Callable[[Api], Awaitable[None]], data_dir: Path | None = None, **settings: Any
) -> None:
    """Run ``body`` against a fresh node, in a fresh event loop."""

    async def main() -> None:
        async with api(data_dir, **settings) as node:
            await body(node)

    asyncio.run(main())
