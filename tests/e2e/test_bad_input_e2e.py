"""The bad-input table, a representative subset, against a real node process."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.e2e.helpers import Nodes
from tests.node.test_bad_input import BAD_INPUTS, BODY_BYTES_MAX, run_case, seed

SUBSET = (
    "invalid-json",
    "json-list",
    "deep-array",
    "non-utf8",
    "lone-surrogate-name",
    "bad-gzip",
    "no-content-type",
    "too-large",
    "profile-number-value",
    "email-no-at",
    "empty-patch",
    "email-taken",
    "stale-if-match",
    "path-id-dotdot",
    "put-member-unknown-user",
    "limit-superscript",
    "at-before-1970",
    "wait-ms-abc",
    "token-not-caught-up",
    "actor-not-utf8",
    "delete-collection",
    "unknown-path",
)


def test_bad_input_against_a_real_node(nodes: Nodes) -> None:
    node = nodes.start("eu", None, "--body-bytes-max", str(BODY_BYTES_MAX))
    cases = [case for case in BAD_INPUTS if case.id in SUBSET]
    assert len(cases) == len(SUBSET)

    async def scenario() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await seed(session, node.url)
            async with session.get(f"{node.url}/status") as response:
                seeded = int((await response.json())["seq"])
            for case in cases:
                await run_case(session, node.url, node.host, node.port, case)
                assert node.alive(), f"the node died on {case.id}:\n{node.stderr()}"
        return seeded

    seeded = asyncio.run(scenario())
    assert node.call("GET", "/health").json() == {"status": "ok"}
    assert node.call("GET", "/status").json()["seq"] == seeded
    unexpected = [line for line in node.stderr().splitlines() if "unexpected error" in line]
    assert not unexpected, unexpected  # what the node logs with every 500
    assert "Traceback" not in node.stderr()  # e.g. a body not the gzip it claims, drained


# Requests aiohttp's own parser refuses, before any route or guard sees them.
UNPARSABLE = {
    "url-too-long": b"GET /users/" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "nul-in-header": b"GET /users/x HTTP/1.1\r\nHost: x\r\nX-Actor: a\x00b\r\n\r\n",
    "length-not-a-number": b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "length-and-chunked": (
        b"POST /users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n"
    ),
    "bad-chunk-size": (
        b"POST /users HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nab\r\n0\r\n\r\n"
    ),
    "asterisk-target": b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
}


async def _raw(host: str, port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as raw bytes; (status, headers in lower case, body) of the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


def test_a_request_the_http_parser_refuses_gets_a_json_400_and_no_traceback(
    nodes: Nodes,
) -> None:
    node = nodes.start("eu", None)

    async def scenario() -> dict[str, tuple[int, dict[str, str], bytes]]:
        return {
            name: await _raw(node.host, node.port, request) for name, request in UNPARSABLE.items()
        }

    for name, (status, headers, body) in asyncio.run(scenario()).items():
        assert status == 400, name
        assert headers.get("content-type", "").startswith("application/json"), (name, headers)
        assert json.loads(body)["error"] == "bad_request", name
        # as every answer does (the fuzzer found these without it)
        assert "x-consistency-token" in headers, (name, headers)
    assert node.alive()
    assert node.call("GET", "/health").json() == {"status": "ok"}
    assert "Traceback" not in node.stderr()


def test_a_client_that_closes_mid_body_is_not_an_error_of_the_node(nodes: Nodes) -> None:
    """It was logged as an unexpected error, with a traceback, once per such client (a
    review's slow clients left 20,000 of them); nothing of the request is written."""
    node = nodes.start("eu", None)
    seq = node.call("GET", "/status").json()["seq"]

    async def cut_short() -> None:
        _, writer = await asyncio.open_connection(node.host, node.port)
        writer.write(
            b"POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"id"'
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()
        await writer.wait_closed()

    asyncio.run(cut_short())
    assert node.call("GET", "/health").json() == {"status": "ok"}
    assert node.call("GET", "/status").json()["seq"] == seq
    log = node.stderr()
    assert "closed the connection first" in log, log
    assert "Traceback" not in log, log
    assert '"level": "error"' not in log, log
