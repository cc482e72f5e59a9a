"""Bad input of every kind gets a clear JSON 4xx error and writes nothing.

One table of requests, each sent byte for byte (raw HTTP/1.1 over a socket, so paths,
headers and bodies reach the node exactly as written) to a node that holds a seeded
user and group. For every row: the status, a JSON body with ``error`` and ``message``,
and the same log sequence, change feed and entities before and after. The table is
also run against a real ``replica node`` process by ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import event, given, settings
from hypothesis import strategies as st

from node.api import build_app
from node.config import Settings
from node.replica import Replica
from node.tokens import encode_token

BODY_BYTES_MAX = 128 * 1024  # small, so that 413 is cheap; still above the nesting bodies
JSON = "application/json"
RAW_REPLY_TIMEOUT_S = 30.0

# -- a raw HTTP/1.1 client: sends exactly the bytes given -------------------------------


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw(
    host: str,
    port: int,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str | bytes]] = (),
    body: bytes = b"",
) -> RawReply:
    """One request on a fresh connection (``Connection: close``), read to the end."""
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: {host}:{port}".encode()]
    for name, value in headers:
        lines.append(
            name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
        )
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), RAW_REPLY_TIMEOUT_S)
    finally:
        writer.close()
    return _parse_reply(data)


def _parse_reply(data: bytes) -> RawReply:
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _unchunk(rest)
    elif "content-length" in headers:
        rest = rest[: int(headers["content-length"])]
    return RawReply(int(status_line.split()[1]), headers, rest)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


# -- the table ------------------------------------------------------------------------

# Placeholders filled in per node: the seeded ids are fixed, the tokens are not.
TOKEN = "{token}"  # the node's current consistency token
AHEAD = "{ahead}"  # a token for writes of this node that do not exist (yet)


@dataclass(frozen=True)
class Bad:
    id: str
    method: str
    target: str
    status: int
    error: str
    body: bytes = b""
    headers: tuple[tuple[str, str | bytes], ...] = ()
    content_type: str | None = JSON  # sent with POST, PUT and PATCH; None: no header

    def request_headers(self, tokens: Mapping[str, str]) -> list[tuple[str, str | bytes]]:
        sent: list[tuple[str, str | bytes]] = []
        if self.content_type is not None and self.method in ("POST", "PUT", "PATCH"):
            sent.append(("Content-Type", self.content_type))
        for name, value in self.headers:
            if isinstance(value, str):
                for placeholder, token in tokens.items():
                    value = value.replace(placeholder, token)
            sent.append((name, value))
        return sent


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _user(**fields: Any) -> bytes:
    """A valid new user, with ``fields`` changed (None removes a field)."""
    user: dict[str, Any] = {
        "name": "Ned Flanders",
        "username": "ned",
        "email": "ned@spring.example",
    }
    user.update(fields)
    return _j({k: v for k, v in user.items() if v is not None})


USER_OK = _user()
TOO_LONG_ID = "a" * 65
TOO_LARGE = b'{"name": "' + b"a" * BODY_BYTES_MAX + b'"}'


def _token_of(wire: object) -> str:
    """A consistency token's text for any msgpack value (tokens are base64 msgpack)."""
    return base64.urlsafe_b64encode(msgpack.packb(wire)).rstrip(b"=").decode()


