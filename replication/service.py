"""Replication inside a node process: the authenticated ``/replication/sync`` endpoint,
the replicator's background tasks, and its lines in ``/status`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from node.api import GUARD
from node.config import Settings
from node.http_errors import error_body, error_response, fail, storage_refusal
from node.kv import StorageFailed
from node.replica import Replica, wall_clock_ms
from node.server import Extension
from node.server import run_node as run_plain_node
from node.writer import Overloaded
from replication.auth import (
    AuthError,
    body_matches,
    check_request_head,
    log_refusal,
    sign_response,
    verify_request,
    verify_request_head,
)
from replication.protocol import BadMessage
from replication.replicator import Limits, Replicator
from replication.stream import STREAM_PATH, StreamEndpoint, StreamTransport
from replication.transport import SYNC_PATH, HttpTransport, Transport

READ_CHUNK_BYTES = 64 * 1024
# Sync bodies read at once (each up to sync_body_bytes_max); more are answered 503. A peer
# sends one at a time over HTTP (the stream, its default, reads no body here).
SYNC_BODIES_READ_MAX = 8
SYNC_PROVEN_BODIES_READ_MAX = 32  # those whose head the MAC proved (a peer's, or a replay)


def client_tls(settings: Settings) -> ssl.SSLContext | None:
    """TLS towards peers: present our certificate, trust the cluster CA if one is set."""
    if settings.tls_cert is None and settings.tls_ca is None:
        return None
    context = ssl.create_default_context(cafile=settings.tls_ca)
    if settings.tls_cert is not None and settings.tls_key is not None:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


class ReplicationService:
    def __init__(self, replica: Replica, settings: Settings) -> None:
        assert settings.cluster_secret is not None, "config refuses peers without a secret"
        self.replica, self.settings = replica, settings
        self.secret = settings.cluster_secret
        urls = {p.name: p.url for p in settings.peers}

        def sender() -> str:  # read as it signs: a renewal changes it while the node runs
            return replica.identity.replica_id

        http = HttpTransport(
            urls, secret=self.secret, sender=sender, ssl_context=client_tls(settings)
        )
        self.stream: StreamTransport | None = None
        transport: Transport = http
        if settings.peer_transport == "stream":
            self.stream = StreamTransport(
                urls,
                secret=self.secret,
                sender=sender,
                http=http,
                message_bytes_max=settings.sync_body_bytes_max,
                compression=settings.peer_compression,
            )
            transport = self.stream
        self._reading = asyncio.Semaphore(SYNC_BODIES_READ_MAX)
        self._reading_proven = asyncio.Semaphore(SYNC_PROVEN_BODIES_READ_MAX)
        self.endpoint = StreamEndpoint(
            self.secret,
            self.answer,
            message_bytes_max=settings.sync_body_bytes_max,
            auth_window_ms=settings.auth_window_ms,
            compression=settings.peer_compression,
        )
        limits = Limits(
            gossip_interval_ms=settings.gossip_interval_ms,
            batch_bytes_max=settings.sync_batch_bytes_max,
            push_queue_events_max=settings.push_queue_events_max,
            backoff_max_ms=settings.backoff_max_ms,
            bootstrap_wait_ms_max=settings.bootstrap_wait_ms_max,
            start_writes_wait_ms_max=settings.start_writes_wait_ms_max,
        )
        self.replicator = Replicator(
            replica,
            transport,
            [p.name for p in settings.peers],
            limits=limits,
            now_ms=wall_clock_ms,
        )

    def install(self, app: web.Application) -> None:
        # Inside a node's app, through the guard of its routes (JSON errors, the token).
        guarded = app.get(GUARD)
        app.router.add_post(SYNC_PATH, self.handle if guarded is None else guarded(self.handle))
        # Not guarded: the guard would stamp headers on an answer long sent; the endpoint
        # answers its own errors as JSON, before the upgrade.
        app.router.add_get(STREAM_PATH, self.endpoint.handle)
        app.on_response_prepare.append(_terse)
        self.replica.reporters.append(self.report)
        self.replica.metric_reporters.append(self.metrics)

    async def start(self) -> None:
        # Before anything yields to the loop, as the node has just begun to listen: no
        # client's request runs before the gate (releasing the quarantine may yield).
        self.replicator.gate_clients()
        await self.replica.release_quarantine()
        self.replicator.start()

    async def stop(self) -> None:
        await self.replicator.stop()
        await self.endpoint.close()

    def report(self) -> dict[str, Any]:
        status = self.replicator.status()
        urls = {p.name: p.url for p in self.settings.peers}
        for peer in status["peers"]:
            peer["url"] = urls[peer["name"]]
            peer["transport"] = "http" if self.stream is None else self.stream.mode(peer["name"])
            peer["compressed"] = self.stream is not None and self.stream.compressed(peer["name"])
        status["streams_refused"] = self.endpoint.refused
        return {"replication": status}

    def metrics(self) -> list[str]:
        """The replication figures of /status, in Prometheus text."""
        status = self.replicator.status()
        region = self.replica.identity.region
        lines: list[str] = []
        per_peer = (
            (
                "replica_peer_events_lacking",
                "Events this node holds that the peer lacks.",
                "events_lacking",
            ),
            ("replica_peer_lag_seconds", "Age of the oldest event the peer lacks.", "lag_s"),
            (
                "replica_peer_last_contact_seconds",
                "Seconds since the last exchange.",
                "last_contact_s_ago",
            ),
            ("replica_peer_failures", "Consecutive failed exchanges (backoff).", "failures"),
        )
        for name, help_text, key in per_peer:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            for peer in status["peers"]:
                if peer[key] is not None:
                    labels = f'region="{region}",peer="{peer["name"]}"'
                    lines.append(f"{name}{{{labels}}} {peer[key]}")
        for name, kind, help_text, value in (
            (
                "replica_quarantined_events",
                "gauge",
                "Events kept aside (format too new).",
                status["quarantined_events"],
            ),
            (
                "replica_pushes_dropped_total",
                "counter",
                "Push queues dropped when full.",
                status["pushes_dropped"],
            ),
            (
                "replica_batches_refused_total",
                "counter",
                "Malformed sync batches refused.",
                status["batches_refused"],
            ),
            (
                "replica_undone_commits_found_total",
                "counter",
                "Times this node's own events were found beyond its log, back from a peer or "
                "in its summary (its last commits undone: a copy restored, a snapshot rolled "
                "back); each time it renewed its replica id.",
                status["undone_found"],
            ),
            (
                "replica_dot_collisions_total",
                "counter",
                "Events met under the dot of another event this node holds (two events "
                "share a dot: a faulty or forged peer); the regions cannot agree on it.",
                status["dot_collisions"],
            ),
            (
                "replica_own_claims_skipped_total",
                "counter",
                "Times a peer showed this node's id beyond its counter after it had renewed "
                "in this run (a faulty peer, or a copy of the node running elsewhere); each "
                "time its counter moved past them.",
                status["claims_skipped"],
            ),
            (
                "replica_writes_held",
                "gauge",
                "1 while client writes wait for every peer's first answer after a start.",
                int(self.replica.writes_held is not None),
            ),
            (
                "replica_streams_refused_total",
                "counter",
                "Peer streams closed for a bad frame (forged, replayed, too big, not binary).",
                self.endpoint.refused,
            ),
        ):
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} {kind}",
                f'{name}{{region="{region}"}} {value}',
            ]
        return lines

    def _too_large(self) -> web.Response:
        limit = self.settings.sync_body_bytes_max
        message = f"a replication request's body exceeds {limit} bytes"
        return error_response(413, "body_too_large", message)

    async def _body(self, request: web.Request) -> bytes | None:
        """The body, or None past ``sync_body_bytes_max`` (not read further); 408 if it
        has not all arrived within ``request_body_wait_ms``."""
        limit = self.settings.sync_body_bytes_max
        chunks, size = [], 0
        wait_ms = self.settings.request_body_wait_ms
        try:
            async with asyncio.timeout(wait_ms / 1000):
                async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
                    size += len(chunk)
                    if size > limit:
                        return None
                    chunks.append(chunk)
        except TimeoutError:
            fail(408, "request_timeout", f"the body did not arrive within {wait_ms} ms")
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.Response:
        if (request.content_length or 0) > self.settings.sync_body_bytes_max:
            return self._too_large()
        window_ms = self.settings.auth_window_ms
        try:  # before the body is read: no one without the secret gets one held in memory
            proven = verify_request_head(
                self.secret, request.method, request.path, request.headers, window_ms=window_ms
            )
            if proven is None:  # a sender of an older version: its form and time only
                check_request_head(request.headers, window_ms=window_ms)
        except AuthError as e:
            return _refused(request, e)
        # Unproven bodies (an older sender's) share SYNC_BODIES_READ_MAX places; proven
        # ones have theirs apart, bounded too: a head captured on a link without TLS
        # could be sent again within the window.
        reading = self._reading if proven is None else self._reading_proven
        if reading.locked():
            busy = "too many replication bodies on their way in"
            return error_response(503, "overloaded", busy, {"Retry-After": "1"})
        async with reading:
            body = await self._body(request)
        if body is None:
            return self._too_large()
        try:
            if proven is None:
                verify_request(
                    self.secret,
                    request.method,
                    request.path,
                    body,
                    request.headers,
                    window_ms=window_ms,
                )
            elif not body_matches(body, proven[1]):
                raise AuthError("the body does not hash to its signed hash")
        except AuthError as e:
            return _refused(request, e)
        status, answer = await self.answer(body)
        if status != 200:
            headers = {"Retry-After": "1"} if status in (503, 507) else None
            return web.Response(
                status=status,
                text=answer.decode(),
                content_type="application/json",
                headers=headers,
            )
        return web.Response(
            body=answer,
            content_type="application/msgpack",
            headers=sign_response(self.secret, 200, answer),
        )

    async def answer(self, body: bytes) -> tuple[int, bytes]:
        """A sync request's answer, over HTTP or a stream: 200 and msgpack, or an error's
        status and JSON (a malformed batch, nothing of it written; a full write queue)."""
        try:
            return 200, await self.replicator.handle(body)
        except BadMessage as e:
            return _error(400, "bad_batch", f"batch refused whole, nothing written: {e}")
        except Overloaded:
            return _error(503, "overloaded", "the write queue is full")
        except StorageFailed as refused:
            return _error(*storage_refusal(refused))


def _refused(request: web.Request, error: AuthError) -> web.Response:
    log_refusal("replication request", request.remote, error)
    return error_response(401, "unauthorized", f"replication request refused: {error}")


def _error(status: int, code: str, message: str) -> tuple[int, bytes]:
    return status, error_body(code, message).encode()


async def _terse(request: web.Request, response: web.StreamResponse) -> None:
    """A sync answer goes to a peer, not a browser: no ``Server`` (the peer runs the same
    code). ``Date`` stays, as HTTP requires of every 2xx answer."""
    if request.path == SYNC_PATH:
        response.headers.popall("Server", None)


def extensions(replica: Replica, settings: Settings) -> Sequence[Extension]:
    if not settings.peers and settings.cluster_secret is None:
        return ()
    return (ReplicationService(replica, settings),)


def run_node(settings: Settings) -> int:
    """``replica node``: the node's API, plus replication with its peers."""
    return run_plain_node(settings, extensions)
