"""Clients that send slowly, or send what they cannot sign, do not get to hold a node's
connections or memory (found by two reviews: a header line every 5 s held a connection
for good, 20,000 of them every file descriptor; 250 unsigned 8 MB replication bodies
held 2 GB)."""

from __future__ import annotations

import json
import socket
import time

from tests.e2e.helpers import Node, Nodes

WAIT_MS = 500  # the node's deadlines in these tests
CLOSED_WAIT_S = 10.0  # well past them: the node must have acted by then
TRICKLE_S = 0.2


def _connect(node: Node) -> socket.socket:
    conn = socket.create_connection((node.host, node.port))
    conn.settimeout(CLOSED_WAIT_S)
    return conn


def _answer(conn: socket.socket) -> bytes:
    """Everything the node sends until it closes the connection."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
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
