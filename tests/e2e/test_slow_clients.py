"""Clients that send slowly, or send what they cannot sign, do not get to hold a node's
connections or memory (found by two reviews: a header line every 5 s held a connection
for good, 20,000 of them every file descriptor; 250 unsigned 8 MB replication bodies
held 2 GB)."""

from __future__ import annotations

import contextlib
import json
import socket
import time

from crdt import VersionVector
from node.deadlines import BODIES_ARRIVING_BYTES_MAX
from replication import protocol
from replication.auth import now_ms, sign_request
from replication.protocol import Sync, Tag
from replication.service import SYNC_BODIES_READ_MAX
from replication.transport import SYNC_PATH
from tests.e2e.helpers import Node, Nodes

WAIT_MS = 500  # the node's deadlines in these tests
CLOSED_WAIT_S = 10.0  # well past them: the node must have acted by then
TRICKLE_S = 0.2


def _connect(node: Node) -> socket.socket:
    conn = socket.create_connection((node.host, node.port))
    conn.settimeout(CLOSED_WAIT_S)
    return conn


def _answer(conn: socket.socket) -> bytes:
    """Everything the node sends until it closes (or resets) the connection."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_first_request_that_trickles_in_is_cut_off(nodes: Nodes) -> None:
    node = nodes.start("eu", None, "--request-head-wait-ms", str(WAIT_MS))
    with _connect(node) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started, closed = time.monotonic(), False
        while time.monotonic() - started < CLOSED_WAIT_S:
            try:
                conn.sendall(b"X-Slow: 1\r\n")
            except OSError:  # reset by the node
                closed = True
                break
            conn.settimeout(TRICKLE_S)
            try:
                if conn.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
        assert closed, "the node kept a connection whose first request never came"
    assert node.call("GET", "/health").json() == {"status": "ok"}  # a prompt one is served
    assert "first request had not arrived" in node.stderr()


def test_a_next_request_that_trickles_in_is_cut_off_too(nodes: Nodes) -> None:
    """After a first request, aiohttp's keep-alive timer (an hour by default) let an idle
    connection, or one whose next head trickled in, stay: a review's 20,000 such held
    every descriptor."""
    node = nodes.start("eu", None, "--idle-connection-wait-ms", str(WAIT_MS))
    with _connect(node) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and no more
        started = time.monotonic()
        assert _answer(conn) == b""  # closed by the node
        assert time.monotonic() - started < CLOSED_WAIT_S


def test_connections_past_the_cap_are_closed_as_they_open(nodes: Nodes) -> None:
    node = nodes.start("eu", None, "--connections-max", "3")
    held = [_connect(node) for _ in range(3)]
    try:
        time.sleep(TRICKLE_S)
        with _connect(node) as extra:
            with contextlib.suppress(OSError):  # closed already
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(extra) == b""
    finally:
        for conn in held:
            conn.close()
    time.sleep(TRICKLE_S)
    assert node.call("GET", "/health").json() == {"status": "ok"}  # room again
    assert "connections_max" in node.stderr()


def test_a_body_that_does_not_arrive_in_time_is_answered_408(nodes: Nodes) -> None:
    node = nodes.start("eu", None, "--request-body-wait-ms", str(WAIT_MS))
    seq = node.call("GET", "/status").json()["seq"]
    with _connect(node) as conn:
        conn.sendall(
            b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"id": "slow"'
        )
        head, _, body = _answer(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"] == "request_timeout"
    assert node.call("GET", "/status").json()["seq"] == seq


def test_an_unsigned_replication_body_is_refused_before_it_is_read(nodes: Nodes) -> None:
    node = nodes.start("eu", None, "--cluster-secret", "s3cret-of-the-cluster")
    with _connect(node) as conn:
        conn.sendall(  # the head alone: the node must answer without waiting for the body
            b"POST /replication/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            b"X-Replica-Auth: a b c\r\nContent-Length: 8000000\r\n\r\n"
        )
        head, _, body = _answer(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert json.loads(body)["error"] == "unauthorized"
    with _connect(node) as conn:  # well formed, but signed long ago: refused as early
        conn.sendall(
            b"POST /replication/sync HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
            b"X-Replica-Auth: us~0badc0de 1000 AAAAAAAAAAAAAAAAAAAAAA\r\n"
            b"Content-Length: 8000000\r\n\r\n"
        )
        head, _, body = _answer(conn).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert "check both machines' clocks" in json.loads(body)["message"]


def test_bodies_arriving_at_once_are_bounded_by_their_bytes(nodes: Nodes) -> None:
    """Each client body on its way in is held as it arrives: 4,000 clients sending 1 MB
    bodies but their last byte held 8 GB (a review). Past BODIES_ARRIVING_BYTES_MAX of
    them, 503 with Retry-After; many small bodies arriving slowly are not refused (a
    count of 64 refused most of 200 WAN clients' uploads: a second review)."""
    node = nodes.start("eu", None, "--request-body-wait-ms", "20000")
    large = 1_048_576  # body_bytes_max, the default
    head = (
        b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(large).encode() + b'\r\n\r\n{"id": "slow"'
    )
    held = [_connect(node) for _ in range(BODIES_ARRIVING_BYTES_MAX // large)]
    try:
        for conn in held:
            conn.sendall(head)
        time.sleep(1.0)  # every one of them in its handler, waiting for the rest
        with _connect(node) as extra:
            extra.sendall(head)
            status, _, body = _answer(extra).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503"), status
        assert b"Retry-After: 1" in status
        assert json.loads(body)["error"] == "overloaded"
    finally:
        for conn in held:
            conn.close()
    time.sleep(0.5)
    slow = []
    for n in range(100):  # small bodies, each sent after its head: none refused
        user = json.dumps({"id": f"w{n}", "name": "W", "username": f"w{n}", "email": f"w{n}@x.org"})
        data = user.encode()
        conn = _connect(node)
        conn.sendall(
            b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data[:5]
        )
        slow.append((conn, data[5:]))
    time.sleep(0.5)
    for conn, rest in slow:
        conn.sendall(rest)
    answers = [_answer(conn).split(b" ", 2)[1] for conn, _ in slow]
    for conn, _ in slow:
        conn.close()
    assert answers == [b"201"] * 100


def test_unproven_replication_bodies_cannot_keep_a_peer_out(nodes: Nodes) -> None:
    """A well-formed but unsigned head passed the check before the body, took one of the
    8 places for bodies and held it trickling: a review kept real peers out so (503) for
    as long as it went on. A peer's request now carries its body's hash under the MAC,
    proven before the body is read, and takes no place; a forged one is refused unread."""
    secret = "s3cret-of-the-cluster"
    node = nodes.start("eu", None, "--cluster-secret", secret, "--request-body-wait-ms", "20000")
    fresh = str(now_ms()).encode()
    held = [_connect(node) for _ in range(SYNC_BODIES_READ_MAX)]
    try:
        for conn in held:  # an older sender's form: no body hash, so not proven yet
            conn.sendall(
                b"POST /replication/sync HTTP/1.1\r\nHost: x\r\n"
                b"X-Replica-Auth: us~0badc0de " + fresh + b" AAAAAAAAAAAAAAAAAAAAAA\r\n"
                b"Content-Length: 8000000\r\n\r\nxx"
            )
        time.sleep(1.0)
        with _connect(node) as forged:  # a hash, but no MAC of the secret's: unread
            forged.sendall(
                b"POST /replication/sync HTTP/1.1\r\nHost: x\r\n"
                b"X-Replica-Auth: us~0badc0de " + fresh + b" AAAAAAAAAAAAAAAAAAAAAA\r\n"
                b"X-Replica-Body-Sha256: " + b"A" * 43 + b"\r\nContent-Length: 8000000\r\n\r\n"
            )
            status, _, _ = _answer(forged).partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 401"), status
        request = protocol.encode(Sync(Tag.SYNC_REQUEST, "us~0badc0de", VersionVector(), ()))
        signed = sign_request(secret, "POST", SYNC_PATH, request, "us~0badc0de")
        msgpack_head = {**signed, "Content-Type": "application/msgpack"}
        answer = node.call("POST", SYNC_PATH, request, msgpack_head)
        assert answer.status == 200, answer.text  # a peer's request goes through
        tampered = node.call("POST", SYNC_PATH, request + b"\x00", msgpack_head)
        assert tampered.status == 401
        assert "does not hash to its signed hash" in tampered.text
    finally:
        for conn in held:
            conn.close()
