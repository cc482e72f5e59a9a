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
import logging
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)
AUTH_WINDOW_MS = 60_000  # as max_drift_ms: a clock the HLC follows still replicates
AUTH = "X-Replica-Auth"
BODY_HASH = "X-Replica-Body-Sha256"  # base64url, no padding
MAC_BYTES = 16


class AuthError(Exception):
    """Missing, stale or wrong signature."""


REFUSALS_LOGGED_EVERY_S = 10.0
_last_logged = [-REFUSALS_LOGGED_EVERY_S]


def log_refusal(what: str, remote: str | None, error: AuthError) -> None:
    """Say, at most every REFUSALS_LOGGED_EVERY_S, that a peer's signature was refused and
    why: a peer with another secret, or a clock far off, is otherwise told alone (a
    review found an operator saw only the other side's "401")."""
    now = time.monotonic()
    if now - _last_logged[0] >= REFUSALS_LOGGED_EVERY_S:
        _last_logged[0] = now
        logger.warning("refused a %s from %s: %s", what, remote or "?", error)


def _mac(secret: str, *parts: str, body: bytes) -> str:
    return _mac_of_digest(secret, *parts, digest=hashlib.sha256(body).digest())


def _mac_of_digest(secret: str, *parts: str, digest: bytes) -> str:
    message = "\n".join(parts).encode() + b"\n" + digest
    mac = hmac.new(secret.encode(), message, hashlib.sha256).digest()[:MAC_BYTES]
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def sign_request(
    secret: str, method: str, path: str, body: bytes, sender: str, *, at_ms: int | None = None
) -> dict[str, str]:
    timestamp = str(now_ms() if at_ms is None else at_ms)
    digest = hashlib.sha256(body).digest()
    mac = _mac_of_digest(secret, method.upper(), path, timestamp, sender, digest=digest)
    # The body's hash, which the MAC covers, goes too: the receiver checks the MAC before
    # reading the body (an older receiver leaves the header be).
    return {AUTH: f"{sender} {timestamp} {mac}", BODY_HASH: _b64(digest)}


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
    skew_ms = int(timestamp) - now_ms()
    if abs(skew_ms) > window_ms:
        raise AuthError(
            f"signed {abs(skew_ms) / 1000:.1f} s {'ahead of' if skew_ms > 0 else 'behind'} "
            f"this node's clock, more than auth_window_ms ({window_ms} ms) allows: check "
            "both machines' clocks"
        )


def verify_request_head(
    secret: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    *,
    window_ms: int = AUTH_WINDOW_MS,
) -> tuple[str, bytes] | None:
    """The sender and the body's hash, proven by the MAC before the body is read, when
    the request carries the hash (``BODY_HASH``; a sender of an older version does not:
    None); the body must then hash to it (``body_matches``). Raises AuthError. No one
    without the secret gets a body read, nor takes a place among those being read (a
    review's unsigned senders, trickling bodies, kept peers' requests out)."""
    declared = headers.get(BODY_HASH)
    if declared is None:
        return None
    try:
        digest = base64.urlsafe_b64decode(declared.encode() + b"=" * (-len(declared) % 4))
    except ValueError:  # binascii.Error too; not ASCII
        raise AuthError(f"{BODY_HASH} malformed") from None
    if len(digest) != hashlib.sha256().digest_size:
        raise AuthError(f"{BODY_HASH} malformed")
    return _verified(secret, method, path, digest, headers, window_ms), digest


def body_matches(body: bytes, digest: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(body).digest(), digest)


def check_request_head(headers: Mapping[str, str], *, window_ms: int = AUTH_WINDOW_MS) -> str:
    """What can be checked of a request's signature before its body is read: the form of
    the header and the freshness of its time; the sender it names (not yet proven).
    A request failing this is refused without reading its body, so that no one without
    the secret makes the node hold bodies in memory (a review's 250 unsigned 8 MB bodies
    held 2 GB)."""
    sender, timestamp, _ = _fields(headers, "sender timestamp mac")
    _fresh(timestamp, window_ms)
    return sender


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
    return _verified(secret, method, path, hashlib.sha256(body).digest(), headers, window_ms)


def _verified(
    secret: str,
    method: str,
    path: str,
    digest: bytes,
    headers: Mapping[str, str],
    window_ms: int,
) -> str:
    """The sender a request's header names, once its time and its MAC over ``digest``
    (its body's hash) hold; else AuthError."""
    sender, timestamp, mac = _fields(headers, "sender timestamp mac")
    _fresh(timestamp, window_ms)
    expected = _mac_of_digest(secret, method.upper(), path, timestamp, sender, digest=digest)
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
