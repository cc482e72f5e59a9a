"""A load generator for when ``wrk`` is not installed: aiohttp, N concurrent connections.

Reads a JSON spec on stdin (url, kind, paths, prefix, duration_s, connections), runs
until the duration is up (each worker loop bounded by the deadline), prints JSON:
requests, errors, seconds, p50_ms, p99_ms.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any

import aiohttp

from benchmarks.common import percentile

HEADERS = {"Content-Type": "application/json"}


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    url, kind, paths = spec["url"], spec["kind"], spec["paths"] or ["/"]
    prefix, connections = spec["prefix"], int(spec["connections"])
    rng = random.Random(6)
    latencies: list[float] = []
    errors = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        deadline = started + float(spec["duration_s"])

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < deadline:
                counter += 1
                n = counter
                if kind == "patch":
                    method, path = "PATCH", rng.choice(paths)
                    body: bytes | None = json.dumps({"name": f"Bench name {n}"}).encode()
                elif kind == "create":
                    uid = f"{prefix}{n}"
                    method, path = "POST", "/users"
                    body = json.dumps(
                        {
                            "id": uid,
                            "name": f"Bench {uid}",
                            "username": f"b.{uid}",
                            "email": f"{uid}@example.org",
                        }
                    ).encode()
                else:
                    method, path, body = "GET", rng.choice(paths), None
                t0 = time.perf_counter()
                try:
                    async with session.request(
                        method, url + path, data=body, headers=HEADERS if body else None
                    ) as response:
                        await response.read()
                        if response.status >= 400:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(connections)))
        seconds = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(load(spec))))


if __name__ == "__main__":
    main()
