"""The peer table: exponential backoff with jitter, capped, reset on contact; a peer that
is away is not retried before its time (no busy loop), whether by gossip or eager push."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import pytest

from crdt import Dot, VersionVector
from node import commands
from replication.peers import BACKOFF_BASE_MS, BACKOFF_MAX_MS, PeerState
from replication.replicator import FAILURES_WARNED_EVERY, Limits
from tests.replication.cluster import NOW_MS, Cluster, person, run


def nominal_ms(failures: int, base_ms: int = BACKOFF_BASE_MS, max_ms: int = BACKOFF_MAX_MS) -> int:
    return min(max_ms, base_ms << (failures - 1))


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(3)
    peer = PeerState("us")
    for failures in range(1, 40):
        now = NOW_MS + failures * 1_000
        delay = peer.failed(now, f"failure {failures}", rng)
        nominal = nominal_ms(failures)
        assert 0.5 * nominal <= delay < 1.5 * nominal, (failures, delay)
        assert peer.failures == failures
        assert peer.last_error == f"failure {failures}"
        assert peer.next_attempt_ms == now + delay
        assert not peer.available(now)
        assert not peer.available(now + delay - 1)
        assert peer.available(now + delay)
    assert nominal_ms(39) == BACKOFF_MAX_MS  # long since capped: the delay stops growing


def test_jitter_spreads_retries_over_half_to_one_and_a_half_the_delay() -> None:
    rng = random.Random(5)
    ratios = []
    for _ in range(400):
        peer = PeerState("us")
        for _ in range(3):
            delay = peer.failed(NOW_MS, "down", rng, base_ms=1_000, max_ms=60_000)
        ratios.append(delay / 4_000)
    assert all(0.5 <= r < 1.5 for r in ratios)
    assert min(ratios) < 0.55
    assert max(ratios) > 1.45
    assert len(set(ratios)) > 300  # ...and peers that failed together do not retry in step


def test_the_limits_are_the_callers() -> None:
    peer = PeerState("us")
    rng = random.Random(1)
    delays = [peer.failed(NOW_MS, "down", rng, base_ms=10, max_ms=80) for _ in range(8)]
    for failures, delay in enumerate(delays, start=1):
        nominal = nominal_ms(failures, 10, 80)
        assert 0.5 * nominal <= delay < 1.5 * nominal


def test_contact_resets_the_backoff_and_keeps_what_was_learned() -> None:
    rng = random.Random(2)
    peer = PeerState("us")
    for _ in range(5):
        peer.failed(NOW_MS, "down", rng)
    assert not peer.available(NOW_MS)
    first = VersionVector.of([Dot("us~aaaa", 1), Dot("us~aaaa", 2)])
    peer.contacted(NOW_MS + 1, "us~aaaa", first)
    assert (peer.failures, peer.next_attempt_ms, peer.last_error) == (0, 0, None)
    assert peer.available(NOW_MS + 1)
    assert peer.last_contact_ms == NOW_MS + 1
    # A later, smaller summary from the same replica does not make it forget.
    peer.contacted(NOW_MS + 2, "us~aaaa", VersionVector.of([Dot("us~aaaa", 1)]))
    assert peer.summary == first
    delay = peer.failed(NOW_MS + 3, "down again", rng)
    assert 0.5 * BACKOFF_BASE_MS <= delay < 1.5 * BACKOFF_BASE_MS  # from the start again


def test_an_unavailable_peer_is_not_chosen_until_its_time(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        await c.write("eu", commands.create("user", "homer", person("homer")))
        c.cut("eu", "us")
        replicator = c.replicator("eu")
        chosen = [await replicator.anti_entropy_once() for _ in range(30)]
        to_us = c.links[("eu", "us")]
        assert to_us.attempts == 1, "us was retried before its backoff ran out"
        assert chosen.count("us") == 1
        assert chosen.count("ap") == 29
        peer = replicator.peers["us"]
        assert peer.failures == 1
        assert "cut" in (peer.last_error or "")
        waited = peer.next_attempt_ms - c.now_ms[0]
        assert 0.5 * BACKOFF_BASE_MS <= waited < 1.5 * BACKOFF_BASE_MS

        c.advance(waited - 1)
        for _ in range(10):
            await replicator.anti_entropy_once()
        assert to_us.attempts == 1
        c.advance(1)
        while to_us.attempts == 1:  # us is a candidate again, drawn at random
            await replicator.anti_entropy_once()
        assert to_us.attempts == 2
        assert peer.failures == 2
        second = peer.next_attempt_ms - c.now_ms[0]
        assert 0.5 * 2 * BACKOFF_BASE_MS <= second < 1.5 * 2 * BACKOFF_BASE_MS

        c.heal()
        c.advance(second)
        while peer.failures:
            await replicator.anti_entropy_once()
        assert peer.last_error is None
        assert peer.next_attempt_ms == 0
        assert "homer" in c.replica("us").entity_ids("user", after="", limit=10)[0]

    run(tmp_path, ("ap", "eu", "us"), body)


def test_with_every_peer_away_a_gossip_round_does_nothing(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        c.isolate("eu")
        replicator = c.replicator("eu")
        assert await replicator.anti_entropy_once() == "us"
        assert [await replicator.anti_entropy_once() for _ in range(50)] == [None] * 50
        assert c.links[("eu", "us")].attempts == 1

    run(tmp_path, ("eu", "us"), body)


def test_eager_push_to_an_away_peer_drops_its_queue_instead_of_retrying(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        c.start("eu")
        c.cut("eu", "us")
        for n in range(20):
            await c.write("eu", commands.create("user", f"u{n}", person(f"u{n}")))
            await c.settle()
        replicator = c.replicator("eu")
        assert c.links[("eu", "us")].attempts == 1, "a push loop kept retrying an away peer"
        assert replicator.status()["peers"][0]["push_queue_events"] == 0
        c.heal()
        c.advance(BACKOFF_MAX_MS)
        await c.write("eu", commands.create("user", "late", person("late")))
        await c.settle()
        # The push carries the new event in one round trip, nothing else: the backlog
        # it dropped is anti-entropy's to repair.
        assert c.replica("us").entity_ids("user", after="", limit=100) == (["late"], None)
        assert await c.replicator("eu").anti_entropy_once() == "us"
        assert len(c.replica("us").entity_ids("user", after="", limit=100)[0]) == 21

    run(tmp_path, ("eu", "us"), body, limits=Limits(gossip_interval_ms=3_600_000))


def test_an_unexpected_error_in_a_sync_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        replicator = c.replicator("eu")
        c.cut("eu", "us")
        assert not await c.sync("eu", "us")  # a failure: "us" is backing off
        c.heal()
        c.advance(BACKOFF_MAX_MS * 2)  # its backoff is over
        calls = 0

        async def broken(name: str, *args: object, **kwargs: object) -> bool:
            nonlocal calls
            calls += 1
            raise RuntimeError("a bug")

        replicator.sync_with = broken  # type: ignore[method-assign]
        c.start("eu")
        await asyncio.sleep(0.2)
        assert calls == 1, f"the loop retried {calls} times instead of backing off"
        assert replicator.peers["us"].failures == 2
        assert "a bug" in (replicator.peers["us"].last_error or "")

    run(tmp_path, ("eu", "us"), body, limits=Limits(gossip_interval_ms=3_600_000))


def test_a_peer_failing_again_and_again_is_logged_at_warning_now_and_then(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable peer was logged at info every second, for good: a streak's first
    failure is a warning, then every FAILURES_WARNED_EVERY-th, with the count."""

    async def body(c: Cluster) -> None:
        replicator = c.replicator("eu")
        with caplog.at_level(logging.DEBUG, logger="replication.replicator"):
            for n in range(1, 2 * FAILURES_WARNED_EVERY + 2):
                replicator.failed("us", f"failure {n}")
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 3, warned
        assert "(failure 1)" in warned[0]
        assert f"{FAILURES_WARNED_EVERY + 1} failures in a row" in warned[1]
        assert f"{2 * FAILURES_WARNED_EVERY + 1} failures in a row" in warned[2]

    run(tmp_path, ("eu", "us"), body)
