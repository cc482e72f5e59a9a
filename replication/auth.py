"""Peer authentication: HMAC-SHA256 with the shared cluster secret.

A request is signed over its method, path, timestamp and a hash of its body; a
response over its status, timestamp and body. A timestamp further than
``auth_window_ms`` from the receiver's clock is refused, so a captured request
cannot be replayed later (within the window a replay is harmless: ingest is
idempotent). Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

AUTH_WINDOW_MS = 30_000
SIGNATURE = "X-Replica-Signature"
TIMESTAMP = "X-Replica-Timestamp"
SENDER = "X-Replica-Id"


class AuthError(Exception):
    """Missing, stale or wrong signature."""


def _mac(secret: str, *parts: str, body: bytes) -> str:
    message = "\n".join(parts).encode() + b"\n" + hashlib.sha256(body).digest()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _same(expected: str, given: str) -> bool:
    """Constant-time comparison; compare_digest raises on non-ASCII text, which is wrong."""
    return given.isascii() and hmac.compare_digest(expected, given)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign_request(
    secret: str, method: str, path: str, body: bytes, sender: str, *, at_ms: int | None = None
) -> dict[str, str]:
    timestamp = str(now_ms() if at_ms is None else at_ms)
    return {
        SENDER: sender,
        TIMESTAMP: timestamp,
        SIGNATURE: _mac(secret, method.upper(), path, timestamp, sender, body=body),
    }


def sign_response(secret: str, status: int, body: bytes) -> dict[str, str]:
    timestamp = str(now_ms())
    return {TIMESTAMP: timestamp, SIGNATURE: _mac(secret, str(status), timestamp, body=body)}


def _fresh(headers: Mapping[str, str], window_ms: int) -> str:
    timestamp = headers.get(TIMESTAMP, "")
    # isdigit alone admits digits such as "¹" that int() refuses: ASCII only.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 16:
        raise AuthError("missing or malformed timestamp")
    if abs(now_ms() - int(timestamp)) > window_ms:
        raise AuthError(f"timestamp more than {window_ms} ms away from this node's clock")
    return timestamp


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
    timestamp = _fresh(headers, window_ms)
    sender = headers.get(SENDER, "")
    if not sender.isascii():  # replica ids are ASCII; other text may not even encode
        raise AuthError("malformed sender")
    expected = _mac(secret, method.upper(), path, timestamp, sender, body=body)
    if not _same(expected, headers.get(SIGNATURE, "")):
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
    timestamp = _fresh(headers, window_ms)
    expected = _mac(secret, str(status), timestamp, body=body)
    if not _same(expected, headers.get(SIGNATURE, "")):
        raise AuthError("bad response signature")
