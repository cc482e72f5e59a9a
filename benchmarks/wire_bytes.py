"""Bytes on the wire per replicated event, and per idle anti-entropy round (issue 6, item 3).

Real nodes (``Replica.open`` on temporary LMDB directories, regions ``eu``, ``us``, ``ap``)
and their real ``Replicator``s, talking through ``MemoryTransport``; each peer's handler
is wrapped to count request and response bodies apart. What each figure counts:

- **protocol figures**: the msgpack bodies of ``/replication/sync`` requests and
  responses (``protocol.encode``), both directions, nothing else: what
  ``MemoryTransport.bytes_sent`` counts.
- **HTTP figures**: every byte of TCP payload both ways between ``HttpTransport`` (signed
  request: one ``X-Replica-Auth`` header) and the node's real endpoint
  (``ReplicationService``, signed response), counted by a relay in between: request
  line, headers and bodies, on a kept-alive connection. Not counted: TCP/IP headers
  (~52-66 bytes per segment), TLS records (~22-29 bytes each), handshakes.

The baseline of a per-event figure is the event's own encoded size
(``node.events.encode``, mean over the events sent), target <= 1.5x; the baseline of an
idle round is ``200 + 16 * origins`` bytes, target <= 1x.

Scenarios:
- **eager push**: the 3 nodes have synced and know each other's summaries; then ``eu``
  makes single writes (one ``Set`` event each, a ``PATCH`` of a user's name) and pushes
  each one alone to both peers, as its pusher does when writes are spaced out
  (``enqueue`` then ``push``: one round trip per event per peer); then the same with 10
  events queued per push, as when writes come faster than round trips.
- **bulk catch-up**: a new node ``sa`` syncs from ``eu``, which holds 10k+ events from 3
  origins: paged rounds (``sync_with``) until caught up.
- **idle round**: two synced nodes, ``sync_with`` once: request + response when nothing
  is missing, with 3 live origins, then with extra origins (retired incarnations) whose
  events both nodes hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Row, print_table, row

NAME = "wire_bytes"
REGIONS = ("eu", "us", "ap")
SECRET = "bench-cluster-secret"
USERS = 200
BULK_TCP_EVENTS = 5_000  # the catch-up over real sockets


def idle_budget(origins: int) -> float:
    return 200 + 16 * origins


@dataclass
class Counted:
    """A peer handler that counts the bodies it is sent and answers with."""

    target: Callable[[bytes], Awaitable[bytes]]
    requests: int = 0
    request_bytes: int = 0
    response_bytes: int = 0

    async def __call__(self, body: bytes) -> bytes:
        answer = await self.target(body)
        self.requests += 1
        self.request_bytes += len(body)
        self.response_bytes += len(answer)
        return answer

    def snapshot(self) -> tuple[int, int, int]:
        return self.requests, self.request_bytes, self.response_bytes


@dataclass
class Node:
    region: str
    replica: Any
    replicator: Any
    transport: Any
    links: dict[str, Counted] = field(default_factory=dict)


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: dict[str, Node] = {}

    def open(self, region: str, peers: list[str]) -> Node:
        from node.replica import Replica, wall_clock_ms
        from replication.replicator import Replicator
        from replication.transport import MemoryTransport

        replica = Replica.open(self.root / region, region)
        replica.bind(asyncio.get_running_loop())
        transport = MemoryTransport()
        replicator = Replicator(replica, transport, peers, now_ms=wall_clock_ms)
        node = Node(region, replica, replicator, transport)
        self.nodes[region] = node
        return node

    def wire(self) -> None:
        """Every node's transport reaches every peer it names, through a counter."""
        for node in self.nodes.values():
            for peer in node.replicator.peers:
                link = Counted(self.nodes[peer].replicator.handle)
                node.links[peer] = link
                node.transport.handlers[peer] = link

    def close(self) -> None:
        for node in self.nodes.values():
            node.replica.close()


async def _sync_all(cluster: Cluster) -> None:
    """Full mesh anti-entropy until every node knows every peer's (equal) summary."""
    for _ in range(2):
        for node in cluster.nodes.values():
            for peer in node.replicator.peers:
                if not await node.replicator.sync_with(peer):
                    raise RuntimeError(f"sync {node.region} -> {peer} failed")
    summaries = {n.region: n.replica.summary for n in cluster.nodes.values()}
    if len(set(summaries.values())) != 1:
        raise AssertionError(f"nodes did not converge: {summaries}")


