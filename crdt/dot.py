"""A dot names one event: the replica it came from and that replica's counter.

Counters start at 1 and never repeat within an origin, so a dot is unique in the
whole cluster. Everything that must be idempotent (ingest, set adds) keys on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)
class Dot:
    origin: str
    counter: int

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise ValueError("dot origin must be a non-empty string")
        if not isinstance(self.counter, int) or isinstance(self.counter, bool):
            raise ValueError("dot counter must be an int")
        if self.counter < 1:
            raise ValueError(f"dot counter must be >= 1, got {self.counter}")

    def __str__(self) -> str:
        return f"{self.origin}:{self.counter}"
