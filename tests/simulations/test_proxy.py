"""The fault proxy forwards a link's bytes, and a reset while a chunk is delayed closes
the connection quietly, on either event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from node.event_loop import EVENT_LOOPS, run_on
from simulations.proxy import Faults, LinkProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _through_proxy(
    delay_ms: int, reset_after_s: float | None
) -> tuple[bytes, int, list[Any]]:
    """Send b"ping" through a proxy to an echo server; reset the proxy after
    ``reset_after_s`` if given. Returns (what came back, bytes forwarded, loop errors)."""
    errors: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = int(target.sockets[0].getsockname()[1])
    proxy = LinkProxy("eu->us", "127.0.0.1", port, Faults(delay_ms=delay_ms))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", await proxy.start())
        writer.write(b"ping")
        await writer.drain()
        if reset_after_s is not None:
            await asyncio.sleep(reset_after_s)
            proxy.reset()
        got = await asyncio.wait_for(reader.read(1024), 5)
        writer.close()
        await asyncio.sleep(delay_ms / 1000 + 0.05)  # the delayed chunk's turn comes
        return got, proxy.bytes_forwarded, errors
    finally:
        await proxy.stop()
        target.close()
        await target.wait_closed()


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_bytes_are_forwarded_both_ways(loop: str) -> None:
    got, forwarded, errors = run_on(loop, _through_proxy(0, None))
    assert got == b"ping"
    assert forwarded == 8  # there and back
    assert errors == []


@pytest.mark.parametrize("loop", EVENT_LOOPS)
def test_a_reset_while_a_chunk_is_delayed_closes_the_connection_quietly(loop: str) -> None:
    got, forwarded, errors = run_on(loop, _through_proxy(200, 0.05))
    assert got == b""  # the client sees the connection end, not the echo
    assert forwarded == 0
    assert errors == [], errors
