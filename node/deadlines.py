"""Deadlines for what a client sends, so that slow clients cannot hold the node's
connections (slowloris): a connection whose first request has not fully arrived in its
head within ``request_head_wait_ms`` is closed, and a body not in within
``request_body_wait_ms`` is answered 408.

aiohttp has neither. Its keep-alive timer, armed when a connection opens, does nothing
before the first request, so one header line every few seconds held a connection for
good, and about 20,000 such connections took every file descriptor of the node, its
peers' connections too (found by a review). Between requests on a kept-alive connection,
an idle one and one whose next head trickles in alike, aiohttp's ``keepalive_timeout``
closes it: ``idle_connection_wait_ms`` (its default was an hour). And at most
``connections_max`` connections are open at once (fewer if the process may open fewer
files): one more is closed as it opens, so that a flood of them cannot take the
descriptors LMDB and the peers need.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web, web_protocol

from node.http_errors import ApiError, fail

logger = logging.getLogger(__name__)

# The first request's head, per connection not yet past it: the timer that closes it.
_opening: dict[web_protocol.RequestHandler, asyncio.TimerHandle] = {}
_open: set[web_protocol.RequestHandler] = set()  # every connection open now
_head_wait_s: list[float] = []  # set once, by close_slow_openings
_connections_max: list[int] = []  # likewise
FILES_KEPT_FREE = 256  # descriptors left to LMDB, logs and peers under RLIMIT_NOFILE
FILES_WANTED = 65_536  # the soft RLIMIT_NOFILE a node raises itself to, if the hard allows
REFUSALS_LOGGED_EVERY_S = 10.0
_refusal_logged = [-REFUSALS_LOGGED_EVERY_S]
_CONNECTION_MADE = web_protocol.RequestHandler.connection_made
_CONNECTION_LOST = web_protocol.RequestHandler.connection_lost


def close_slow_openings(head_wait_ms: int, connections_max: int) -> int:
    """Close every connection of this process's servers whose first request's head has
    not arrived ``head_wait_ms`` after it opened (``request_began`` marks it arrived),
    and any beyond ``connections_max`` open at once (or what RLIMIT_NOFILE leaves);
    return that cap. aiohttp makes its protocol objects itself: their methods are
    wrapped, once."""
    files = _files_allowed()
    if files != resource.RLIM_INFINITY:
        room = files - FILES_KEPT_FREE if files >= 2 * FILES_KEPT_FREE else files // 2
        if room < connections_max:
            logger.warning(
                "at most %d connections at once (connections_max %d): this process may open "
                "%d files (RLIMIT_NOFILE; raise it, e.g. LimitNOFILE= in systemd)",
                max(1, room),
                connections_max,
                files,
            )
            connections_max = max(1, room)
    _head_wait_s[:] = [head_wait_ms / 1000]
    _connections_max[:] = [connections_max]
    web_protocol.RequestHandler.connection_made = _connection_made  # type: ignore[method-assign,assignment]
    web_protocol.RequestHandler.connection_lost = _connection_lost  # type: ignore[method-assign,assignment]
    return connections_max


def _files_allowed() -> int:
    """The files this process may open, its soft limit raised to the hard one first (a
    shell's 256 or 1,024 left a node a handful of connections: a review)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, FILES_WANTED)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
    return soft


def _connection_made(handler: web_protocol.RequestHandler, transport: Any) -> None:
    _CONNECTION_MADE(handler, transport)
    if _connections_max and len(_open) >= _connections_max[0]:
        now = time.monotonic()
        if now - _refusal_logged[0] >= REFUSALS_LOGGED_EVERY_S:
            _refusal_logged[0] = now
            logger.warning(
                "closed a connection as it opened: %d are open, connections_max", len(_open)
            )
        handler.force_close()
        return
    _open.add(handler)
    if _head_wait_s:
        loop = asyncio.get_running_loop()
        _opening[handler] = loop.call_later(_head_wait_s[0], _too_slow, handler)


def _connection_lost(handler: web_protocol.RequestHandler, exc: BaseException | None) -> None:
    _open.discard(handler)
    timer = _opening.pop(handler, None)
    if timer is not None:
        timer.cancel()
    _CONNECTION_LOST(handler, exc)


def _too_slow(handler: web_protocol.RequestHandler) -> None:
    if _opening.pop(handler, None) is None:
        return
    logger.info(
        "closed a connection whose first request had not arrived after %.0f s", _head_wait_s[0]
    )
    handler.force_close()


def request_began(request: web.BaseRequest) -> None:
    """The request's head has arrived: its connection's opening deadline is met."""
    timer = _opening.pop(request.protocol, None)
    if timer is not None:
        timer.cancel()


# Bytes of the bodies on their way in, each counted at its declared length (or the
# largest a body may be, sent chunked): each is held in memory as it arrives, and 4,000
# clients sending 1 MB bodies but their last byte held 8 GB (a review). Past it, 503 at
# once. A body all here with its head counts nothing; by bytes, not bodies, so that
# many clients with small bodies (a count of 64 refused 136 of 200 WAN clients' 55 KB
# uploads: a review) are not refused for a few large ones.
BODIES_ARRIVING_BYTES_MAX = 256 * 1_048_576
_arriving = [0]


async def read_body(request: web.BaseRequest, wait_ms: int, bytes_max: int) -> bytes:
    """The whole body (at most ``bytes_max``); 408 if it has not arrived within
    ``wait_ms``, 503 if BODIES_ARRIVING_BYTES_MAX bytes of bodies are arriving."""
    if request.content.is_eof():  # all here already (most bodies come with their head)
        return await request.read()
    size = min(request.content_length or bytes_max, bytes_max)
    if _arriving[0] + size > BODIES_ARRIVING_BYTES_MAX:
        raise ApiError(
            503,
            "overloaded",
            f"{BODIES_ARRIVING_BYTES_MAX} bytes of request bodies are on their way in "
            "already; retry shortly",
        )
    _arriving[0] += size
    try:
        async with asyncio.timeout(wait_ms / 1000):
            return await request.read()
    except TimeoutError:
        fail(408, "request_timeout", f"the body did not arrive within {wait_ms} ms")
    finally:
        _arriving[0] -= size
