"""What a node knows of each peer: its last summary, last contact, and its backoff.

An unreachable peer is retried after an exponentially growing delay with jitter
(so a cluster coming back does not retry in lockstep), capped at ``backoff_max_ms``.
Knowing a peer costs its summary and a few numbers, however long it is away.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from crdt import VersionVector

BACKOFF_BASE_MS = 250
BACKOFF_MAX_MS = 1_000  # after a heal, peers find each other again within ~1.5 s


@dataclass
class PeerState:
    name: str
    summary: VersionVector | None = None  # None until first contact
    replica_id: str | None = None
    last_contact_ms: int | None = None
    last_error: str | None = None
    failures: int = 0
    next_attempt_ms: int = 0
    rounds: int = 0
    events_sent: int = 0
    events_received: int = 0

    def available(self, now_ms: int) -> bool:
        return now_ms >= self.next_attempt_ms

    def contacted(
        self, now_ms: int, replica_id: str, summary: VersionVector, *, whole: bool = False
    ) -> None:
        """``summary``: what the peer holds, at least. ``whole``: all it holds, as its
        request sent it whole, which replaces what we knew: a peer whose directory was
        restored from a copy holds less than it did (its copy's events only)."""
        # A new replica id is a new incarnation (its data directory was lost): what the
        # old one held says nothing of what this one holds.
        if replica_id != self.replica_id or whole:
            self.summary = None
        self.replica_id = replica_id
        self.summary = summary if self.summary is None else self.summary.merge(summary)
        self.last_contact_ms = now_ms
        self.failures = 0
        self.next_attempt_ms = 0
        self.last_error = None

    def learned(self, summary: VersionVector) -> None:
        """The peer holds at least ``summary`` (e.g. events we just delivered to it)."""
        self.summary = summary if self.summary is None else self.summary.merge(summary)

    def failed(
        self,
        now_ms: int,
        error: str,
        rng: random.Random,
        *,
        base_ms: int = BACKOFF_BASE_MS,
        max_ms: int = BACKOFF_MAX_MS,
    ) -> int:
        """Record a failure; return the delay before the next attempt."""
        self.failures += 1
        self.last_error = error
        delay = min(max_ms, base_ms * 2 ** min(self.failures - 1, 30))
        delay = int(delay * (0.5 + rng.random()))  # jitter in [0.5, 1.5)
        self.next_attempt_ms = now_ms + delay
        return delay
