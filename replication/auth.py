"""Peer authentication: HMAC-SHA256 with the shared cluster secret, in one header.

A request carries ``X-Replica-Auth: <sender> <timestamp ms> <mac>``, signed over its
method, path, timestamp, sender and a hash of its body; a response carries
``X-Replica-Auth: <timestamp ms> <mac>``, signed over its status, timestamp and body.
The MAC is the first 128 bits of the HMAC, base64url without padding: forging one
still takes 2^128 tries, and a sync costs no more header than it must. A timestamp
further than ``auth_window_ms`` from the receiver's clock is refused, so a captured
request cannot be replayed later (within the window a replay is harmless: ingest is
idempotent). Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

AUTH_WINDOW_MS = 30_000
AUTH = "X-Replica-Auth"
MAC_BYTES = 16


class AuthError(Exception):
    """Missing, stale or wrong signature."""


def _mac(secret: str, *parts: str, body: bytes) -> str:
    message = "\n".join(parts).encode() + b"\n" + hashlib.sha256(body).digest()
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign_request(
    secret: str, method: str, path: str, body: bytes, sender: str, *, at_ms: int | None = None
) -> dict[str, str]:
    timestamp = str(now_ms() if at_ms is None else at_ms)
    mac = _mac(secret, method.upper(), path, timestamp, sender, body=body)
    return {AUTH: f"{sender} {timestamp} {mac}"}


def sign_response(secret: str, status: int, body: bytes) -> dict[str, str]:
    timestamp = str(now_ms())
    return {AUTH: f"{timestamp} {_mac(secret, str(status), timestamp, body=body)}"}


def _fields(headers: Mapping[str, str], names: str) -> list[str]:
    """The header's space-separated fields; ASCII only, so that other text (even bytes
    that are not UTF-8, decoded with surrogate escapes) can neither crash nor match."""
    value = headers.get(AUTH, "")
    fields = value.split(" ")
    if not value.isascii() or len(fields) != len(names.split()):
        raise AuthError(f"{AUTH} missing or malformed: expected {names!r}")
    return fields


def _fresh(timestamp: str, window_ms: int) -> None:
    # isdigit alone admits digits such as "¹" that int() refuses: ASCII only (_fields).
    if not timestamp.isdigit() or len(timestamp) > 16:
        raise AuthError("malformed timestamp")
    if abs(now_ms() - int(timestamp)) > window_ms:
        raise AuthError(f"timestamp more than {window_ms} ms away from this node's clock")


def verify_request(
    secret: str,
    method: str,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    window_ms: int = AUTH_WINDOW_MS,
) -> str:
    """Return the authenticated sender id, or raise AuthError."""
    sender, timestamp, mac = _fields(headers, "sender timestamp mac")
    _fresh(timestamp, window_ms)
    expected = _mac(secret, method.upper(), path, timestamp, sender, body=body)
    if not hmac.compare_digest(expected, mac):  # constant-time; ASCII, as _fields made sure
        raise AuthError("bad signature")
    return sender


def verify_response(
    secret: str,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    window_ms: int = AUTH_WINDOW_MS,
) -> None:
    timestamp, mac = _fields(headers, "timestamp mac")
    _fresh(timestamp, window_ms)
    if not hmac.compare_digest(_mac(secret, str(status), timestamp, body=body), mac):
        raise AuthError("bad response signature")