async def _writes(
    replica: Any, count: int, start: int, *, create: bool = False, users: int = USERS
) -> list[Any]:
    """``count`` writes on ``replica``, concurrent (group commit); the events they made.

    ``create``: users ``<region>0..``; otherwise a ``PATCH`` of the name of one of them.
    """
    from node import commands

    gate = asyncio.Semaphore(512)
    made: list[Any] = []

    async def one(i: int) -> None:
        uid = f"{replica.identity.region}{i if create else i % users}"
        decide = (
            commands.create("user", uid, {"name": f"user {i}"})
            if create
            else commands.patch("user", uid, {"name": _fresh_name(i)}, None)
        )
        async with gate:
            made.extend(await replica.write(decide, actor="bench"))

    await asyncio.gather(*(one(i) for i in range(start, start + count)))
    return made


def _fresh_name(i: int) -> str:
    """13 characters, 8 of them drawn at random (seeded): a value a compressed stream has
    not seen before, as a real rename is, where a counter would repeat all but a digit."""
    rng = random.Random(i)
    return "name-" + "".join(rng.choice(_ALPHABET) for _ in range(8))


_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _bodies(links: dict[str, Counted]) -> tuple[int, int, int]:
    snaps = [link.snapshot() for link in links.values()]
    return tuple(sum(s[i] for s in snaps) for i in range(3))  # type: ignore[return-value]


def _delta(after: tuple[int, int, int], before: tuple[int, int, int]) -> tuple[int, int, int]:
    return (after[0] - before[0], after[1] - before[1], after[2] - before[2])


async def _retired_origins(cluster: Cluster, regions: tuple[str, ...], total: int) -> None:
    """Give ``regions`` events of more origins (e.g. lost data directories), up to ``total``."""
    from crdt import Dot
    from node.events import Event, Op

    have = len(cluster.nodes[regions[0]].replica.summary.origins)
    stamp = cluster.nodes[regions[0]].replica.clock.last
    made = [
        Event(Dot(f"old{k}~{k:08x}", c), stamp - 1000 + c, f"user/u{k}", Op.SET, "name", "x")
        for k in range(have, total)
        for c in range(1, 101)  # 100 events each: multi-byte counters, like real origins
    ]
    for region in regions:
        await cluster.nodes[region].replica.ingest(made)


# --------------------------------------------------------------------------- HTTP