BAD_INPUTS: list[Bad] = [
    # -- bodies that are not JSON, or not a JSON object --------------------------------
    Bad("invalid-json", "POST", "/users", 400, "bad_json", b'{"name": '),
    Bad("trailing-garbage", "POST", "/users", 400, "bad_json", USER_OK + b" x"),
    Bad("empty-body", "POST", "/users", 400, "bad_json", b""),
    Bad("single-quotes", "PATCH", "/users/homer", 400, "bad_json", b"{'name': 'H'}"),
    Bad("json-list", "POST", "/users", 400, "bad_body", b"[]"),
    Bad("json-list-of-user", "POST", "/users", 400, "bad_body", b"[" + USER_OK + b"]"),
    Bad("json-string", "POST", "/users", 400, "bad_body", b'"homer"'),
    Bad("json-number", "POST", "/users", 400, "bad_body", b"42"),
    Bad("json-null", "POST", "/users", 400, "bad_body", b"null"),
    Bad("json-true", "POST", "/groups", 400, "bad_body", b"true"),
    Bad("json-nan", "POST", "/groups", 400, "bad_body", b"NaN"),
    Bad("patch-json-list", "PATCH", "/users/homer", 400, "bad_body", b'[{"name": "H"}]'),
    Bad("patch-json-null", "PATCH", "/groups/springfield", 400, "bad_body", b"null"),
    Bad("deep-array", "POST", "/users", 400, "bad_json", b"[" * 100_000),
    Bad("deep-object", "PATCH", "/users/homer", 400, "bad_json", b'{"a":' * 20_000),
    Bad("non-utf8", "POST", "/users", 400, "bad_json", b'{"name": "\xff\xfe"}'),
    Bad(
        "latin1-charset",
        "POST",
        "/users",
        400,
        "bad_json",
        _user(name=None)[:-1] + b', "name": "Jos\xe9"}',
        content_type="application/json; charset=latin-1",
    ),
    Bad("lone-surrogate-name", "POST", "/users", 400, "bad_json", _user(name="x\ud800")),
    Bad(
        "lone-surrogate-profile",
        "PATCH",
        "/users/homer",
        400,
        "bad_json",
        _j({"profile": {"job": "\udc80"}}),
    ),
    Bad("lone-surrogate-group", "POST", "/groups", 400, "bad_json", _j({"name": "\udfff"})),
    # json decodes a surrogate's UTF-8 bytes, and UTF-16 text, into lone surrogates too
    Bad(
        "lone-surrogate-utf8-bytes",
        "POST",
        "/groups",
        400,
        "bad_json",
        b'{"name": "x\xed\xa0\x80"}',
    ),
    Bad(
        "lone-surrogate-utf16",
        "POST",
        "/groups",
        400,
        "bad_json",
        '{"name": "x\ud800"}'.encode("utf-16-le", "surrogatepass"),
    ),
    Bad(
        "lone-surrogate-uppercase-escape",
        "PATCH",
        "/users/homer",
        400,
        "bad_json",
        b'{"name": "x\\uDBFF"}',
    ),
    Bad(
        "bad-gzip",
        "POST",
        "/users",
        400,
        "bad_payload",
        USER_OK,
        headers=(("Content-Encoding", "gzip"),),
    ),
    # -- content type ------------------------------------------------------------------
    Bad("text-plain", "POST", "/users", 415, "unsupported_media_type", USER_OK, (), "text/plain"),
    Bad("no-content-type", "POST", "/users", 415, "unsupported_media_type", USER_OK, (), None),
    Bad(
        "form-encoded",
        "POST",
        "/users",
        415,
        "unsupported_media_type",
        b"name=Ned&username=ned&email=ned%40spring.example",
        (),
        "application/x-www-form-urlencoded",
    ),
    Bad(
        "patch-text-plain",
        "PATCH",
        "/users/homer",
        415,
        "unsupported_media_type",
        b'{"name": "H"}',
        (),
        "text/plain",
    ),
    Bad("group-xml", "POST", "/groups", 415, "unsupported_media_type", b"<g/>", (), "text/xml"),
    # -- size --------------------------------------------------------------------------
    Bad("too-large", "POST", "/users", 413, "body_too_large", TOO_LARGE),
    Bad("patch-too-large", "PATCH", "/users/homer", 413, "body_too_large", TOO_LARGE),
    Bad("group-too-large", "POST", "/groups", 413, "body_too_large", TOO_LARGE),
    # -- fields: unknown, wrong type ---------------------------------------------------
    Bad("unknown-field", "POST", "/users", 400, "unknown_field", _user(age="39")),
    Bad("patch-unknown-field", "PATCH", "/users/homer", 400, "unknown_field", _j({"nick": "H"})),
    Bad("patch-id", "PATCH", "/users/homer", 400, "unknown_field", _j({"id": "homer2"})),
    Bad(
        "group-members-field",
        "POST",
        "/groups",
        400,
        "unknown_field",
        _j({"name": "G", "members": []}),
    ),
    Bad("name-number", "POST", "/users", 400, "wrong_type", _user(name=42)),
    Bad("name-nan", "POST", "/users", 400, "wrong_type", _user(name=None)[:-1] + b', "name": NaN}'),
    Bad("email-object", "POST", "/users", 400, "wrong_type", _user(email={"at": "x"})),
    Bad("username-bool", "POST", "/users", 400, "wrong_type", _user(username=True)),
    Bad("api-key-list", "POST", "/users", 400, "wrong_type", _user(api_key=["k"])),
    Bad("profile-list", "POST", "/users", 400, "wrong_type", _user(profile=["job"])),
    Bad("profile-string", "PATCH", "/users/homer", 400, "wrong_type", _j({"profile": "job"})),
    Bad(
        "profile-number-value",
        "PATCH",
        "/users/homer",
        400,
        "wrong_type",
        _j({"profile": {"job": 7}}),
    ),
    Bad("group-name-list", "POST", "/groups", 400, "wrong_type", _j({"name": ["G"]})),
    Bad("patch-name-null", "PATCH", "/users/homer", 400, "wrong_type", _j({"name": None})),
    Bad("id-number", "POST", "/users", 400, "wrong_type", _user(id=7)),
    # -- fields: invalid values --------------------------------------------------------
    Bad("email-no-at", "POST", "/users", 422, "invalid_value", _user(email="ned.spring.example")),
    Bad("email-no-domain-dot", "POST", "/users", 422, "invalid_value", _user(email="ned@spring")),
    Bad(
        "email-space", "PATCH", "/users/homer", 422, "invalid_value", _j({"email": "h s@x.example"})
    ),
    Bad("username-leading-dash", "POST", "/users", 422, "invalid_value", _user(username="-ned")),
    Bad("username-one-char", "POST", "/users", 422, "invalid_value", _user(username="n")),
    Bad("username-space", "PATCH", "/users/homer", 422, "invalid_value", _j({"username": "h s"})),
    Bad("api-key-short", "POST", "/users", 422, "invalid_value", _user(api_key="short")),
    Bad("api-key-chars", "POST", "/users", 422, "invalid_value", _user(api_key="abc def ghi")),
    Bad("name-too-long", "POST", "/users", 422, "invalid_value", _user(name="N" * 201)),
    Bad("name-blank", "POST", "/users", 422, "invalid_value", _user(name="   ")),
    Bad("group-name-empty", "PATCH", "/groups/springfield", 422, "invalid_value", _j({"name": ""})),
    Bad("profile-bad-key", "POST", "/users", 422, "invalid_value", _user(profile={"Bad-Key": "x"})),
    Bad(
        "profile-too-many-keys",
        "PATCH",
        "/users/homer",
        422,
        "invalid_value",
        _j({"profile": {f"k{i}": "v" for i in range(65)}}),
    ),
    Bad(
        "profile-value-too-long",
        "PATCH",
        "/users/homer",
        422,
        "invalid_value",
        _j({"profile": {"bio": "b" * 1001}}),
    ),
    Bad("id-bad-chars", "POST", "/users", 422, "invalid_value", _user(id="ned flanders")),
    Bad(
        "id-too-long", "POST", "/groups", 422, "invalid_value", _j({"id": TOO_LONG_ID, "name": "G"})
    ),
    Bad("missing-email", "POST", "/users", 422, "missing_field", _user(email=None)),
    Bad("missing-everything", "POST", "/users", 422, "missing_field", b"{}"),
    Bad("group-missing-name", "POST", "/groups", 422, "missing_field", _j({"id": "g2"})),
    Bad("empty-patch", "PATCH", "/users/homer", 422, "empty_patch", b"{}"),
    Bad("empty-profile-patch", "PATCH", "/users/homer", 422, "empty_patch", _j({"profile": {}})),
    # -- refused by the state: exists, taken, stale ------------------------------------
    Bad("id-exists", "POST", "/users", 409, "exists", _user(id="homer")),
    Bad("email-taken", "POST", "/users", 409, "conflict", _user(email="HOMER@Spring.example")),
    Bad("username-taken", "POST", "/users", 409, "conflict", _user(username="marge")),
    Bad(
        "patch-email-taken",
        "PATCH",
        "/users/homer",
        409,
        "conflict",
        _j({"email": "marge@spring.example"}),
    ),
    Bad(
        "stale-if-match",
        "PATCH",
        "/users/homer",
        412,
        "precondition_failed",
        _j({"name": "H"}),
        (("If-Match", '"0000000000000000"'),),
    ),
    Bad(
        "delete-stale-if-match",
        "DELETE",
        "/groups/springfield",
        412,
        "precondition_failed",
        headers=(("If-Match", '"0000000000000000"'),),
    ),
    # -- ids in paths ------------------------------------------------------------------
    Bad("path-id-too-long", "GET", f"/users/{TOO_LONG_ID}", 404, "not_found"),
    Bad("path-id-unicode", "GET", "/users/%C3%A9", 404, "not_found"),
    Bad("path-id-dotdot", "GET", "/users/%2E%2E", 404, "not_found"),
    Bad("path-id-dotdot-raw", "PATCH", "/users/..", 404, "not_found", _j({"name": "H"})),
    Bad("path-id-nul", "DELETE", "/users/homer%00", 404, "not_found"),
    Bad("patch-path-id-unicode", "PATCH", "/users/hom%C3%A9r", 404, "not_found", _j({"name": "H"})),
    Bad("delete-path-id-too-long", "DELETE", f"/groups/{TOO_LONG_ID}", 404, "not_found"),
    Bad("put-member-bad-user-id", "PUT", "/groups/springfield/members/a%20b", 404, "not_found"),
    # -- unknown ids -------------------------------------------------------------------
    Bad("unknown-user", "GET", "/users/flanders", 404, "not_found"),
    Bad("patch-unknown-user", "PATCH", "/users/flanders", 404, "not_found", _j({"name": "N"})),
    Bad("delete-unknown-user", "DELETE", "/users/flanders", 404, "not_found"),
    Bad("history-unknown-user", "GET", "/users/flanders/history", 404, "not_found"),
    Bad("groups-of-unknown-user", "GET", "/users/flanders/groups", 404, "not_found"),
    Bad("unknown-group", "GET", "/groups/shelbyville", 404, "not_found"),
    Bad("members-unknown-group", "GET", "/groups/shelbyville/members", 404, "not_found"),
    Bad("put-member-unknown-user", "PUT", "/groups/springfield/members/flanders", 404, "not_found"),
    Bad("put-member-unknown-group", "PUT", "/groups/shelbyville/members/homer", 404, "not_found"),
    Bad(
        "delete-member-unknown-group",
        "DELETE",
        "/groups/shelbyville/members/homer",
        404,
        "not_found",
    ),
    # -- query parameters --------------------------------------------------------------
    Bad("limit-negative", "GET", "/users?limit=-1", 400, "bad_query"),
    Bad("limit-abc", "GET", "/users?limit=abc", 400, "bad_query"),
    Bad("limit-zero", "GET", "/users?q=homer&limit=0", 400, "bad_query"),
    Bad("limit-over-max", "GET", "/groups/springfield/members?limit=1001", 400, "bad_query"),
    Bad("limit-huge", "GET", "/changes?limit=99999999999999999999", 400, "bad_query"),
    Bad("limit-superscript", "GET", "/users?limit=%C2%B2", 400, "bad_query"),
    Bad("limit-arabic-digit", "GET", "/changes?limit=%D9%A3", 400, "bad_query"),
    Bad("cursor-bad-chars", "GET", "/users?cursor=a%2Fb", 400, "bad_query"),
    Bad("cursor-nul", "GET", "/users?q=homer&cursor=a%00", 400, "bad_query"),
    Bad("limit-abc-by-email", "GET", "/users?email=homer@x.us&limit=abc", 400, "bad_query"),
    Bad("cursor-bad-by-username", "GET", "/users?username=homer&cursor=a%2F", 400, "bad_query"),
    Bad(
        "cursor-too-long",
        "GET",
        f"/groups/springfield/members?cursor={TOO_LONG_ID}",
        400,
        "bad_query",
    ),
    Bad("since-abc", "GET", "/changes?since=abc", 400, "bad_query"),
    Bad("since-negative", "GET", "/changes?since=-1", 400, "bad_query"),
    Bad("since-superscript", "GET", "/changes?since=%C2%B2", 400, "bad_query"),
    Bad("since-too-long", "GET", "/changes?since=" + "9" * 20, 400, "bad_query"),
    Bad("wait-abc", "GET", "/changes?wait=abc", 400, "bad_query"),
    Bad("wait-too-large", "GET", "/changes?wait=30001", 400, "bad_query"),
    Bad("at-garbage", "GET", "/users/homer?at=garbage", 400, "bad_query"),
    # a newline in a path (aiohttp's plain-text 404 and 405 answered it, found by a fuzzer)
    Bad("path-newline", "GET", "/nope%0A", 404, "not_found"),
    Bad("path-newline-method", "DELETE", "/users/homer%0a/groups", 405, "method_not_allowed"),
    Bad("at-empty", "GET", "/groups/springfield?at=", 400, "bad_query"),
    Bad("at-no-zone", "GET", "/users/homer?at=2026-01-01T12:00:00", 400, "bad_query"),
    Bad("at-before-1970", "GET", "/users/homer?at=1969-12-31T23:59:59Z", 404, "not_found"),
    Bad("at-year-1", "GET", "/users/homer?at=0001-01-01T00:00:00Z", 404, "not_found"),
    Bad("q-too-long", "GET", "/users?q=" + "q" * 201, 400, "bad_query"),
    # -- headers -----------------------------------------------------------------------
    Bad(
        "token-garbage",
        "GET",
        "/users/homer",
        400,
        "bad_token",
        headers=(("X-Consistency-Token", "garbage!!"),),
    ),
    Bad("token-empty", "GET", "/status", 400, "bad_token", headers=(("X-Consistency-Token", ""),)),
    # Well-formed msgpack of the token's shape, holding what no counter or origin is.
    *(
        Bad(
            f"token-{what}",
            "GET",
            path,
            400,
            "bad_token",
            headers=(("X-Consistency-Token", _token_of([1, [[origin, counter]]])),),
        )
        for what, origin, counter, path in (
            ("infinite-counter", "eu~0000aaaa", float("inf"), "/health"),
            ("float-counter", "eu~0000aaaa", 3.0, "/users/homer"),
            ("bool-counter", "eu~0000aaaa", True, "/status"),
            ("int-origin", 7, 3, "/users?q=homer"),
        )
    ),
    Bad(
        "token-too-long",
        "GET",
        "/users?q=homer",
        400,
        "bad_token",
        headers=(("X-Consistency-Token", "A" * 5000),),
    ),
    Bad(
        "wait-ms-abc",
        "GET",
        "/users/homer",
        400,
        "bad_header",
        headers=(("X-Consistency-Token", TOKEN), ("X-Wait-Ms", "abc")),
    ),
    Bad(
        "wait-ms-negative",
        "GET",
        "/changes",
        400,
        "bad_header",
        headers=(("X-Consistency-Token", TOKEN), ("X-Wait-Ms", "-1")),
    ),
    Bad(
        "wait-ms-too-large",
        "GET",
        "/users/homer",
        400,
        "bad_header",
        headers=(("X-Consistency-Token", TOKEN), ("X-Wait-Ms", "60001")),
    ),
    Bad(
        "wait-ms-superscript",
        "GET",
        "/groups/springfield",
        400,
        "bad_header",
        headers=(("X-Consistency-Token", TOKEN), ("X-Wait-Ms", "²")),  # sent as UTF-8
    ),
    Bad(
        "token-not-caught-up",
        "GET",
        "/users/homer",
        504,
        "not_caught_up",
        headers=(("X-Consistency-Token", AHEAD), ("X-Wait-Ms", "0")),
    ),
    Bad("actor-too-long", "POST", "/users", 400, "bad_header", USER_OK, (("X-Actor", "a" * 129),)),
    Bad(
        "actor-not-utf8",
        "PATCH",
        "/users/homer",
        400,
        "bad_header",
        _j({"name": "H"}),
        (("X-Actor", b"\xff\xfe"),),
    ),
    Bad(
        "actor-too-long-put",
        "PUT",
        "/groups/springfield/members/marge",
        400,
        "bad_header",
        b"",
        (("X-Actor", "a" * 200),),
    ),
    Bad(
        "actor-too-long-delete",
        "DELETE",
        "/users/marge",
        400,
        "bad_header",
        headers=(("X-Actor", "a" * 129),),
    ),
    # -- routing -----------------------------------------------------------------------
    Bad("unknown-path", "GET", "/nope", 404, "not_found"),
    Bad("unknown-subpath", "GET", "/users/homer/nope", 404, "not_found"),
    Bad("unknown-path-post", "POST", "/user", 404, "not_found", USER_OK),
    Bad("delete-collection", "DELETE", "/users", 405, "method_not_allowed"),
    Bad("put-user", "PUT", "/users/homer", 405, "method_not_allowed", USER_OK),
    Bad("post-changes", "POST", "/changes", 405, "method_not_allowed", b"{}"),
    Bad(
        "patch-member",
        "PATCH",
        "/groups/springfield/members/homer",
        405,
        "method_not_allowed",
        b"{}",
    ),
]


