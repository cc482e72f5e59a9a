"""Reads against a real ``replica node`` process: GET /users/{id} and GET /users?email=.

64 concurrent connections from a load generator on the other core; the servers pinned
to one core. Baseline in the same run: ``benchmarks.bare_server``, a bare aiohttp handler
returning the same JSON bytes (fetched from the node) out of LMDB. Node and baseline
take turns, round after round; the best round of each counts.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Row, row, scratch_dir
from benchmarks.httpbench import (
    BareServer,
    Node,
    Scenario,
    compare,
    load_bare_alike,
    seed_users,
    user_fields,
)

NAME = "HTTP reads"
USERS = 5_000


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 2.0, 1.0) if quick else (5, 3.0, 2.0)
    users = 1_000 if quick else USERS
    with scratch_dir("http-reads") as tmp:
        base = Path(tmp)
        ids = seed_users(base / "node", users)
        by_id = Scenario("get", tuple(f"/users/{u}" for u in ids))
        by_email = Scenario("get", tuple(f"/users?email={user_fields(u)['email']}" for u in ids))
        with Node(base / "node") as node:
            load_bare_alike(node.url, ids, base / "bare")  # the node renders what it serves
            with BareServer(base / "bare") as bare:
                loads = compare(
                    {"node": node.url, "bare": bare.url},
                    {"id": by_id, "email": by_email},
                    rounds=rounds,
                    duration_s=duration,
                    warmup_s=warmup,
                )
    rows = []
    for what, key in (("GET /users/{id}", "id"), ("GET /users?email=", "email")):
        node_load, bare_load = loads[("node", key)], loads[("bare", key)]
        rows += [
            row(
                NAME,
                f"{what} req/s ({node_load.tool})",  # see http_writes: the generator matters
                node_load.rps,
                "req/s",
                bare_load.rps,
                at_least=0.8,
            ),
            row(NAME, f"{what} p99", node_load.p99_ms, "ms", bare_load.p99_ms),
        ]
    return rows
