"""Long work in slices, the event loop running between them.

A node serves every request from one event loop: work that runs for tens of
milliseconds (reading a peer's page of 10,000 events, decoding one) holds every other
request that long. Such work is written once, as a generator that yields between
slices (with nothing held that others wait for, a read transaction included) and
returns its result; ``run_through`` runs it at once (the deterministic simulation, a
test) and ``run_paced`` gives the loop a turn at each yield.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from typing import TypeVar

T = TypeVar("T")

Slices = Generator[None, None, T]


def run_through(slices: Slices[T]) -> T:
    """The result of ``slices``, run without a pause."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            result: T = done.value
            return result


async def run_paced(slices: Slices[T]) -> T:
    """The result of ``slices``, the event loop running between each two."""
    while True:
        try:
            next(slices)
        except StopIteration as done:
            result: T = done.value
            return result
        await asyncio.sleep(0)
