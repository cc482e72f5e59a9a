"""Durable HTTP writes against a real ``replica node`` process: PATCH and POST /users.

64 concurrent connections from a load generator on the other core; the servers pinned
to one core. Baseline in the same run: ``benchmarks.bare_server``, a bare aiohttp handler
appending the same request bytes to LMDB with group commit (one writer thread, batched
durable commits), the ceiling of the stack. Both run with full durability (LMDB sync and
metasync); the ``--no-metasync`` setting is measured too, on both sides. Node and
baseline take turns, round after round; the best round of each counts.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import Row, row, scratch_dir
from benchmarks.httpbench import (
    BareServer,
    Load,
    Node,
    Scenario,
    compare,
    node_metric,
    seed_users,
)

NAME = "HTTP writes"
USERS = 1_000


def _rows(what: str, node: Load, bare: Load, *, targets: bool = True) -> list[Row]:
    at_least = 0.7 if targets else None
    at_most = 2.0 if targets else None
    # The load generator is named: without wrk, the aiohttp one on the other core is
    # slower than the bare server and caps its figure, which flatters the ratio.
    rows = [
        row(NAME, f"{what} req/s ({node.tool})", node.rps, "req/s", bare.rps, at_least=at_least),
        row(NAME, f"{what} p50", node.p50_ms, "ms", bare.p50_ms),
        row(NAME, f"{what} p99", node.p99_ms, "ms", bare.p99_ms, at_most=at_most),
    ]
    if "disk_written" in node.detail and "disk_written" in bare.detail:
        # What a durable write costs the disk: LMDB writes every page a commit changed,
        # and the node's views and indexes change pages at random keys; the bare log
        # appends to one. Divided among the requests that the commits carried.
        rows.append(
            row(
                NAME,
                f"{what}: bytes written to the disk per request (its /sys/block stat)",
                node.detail["disk_written"] / max(1, node.requests),
                "bytes",
                bare.detail["disk_written"] / max(1, bare.requests),
            )
        )
    return rows


def run(quick: bool) -> list[Row]:
    rounds, duration, warmup = (1, 2.0, 1.0) if quick else (5, 3.0, 2.0)
    with scratch_dir("http-writes") as tmp:
        base = Path(tmp)
        ids = seed_users(base / "node", USERS)
        patch = Scenario("patch", tuple(f"/users/{u}" for u in ids))
        scenarios = {"patch": patch, "post": Scenario("create", prefix="c")}
        with Node(base / "node") as node, BareServer(base / "bare") as bare:
            urls = {"node": node.url, "bare": bare.url}
            dirs = {"node": base / "node", "bare": base / "bare"}
            loads = compare(
                urls, scenarios, rounds=rounds, duration_s=duration, warmup_s=warmup, data_dirs=dirs
            )
            gc_pause_s = node_metric(node.url, "replica_gc_pause_seconds_max")
        with (
            Node(base / "node", "--no-metasync") as node,
            BareServer(base / "bare", "--no-metasync") as bare,
        ):
            urls = {"node": node.url, "bare": bare.url}
            fast = compare(
                urls, {"patch": patch}, rounds=rounds, duration_s=duration, warmup_s=warmup
            )
    gc_rows = []
    if gc_pause_s is not None:
        # Every thread waits while the collector runs: a pause lands in some request's
        # latency (the p99s above).
        figure = "longest garbage-collector pause in the node, PATCH and POST runs (/metrics)"
        gc_rows.append(row(NAME, figure, gc_pause_s * 1000, "ms"))
    return [
        *_rows("PATCH", loads[("node", "patch")], loads[("bare", "patch")]),
        *_rows("POST", loads[("node", "post")], loads[("bare", "post")]),
        *gc_rows,
        *_rows(
            "PATCH --no-metasync", fast[("node", "patch")], fast[("bare", "patch")], targets=False
        ),
    ]
