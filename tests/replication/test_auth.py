"""Peer authentication: HMAC over method, path, timestamp, sender and body, in one
header; a freshness window; constant-time comparison; every refusal is an AuthError,
never a crash."""

from __future__ import annotations

import base64

import pytest

from replication import auth
from replication.auth import AUTH, AuthError

SECRET = "cluster-secret"
NOW_MS = 1_700_000_000_000
PATH = "/replication/sync"
BODY = b"\x96\x01\x01some msgpack"
SENDER_ID = "eu~a1b2c3d4"
WINDOW_MS = auth.AUTH_WINDOW_MS
SENDER, TIMESTAMP, MAC = 0, 1, 2  # the request header's fields


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "now_ms", lambda: NOW_MS)


def signed(*, at_ms: int | None = None) -> dict[str, str]:
    return auth.sign_request(SECRET, "POST", PATH, BODY, SENDER_ID, at_ms=at_ms)


def verify(headers: dict[str, str], **changes: object) -> str:
    args: dict[str, object] = {
        "secret": SECRET,
        "method": "POST",
        "path": PATH,
        "body": BODY,
        "headers": headers,
    }
    args.update(changes)
    return auth.verify_request(**args)  # type: ignore[arg-type]


def with_field(headers: dict[str, str], index: int, value: str) -> dict[str, str]:
    """``headers`` with one space-separated field of X-Replica-Auth replaced."""
    fields = headers[AUTH].split(" ")
    fields[index] = value
    return {AUTH: " ".join(fields)}


def test_a_signed_request_verifies_and_names_its_sender() -> None:
    headers = signed()
    sender, timestamp, mac = headers[AUTH].split(" ")
    assert (sender, timestamp) == (SENDER_ID, str(NOW_MS))
    assert len(base64.urlsafe_b64decode(mac + "==")) == auth.MAC_BYTES == 16
    assert verify(headers) == SENDER_ID
    assert verify(headers, method="post") == SENDER_ID  # methods compare in upper case


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": "another-secret"},
        {"body": BODY + b"!"},
        {"body": b""},
        {"path": "/replication/sync/"},
        {"path": "/users"},
        {"method": "PUT"},
    ],
    ids=["secret", "body", "empty-body", "path-slash", "path", "method"],
)
def test_anything_changed_in_what_was_signed_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(AuthError, match="bad signature"):
        verify(signed(), **changes)


def test_a_claimed_sender_other_than_the_signer_is_refused() -> None:
    with pytest.raises(AuthError, match="bad signature"):
        verify(with_field(signed(), SENDER, "us~0f0f"))


def test_a_signature_moved_to_another_timestamp_is_refused() -> None:
    with pytest.raises(AuthError, match="bad signature"):
        verify(with_field(signed(), TIMESTAMP, str(NOW_MS - 1)))


@pytest.mark.parametrize("offset_ms", [-WINDOW_MS, -1, 0, 1, WINDOW_MS])
def test_timestamps_within_the_window_are_fresh(offset_ms: int) -> None:
    assert verify(signed(at_ms=NOW_MS + offset_ms)) == SENDER_ID


@pytest.mark.parametrize("offset_ms", [-WINDOW_MS - 1, -10 * WINDOW_MS, WINDOW_MS + 1, 10**9])
def test_stale_and_future_timestamps_are_refused(offset_ms: int) -> None:
    """The refusal says how far off the clock was, and which way: an operator's first
    question when a peer cannot replicate (a review saw a bare 401)."""
    way = "ahead of" if offset_ms > 0 else "behind"
    with pytest.raises(AuthError, match=f"s {way} this node's clock.*check both machines' clocks"):
        verify(signed(at_ms=NOW_MS + offset_ms))


def test_the_window_is_the_receivers_choice() -> None:
    headers = signed(at_ms=NOW_MS - 5_000)
    assert verify(headers, window_ms=5_000) == SENDER_ID
    with pytest.raises(AuthError):
        verify(headers, window_ms=4_999)