# -- a seeded node, and what "nothing was written" means -----------------------------------

SEED_USERS = [
    {"id": "homer", "name": "Homer Simpson", "username": "homer", "email": "homer@spring.example"},
    {"id": "marge", "name": "Marge Simpson", "username": "marge", "email": "marge@spring.example"},
]
SEED_GROUP = {"id": "springfield", "name": "Springfield"}
SNAPSHOT_PATHS = (
    "/users/homer",
    "/users/marge",
    "/groups/springfield",
    "/groups/springfield/members",
    "/users/homer/groups",
    "/changes?since=0&limit=1000",
)


async def seed(session: aiohttp.ClientSession, base: str) -> None:
    """Two users and a group with one member; fails loudly if the node refuses."""
    for user in SEED_USERS:
        async with session.post(f"{base}/users", json=user) as response:
            assert response.status == 201, await response.text()
    async with session.post(f"{base}/groups", json=SEED_GROUP) as response:
        assert response.status == 201, await response.text()
    async with session.put(f"{base}/groups/springfield/members/homer") as response:
        assert response.status == 200, await response.text()


async def tokens_of(session: aiohttp.ClientSession, base: str) -> dict[str, str]:
    """Values for the table's placeholders, from the node's own /status."""
    async with session.get(f"{base}/status") as response:
        status = await response.json()
    return {TOKEN: status["token"], AHEAD: encode_token({status["replica_id"]: 10**9})}


