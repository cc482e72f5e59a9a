"""The bad-input table, a representative subset, against a real node process."""

from __future__ import annotations

import asyncio

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