@pytest.mark.parametrize("kept", [[], [SENDER], [SENDER, TIMESTAMP], [TIMESTAMP, MAC]])
def test_a_header_missing_a_field_is_refused(kept: list[int]) -> None:
    fields = signed()[AUTH].split(" ")
    with pytest.raises(AuthError, match="missing or malformed"):
        verify({AUTH: " ".join(fields[i] for i in kept)})


def test_a_header_with_a_field_too_many_is_refused() -> None:
    with pytest.raises(AuthError, match="missing or malformed"):
        verify({AUTH: signed()[AUTH] + " extra"})


def test_no_headers_at_all_is_refused() -> None:
    with pytest.raises(AuthError):
        verify({})


@pytest.mark.parametrize("timestamp", ["", "soon", "-5", "1.5", "+1700000000000", "1" * 17])
def test_a_malformed_timestamp_is_refused(timestamp: str) -> None:
    with pytest.raises(AuthError, match="malformed timestamp"):
        verify(with_field(signed(), TIMESTAMP, timestamp))


@pytest.mark.parametrize("timestamp", ["¹⁷", "١٧٠٠٠٠٠٠٠٠٠٠٠"])
def test_a_non_ascii_timestamp_is_an_auth_error_not_a_crash(timestamp: str) -> None:
    """Found writing these tests: ``"¹".isdigit()`` holds but ``int("¹")`` raises, and the
    endpoint answered a header of superscript digits with a 500."""
    with pytest.raises(AuthError):
        verify(with_field(signed(), TIMESTAMP, timestamp))


@pytest.mark.parametrize("signature", ["é" * 22, "ü", "\udcff"])
def test_a_non_ascii_signature_is_an_auth_error_not_a_crash(signature: str) -> None:
    """Found writing these tests: hmac.compare_digest raises TypeError on non-ASCII
    strings, and the endpoint answered such a header with a 500."""
    with pytest.raises(AuthError):
        verify(with_field(signed(), MAC, signature))


@pytest.mark.parametrize("sender", ["eu~é", "eu~\udcff"])
def test_a_non_ascii_sender_is_an_auth_error_not_a_crash(sender: str) -> None:
    """Found writing these tests: a sender header carrying bytes that are not UTF-8
    (decoded with surrogate escapes) made the MAC's encode() raise, and the endpoint 500."""
    with pytest.raises(AuthError):
        verify(with_field(signed(), SENDER, sender))


def test_a_signed_response_verifies() -> None:
    headers = auth.sign_response(SECRET, 200, BODY)
    auth.verify_response(SECRET, 200, BODY, headers)


@pytest.mark.parametrize(
    ("secret", "status", "body"),
    [("another-secret", 200, BODY), (SECRET, 400, BODY), (SECRET, 200, BODY + b"!")],
    ids=["secret", "status", "body"],
)
def test_a_tampered_response_is_refused(secret: str, status: int, body: bytes) -> None:
    headers = auth.sign_response(SECRET, 200, BODY)
    with pytest.raises(AuthError, match="bad response signature"):
        auth.verify_response(secret, status, body, headers)


def test_a_stale_response_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    headers = auth.sign_response(SECRET, 200, BODY)
    monkeypatch.setattr(auth, "now_ms", lambda: NOW_MS + WINDOW_MS + 1)
    with pytest.raises(AuthError, match="behind this node's clock"):
        auth.verify_response(SECRET, 200, BODY, headers)


@pytest.mark.parametrize("value", ["", str(NOW_MS), "mac", f"{NOW_MS} mac extra"])
def test_a_response_with_a_malformed_header_is_refused(value: str) -> None:
    with pytest.raises(AuthError, match="missing or malformed"):
        auth.verify_response(SECRET, 200, BODY, {AUTH: value})


def test_a_response_without_the_header_is_refused() -> None:
    with pytest.raises(AuthError):
        auth.verify_response(SECRET, 200, BODY, {})


def test_a_request_signature_does_not_verify_as_a_response() -> None:
    with pytest.raises(AuthError):
        auth.verify_response(SECRET, 200, BODY, signed())