async def snapshot(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    """What a write would change: the log position, the change feed, the seeded entities."""
    seen: dict[str, Any] = {}
    async with session.get(f"{base}/status") as response:
        seen["seq"] = (await response.json())["seq"]
    for path in SNAPSHOT_PATHS:
        async with session.get(base + path) as response:
            seen[path] = (response.status, response.headers.get("ETag"), await response.json())
    return seen


def check_reply(case: Bad, reply: RawReply) -> None:
    where = f"{case.method} {case.target[:80]}"
    assert reply.status == case.status, f"{where}: {reply.status} {reply.body[:300]!r}"
    assert reply.headers.get("content-type", "").startswith(JSON), f"{where}: {reply.headers}"
    body = reply.json()
    assert isinstance(body, dict), f"{where}: {body!r}"
    assert body.get("error") == case.error, f"{where}: {body!r}"
    assert isinstance(body.get("message"), str), f"{where}: {body!r}"
    assert body["message"], f"{where}: {body!r}"


async def run_case(
    session: aiohttp.ClientSession, base: str, host: str, port: int, case: Bad
) -> None:
    """Send one row to a seeded node; check the answer and that nothing was written."""
    tokens = await tokens_of(session, base)
    before = await snapshot(session, base)
    reply = await send_raw(
        host, port, case.method, case.target, headers=case.request_headers(tokens), body=case.body
    )
    check_reply(case, reply)
    after = await snapshot(session, base)
    assert after == before, f"{case.id} wrote something"


def _settings(data_dir: Path) -> Settings:
    return Settings(region="eu", data_dir=data_dir, body_bytes_max=BODY_BYTES_MAX)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.id for case in BAD_INPUTS])
