"""Sync messages over one long-lived WebSocket per peer: the same bodies as HTTP, without
an HTTP request line, headers and signature on every round trip.

A round trip over HTTP carries ~340 bytes of request line and headers (the signature
alone ~120) around bodies of a few dozen: an idle anti-entropy round or a pushed event
cost several times what they carry. Over the stream a round trip costs 48 bytes of
framing: a WebSocket frame header each way (6 bytes from the client, which masks; 2
from the server) and these heads::

    request: request id (4 bytes, big-endian) | MAC (16) | body
    answer:  request id (4) | status (2)      | MAC (16) | body

Opening a stream: the client's upgrade request (``GET /replication/stream``) is signed as
any replication request (``X-Replica-Auth``), over a fresh nonce it sends in
``X-Replica-Nonce``. The server answers the upgrade with a first message, its own fresh
nonce and a MAC over both nonces, which proves to the client that it knows the cluster
secret. Both sides then key every frame's MAC (HMAC-SHA256, first 128 bits) with a key
derived from the secret, the sender and both nonces: a frame cannot be forged, nor
replayed into another stream. Within a stream, request ids only grow (a replayed request
is refused) and an answer settles only a request still waiting (a replayed one is
ignored); the direction is part of what is signed, so a frame cannot be reflected. A
frame that fails any of these closes the stream, having written nothing.

Compression: a stream is compressed (permessage-deflate, RFC 7692, each direction keeping
its window across messages, at zlib's fastest level) where both ends allow it: by
default on links without TLS only. Over TLS, a compressed frame's length tells someone
who watches the encrypted traffic, and can have the node write values of their choosing
next to others' (through the API), whether their guess of a secret (an ``api_key``) is
right, as in CRIME and BREACH; where there is no TLS the traffic is there to read
anyway. A frame's MAC is over its bytes before compression, and a frame that inflates
past the message limit closes the stream, as a long one does.

A peer that has no stream endpoint (an older version, during a rolling upgrade) answers
the upgrade 404 or 405 (and a proxy that does not pass the upgrade on, 400, 426 or 501):
it is reached over HTTP for ``HTTP_FALLBACK_MS``, then asked again. A request, its write
included, waits at most ``timeout_ms`` for its answer and then fails alone; a stream that
cannot be written to, or that stays silent through a heartbeat, is closed, and the next
request opens another.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from node.deadlines import request_began
from node.http_errors import error_body, error_response
from replication.auth import AuthError, log_refusal, now_ms, sign_request, verify_request
from replication.transport import (
    REQUEST_TIMEOUT_MS,
    HttpTransport,
    Sender,
    TransportError,
    sender_of,
)

logger = logging.getLogger(__name__)
UNAUTHORIZED_HINT = (
    " (it refused this node's signature: a cluster secret other than its own, or clocks "
    "further apart than auth_window_ms; its log says which)"
)

STREAM_PATH = "/replication/stream"
NONCE = "X-Replica-Nonce"
NONCE_BYTES = 16
MAC_BYTES = 16
_REQUEST_HEAD = struct.Struct(">I")  # request id
_ANSWER_HEAD = struct.Struct(">IH")  # request id, status
REQUEST_HEAD_BYTES = _REQUEST_HEAD.size + MAC_BYTES
ANSWER_HEAD_BYTES = _ANSWER_HEAD.size + MAC_BYTES
REQUEST_ID_MAX = 2**32 - 1  # a stream that used them all is closed; the next one starts at 1
STREAM_REQUESTS_IN_FLIGHT_MAX = 8  # answered at once per stream; more wait, unread
HTTP_FALLBACK_MS = 60_000  # a peer without the stream endpoint: HTTP this long, then ask again
# Answers to an upgrade that mean "no stream here" rather than "refused": an older version
# (404, 405), or a proxy on the way that does not pass the upgrade (400, 426, 501).
NO_STREAM_STATUSES = frozenset({400, 404, 405, 426, 501})
SEND_WAIT_MS = REQUEST_TIMEOUT_MS  # an answer not written by then: the stream is dropped
OPENINGS_REMEMBERED_MAX = 10_000  # client nonces refused again while their signature is fresh
CLOSE_WAIT_MS = 1_000  # how long closing a stream waits for the peer's close frame
# The server pings a stream this often and closes it if no pong comes within half of it:
# a peer that vanished (a half-open connection) does not hold its stream for hours.
STREAM_HEARTBEAT_MS = 30_000

# aiohttp compresses a message up to this size at once, in the event loop, and a larger
# one in a thread (aiohttp/_websocket/writer.py, WEBSOCKET_MAX_SYNC_CHUNK_SIZE).
SYNC_COMPRESSED_BYTES_MAX = 16 * 1024
COMPRESSION_WINDOW_BITS = 15  # deflate's window, 32 KiB: the largest, the best ratio


def _frame_bytes_max(message_bytes_max: int) -> int:
    """What aiohttp is told to take (its ``max_msg_size``): it holds a compressed frame to
    the limit too, and deflate makes a message that does not compress a little longer (a
    stored block's 5 bytes per 16 KiB, and the flush). The message itself is held to
    ``message_bytes_max`` once inflated, here."""
    return message_bytes_max + message_bytes_max // 1000 + 1024


Answer = Callable[[bytes], Awaitable[tuple[int, bytes]]]


def compresses(compression: str, secure: bool) -> bool:
    """Whether a stream is compressed under the ``peer_compression`` setting: "on", "off",
    or "auto" (on a link without TLS only; see the module's docstring)."""
    return compression == "on" or (compression == "auto" and not secure)


_NONCE_TEXT = re.compile(r"[A-Za-z0-9_-]{22}")


def _nonce_text(nonce: bytes) -> str:
    return base64.urlsafe_b64encode(nonce).rstrip(b"=").decode()


def _nonce_of(text: str) -> bytes:
    """The nonce a header carries; ValueError if it is not 16 bytes in base64url."""
    if not _NONCE_TEXT.fullmatch(text):
        raise ValueError(f"{NONCE} must be {NONCE_BYTES} bytes in base64url (22 characters)")
    return base64.urlsafe_b64decode(text + "==")


def _hello_mac(secret: str, sender: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    message = b"hello\n" + sender.encode() + b"\n" + client_nonce + server_nonce
    return hmac.new(secret.encode(), message, hashlib.sha256).digest()[:MAC_BYTES]


class FrameMac:
    """The MAC of a stream's frames, keyed for that stream alone."""

    def __init__(self, secret: str, sender: str, client_nonce: bytes, server_nonce: bytes):
        message = b"stream\n" + sender.encode() + b"\n" + client_nonce + server_nonce
        key = hmac.new(secret.encode(), message, hashlib.sha256).digest()
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # copied per frame: no re-keying

    def of(self, direction: bytes, head: bytes, body: bytes) -> bytes:
        mac = self._keyed.copy()
        mac.update(direction + head)
        mac.update(body)
        return mac.digest()[:MAC_BYTES]

    def request(self, request_id: int, body: bytes) -> bytes:
        head = _REQUEST_HEAD.pack(request_id)
        return head + self.of(b"q", head, body) + body

    def answer(self, request_id: int, status: int, body: bytes) -> bytes:
        head = _ANSWER_HEAD.pack(request_id, status)
        return head + self.of(b"a", head, body) + body

    def read(self, direction: bytes, head: struct.Struct, frame: bytes) -> tuple[Any, bytes]:
        """The unpacked head and the body of a frame; ValueError if it is short or forged."""
        size = head.size
        if len(frame) < size + MAC_BYTES:
            raise ValueError(f"a frame of {len(frame)} bytes is shorter than its head")
        body = frame[size + MAC_BYTES :]
        expected = self.of(direction, frame[:size], body)
        if not hmac.compare_digest(expected, frame[size : size + MAC_BYTES]):
            raise ValueError("bad frame signature")
        return head.unpack_from(frame), body


# --------------------------------------------------------------------------- client


class _Link:
    """One open stream to a peer: requests go out as they come, answers are matched by id."""

    def __init__(
        self, peer: str, ws: aiohttp.ClientWebSocketResponse, mac: FrameMac, answer_bytes_max: int
    ) -> None:
        self.peer, self.ws, self.mac = peer, ws, mac
        self.answer_bytes_max = answer_bytes_max
        self.next_id = 1
        self.waiting: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self.reader = asyncio.create_task(self._read())
        self._sending: asyncio.Task[None] | None = None  # the last request frame's write

    @property
    def usable(self) -> bool:
        return not self.ws.closed and not self.reader.done() and self.next_id <= REQUEST_ID_MAX

    async def request(self, body: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send one request and wait for its answer, both within ``timeout_s``.

        A request whose answer is late fails alone: the others sharing the stream go on
        (a stream that went silent is the heartbeat's to close). One that could not even
        be written closes the stream, as the peer takes nothing: the next opens another."""
        request_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = future
        sent = False
        try:
            async with asyncio.timeout(timeout_s):
                sending = self._send(self.mac.request(request_id, body))
                # A frame's task goes on if the request gives up; a frame written at once
                # is written before its send first yields.
                await (asyncio.shield(sending) if isinstance(sending, asyncio.Task) else sending)
                sent = True
                return await future
        except TimeoutError:
            self.waiting.pop(request_id, None)
            future.cancel()
            if not sent:
                await self.close()
            raise TransportError(f"{self.peer}: no answer in {timeout_s * 1000:.0f} ms") from None
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise TransportError(f"{self.peer}: stream: {type(exc).__name__}: {exc}") from exc
        finally:
            self.waiting.pop(request_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # failed by the reader as the stream closed: seen here

    def _send(self, frame: bytes) -> Awaitable[None]:
        """Write ``frame`` once the frames before it are written: the peer takes request
        ids only in ascending order. aiohttp alone may reorder compressed frames (one past
        ``SYNC_COMPRESSED_BYTES_MAX`` is compressed in a thread, and a smaller one sent
        meanwhile goes first), so a frame that large on a compressed stream, or one sent
        while such a frame is on its way, is written by a task that waits for the one
        before it (a request given up on does not stop its frame half-way: the task goes
        on). Any other is written at once, by the request's own send (a coroutine), before
        it first yields."""
        before = self._sending
        if (before is None or before.done()) and (
            len(frame) <= SYNC_COMPRESSED_BYTES_MAX or not self.ws.compress
        ):
            return self.ws.send_bytes(frame)

        async def send() -> None:
            if before is not None and not before.done():
                await asyncio.wait((before,))
            await self.ws.send_bytes(frame)

        task = asyncio.create_task(send())
        task.add_done_callback(_retrieved)
        self._sending = task
        return task

    async def _read(self) -> None:
        why = "stream closed"
        try:
            async for message in self.ws:
                if message.type is not WSMsgType.BINARY:
                    why = f"stream: unexpected {message.type.name} message"
                    break
                if len(message.data) > self.answer_bytes_max:
                    why = f"stream: an answer of {len(message.data)} bytes is over the limit"
                    break
                try:
                    (request_id, status), body = self.mac.read(b"a", _ANSWER_HEAD, message.data)
                except ValueError as exc:
                    why = f"stream: {exc}"
                    break
                future = self.waiting.get(request_id)
                if future is not None and not future.done():
                    future.set_result((status, body))
                # else: the answer to a request that gave up waiting, or a replay: ignored
        except (aiohttp.ClientError, ConnectionError) as exc:
            why = f"stream: {type(exc).__name__}: {exc}"
        finally:
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(TransportError(f"{self.peer}: {why}"))
            if not self.ws.closed:
                await _close_client(self.ws, WSCloseCode.POLICY_VIOLATION)

    async def close(self) -> None:
        await _close_client(self.ws, WSCloseCode.GOING_AWAY)
        if not self.reader.done():
            self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


def _retrieved(task: asyncio.Task[None]) -> None:
    """A frame's write that failed after its request gave up: nothing is waiting for it
    (the stream's reader sees the connection go)."""
    if not task.cancelled():
        task.exception()


async def _close_client(ws: aiohttp.ClientWebSocketResponse, code: int) -> None:
    """Close within ``CLOSE_WAIT_MS``: past it (a peer that reads nothing), aiohttp drops
    the connection as the close is cancelled."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
        await asyncio.wait_for(ws.close(code=code), CLOSE_WAIT_MS / 1000)


class StreamTransport:
    """Sync messages to each peer over one signed WebSocket, HTTP for peers without one.

    The same ``send(peer, body) -> answer`` as ``HttpTransport``, whose session and
    signing it shares; ``bytes_sent`` counts bodies, as there.
    """

    def __init__(
        self,
        urls: dict[str, str],
        *,
        secret: str,
        sender: Sender,
        http: HttpTransport,
        timeout_ms: int = REQUEST_TIMEOUT_MS,
        message_bytes_max: int,
        compression: str = "auto",
    ) -> None:
        self.urls, self.secret, self.sender, self.http = urls, secret, sender_of(sender), http
        self.compression = compression
        self.timeout_s = timeout_ms / 1000
        self.message_bytes_max = message_bytes_max
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._http_until_ms: dict[str, int] = {}  # peers without a stream endpoint
        self._compressed: dict[str, bool] = {}  # of the last stream opened to each peer
        self.bytes_sent = 0
        self.streams_opened = 0
        self.closed = False

    def mode(self, peer: str) -> str:
        """How ``peer`` is reached now: "stream" or "http" (it has no stream endpoint)."""
        return "http" if self._http_until_ms.get(peer, 0) > now_ms() else "stream"

    def compressed(self, peer: str) -> bool:
        """Whether the last stream opened to ``peer`` was compressed (both ends agreed)."""
        return self._compressed.get(peer, False)

    async def send(self, peer: str, body: bytes) -> bytes:
        if self.mode(peer) == "http":
            answer = await self.http.send(peer, body)
            self.bytes_sent += len(body) + len(answer)
            return answer
        if len(body) > self.message_bytes_max:  # as HTTP's 413: this request alone fails
            raise TransportError(
                f"{peer}: a body of {len(body)} bytes is over {self.message_bytes_max}"
            )
        link = await self._link(peer)
        if link is None:  # it has no stream endpoint: HTTP from now on, for a while
            return await self.send(peer, body)
        status, answer = await link.request(body, self.timeout_s)
        if status != 200:
            raise TransportError(f"{peer} answered {status}: {answer[:200]!r}")
        self.bytes_sent += len(body) + len(answer)
        return answer

    async def _link(self, peer: str) -> _Link | None:
        link = self._links.get(peer)
        if link is not None and link.usable:
            return link
        lock = self._opening.setdefault(peer, asyncio.Lock())
        async with lock:  # one stream per peer, however many tasks want it at once
            if self.closed:
                raise TransportError(f"{peer}: the transport is closed")
            link = self._links.get(peer)
            if link is not None and link.usable:
                return link
            if link is not None:
                await link.close()
                del self._links[peer]
            opened = await self._open(peer)
            if opened is not None:
                self._links[peer] = opened
            return opened

    async def _open(self, peer: str) -> _Link | None:
        client_nonce = os.urandom(NONCE_BYTES)
        sender = self.sender()  # the stream's for its life
        headers = {
            NONCE: _nonce_text(client_nonce),
            **sign_request(self.secret, "GET", STREAM_PATH, client_nonce, sender),
        }
        try:
            ws = await self.http.session().ws_connect(
                self.urls[peer] + STREAM_PATH,
                headers=headers,
                compress=(
                    COMPRESSION_WINDOW_BITS
                    if compresses(self.compression, self.urls[peer].startswith("https:"))
                    else 0
                ),
                autoping=True,
                # Pinged after a request timeout without a word from the peer, and closed
                # if no pong follows within half of it: a stream gone silent is dropped.
                heartbeat=self.timeout_s,
                max_msg_size=_frame_bytes_max(self.message_bytes_max + ANSWER_HEAD_BYTES),
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_WAIT_MS / 1000),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in NO_STREAM_STATUSES:
                logger.warning(
                    "%s cannot open %s (%d: an older version, or a proxy that does not pass"
                    " the upgrade): HTTP for %d ms",
                    peer,
                    STREAM_PATH,
                    exc.status,
                    HTTP_FALLBACK_MS,
                )
                self._http_until_ms[peer] = now_ms() + HTTP_FALLBACK_MS
                return None
            why = f"{exc.status} {exc.message}"
            if exc.status == 401:
                why += UNAUTHORIZED_HINT
            raise TransportError(f"{peer} refused the stream: {why}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError, RuntimeError) as exc:
            raise TransportError(f"{peer}: {type(exc).__name__}: {exc}") from exc
        try:
            hello = await ws.receive(self.timeout_s)
            if hello.type is not WSMsgType.BINARY or len(hello.data) != NONCE_BYTES + MAC_BYTES:
                raise TransportError(f"{peer}: the stream opened without its hello")
            server_nonce, mac = hello.data[:NONCE_BYTES], hello.data[NONCE_BYTES:]
            expected = _hello_mac(self.secret, sender, client_nonce, server_nonce)
            if not hmac.compare_digest(expected, mac):
                raise TransportError(f"{peer}: bad stream hello signature")
        except BaseException as exc:
            await _close_client(ws, WSCloseCode.POLICY_VIOLATION)
            if isinstance(exc, TimeoutError | aiohttp.ClientError | ConnectionError):
                raise TransportError(f"{peer}: stream hello: {type(exc).__name__}") from exc
            raise
        self.streams_opened += 1
        self._compressed[peer] = ws.compress != 0
        mac = FrameMac(self.secret, sender, client_nonce, server_nonce)
        return _Link(peer, ws, mac, self.message_bytes_max + ANSWER_HEAD_BYTES)

    async def close(self) -> None:
        self.closed = True
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.close() for link in links))
        await self.http.close()


# --------------------------------------------------------------------------- server


class StreamEndpoint:
    """The server side: ``GET /replication/stream`` upgrades to a stream of sync requests,
    each answered by ``answer`` (status, body), at most ``STREAM_REQUESTS_IN_FLIGHT_MAX``
    at once per stream.

    Each sender has one stream: a new one (it reconnected) closes the one before. An
    opening's nonce is refused again while its signature is fresh, so a captured upgrade
    request opens nothing. No write to a peer waits longer than ``SEND_WAIT_MS``, nor a
    close longer than ``CLOSE_WAIT_MS``: past them the connection is dropped, so a peer
    that stops reading can hold no task, and no shutdown, for long."""

    def __init__(
        self,
        secret: str,
        answer: Answer,
        *,
        message_bytes_max: int,
        auth_window_ms: int,
        in_flight_max: int = STREAM_REQUESTS_IN_FLIGHT_MAX,
        heartbeat_ms: int = STREAM_HEARTBEAT_MS,
        send_wait_ms: int = SEND_WAIT_MS,
        compression: str = "auto",
    ) -> None:
        self.secret, self.answer = secret, answer
        self.compression = compression
        self.heartbeat_ms = heartbeat_ms
        self.message_bytes_max = message_bytes_max
        self.auth_window_ms = auth_window_ms
        self.in_flight_max = in_flight_max
        self.send_wait_s = send_wait_ms / 1000
        self.open: dict[web.WebSocketResponse, web.Request] = {}
        self._of_sender: dict[str, web.WebSocketResponse] = {}
        self._openings: OrderedDict[bytes, int] = OrderedDict()  # client nonce -> when, ms
        self._closing: set[asyncio.Task[None]] = set()
        self.closed = False
        self.refused = 0  # streams closed for a bad frame

    def _fresh_opening(self, nonce: bytes) -> bool:
        """Remember ``nonce``; False if it opened a stream before (a replay). A signature's
        timestamp is good for ``auth_window_ms`` either side of now, so a nonce is kept
        twice that long: any replay after it is forgotten is refused as stale."""
        now = now_ms()
        openings = self._openings
        while openings and (
            len(openings) >= OPENINGS_REMEMBERED_MAX
            or next(iter(openings.values())) < now - 2 * self.auth_window_ms
        ):
            openings.popitem(last=False)
        if nonce in openings:
            return False
        openings[nonce] = now
        return True

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_began(request)
        if self.closed:
            return error_response(503, "stopping", "this node is stopping", {"Retry-After": "1"})
        try:
            client_nonce = _nonce_of(request.headers.get(NONCE, ""))
        except ValueError as exc:
            return error_response(400, "bad_header", str(exc))
        try:
            sender = verify_request(
                self.secret,
                request.method,
                request.path,
                client_nonce,
                request.headers,
                window_ms=self.auth_window_ms,
            )
        except AuthError as exc:
            log_refusal("replication stream", request.remote, exc)
            return error_response(401, "unauthorized", f"replication stream refused: {exc}")
        ws = web.WebSocketResponse(
            timeout=CLOSE_WAIT_MS / 1000,
            heartbeat=self.heartbeat_ms / 1000,
            compress=compresses(self.compression, request.secure),
            autoping=True,
            max_msg_size=_frame_bytes_max(self.message_bytes_max + REQUEST_HEAD_BYTES),
        )
        if not ws.can_prepare(request).ok:
            return error_response(400, "not_websocket", "open the stream with a WebSocket upgrade")
        if not self._fresh_opening(client_nonce):
            return error_response(401, "unauthorized", "replication stream refused: replayed")
        try:
            await ws.prepare(request)
        except ConnectionResetError:  # the peer went before the upgrade's answer (stopped)
            logger.info("stream from %s closed before it opened", sender)
            return error_response(400, "connection_closed", "the connection closed first")
        self.open[ws] = request
        before = self._of_sender.get(sender)
        self._of_sender[sender] = ws
        if before is not None:  # the sender reconnected: its older stream is done with
            self._close_later(before, WSCloseCode.GOING_AWAY)
        try:
            server_nonce = os.urandom(NONCE_BYTES)
            hello = _hello_mac(self.secret, sender, client_nonce, server_nonce)
            if await self._send(ws, request, server_nonce + hello):
                await self._serve(
                    ws, request, FrameMac(self.secret, sender, client_nonce, server_nonce)
                )
        except (ConnectionError, RuntimeError) as exc:  # the peer went away mid-answer
            logger.debug("stream from %s ended: %s", sender, exc)
        finally:
            self.open.pop(ws, None)
            if self._of_sender.get(sender) is ws:
                del self._of_sender[sender]
        return ws

    async def _serve(self, ws: web.WebSocketResponse, request: web.Request, mac: FrameMac) -> None:
        gate = asyncio.Semaphore(self.in_flight_max)
        answering: set[asyncio.Task[None]] = set()
        last_id = 0
        try:
            async for message in ws:
                if message.type is WSMsgType.ERROR:  # e.g. past max_msg_size: aiohttp closed it
                    self.refused += 1
                    logger.warning("replication stream closed: %s", message.data)
                    break
                if message.type is not WSMsgType.BINARY:
                    await self._refuse(ws, request, WSCloseCode.UNSUPPORTED_DATA, "binary only")
                    break
                if len(message.data) > self.message_bytes_max + REQUEST_HEAD_BYTES:
                    why = f"a message of {len(message.data)} bytes is over the limit"
                    await self._refuse(ws, request, WSCloseCode.MESSAGE_TOO_BIG, why)
                    break
                try:
                    (request_id,), body = mac.read(b"q", _REQUEST_HEAD, message.data)
                except ValueError as exc:
                    await self._refuse(ws, request, WSCloseCode.POLICY_VIOLATION, str(exc))
                    break
                if request_id <= last_id:
                    await self._refuse(ws, request, WSCloseCode.POLICY_VIOLATION, "id reused")
                    break
                last_id = request_id
                await gate.acquire()  # past the limit, the next frame waits unread
                task = asyncio.create_task(self._answer(ws, request, mac, request_id, body))
                answering.add(task)
                task.add_done_callback(answering.discard)
                task.add_done_callback(lambda _: gate.release())
        finally:
            if answering:  # a write they started finishes; their answers may find it closed
                # Shielded: a handler cancelled (the connection gone) does not cancel an
                # answer's write under way, which aiohttp would leave failed and unread.
                await asyncio.shield(asyncio.gather(*answering, return_exceptions=True))

    async def _answer(
        self,
        ws: web.WebSocketResponse,
        request: web.Request,
        mac: FrameMac,
        request_id: int,
        body: bytes,
    ) -> None:
        try:
            status, answer = await self.answer(body)
        except Exception:  # a bug, not the peer's doing: said as HTTP would say it
            logger.exception("answering a stream request failed")
            status, answer = 500, error_body("internal", "see the node's log").encode()
        if not ws.closed:  # else the peer went away meanwhile; its next request asks again
            await self._send(ws, request, mac.answer(request_id, status, answer))

    async def _send(self, ws: web.WebSocketResponse, request: web.Request, data: bytes) -> bool:
        """Write ``data`` within ``send_wait_s``; False (and the connection dropped) if the
        peer would not take it."""
        try:
            async with asyncio.timeout(self.send_wait_s):
                await ws.send_bytes(data)
            return True
        except TimeoutError:
            logger.warning(
                "replication stream dropped: the peer took no answer for %gs", self.send_wait_s
            )
            _abort(request)
        except (ConnectionError, RuntimeError):
            pass  # it went away
        return False

    async def _refuse(
        self, ws: web.WebSocketResponse, request: web.Request, code: int, why: str
    ) -> None:
        self.refused += 1
        logger.warning("replication stream closed: %s", why)
        await _close_server(ws, request, code, why)

    def _close_later(self, ws: web.WebSocketResponse, code: int) -> None:
        request = self.open.get(ws)
        if request is None:
            return
        task = asyncio.create_task(_close_server(ws, request, code, "replaced"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Close every open stream and refuse new ones (the node is stopping): peers
        reconnect once it is back. Bounded by ``CLOSE_WAIT_MS``."""
        self.closed = True
        await asyncio.gather(
            *(
                _close_server(ws, r, WSCloseCode.GOING_AWAY, "stopping")
                for ws, r in list(self.open.items())
            ),
            *self._closing,
            return_exceptions=True,
        )


async def _close_server(
    ws: web.WebSocketResponse, request: web.Request, code: int, why: str
) -> None:
    try:
        async with asyncio.timeout(CLOSE_WAIT_MS / 1000):
            await ws.close(code=code, message=why.encode()[:120])
    except TimeoutError:
        _abort(request)  # the peer reads nothing: its buffer would never drain
    except (ConnectionError, RuntimeError):
        pass


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
