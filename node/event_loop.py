"""The event loop a server runs on: uvloop (libuv's loop, the default) or asyncio's own.

A node serves on the loop its ``event_loop`` setting names; the local cluster's supervisor
(its fault proxies between nodes) and the benchmarks' load clients run on the default.
The deterministic simulation keeps asyncio's loop: it serves no sockets, and measured
the same on both.

Measured with ``benchmarks/http_instructions.py`` on this project's read path: a GET by id
costs the node 224k user-space instructions on uvloop against 262k on asyncio's loop
(a lookup by email and the bare baseline server gain as much), a PATCH 987k against
1,041k. ``asyncio`` stays available as a named setting, for a platform without uvloop or
to rule the loop out when chasing a problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

EVENT_LOOPS = ("uvloop", "asyncio")
EVENT_LOOP_DEFAULT = "uvloop"


def run_on(event_loop: str, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop of the kind ``event_loop`` names."""
    if event_loop == "uvloop":
        return uvloop.run(main)
    if event_loop == "asyncio":
        return asyncio.run(main)
    main.close()  # never awaited: say so quietly, not with a warning at exit
    raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {event_loop!r}")


def running_loop_name() -> str:
    """Which of ``EVENT_LOOPS`` the running loop is."""
    loop = asyncio.get_running_loop()
    return "uvloop" if isinstance(loop, uvloop.Loop) else "asyncio"