def test_bad_input_is_refused_with_json_and_writes_nothing(tmp_path: Path, case: Bad) -> None:
    async def scenario() -> None:
        replica = Replica.open(tmp_path, "eu")
        replica.bind(asyncio.get_running_loop())
        try:
            server = TestServer(build_app(replica, _settings(tmp_path)))
            async with TestClient(server) as client:
                base = str(server.make_url("")).rstrip("/")
                await seed(client.session, base)
                seq = replica.state.seq
                assert server.host is not None
                assert server.port is not None
                await run_case(client.session, base, server.host, server.port, case)
                assert replica.state.seq == seq
                async with client.get("/health") as response:
                    assert response.status == 200
        finally:
            replica.close()

    asyncio.run(scenario())


def test_the_table_is_wide_and_its_ids_unique() -> None:
    assert len(BAD_INPUTS) >= 50
    assert len({case.id for case in BAD_INPUTS}) == len(BAD_INPUTS)
    assert {case.status for case in BAD_INPUTS} >= {400, 404, 405, 409, 412, 413, 415, 422}


def test_bad_authorization_is_401_and_writes_nothing(tmp_path: Path) -> None:
    """With an API token configured: a wrong, missing or non-UTF-8 bearer is a JSON 401."""
    settings = Settings(region="eu", data_dir=tmp_path, api_token="s3cret-token")
    authorized = {"Authorization": "Bearer s3cret-token"}
    attempts: list[tuple[str, str | bytes] | None] = [
        None,
        ("Authorization", "Bearer wrong"),
        ("Authorization", "s3cret-token"),
        ("Authorization", b"Bearer \xff\xfe"),
        ("Authorization", b"Bearer s3cret-token " + "é".encode()),
    ]

    async def scenario() -> None:
        replica = Replica.open(tmp_path, "eu")
        replica.bind(asyncio.get_running_loop())
        try:
            server = TestServer(build_app(replica, settings))
            async with TestClient(server, headers=authorized) as client:
                assert server.host is not None
                assert server.port is not None
                await seed(client.session, str(server.make_url("")).rstrip("/"))
                seq = replica.state.seq
                for header in attempts:
                    headers = [("Content-Type", JSON), *([header] if header else [])]
                    reply = await send_raw(
                        server.host, server.port, "POST", "/users", headers=headers, body=USER_OK
                    )
                    case = Bad("unauthorized", "POST", "/users", 401, "unauthorized")
                    check_reply(case, reply)
                    assert replica.state.seq == seq, header
                reply = await send_raw(server.host, server.port, "GET", "/health")
                assert reply.status == 200  # open without a token
        finally:
            replica.close()

    asyncio.run(scenario())


