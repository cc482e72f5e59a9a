"""The authenticated ``/replication/sync`` endpoint, over real HTTP on loopback: two real
nodes sync through ``HttpTransport``; unsigned, badly signed and malformed requests get
their 4xx (never a 500) and write nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

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
from replication.transport import SYNC_PATH, HttpTransport
from tests.replication.served import (
    SECRET,
    assert_a_wrong_secret_is_refused,
    assert_two_nodes_sync,
    served_pair,
)


@dataclass
class Pair:
    eu: Replica
    us: Replica
    url: str  # us's sync endpoint
    replicator: Replicator  # eu's, reaching us over HTTP
    service: ReplicationService  # us's

    def signed_post(self, body: bytes, **headers: str) -> dict[str, str]:
        signed = auth.sign_request(SECRET, "POST", SYNC_PATH, body, self.eu.identity.replica_id)
        return {"Content-Type": "application/msgpack", **signed, **headers}


@asynccontextmanager
async def pair(tmp_path: Path, *, secret: str = SECRET) -> AsyncIterator[Pair]:
    async with served_pair(tmp_path) as (eu, us, service, base):
        transport = HttpTransport({"us": base}, secret=secret, sender=eu.identity.replica_id)
        try:
            replicator = Replicator(eu, transport, ["us"], now_ms=wall_clock_ms)
            yield Pair(eu, us, base + SYNC_PATH, replicator, service)
        finally:
            await transport.close()


def run(tmp_path: Path, body: Callable[[Pair], Awaitable[None]], **options: str) -> None:
    async def main() -> None:
        async with pair(tmp_path, **options) as p:
            await body(p)

    asyncio.run(main())


def test_two_nodes_sync_over_signed_http(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        await assert_two_nodes_sync(p.eu, p.us, p.replicator)
        assert p.replicator.peers["us"].replica_id == p.us.identity.replica_id

    run(tmp_path, body)


def test_a_node_with_the_wrong_secret_is_refused_and_backs_off(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        await assert_a_wrong_secret_is_refused(p.eu, p.us, p.replicator)

    run(tmp_path, body, secret="not-the-cluster-secret")


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as r,
    ):
        return r.status, await r.read()


async def raw_post(url: str, body: bytes, header_lines: list[bytes]) -> int:
    """POST with header bytes exactly as given (a client library would refuse some)."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        head = [
            f"POST {SYNC_PATH} HTTP/1.1".encode(),
            f"Host: {target.host}".encode(),
            f"Content-Length: {len(body)}".encode(),
            b"Connection: close",
            *header_lines,
        ]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()
        await writer.wait_closed()


def request_body(p: Pair, *events: Event) -> bytes:
    raws = tuple(RawEvent(e.dot, ev.encode(e)) for e in events)
    message = Sync(Tag.SYNC_REQUEST, p.eu.identity.replica_id, VersionVector(), raws)
    return protocol.encode(message)


def create(origin: str, counter: int, user_id: str) -> Event:
    return Event(
        Dot(origin, counter), (wall_clock_ms() << 16) + counter, f"user/{user_id}", Op.CREATE
    )


