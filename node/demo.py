"""The README's first command: start a real node and walk a short scripted session.

It runs ``replica node`` as a child process on loopback with its own LMDB data
directory, drives it over HTTP the way a client would, narrates what happens, and
stops the node with SIGTERM. The Simpsons come from the talks the project grew from.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from node.process import NodeProcess

USERS = [
    ("homer", "Homer", "homer@springfield.example"),
    ("marge", "Marge", "marge@springfield.example"),
    ("bart", "Bart", "bart@springfield.example"),
    ("lisa", "Lisa", "lisa@springfield.example"),
    ("maggie", "Maggie", "maggie@springfield.example"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.base + path, json=body, headers=headers) as r:
            data = await r.json() if r.content_type == "application/json" else None
            print(f"  {method:6} {path:44} -> {r.status}")
            return r.status, data, r.headers


def show(label: str, value: Any) -> None:
    print(f"    {label}: {json.dumps(value) if not isinstance(value, str) else value}")


async def session(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        c = Client(http, base)
        print("\n1. Create the Simpsons and a group")
        for user_id, name, email in USERS:
            await c.call(
                "POST",
                "/users",
                {"id": user_id, "name": name, "username": user_id, "email": email},
                **{"X-Actor": "demo"},
            )
        await c.call("POST", "/groups", {"id": "simpsons", "name": "The Simpsons"})
        for user_id, *_ in USERS:
            await c.call("PUT", f"/groups/simpsons/members/{user_id}")
        _, members, _ = await c.call("GET", "/groups/simpsons/members")
        show("members", members["members"])

        print("\n2. Uniqueness is enforced in this region")
        _, error, _ = await c.call(
            "POST",
            "/users",
            {"name": "Fake Homer", "username": "HOMER", "email": "fake@springfield.example"},
        )
        show("answer", error)

        print("\n3. Rename Maggie, conditionally on the version we read (If-Match)")
        _, maggie, headers = await c.call("GET", "/users/maggie")
        etag = headers["ETag"]
        before_rename = time.time()
        await asyncio.sleep(0.05)
        _, maggie, _ = await c.call(
            "PATCH", "/users/maggie", {"name": "Lisa Jr"}, **{"If-Match": etag}
        )
        show("now", maggie["name"])
        _, error, _ = await c.call(
            "PATCH", "/users/maggie", {"name": "Stale"}, **{"If-Match": etag}
        )
        show("a second write with the old ETag", error["error"])

        print("\n4. History: every event, and which write won")
        _, trail, _ = await c.call("GET", "/users/maggie/history")
        for e in trail["events"]:
            outcome = "" if "won" not in e else ("won" if e["won"] else e["why"])
            show(f"{e['op']:6} {e.get('field') or '':8}", f"{e.get('value')!s:28} {outcome}")

        print("\n5. Time travel: Maggie as she was before the rename")
        at = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(before_rename))
            + f".{int(before_rename * 1000) % 1000:03d}Z"
        )
        _, old, _ = await c.call("GET", f"/users/maggie?at={at}")
        show("name then", old["name"])

        print("\n6. Lookups, search, and a user's groups")
        _, found, _ = await c.call("GET", "/users?email=LISA@springfield.example")
        show("by email", [u["name"] for u in found["users"]])
        _, found, _ = await c.call("GET", "/users?q=spring&limit=3")
        show("search 'spring' (page of 3)", [u["id"] for u in found["users"]])
        _, groups, _ = await c.call("GET", "/users/bart/groups")
        show("bart's groups", groups["groups"])

        print("\n7. Delete Bart: his membership goes with him")
        await c.call("DELETE", "/users/bart")
        _, members, _ = await c.call("GET", "/groups/simpsons/members")
        show("members", members["members"])

        print("\n8. The change feed and the node's status")
        _, feed, _ = await c.call("GET", "/changes?since=0&limit=3")
        show(
            "first events",
            [f"{e['op']} {e['stream']} {e.get('field') or ''}".strip() for e in feed["changes"]],
        )
        _, status_, _ = await c.call("GET", "/status")
        show("status", {k: status_[k] for k in ("region", "replica_id", "seq")})


def main(data_root: Path | None = None) -> int:
    root = data_root or Path(tempfile.mkdtemp(prefix="replica-demo-"))
    port = free_port()
    print(f"Starting a node for region 'eu' on 127.0.0.1:{port}, data in {root / 'eu'}")
    with NodeProcess("eu", root / "eu", port) as node:
        asyncio.run(session(node.url))
        print("\nStopping the node (SIGTERM drains in-flight writes and closes LMDB)")
    print(f"Node stopped with exit code {node.returncode}; its data stays in {root / 'eu'}.")
    return 0 if node.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