# -- random JSON-ish bodies ----------------------------------------------------------------

# Text is kept short: the point is shapes and types, not lengths (the table has those).
_text = st.text(max_size=24)
_surrogates = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
)
_plausible = st.sampled_from(
    [
        "Ned Flanders",
        "ned",
        "ned@spring.example",
        "NED@Spring.Example",
        "homer@spring.example",
        "marge",
        "abcdefgh_123",
        "",
        " ",
        "x@y",
        "a" * 201,
    ]
)
_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | _text | _plausible | _surrogates
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(["id", "name", "username", "email", "api_key", "profile", "members"])
_profiles = st.dictionaries(
    st.sampled_from(["job", "town", "plays"]), st.none() | _text | _surrogates, max_size=3
) | st.dictionaries(st.sampled_from(["job", "Bad", "k" * 65]) | _text, json_values, max_size=4)
_names = (
    st.from_regex(r"[A-Z][a-z]{1,10}( [A-Z][a-z]{1,10})?", fullmatch=True) | _text | _surrogates
)
_usernames = st.from_regex(r"[a-z][a-z0-9_.-]{1,12}", fullmatch=True) | _plausible
_emails = st.builds("{}@spring.example".format, _usernames) | _plausible
_optional_fields = {
    "api_key": st.sampled_from(["k3y-0123456789", "short"]) | _scalars,
    "profile": _profiles | json_values,
}
# Mostly well-formed users and patches (so that writes succeed, collide and interleave),
# then anything at all.
_new_users = st.fixed_dictionaries(
    {"name": _names, "username": _usernames, "email": _emails},
    optional={"id": st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True) | _scalars}
    | _optional_fields,
)
_patches = st.fixed_dictionaries(
    {}, optional={"name": _names, "username": _usernames, "email": _emails} | _optional_fields
)
_anything = st.dictionaries(_field_names | _text, json_values | _profiles, max_size=6) | json_values


