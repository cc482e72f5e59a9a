"""Deadlines for what a client sends, so that slow clients cannot hold the node's
connections (slowloris): a connection whose first request has not fully arrived in its
head within ``request_head_wait_ms`` is closed, and a body not in within
``request_body_wait_ms`` is answered 408.

aiohttp has neither. Its keep-alive timer, armed when a connection opens, does nothing
before the first request, so one header line every few seconds held a connection for
good, and about 20,000 such connections took every file descriptor of the node, its
peers' connections too (found by a review). Between requests on a kept-alive connection
aiohttp's own ``keepalive_timeout`` (75 s) closes it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web, web_protocol

from node.http_errors import fail

logger = logging.getLogger(__name__)

# The first request's head, per connection not yet past it: the timer that closes it.
_opening: dict[web_protocol.RequestHandler, asyncio.TimerHandle] = {}
_head_wait_s: list[float] = []  # set once, by close_slow_openings
_CONNECTION_MADE = web_protocol.RequestHandler.connection_made
_CONNECTION_LOST = web_protocol.RequestHandler.connection_lost


def close_slow_openings(head_wait_ms: int) -> None:
    """Close every connection of this process's servers whose first request's head has
    not arrived ``head_wait_ms`` after it opened (``request_began`` marks it arrived).
    aiohttp makes its protocol objects itself: their methods are wrapped, once."""
    _head_wait_s[:] = [head_wait_ms / 1000]
    web_protocol.RequestHandler.connection_made = _connection_made  # type: ignore[method-assign,assignment]
    web_protocol.RequestHandler.connection_lost = _connection_lost  # type: ignore[method-assign,assignment]


def _connection_made(handler: web_protocol.RequestHandler, transport: Any) -> None:
    _CONNECTION_MADE(handler, transport)
    if _head_wait_s:
        loop = asyncio.get_running_loop()
        _opening[handler] = loop.call_later(_head_wait_s[0], _too_slow, handler)


def _connection_lost(handler: web_protocol.RequestHandler, exc: BaseException | None) -> None:
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


async def read_body(request: web.BaseRequest, wait_ms: int) -> bytes:
    """The whole body, or 408 if it has not arrived within ``wait_ms``."""
    if request.content.is_eof():  # all here already (most bodies come with their head)
        return await request.read()
    try:
        async with asyncio.timeout(wait_ms / 1000):
            return await request.read()
    except TimeoutError:
        fail(408, "request_timeout", f"the body did not arrive within {wait_ms} ms")