def test_unsigned_and_badly_signed_requests_get_401_and_write_nothing(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        data = request_body(p, create(p.eu.identity.replica_id, 1, "homer"))
        good = p.signed_post(data)
        assert (await post(p.url, data, {}))[0] == 401
        sender, timestamp, _ = good[auth.AUTH].split(" ")
        forged = {auth.AUTH: f"{sender} {timestamp} {'A' * 22}"}
        assert (await post(p.url, data, forged))[0] == 401
        assert (await post(p.url, data + b"x", good))[0] == 401
        assert p.us.state.seq == 0
        status, _ = await post(p.url, data, good)
        assert status == 200
        assert p.us.state.seq == 1

    run(tmp_path, body)


def test_header_bytes_that_are_not_ascii_get_401_not_500(tmp_path: Path) -> None:
    """Found writing these tests: a signature, timestamp or sender header with bytes that
    are not ASCII made verify_request raise TypeError, ValueError or UnicodeEncodeError,
    and the endpoint answered 500."""

    async def body(p: Pair) -> None:
        data = request_body(p, create(p.eu.identity.replica_id, 1, "homer"))
        good = p.signed_post(data)
        sender, timestamp, mac = (f.encode() for f in good[auth.AUTH].split(" "))
        name = auth.AUTH.encode() + b": "
        bad_signature = [name + b" ".join([sender, timestamp, b"\xc3\xa9\xff" + mac[3:]])]
        bad_timestamp = [name + b" ".join([sender, "¹⁷".encode(), mac])]
        bad_sender = [name + b" ".join([b"eu~\xff\xfe", timestamp, mac])]
        assert await raw_post(p.url, data, bad_signature) == 401
        assert await raw_post(p.url, data, bad_timestamp) == 401
        assert await raw_post(p.url, data, bad_sender) == 401
        assert p.us.state.seq == 0

    run(tmp_path, body)


def test_a_malformed_batch_gets_400_and_writes_nothing(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        me = p.eu.identity.replica_id
        bad = Event(Dot(me, 2), wall_clock_ms() << 16, "user/not an id", Op.CREATE)
        data = request_body(p, create(me, 1, "homer"), bad)
        status, answer = await post(p.url, data, p.signed_post(data))
        assert status == 400
        assert b"bad_batch" in answer
        assert p.us.state.seq == 0
        assert p.us.summary == VersionVector()
        assert p.replicator.peers["us"].summary is None

    run(tmp_path, body)


def test_metrics_export_what_status_shows_of_each_peer(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        await p.eu.write(commands.create("group", "staff", {"name": "Staff"}), actor="t")
        assert await p.replicator.sync_with("us")
        text = render_metrics(p.us)
        assert 'replica_peer_events_lacking{region="us",peer="eu"} 0' in text
        assert 'replica_peer_failures{region="us",peer="eu"} 0' in text
        assert 'replica_peer_last_contact_seconds{region="us",peer="eu"}' in text
        assert 'replica_quarantined_events{region="us"} 0' in text
        assert 'replica_events_ingested_total{region="us"} 2' in text
        [peer] = p.service.report()["replication"]["peers"]
        assert (peer["name"], peer["events_lacking"]) == ("eu", 0)

    run(tmp_path, body)


def test_a_sync_round_trip_carries_no_header_a_peer_does_not_need(tmp_path: Path) -> None:
    async def body(p: Pair) -> None:
        heard: list[dict[str, str]] = []

        async def peer(request: web.Request) -> web.Response:
            heard.append(dict(request.headers))
            return web.Response(body=b"ok", headers=auth.sign_response(SECRET, 200, b"ok"))

        app = web.Application()
        app.router.add_post(SYNC_PATH, peer)
        async with TestServer(app) as server:
            base = str(server.make_url("/")).rstrip("/")
            transport = HttpTransport({"x": base}, secret=SECRET, sender="eu~abcd")
            try:
                assert await transport.send("x", b"body") == b"ok"
            finally:
                await transport.close()
        (headers,) = heard
        assert auth.AUTH in headers
        assert not {"User-Agent", "Accept", "Accept-Encoding"} & set(headers)

        data = request_body(p, create(p.eu.identity.replica_id, 1, "homer"))
        async with (
            aiohttp.ClientSession() as session,
            session.post(p.url, data=data, headers=p.signed_post(data)) as r,
        ):
            assert r.status == 200
            auth.verify_response(SECRET, 200, await r.read(), r.headers)
            assert "Server" not in r.headers
            assert "Date" in r.headers  # HTTP requires it of a 2xx answer
        async with (  # the rest of the node's answers keep Server too
            aiohttp.ClientSession() as session,
            session.get(p.url.removesuffix(SYNC_PATH) + "/nothing-here") as r,
        ):
            assert {"Server", "Date"} <= set(r.headers)

    run(tmp_path, body)


def test_a_body_over_the_sync_limit_gets_413_naming_that_limit(tmp_path: Path) -> None:
    """Declared or streamed (chunked), a body past ``sync_body_bytes_max`` is refused
    before it is read whole, with the replication limit in the message (it quoted the
    client API's ``body_bytes_max``)."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 512

    async def main() -> None:
        async with served_pair(tmp_path, sync_body_bytes_max=1_000) as (_, us, _, base):
            # Signed (an unsigned body is refused unread: 401), and over another body's
            # hash: the size is checked as the body is read, before it is hashed.
            head = auth.sign_request(SECRET, "POST", SYNC_PATH, b"", "us~0badc0de")
            for body in (b"x" * 1_001, chunks()):
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(base + SYNC_PATH, data=body, headers=head) as r,
                ):
                    assert r.status == 413
                    assert r.content_type == "application/json"
                    answer = await r.json()
                assert answer["error"] == "body_too_large"
                assert "1000 bytes" in answer["message"]
            assert us.state.seq == 0

    asyncio.run(main())


def test_requests_are_signed_as_the_replica_id_the_node_has_when_it_sends() -> None:
    """A node renews its id while it runs (its last commits found undone): its requests
    went on being signed as the old one until it restarted (found by a review)."""
    ids = ["eu~aaaa1111"]
    signed: list[str] = []

    async def main() -> None:
        async def peer(request: web.Request) -> web.Response:
            body = await request.read()
            signed.append(auth.verify_request(SECRET, "POST", SYNC_PATH, body, request.headers))
            return web.Response(body=b"ok", headers=auth.sign_response(SECRET, 200, b"ok"))

        app = web.Application()
        app.router.add_post(SYNC_PATH, peer)
        async with TestServer(app) as server:
            base = str(server.make_url("/")).rstrip("/")
            transport = HttpTransport({"x": base}, secret=SECRET, sender=lambda: ids[-1])
            try:
                assert await transport.send("x", b"one") == b"ok"
                ids.append("eu~bbbb2222")  # renewed
                assert await transport.send("x", b"two") == b"ok"
            finally:
                await transport.close()

    asyncio.run(main())
    assert signed == ["eu~aaaa1111", "eu~bbbb2222"]