def test_random_json_bodies_never_fail_the_node(tmp_path: Path) -> None:
    """POSTed to /users or PATCHed to a seeded user: a 2xx, or a JSON 4xx and no write."""
    replica = Replica.open(tmp_path, "eu")

    async def send(method: str, path: str, body: bytes | None) -> tuple[int, Any]:
        replica.bind(asyncio.get_running_loop())
        async with TestClient(TestServer(build_app(replica, _settings(tmp_path)))) as client:
            if body is None:
                await seed(client.session, str(client.make_url("")).rstrip("/"))
                return 201, {}
            headers = {"Content-Type": JSON}
            async with client.request(method, path, data=body, headers=headers) as response:
                return response.status, await response.json()

    @settings(max_examples=150)
    @given(method=st.sampled_from(["POST", "PATCH"]), data=st.data())
    def check(method: str, data: st.DataObject) -> None:
        body = data.draw((_new_users if method == "POST" else _patches) | _anything)
        raw = json.dumps(body).encode()  # lone surrogates go out as \ud800 escapes
        seq = replica.state.seq
        path = "/users" if method == "POST" else "/users/homer"
        status, answer = asyncio.run(send(method, path, raw))
        event(f"{method} {status}")
        assert status < 500, (status, answer, raw)
        if status >= 300:
            assert 400 <= status < 500, (status, answer, raw)
            assert {"error", "message"} <= set(answer), (status, answer, raw)
            assert replica.state.seq == seq, f"a refused body wrote something: {raw!r}"

    try:
        asyncio.run(send("POST", "/users", None))
        check()
    finally:
        replica.close()
