"""How a sync message reaches a peer: over HTTP between processes, or in memory.

Both carry the same bytes; simulations wrap the in-memory one with their own network
(loss, delay, partitions), so they drive the real replication code without sockets.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp

from replication.auth import AuthError, sign_request, verify_response

SYNC_PATH = "/replication/sync"
REQUEST_TIMEOUT_MS = 10_000


class TransportError(Exception):
    """The peer could not be reached, or answered with an error."""


class Transport(Protocol):
    async def send(self, peer: str, body: bytes) -> bytes:
        """Deliver a sync request to ``peer`` and return its response body."""
        ...

    async def close(self) -> None: ...


Handler = Callable[[bytes], Awaitable[bytes]]


class MemoryTransport:
    """Peers are handlers in this process, by name. A missing peer is unreachable."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.bytes_sent = 0

    async def send(self, peer: str, body: bytes) -> bytes:
        handler = self.handlers.get(peer)
        if handler is None:
            raise TransportError(f"{peer} is unreachable")
        self.bytes_sent += len(body)
        response = await handler(body)
        self.bytes_sent += len(response)
        return response

    async def close(self) -> None:
        pass


# Who signs: a replica id, or what gives the current one (a node renews its id while it
# runs when it finds its last commits undone).
Sender = str | Callable[[], str]


def sender_of(sender: Sender) -> Callable[[], str]:
    if callable(sender):
        return sender
    return lambda: sender


class HttpTransport:
    """Signed msgpack over HTTP(S); peers are named by region and reached by URL."""

    def __init__(
        self,
        urls: dict[str, str],
        *,
        secret: str,
        sender: Sender,
        ssl_context: ssl.SSLContext | None = None,
        timeout_ms: int = REQUEST_TIMEOUT_MS,
    ) -> None:
        self.urls, self.secret, self.sender = urls, secret, sender_of(sender)
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=timeout_ms / 1000)
        self.bytes_sent = 0

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=connector,
                # A peer needs none of these; each round trip would carry them.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def send(self, peer: str, body: bytes) -> bytes:
        headers = {
            "Content-Type": "application/msgpack",
            **sign_request(self.secret, "POST", SYNC_PATH, body, self.sender()),
        }
        try:
            async with self.session().post(
                self.urls[peer] + SYNC_PATH, data=body, headers=headers
            ) as r:
                response = await r.read()
                if r.status != 200:
                    raise TransportError(f"{peer} answered {r.status}: {response[:200]!r}")
                verify_response(self.secret, r.status, response, r.headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TransportError(f"{peer}: {type(exc).__name__}: {exc}") from exc
        except AuthError as exc:
            raise TransportError(f"{peer}: {exc}") from exc
        self.bytes_sent += len(body) + len(response)
        return response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