@dataclass
class Relay:
    """A TCP relay that counts payload bytes each way."""

    target_port: int
    up: int = 0
    down: int = 0
    server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _serving: int = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close every relayed connection and wait (bounded) until their tasks ended."""
        if self.server is not None:
            self.server.close()
        for w in list(self._open):
            w.close()
        if self._serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), 5)
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._serving += 1
        self._done.clear()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._open |= {writer, up_writer}
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down")
                )
            finally:
                for w in (writer, up_writer):
                    self._open.discard(w)
                    w.close()
        except OSError:
            writer.close()
        finally:
            self._serving -= 1
            if not self._serving:
                self._done.set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: Any, way: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                setattr(self, way, getattr(self, way) + len(chunk))
                writer.write(chunk)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError):
            writer.close()


async def _tcp(root: Path, pushes: int, kind: str) -> dict[str, float]:
    """eu -> us over real sockets, ``kind`` "stream" (the default transport, compressed as
    on a link without TLS), "plain stream" (``peer_compression = "off"``, as over TLS) or
    "http" (the fallback): an idle round, single-event pushes and 10-event pushes, TCP
    payload counted by a relay. A stream's opening (its upgrade request, answer and
    hello) is counted apart, as it is paid once per connection, not per round."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from node import events as ev
    from node.config import Peer, Settings
    from node.replica import Replica, wall_clock_ms
    from replication import auth
    from replication.protocol import RawEvent
    from replication.replicator import Replicator
    from replication.service import ReplicationService
    from replication.stream import StreamTransport
    from replication.transport import HttpTransport, Transport

    eu = Replica.open(root / f"{kind}-eu", "eu")
    us = Replica.open(root / f"{kind}-us", "us")
    server = relay = None
    transport: Transport | None = None
    try:
        loop = asyncio.get_running_loop()
        eu.bind(loop)
        us.bind(loop)
        compression = "off" if kind == "plain stream" else "auto"
        settings = Settings(
            region="us",
            data_dir=root / f"{kind}-us",
            peers=(Peer("eu", "http://127.0.0.1:9"),),
            cluster_secret=SECRET,
            peer_compression=compression,
        )
        service = ReplicationService(us, settings)
        app = web.Application()
        service.install(app)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        relay = Relay(int(server.port or 0))
        port = await relay.start()
        urls = {"us": f"http://127.0.0.1:{port}"}
        sender = eu.identity.replica_id
        http = HttpTransport(urls, secret=SECRET, sender=sender)
        transport = http
        opening = 0
        if kind != "http":
            stream = StreamTransport(
                urls,
                secret=SECRET,
                sender=sender,
                http=http,
                message_bytes_max=settings.sync_body_bytes_max,
                compression=compression,
            )
            await stream._link("us")  # opened before any round: its bytes counted apart
            opening = relay.up + relay.down
            transport = stream
        sizes: list[int] = []
        sizes10: list[int] = []

        class Bodies:
            up = down = 0

        send = transport.send

        async def counted(peer: str, body: bytes) -> bytes:
            answer = await send(peer, body)
            Bodies.up += len(body)
            Bodies.down += len(answer)
            return answer

        transport.send = counted  # type: ignore[method-assign]
        replicator = Replicator(eu, transport, ["us"], now_ms=wall_clock_ms)
        await _writes(eu, 20, 0, create=True)
        await _writes(us, 20, 0, create=True)
        for _ in range(2):  # both sides know each other's summary; the connection is open
            if not await replicator.sync_with("us"):
                raise RuntimeError(f"{kind} sync failed")
        if eu.summary != us.summary:
            raise AssertionError(f"{kind} pair did not converge")

        def mark() -> tuple[int, int, int, int]:
            assert relay is not None
            return relay.up, relay.down, Bodies.up, Bodies.down

        m0 = mark()
        await replicator.sync_with("us")
        m1 = mark()
        for i in range(pushes):
            (event,) = await _writes(eu, 1, i, users=20)
            data = ev.encode(event)
            sizes.append(len(data))
            replicator.enqueue([RawEvent(event.dot, data)])
            await replicator.push("us")
        m2 = mark()
        for i in range(pushes // 10):
            written = await _writes(eu, 10, pushes + 10 * i, users=20)
            raws = [RawEvent(e.dot, ev.encode(e)) for e in written]
            sizes10.extend(len(r.data) for r in raws)
            replicator.enqueue(raws)
            await replicator.push("us")
        m3 = mark()
        if eu.summary != us.summary:
            raise AssertionError(f"{kind} pushes did not arrive")
        # Catch-up: writes us did not get pushed (a partition's), sent by anti-entropy in
        # pages of at most sync_batch_bytes_max.
        behind = await _writes(eu, BULK_TCP_EVENTS, 10 * pushes, users=20)
        bulk_bytes = sum(len(ev.encode(e)) for e in behind)
        await replicator.sync_with("us")
        m4 = mark()
        if eu.summary != us.summary:
            raise AssertionError(f"{kind} catch-up did not arrive")
        one_stream = ("stream", 1)
        if isinstance(transport, StreamTransport) and (
            (transport.mode("us"), transport.streams_opened) != one_stream
        ):
            raise AssertionError("the rounds did not all go over one stream")
        signed = auth.sign_request(SECRET, "POST", "/replication/sync", b"", sender)
        signed_bytes = sum(len(k) + 2 + len(v) + 2 for k, v in signed.items())
        resp_signed = auth.sign_response(SECRET, 200, b"")
        resp_signed_bytes = sum(len(k) + 2 + len(v) + 2 for k, v in resp_signed.items())

        def tcp(a: tuple[int, ...], b: tuple[int, ...]) -> int:
            return (b[0] - a[0]) + (b[1] - a[1])

        def bodies(a: tuple[int, ...], b: tuple[int, ...]) -> int:
            return (b[2] - a[2]) + (b[3] - a[3])

        return {
            "compressed": isinstance(transport, StreamTransport) and transport.compressed("us"),
            "origins": len(eu.summary.origins),
            "idle_tcp": tcp(m0, m1),
            "idle_headers": tcp(m0, m1) - bodies(m0, m1),
            "push_tcp_per_event": tcp(m1, m2) / pushes,
            "push_bodies_per_event": bodies(m1, m2) / pushes,
            "event_bytes": sum(sizes) / len(sizes),
            "push10_tcp_per_event": tcp(m2, m3) / len(sizes10),
            "push10_bodies_per_event": bodies(m2, m3) / len(sizes10),
            "event10_bytes": sum(sizes10) / len(sizes10),
            "bulk_tcp_per_event": tcp(m3, m4) / len(behind),
            "bulk_event_bytes": bulk_bytes / len(behind),
            "signed_headers": signed_bytes + resp_signed_bytes,
            "opening": opening,
        }
    finally:
        if transport is not None:
            await transport.close()
        if relay is not None:
            await relay.stop()
        if server is not None:
            await service.stop()
            await server.close()
        eu.close()
        us.close()


# --------------------------------------------------------------------------- protocol


async def _protocol(root: Path, pushes: int, bulk: int) -> dict[str, Any]:
    from node import events as ev
    from node import log
    from replication.protocol import RawEvent

    cluster = Cluster(root)
    try:
        for region in REGIONS:
            cluster.open(region, [p for p in REGIONS if p != region])
        cluster.wire()
        for region in REGIONS:
            await _writes(cluster.nodes[region].replica, USERS, 0, create=True)
        await _sync_all(cluster)
        eu = cluster.nodes["eu"]
        out: dict[str, Any] = {}

        # -- idle round, 3 origins
        before = _bodies(eu.links)
        await eu.replicator.sync_with("us")
        rounds, req, resp = _delta(_bodies(eu.links), before)
        out["idle"] = [(len(eu.replica.summary.origins), rounds, req, resp)]

        async def push(batches: int, per_push: int, first: int) -> dict[str, Any]:
            """Eager pushes of ``per_push`` events each; bodies per delivered event."""
            sizes: list[int] = []
            before = _bodies(eu.links)
            for b in range(batches):
                made = await _writes(eu.replica, per_push, first + per_push * b)
                raws = [RawEvent(e.dot, ev.encode(e)) for e in made]
                sizes += [len(r.data) for r in raws]
                eu.replicator.enqueue(raws)
                for peer in eu.replicator.peers:
                    await eu.replicator.push(peer)
            rounds, req, resp = _delta(_bodies(eu.links), before)
            for node in cluster.nodes.values():
                if node.replica.summary != eu.replica.summary:
                    raise AssertionError(f"{node.region} missed pushed events")
            deliveries = len(sizes) * len(eu.replicator.peers)
            return {
                "deliveries": deliveries,
                "rounds": rounds,
                "request": req / deliveries,
                "response": resp / deliveries,
                "event": sum(sizes) / len(sizes),
            }

        # -- eager push of single events; then under load, several queued (10 per push)
        out["push"] = await push(pushes, 1, 0)
        batches = max(1, pushes // 10)
        out["push10"] = await push(batches, 10, pushes)

        # -- bulk catch-up of a new node from eu
        await _writes(eu.replica, bulk, pushes + 10 * batches)
        await _sync_all(cluster)  # others catch up too, so eu holds 3 origins' events
        sa = cluster.open("sa", ["eu"])
        link = Counted(eu.replicator.handle)
        sa.links["eu"] = link
        sa.transport.handlers["eu"] = link
        held = eu.replica.state.seq
        if not await sa.replicator.sync_with("eu"):
            raise RuntimeError("bulk catch-up failed")
        if sa.replica.summary != eu.replica.summary:
            raise AssertionError("sa did not catch up")
        with sa.replica.kv.read() as txn:
            event_bytes = sum(len(ev.encode(e)) for _, e in log.events_after(txn, 0, limit=held))
        received = sa.replica.state.seq
        if received != held:
            raise AssertionError(f"sa received {received} events of the {held} eu holds")
        out["bulk"] = {
            "events": received,
            "rounds": link.requests,
            "request": link.request_bytes,
            "response": link.response_bytes,
            "event_bytes": event_bytes,
        }

        # -- idle rounds with more origins (retired incarnations whose events all hold)
        for total in (10, 30):
            await _retired_origins(cluster, ("eu", "us"), total)
            await eu.replicator.sync_with("us")  # both learn the other's new summary
            before = _bodies(eu.links)
            await eu.replicator.sync_with("us")
            rounds, req, resp = _delta(_bodies(eu.links), before)
            out["idle"].append((len(eu.replica.summary.origins), rounds, req, resp))
        return out
    finally:
        cluster.close()


# --------------------------------------------------------------------------- run


async def _main(quick: bool) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    pushes = 50 if quick else 200
    bulk = 2_000 if quick else 12_000
    root = Path(tempfile.mkdtemp(prefix="bench-wire-"))
    try:
        proto = await _protocol(root, pushes, bulk)
        tcp = {kind: await _tcp(root, pushes, kind) for kind in ("stream", "plain stream", "http")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return proto, tcp


def run(quick: bool) -> list[Row]:
    proto, tcp = asyncio.run(_main(quick))
    push, push10, bulk = proto["push"], proto["push10"], proto["bulk"]
    rows = [
        row(NAME, f"eager push, 1 event/push, 3 origins, {push['rounds'] / push['deliveries']:g} "
            f"round trip/push: bodies per event (request {push['request']:.0f} + response "
            f"{push['response']:.0f})",
            push["request"] + push["response"], "bytes", push["event"], at_most=1.5),
        row(NAME, f"eager push, 10 events/push (load), 3 origins: bodies per event "
            f"(request {push10['request']:.0f} + response {push10['response']:.0f})",
            push10["request"] + push10["response"], "bytes", push10["event"], at_most=1.5),
        row(NAME, f"bulk catch-up of {bulk['events']:,} events in {bulk['rounds']} round(s): "
            f"bodies per event", (bulk["request"] + bulk["response"]) / bulk["events"], "bytes",
            bulk["event_bytes"] / bulk["events"], at_most=1.5),
    ]  # fmt: skip
    for origins, rounds, req, resp in proto["idle"]:
        rows.append(
            row(NAME, f"idle round, {origins} origins, {rounds} round trip: bodies "
                f"(request {req} + response {resp}) vs 200 + 16/origin",
                req + resp, "bytes", idle_budget(origins), at_most=1.0)
        )  # fmt: skip
    stream, plain, http = tcp["stream"], tcp["plain stream"], tcp["http"]
    if not stream["compressed"] or plain["compressed"]:
        raise AssertionError("the streams were not compressed as set")
    rows += [
        row(NAME, f"stream (the default transport, compressed) eager push, 1 event/round, "
            f"{stream['origins']} origins: TCP payload per event (bodies "
            f"{stream['push_bodies_per_event']:.0f}, framed)",
            stream["push_tcp_per_event"], "bytes", stream["event_bytes"], at_most=1.5),
        row(NAME, f"stream eager push, 10 events/round (load): TCP payload per event (bodies "
            f"{stream['push10_bodies_per_event']:.0f}, framed)",
            stream["push10_tcp_per_event"], "bytes", stream["event10_bytes"], at_most=1.5),
        row(NAME, f"stream catch-up, {BULK_TCP_EVENTS:,} events: TCP payload per event",
            stream["bulk_tcp_per_event"], "bytes", stream["bulk_event_bytes"], at_most=1.5),
        row(NAME, f"stream idle round, {stream['origins']} origins: TCP payload (bodies "
            f"{stream['idle_tcp'] - stream['idle_headers']:.0f}, framed) vs 200 + 16/origin",
            stream["idle_tcp"], "bytes", idle_budget(int(stream["origins"])), at_most=1.0),
        row(NAME, "stream opening, once per connection: upgrade request, answer and hello",
            stream["opening"], "bytes"),
        row(NAME, "stream not compressed (peer_compression = off; auto over TLS) eager push, "
            "1 event/round: TCP payload per event",
            plain["push_tcp_per_event"], "bytes", plain["event_bytes"]),
        row(NAME, "stream not compressed, eager push, 10 events/round: TCP payload per event",
            plain["push10_tcp_per_event"], "bytes", plain["event10_bytes"]),
        row(NAME, f"stream not compressed, catch-up, {BULK_TCP_EVENTS:,} events: TCP payload "
            "per event", plain["bulk_tcp_per_event"], "bytes", plain["bulk_event_bytes"]),
        row(NAME, "stream not compressed, idle round: TCP payload vs 200 + 16/origin",
            plain["idle_tcp"], "bytes", idle_budget(int(plain["origins"]))),
        row(NAME, f"HTTP (the fallback, for peers without the stream) eager push, 1 event/round: "
            f"TCP payload per event (bodies {http['push_bodies_per_event']:.0f} + HTTP)",
            http["push_tcp_per_event"], "bytes", http["event_bytes"]),
        row(NAME, f"HTTP eager push, 10 events/round: TCP payload per event (bodies "
            f"{http['push10_bodies_per_event']:.0f} + HTTP)",
            http["push10_tcp_per_event"], "bytes", http["event10_bytes"]),
        row(NAME, f"HTTP catch-up, {BULK_TCP_EVENTS:,} events: TCP payload per event",
            http["bulk_tcp_per_event"], "bytes", http["bulk_event_bytes"]),
        row(NAME, f"HTTP idle round, {http['origins']} origins: TCP payload "
            f"(HTTP lines+headers {http['idle_headers']:.0f}, of which X-Replica-Auth "
            f"{http['signed_headers']:.0f}) vs 200 + 16/origin",
            http["idle_tcp"], "bytes", idle_budget(int(http["origins"]))),
    ]  # fmt: skip
    return rows


if __name__ == "__main__":
    import sys

    print_table(run(quick="--quick" in sys.argv))
