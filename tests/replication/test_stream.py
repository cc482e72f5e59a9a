"""Sync messages over the signed WebSocket stream (``replication/stream.py``), on real
aiohttp servers on loopback: two real nodes sync over one long-lived stream; a stream
that cannot be opened, or a frame that is forged, replayed, reflected, malformed or too
big, writes nothing and never answers 500; a peer of an older version without the stream
is reached over HTTP."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.test_utils import TestServer

from crdt import Dot, VersionVector
from node import commands
from node import events as ev
from node.events import Event, Op
from node.metrics import render_metrics
from node.replica import Replica, wall_clock_ms
from replication import auth, protocol
from replication.protocol import RawEvent, Sync, Tag
from replication.replicator import Replicator
from replication.service import ReplicationService
from replication.stream import (
    _ANSWER_HEAD,
    MAC_BYTES,
    NONCE,
    NONCE_BYTES,
    STREAM_PATH,
    FrameMac,
    StreamEndpoint,
    StreamTransport,
    _hello_mac,
    _nonce_of,
    _nonce_text,
    compresses,
)
from replication.transport import SYNC_PATH, HttpTransport, TransportError
from tests.replication.served import (
    SECRET,
    assert_a_wrong_secret_is_refused,
    assert_two_nodes_sync,
    served_pair,
)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's, for an opening by hand
BODY_BYTES_MAX = 64 * 1024


def opening(sender: str = "eu~abcd") -> tuple[bytes, dict[str, str]]:
    """A fresh client nonce and the signed headers that open a stream with it."""
    nonce = os.urandom(NONCE_BYTES)
    headers = {
        NONCE: _nonce_text(nonce),
        **auth.sign_request(SECRET, "GET", STREAM_PATH, nonce, sender),
    }
    return nonce, headers


def stream_transport(
    base: str,
    *,
    secret: str = SECRET,
    sender: str = "eu~abcd",
    timeout_ms: int = 10_000,
    compression: str = "auto",
) -> StreamTransport:
    urls = {"us": base}
    http = HttpTransport(urls, secret=secret, sender=sender, timeout_ms=timeout_ms)
    return StreamTransport(
        urls,
        secret=secret,
        sender=sender,
        http=http,
        timeout_ms=timeout_ms,
        message_bytes_max=BODY_BYTES_MAX,
        compression=compression,
    )


# --------------------------------------------------------------------------- two real nodes


@dataclass
class Pair:
    eu: Replica
    us: Replica
    base: str  # us's URL
    transport: StreamTransport  # eu's
    replicator: Replicator  # eu's, reaching us over the stream
    service: ReplicationService  # us's


@asynccontextmanager
async def pair(
    tmp_path: Path, *, secret: str = SECRET, stream: bool = True, no_stream_status: int = 404
) -> AsyncIterator[Pair]:
    """eu reaches us's real replication endpoints; ``stream=False``: us is of an older
    version, which has ``/replication/sync`` and no stream (or a proxy in front of it
    answers the upgrade ``no_stream_status``)."""

    def older(app: web.Application, service: ReplicationService) -> None:
        app.router.add_post(SYNC_PATH, service.handle)
        if no_stream_status != 404:

            async def no_stream(request: web.Request) -> web.Response:
                return web.Response(status=no_stream_status)

            app.router.add_get(STREAM_PATH, no_stream)

    install = {} if stream else {"install": older}
    async with served_pair(tmp_path, sync_body_bytes_max=BODY_BYTES_MAX, **install) as (
        eu,
        us,
        service,
        base,
    ):
        transport = stream_transport(base, secret=secret, sender=eu.identity.replica_id)
        try:
            replicator = Replicator(eu, transport, ["us"], now_ms=wall_clock_ms)
            yield Pair(eu, us, base, transport, replicator, service)
        finally:
            await transport.close()


def run(tmp_path: Path, body: Callable[[Pair], Awaitable[None]], **options: object) -> None:
    async def main() -> None:
        async with pair(tmp_path, **options) as p:  # type: ignore[arg-type]
            await body(p)

    asyncio.run(main())


def test_two_nodes_sync_over_one_stream(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        await assert_two_nodes_sync(p.eu, p.us, p.replicator, rounds=3)
        assert p.transport.mode("us") == "stream"
        assert p.transport.streams_opened == 1  # every round on the same stream
        assert len(p.service.endpoint.open) == 1

    run(tmp_path, body)


def test_a_node_with_the_wrong_secret_is_refused_and_backs_off(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        await assert_a_wrong_secret_is_refused(p.eu, p.us, p.replicator)
        assert p.transport.streams_opened == 0
        assert p.transport.mode("us") == "stream"  # refused is not "has no stream"

    run(tmp_path, body, secret="not-the-cluster-secret")


@pytest.mark.parametrize("status", [404, 400, 426, 501])
def test_a_peer_without_the_stream_is_reached_over_http(tmp_path: Path, status: int) -> None:
    """404: a node of an older version; 400, 426, 501: a proxy on the way that does not
    pass the upgrade on (the node then sees a plain GET: 400)."""

    async def body(p: Pair) -> None:
        await p.eu.write(commands.create("group", "staff", {"name": "Staff"}), actor="t")
        assert await p.replicator.sync_with("us")
        assert p.us.entity("group", "staff").exists
        assert p.transport.mode("us") == "http"
        assert p.transport.streams_opened == 0
        assert p.transport.bytes_sent > 0

    run(tmp_path, body, stream=False, no_stream_status=status)


def test_status_names_each_peers_transport(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        [peer] = p.service.report()["replication"]["peers"]
        assert peer["transport"] == "stream"
        assert p.service.report()["replication"]["streams_refused"] == 0

    run(tmp_path, body)


# --------------------------------------------------------------------------- raw frames


def request_body(sender: str, *events: Event) -> bytes:
    raws = tuple(RawEvent(e.dot, ev.encode(e)) for e in events)
    return protocol.encode(Sync(Tag.SYNC_REQUEST, sender, VersionVector(), raws))


def create(origin: str, counter: int, user_id: str) -> Event:
    return Event(
        Dot(origin, counter), (wall_clock_ms() << 16) + counter, f"user/{user_id}", Op.CREATE
    )


@dataclass
class Opened:
    ws: aiohttp.ClientWebSocketResponse
    mac: FrameMac
    sender: str


@asynccontextmanager
async def opened(base: str, sender: str, *, compress: int = 0) -> AsyncIterator[Opened]:
    """A stream opened by hand, as a peer's transport opens it (``compress``: the deflate
    window bits it offers, 0 for none)."""
    nonce, headers = opening(sender)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(base + STREAM_PATH, headers=headers, compress=compress) as ws,
    ):
        hello = await ws.receive_bytes(timeout=5)
        server_nonce = hello[:NONCE_BYTES]
        assert hello[NONCE_BYTES:] == _hello_mac(SECRET, sender, nonce, server_nonce)
        yield Opened(ws, FrameMac(SECRET, sender, nonce, server_nonce), sender)


async def answer_of(o: Opened) -> tuple[int, int, bytes]:
    (request_id, status), body = o.mac.read(b"a", _ANSWER_HEAD, await o.ws.receive_bytes(timeout=5))
    return request_id, status, body


async def closed_with(o: Opened) -> int | None:
    message = await o.ws.receive(timeout=5)
    assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    return o.ws.close_code


def frames(
    tmp_path: Path, body: Callable[[Pair, Opened], Awaitable[None]], *, compress: int = 0
) -> None:
    async def test(p: Pair) -> None:
        async with opened(p.base, p.eu.identity.replica_id, compress=compress) as o:
            await body(p, o)

    run(tmp_path, test)


def test_a_signed_frame_is_answered_and_the_stream_stays_open(tmp_path: Path) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        await o.ws.send_bytes(o.mac.request(1, request_body(me, create(me, 1, "homer"))))
        request_id, status, answer = await answer_of(o)
        assert (request_id, status) == (1, 200)
        assert protocol.decode(answer, expect=Tag.SYNC_RESPONSE).tag is Tag.SYNC_RESPONSE
        await o.ws.send_bytes(o.mac.request(7, request_body(me, create(me, 2, "marge"))))
        assert (await answer_of(o))[:2] == (7, 200)
        assert p.us.state.seq == 2

    frames(tmp_path, body)


def test_a_malformed_batch_is_answered_400_and_writes_nothing(tmp_path: Path) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        bad = Event(Dot(me, 2), wall_clock_ms() << 16, "user/not an id", Op.CREATE)
        await o.ws.send_bytes(o.mac.request(1, request_body(me, create(me, 1, "homer"), bad)))
        request_id, status, answer = await answer_of(o)
        assert (request_id, status) == (1, 400)
        assert b"bad_batch" in answer
        await o.ws.send_bytes(o.mac.request(2, b"\xc1 not msgpack"))
        assert (await answer_of(o))[:2] == (2, 400)
        assert p.us.state.seq == 0
        await o.ws.send_bytes(o.mac.request(3, request_body(me, create(me, 1, "homer"))))
        assert (await answer_of(o))[:2] == (3, 200)  # the stream is still good
        assert p.us.state.seq == 1

    frames(tmp_path, body)


def forged(o: Opened, frame: bytes) -> bytes:
    return frame[:4] + bytes(MAC_BYTES) + frame[4 + MAC_BYTES :]


BAD_FRAMES: dict[str, Callable[[Opened, bytes], bytes]] = {
    "forged signature": forged,
    "body changed after signing": lambda o, frame: frame + b"x",
    "shorter than its head": lambda o, frame: frame[:10],
    "signed for the other direction": lambda o, frame: (
        frame[:4] + o.mac.of(b"a", frame[:4], frame[4 + MAC_BYTES :]) + frame[4 + MAC_BYTES :]
    ),
    "signed with another stream's key": lambda o, frame: FrameMac(
        SECRET, o.sender, os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
    ).request(1, frame[4 + MAC_BYTES :]),
}


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES))
def test_a_bad_frame_closes_the_stream_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        frame = o.mac.request(1, request_body(me, create(me, 1, "homer")))
        await o.ws.send_bytes(BAD_FRAMES[kind](o, frame))
        assert await closed_with(o) == WSCloseCode.POLICY_VIOLATION
        assert p.us.state.seq == 0
        assert p.service.endpoint.refused == 1
        assert 'replica_streams_refused_total{region="us"} 1' in render_metrics(p.us)

    frames(tmp_path, body)


def test_a_replayed_request_closes_the_stream_and_is_not_applied_again(tmp_path: Path) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        first = o.mac.request(5, request_body(me, create(me, 1, "homer")))
        await o.ws.send_bytes(first)
        assert (await answer_of(o))[:2] == (5, 200)
        await o.ws.send_bytes(first)
        assert await closed_with(o) == WSCloseCode.POLICY_VIOLATION
        smaller = o.mac.request(4, request_body(me, create(me, 2, "marge")))
        with pytest.raises((ConnectionError, RuntimeError)):
            await o.ws.send_bytes(smaller)  # closed: nothing more is read
        assert p.us.state.seq == 1

    frames(tmp_path, body)


def test_a_text_frame_closes_the_stream(tmp_path: Path) -> None:
    async def body(p: Pair, o: Opened) -> None:
        await o.ws.send_str("hello")
        assert await closed_with(o) == WSCloseCode.UNSUPPORTED_DATA
        assert p.us.state.seq == 0

    frames(tmp_path, body)


def test_a_frame_past_the_body_limit_closes_the_stream_and_writes_nothing(
    tmp_path: Path,
) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        events = [create(me, i, f"user{i}") for i in range(1, 2_000)]
        data = request_body(me, *events)
        assert len(data) > BODY_BYTES_MAX
        await o.ws.send_bytes(o.mac.request(1, data))
        assert await closed_with(o) == WSCloseCode.MESSAGE_TOO_BIG
        assert p.us.state.seq == 0

    frames(tmp_path, body)


def test_opening_a_stream_needs_a_signature_over_a_nonce(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        me = p.eu.identity.replica_id
        _, good = opening(me)
        other_nonce = {**good, NONCE: _nonce_text(os.urandom(NONCE_BYTES))}
        cases = {
            "no nonce": ({k: v for k, v in good.items() if k != NONCE}, 400),
            "a nonce of the wrong size": ({**good, NONCE: "abc"}, 400),
            "a nonce that is not base64url": ({**good, NONCE: "!" * 22}, 400),
            "unsigned": ({NONCE: good[NONCE]}, 401),
            "signed over another nonce": (other_nonce, 401),
        }
        async with aiohttp.ClientSession() as session:
            for name, (headers, status) in cases.items():
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(p.base + STREAM_PATH, headers=headers)
                assert refused.value.status == status, name
            async with session.get(p.base + STREAM_PATH, headers=good) as r:  # no upgrade
                assert r.status == 400
                assert (await r.json())["error"] == "not_websocket"
        assert not p.service.endpoint.open

    run(tmp_path, body)


# --------------------------------------------------------------------------- the transport


async def echo(body: bytes) -> tuple[int, bytes]:
    return 200, body


@asynccontextmanager
async def endpoint(
    answer: Callable[[bytes], Awaitable[tuple[int, bytes]]],
    *,
    heartbeat_ms: int = 30_000,
    compression: str = "auto",
) -> AsyncIterator[tuple[str, StreamEndpoint]]:
    served = StreamEndpoint(
        SECRET,
        answer,
        message_bytes_max=BODY_BYTES_MAX,
        auth_window_ms=30_000,
        heartbeat_ms=heartbeat_ms,
        compression=compression,
    )
    app = web.Application()
    app.router.add_get(STREAM_PATH, served.handle)
    async with TestServer(app) as server:
        try:
            yield str(server.make_url("/")).rstrip("/"), served
        finally:
            await served.close()


@asynccontextmanager
async def linked(
    answer: Callable[[bytes], Awaitable[tuple[int, bytes]]], *, timeout_ms: int = 10_000
) -> AsyncIterator[tuple[StreamTransport, StreamEndpoint]]:
    """A transport reaching an endpoint that answers with ``answer``."""
    async with endpoint(answer) as (base, served):
        transport = stream_transport(base, timeout_ms=timeout_ms)
        try:
            yield transport, served
        finally:
            await transport.close()


def test_concurrent_requests_share_one_stream_and_get_their_own_answers() -> None:
    async def out_of_order(body: bytes) -> tuple[int, bytes]:
        await asyncio.sleep((body[-1] % 7) / 1000)
        return 200, b"echo " + body

    async def main() -> None:
        async with linked(out_of_order) as (transport, _):
            bodies = [b"request %d" % i for i in range(40)]
            answers = await asyncio.gather(*(transport.send("us", b) for b in bodies))
            assert answers == [b"echo " + b for b in bodies]
            assert transport.streams_opened == 1

    asyncio.run(main())


def test_an_error_status_is_a_transport_error() -> None:
    async def refuse(body: bytes) -> tuple[int, bytes]:
        return 503, b'{"error": "overloaded"}'

    async def main() -> None:
        async with linked(refuse) as (transport, _):
            with pytest.raises(TransportError, match="503"):
                await transport.send("us", b"x")

    asyncio.run(main())


def test_a_request_left_unanswered_times_out_and_the_stream_carries_the_next() -> None:
    async def slow_once(body: bytes) -> tuple[int, bytes]:
        if body == b"slow":
            await asyncio.sleep(0.6)
        return 200, body

    async def main() -> None:
        async with linked(slow_once, timeout_ms=300) as (transport, _):
            with pytest.raises(TransportError, match="no answer in 300 ms"):
                await transport.send("us", b"slow")
            assert await transport.send("us", b"fast") == b"fast"
            await asyncio.sleep(0.5)  # the late answer comes, and is ignored
            assert await transport.send("us", b"again") == b"again"
            assert transport.streams_opened == 1

    asyncio.run(main())


def test_a_stream_outlives_the_request_timeout_between_requests() -> None:
    """The session's timeout bounds a request, not the stream's life."""

    async def main() -> None:
        async with linked(echo, timeout_ms=500) as (transport, _):
            assert await transport.send("us", b"one") == b"one"
            await asyncio.sleep(1.2)  # past the timeout, and a heartbeat answered
            assert await transport.send("us", b"two") == b"two"
            assert transport.streams_opened == 1

    asyncio.run(main())


def test_a_stream_the_server_drops_fails_its_waiting_request_and_the_next_reopens() -> None:
    async def main() -> None:
        started = asyncio.Event()

        async def hang(body: bytes) -> tuple[int, bytes]:
            if body == b"hang":
                started.set()
                await asyncio.sleep(1)
            return 200, body

        async with linked(hang) as (transport, served):
            waiting = asyncio.ensure_future(transport.send("us", b"hang"))
            await started.wait()
            for request in served.open.values():  # the connection breaks
                assert request.transport is not None
                request.transport.abort()
            with pytest.raises(TransportError):
                await waiting
            assert await transport.send("us", b"again") == b"again"
            assert transport.streams_opened == 2

    asyncio.run(main())


def test_a_stopping_node_closes_its_streams_and_opens_no_new_one() -> None:
    async def main() -> None:
        async with linked(echo) as (transport, served):
            assert await transport.send("us", b"one") == b"one"
            await asyncio.wait_for(served.close(), 2)
            with pytest.raises(TransportError, match="503"):
                await transport.send("us", b"two")
            assert not served.open
            assert transport.mode("us") == "stream"  # a node stopping still has streams

    asyncio.run(main())


def test_a_replayed_opening_is_refused_and_a_reconnect_replaces_the_older_stream() -> None:
    async def main() -> None:
        async with endpoint(echo) as (base, served), aiohttp.ClientSession() as session:
            _, captured = opening()
            async with session.ws_connect(base + STREAM_PATH, headers=captured) as first:
                await first.receive_bytes(timeout=5)
                with pytest.raises(aiohttp.WSServerHandshakeError) as replayed:
                    await session.ws_connect(base + STREAM_PATH, headers=captured)
                assert replayed.value.status == 401
                assert len(served.open) == 1
                transport = stream_transport(base)  # the same sender, reconnecting
                try:
                    assert await transport.send("us", b"x") == b"x"
                    closing = await first.receive(timeout=5)
                    assert closing.type is WSMsgType.CLOSE
                    assert closing.data == WSCloseCode.GOING_AWAY
                    assert len(served.open) == 1
                finally:
                    await transport.close()

    asyncio.run(main())


def test_a_late_answer_fails_its_own_request_and_no_other() -> None:
    async def answer(body: bytes) -> tuple[int, bytes]:
        await asyncio.sleep(3 if body == b"slow" else 0.6)
        return 200, body

    async def main() -> None:
        async with endpoint(answer) as (base, _):
            transport = stream_transport(base, timeout_ms=1_000)
            try:
                slow = asyncio.ensure_future(transport.send("us", b"slow"))
                await asyncio.sleep(0.5)
                fast = asyncio.ensure_future(transport.send("us", b"fast"))
                with pytest.raises(TransportError, match="no answer in 1000 ms"):
                    await slow
                assert await fast == b"fast"
                assert transport.streams_opened == 1
            finally:
                await transport.close()

    asyncio.run(main())


@asynccontextmanager
async def frozen_peer() -> AsyncIterator[str]:
    """A peer that opens the stream (a real hello), then reads no byte more and answers
    nothing, not even a ping: a process stopped, a network gone silent. Its receive
    buffer is small, so a large request cannot all be written."""

    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {
            name.lower(): value
            for name, _, value in (line.partition(": ") for line in head.decode().split("\r\n"))
        }
        key = fields["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        server_nonce = os.urandom(NONCE_BYTES)
        nonce = _nonce_of(fields[NONCE.lower()])
        hello = server_nonce + _hello_mac(SECRET, "eu~abcd", nonce, server_nonce)
        writer.write(bytes([0x82, len(hello)]) + hello)
        await writer.drain()
        with contextlib.suppress(asyncio.CancelledError):  # ended with the test
            await asyncio.sleep(30)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(frozen, sock=sock)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def test_a_peer_that_reads_nothing_cannot_hold_a_request_past_its_deadline() -> None:
    """A large request blocks in the write: the deadline covers the write too, and the
    stream is dropped, as the peer takes nothing."""

    async def main() -> None:
        async with frozen_peer() as base:
            transport = stream_transport(base, timeout_ms=500)
            transport.message_bytes_max = 64 * 1024 * 1024
            try:
                started = time.monotonic()
                with pytest.raises(TransportError, match="no answer in 500 ms"):
                    await transport.send("us", os.urandom(32 * 1024 * 1024))
                assert time.monotonic() - started < 3
                assert not transport._links["us"].usable
            finally:
                await transport.close()

    asyncio.run(main())


def test_a_stream_gone_silent_is_dropped_by_its_heartbeat() -> None:
    async def main() -> None:
        async with frozen_peer() as base:
            transport = stream_transport(base, timeout_ms=400)
            try:
                with pytest.raises(TransportError):  # written whole; never answered
                    await transport.send("us", b"small")
                link = transport._links["us"]
                for _ in range(40):  # pinged at 400 ms of silence, no pong within 200 ms
                    if not link.usable:
                        break
                    await asyncio.sleep(0.05)
                assert not link.usable
            finally:
                await transport.close()

    asyncio.run(main())


def test_a_peer_that_reads_nothing_cannot_hold_the_server() -> None:
    """A peer sends requests with large answers and reads none of them: the answers give
    up after the send deadline, and closing the endpoint (a node stopping) is bounded."""

    async def big(body: bytes) -> tuple[int, bytes]:
        return 200, bytes(1 << 20)

    async def main() -> None:
        served = StreamEndpoint(
            SECRET, big, message_bytes_max=BODY_BYTES_MAX, auth_window_ms=30_000, send_wait_ms=300
        )
        app = web.Application()
        app.router.add_get(STREAM_PATH, served.handle)
        async with TestServer(app) as server:
            nonce, headers = opening()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
            reader, writer = await asyncio.open_connection(sock=sock)
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                f"GET {STREAM_PATH} HTTP/1.1",
                f"Host: 127.0.0.1:{server.port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Version: 13",
                f"Sec-WebSocket-Key: {key}",
                *(f"{name}: {value}" for name, value in headers.items()),
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await reader.readuntil(b"\r\n\r\n")
            hello = (await reader.readexactly(2 + NONCE_BYTES + MAC_BYTES))[2:]
            mac = FrameMac(SECRET, "eu~abcd", nonce, hello[:NONCE_BYTES])
            for request_id in range(1, 9):  # masked with a zero key: the payload as it is
                payload = mac.request(request_id, b"give me a lot")
                writer.write(bytes([0x82, 0x80 | len(payload)]) + bytes(4) + payload)
            await writer.drain()
            for _ in range(40):  # the answers give up on the peer: it is dropped
                await asyncio.sleep(0.1)
                if not served.open:
                    break
            assert not served.open
            started = time.monotonic()
            await served.close()
            assert time.monotonic() - started < 2
            writer.transport.abort()

    asyncio.run(main())


async def fake_server(hello: Callable[[bytes, bytes], bytes], answer: bytes | None) -> TestServer:
    """A server that is not a peer: it opens a stream with ``hello(client_nonce,
    server_nonce)`` and answers each frame with ``answer``."""

    async def handle(request: web.Request) -> web.WebSocketResponse:
        client_nonce = request.headers[NONCE].encode()
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        server_nonce = os.urandom(NONCE_BYTES)
        await ws.send_bytes(server_nonce + hello(client_nonce, server_nonce))
        async for _ in ws:
            if answer is not None:
                await ws.send_bytes(answer)
        return ws

    app = web.Application()
    app.router.add_get(STREAM_PATH, handle)
    server = TestServer(app)
    await server.start_server()
    return server


def test_a_server_that_does_not_know_the_secret_is_not_trusted() -> None:
    async def main() -> None:
        server = await fake_server(lambda c, s: bytes(MAC_BYTES), None)
        transport = stream_transport(str(server.make_url("/")).rstrip("/"))
        try:
            with pytest.raises(TransportError, match="bad stream hello signature"):
                await transport.send("us", b"x")
            assert transport.streams_opened == 0
        finally:
            await transport.close()
            await server.close()

    asyncio.run(main())


def test_a_forged_answer_fails_the_request() -> None:
    async def main() -> None:
        # A server that knows the secret opens the stream; an answer it did not sign
        # (in flight, say) fails the request.
        forged_answer = _ANSWER_HEAD.pack(1, 200) + bytes(MAC_BYTES) + b"forged"
        sender = "eu~abcd"

        def hello(client_nonce_text: bytes, server_nonce: bytes) -> bytes:
            nonce = _nonce_of(client_nonce_text.decode())
            return _hello_mac(SECRET, sender, nonce, server_nonce)

        server = await fake_server(hello, forged_answer)
        transport = stream_transport(str(server.make_url("/")).rstrip("/"), sender=sender)
        try:
            with pytest.raises(TransportError, match="bad frame signature"):
                await transport.send("us", b"x")
        finally:
            await transport.close()
            await server.close()

    asyncio.run(main())


def test_a_peer_that_vanished_does_not_hold_its_stream() -> None:
    """A half-open connection: the peer neither sends nor answers pings. The server's
    heartbeat closes the stream and forgets it."""

    async def main() -> None:
        async with endpoint(echo, heartbeat_ms=200) as (base, served):
            _, headers = opening()
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(base + STREAM_PATH, headers=headers, autoping=False) as ws,
            ):
                await ws.receive_bytes(timeout=5)  # the hello
                assert len(served.open) == 1
                for _ in range(50):  # pings come and go unanswered
                    await asyncio.sleep(0.05)
                    if not served.open:
                        break
                assert not served.open

    asyncio.run(main())


# --------------------------------------------------------------------------- compression


class Relay:
    """A TCP relay on loopback counting the bytes it carries, both ways."""

    def __init__(self, port: int) -> None:
        self.port, self.carried = port, 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.carried += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def test_streams_are_compressed_on_links_without_tls_unless_told() -> None:
    assert compresses("auto", secure=False)
    assert not compresses("auto", secure=True)
    assert compresses("on", secure=True)
    assert compresses("on", secure=False)
    assert not compresses("off", secure=False)
    assert not compresses("off", secure=True)


def sync_like(i: int) -> bytes:
    """A body shaped like a push: the same origin, fields and actor, a fresh value."""
    return b"eu~0badc0de user/homer%d name Homer Simpson %08d actor ops@springfield" % (i, i)


@pytest.mark.parametrize(
    ("client", "server", "compressed"),
    [("auto", "auto", True), ("on", "on", True), ("off", "auto", False), ("auto", "off", False)],
)
def test_a_stream_is_compressed_where_both_ends_allow_it(
    client: str, server: str, compressed: bool
) -> None:
    async def main() -> None:
        async with endpoint(echo, compression=server) as (base, served):
            port = int(base.rsplit(":", 1)[1])
            relay = Relay(port)
            async with relay as relayed:
                transport = stream_transport(relayed, compression=client)
                try:
                    assert await transport.send("us", sync_like(0)) == sync_like(0)
                    opened_bytes = relay.carried
                    bodies = [sync_like(i) for i in range(1, 201)]
                    for body in bodies:
                        assert await transport.send("us", body) == body
                    carried = relay.carried - opened_bytes
                    assert transport.compressed("us") is compressed
                    [ws] = served.open
                    assert bool(ws.compress) is compressed
                finally:
                    await transport.close()
        sent = 2 * sum(len(b) for b in bodies)  # each body goes there and back
        if compressed:  # a stream's window holds what repeats from one message to the next
            assert carried < sent / 2, (carried, sent)
        else:
            assert carried > sent, (carried, sent)

    asyncio.run(main())


def test_large_and_small_messages_share_a_compressed_stream_intact() -> None:
    """Messages past 16 KiB are compressed in a thread, smaller ones at once: interleaved,
    concurrent, each arrives whole and the window stays in step on both sides."""
    rng = random.Random(7)

    def body(i: int) -> bytes:
        size = rng.choice([40, 900, 20_000, 60_000])
        return bytes(rng.getrandbits(8) for _ in range(size // 4)) * 4 + b"%d" % i

    async def main() -> None:
        async with endpoint(echo) as (base, _):
            transport = stream_transport(base)
            try:
                for _ in range(3):
                    bodies = [body(i) for i in range(12)]
                    answers = await asyncio.gather(*(transport.send("us", b) for b in bodies))
                    assert answers == bodies
                assert transport.compressed("us")
                assert transport.streams_opened == 1
            finally:
                await transport.close()

    asyncio.run(main())


def test_a_body_that_does_not_compress_crosses_a_compressed_stream_up_to_the_limit() -> None:
    """Deflate makes random bytes a little longer: a message at the limit is a frame
    over it, which the stream takes all the same (the limit holds the message)."""

    async def main() -> None:
        async with endpoint(echo, compression="on") as (base, _):
            transport = stream_transport(base, compression="on")
            try:
                body = os.urandom(BODY_BYTES_MAX)
                assert await transport.send("us", body) == body
                assert transport.compressed("us")
                assert transport.streams_opened == 1
            finally:
                await transport.close()

    asyncio.run(main())


@pytest.mark.parametrize("compression", ["on", "off"])
def test_requests_failed_by_a_dropped_stream_leave_no_error_unread(compression: str) -> None:
    """The peer drops the connection while requests are still being written (queued
    behind a large one): each fails with a TransportError, and none leaves a future whose
    error nobody read (asyncio logs each of those)."""
    unread: list[str] = []
    served: list[StreamEndpoint] = []

    async def drop_on_die(body: bytes) -> tuple[int, bytes]:
        if body == b"die":
            for request in served[0].open.values():
                assert request.transport is not None
                request.transport.abort()
        return 200, body

    async def send(transport: StreamTransport, body: bytes) -> None:
        with contextlib.suppress(TransportError):
            await transport.send("us", body)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unread.append(context["message"])
        )
        async with endpoint(drop_on_die, compression=compression) as (base, endpoint_):
            served.append(endpoint_)
            transport = stream_transport(base, compression=compression)
            try:
                assert await transport.send("us", b"hello") == b"hello"
                first = asyncio.create_task(send(transport, b"die"))
                await asyncio.sleep(0)
                big = os.urandom(BODY_BYTES_MAX - 1024)
                rest = [send(transport, big)] + [send(transport, b"x%d" % i) for i in range(20)]
                await asyncio.gather(first, *rest)
            finally:
                await transport.close()
        gc.collect()
        await asyncio.sleep(0.05)
        gc.collect()

    asyncio.run(main())
    assert unread == []


def test_a_message_one_byte_over_the_limit_closes_the_stream_and_writes_nothing(
    tmp_path: Path,
) -> None:
    async def body(p: Pair, o: Opened) -> None:
        await o.ws.send_bytes(o.mac.request(1, b"x" * (BODY_BYTES_MAX + 1)))
        assert await closed_with(o) == WSCloseCode.MESSAGE_TOO_BIG
        assert p.us.state.seq == 0
        assert p.service.endpoint.refused == 1

    frames(tmp_path, body)


def test_a_frame_that_inflates_past_the_body_limit_closes_the_stream_and_writes_nothing(
    tmp_path: Path,
) -> None:
    async def body(p: Pair, o: Opened) -> None:
        me = o.sender
        await o.ws.send_bytes(o.mac.request(1, request_body(me, create(me, 1, "homer"))))
        assert (await answer_of(o))[:2] == (1, 200)  # a compressed request is answered
        bomb = b"\0" * (8 * BODY_BYTES_MAX)  # a few hundred bytes once deflated
        await o.ws.send_bytes(o.mac.request(2, bomb))
        assert await closed_with(o) == WSCloseCode.MESSAGE_TOO_BIG
        assert p.us.state.seq == 1

    frames(tmp_path, body, compress=15)
