"""``Replicator.status()``: what ``/status`` shows of each peer: last contact, events and
seconds of lag, failures, push queue; and the stable point once every peer is known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from node import commands
from tests.replication.cluster import NOW_MS, Cluster, person, run


def peer_status(c: Cluster, region: str, peer: str) -> dict[str, Any]:
    [found] = [p for p in c.replicator(region).status()["peers"] if p["name"] == peer]
    assert isinstance(found, dict)
    return found


def test_lag_shows_while_a_peer_is_behind_and_drops_to_zero_after_sync(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        before = peer_status(c, "eu", "us")
        assert before["last_contact"] is None
        assert before["events_lacking"] is None
        assert c.replicator("eu").status()["stable"] is None

        await c.write("eu", commands.create("user", "homer", person("homer")))
        assert await c.sync("eu", "us")
        synced = peer_status(c, "eu", "us")
        assert synced["replica_id"] == c.replica("us").identity.replica_id
        assert synced["last_contact"] == "2023-11-14T22:13:20.000Z"  # NOW_MS, virtual
        assert (synced["events_lacking"], synced["lag_s"]) == (0, 0.0)
        assert synced["rounds"] >= 1
        assert synced["events_sent"] == 4
        # The receiving side counts what was pushed to it, not only its own requests'
        # answers (a review's bootstrap said 24,020 received of 56,148 ingested).
        assert peer_status(c, "us", "eu")["events_received"] == 4

        c.cut("eu", "us")
        c.advance(2_000)
        written_at = c.now_ms[0]
        for n in range(5):
            await c.write("eu", commands.create("user", f"u{n}", person(f"u{n}")))
        c.advance(3_000)
        assert not await c.sync("eu", "us")
        behind = peer_status(c, "eu", "us")
        assert behind["events_lacking"] == 5 * 4
        assert behind["lag_s"] == (c.now_ms[0] - written_at) / 1000 == 3.0
        assert behind["last_contact_s_ago"] == 5.0
        assert behind["failures"] == 1
        assert "cut" in behind["last_error"]
        assert behind["next_attempt_in_ms"] > 0

        c.heal()
        assert await c.sync("eu", "us")
        caught_up = peer_status(c, "eu", "us")
        assert (caught_up["events_lacking"], caught_up["lag_s"]) == (0, 0.0)
        assert (caught_up["failures"], caught_up["last_error"]) == (0, None)
        assert caught_up["last_contact_s_ago"] == 0.0
        # The peer that served the request knows the requester is level too.
        served = peer_status(c, "us", "eu")
        assert served["last_contact_s_ago"] == 0.0
        assert served["events_lacking"] == 0

        status = c.replicator("eu").status()
        replica = c.replica("eu")
        assert status["stable"] == {replica.identity.replica_id: replica.state.counter}
        assert status["bootstrap"] == {"active": False, "events_received": 0}
        assert status["quarantined_events"] == 0
        assert status["batches_refused"] == 0

    run(tmp_path, ("eu", "us"), body)


def test_now_ms_is_the_virtual_clock(tmp_path: Path) -> None:
    async def body(c: Cluster) -> None:
        event, _ = await c.write("eu", commands.create("group", "g", {"name": "G"}))
        assert event.hlc >> 16 == NOW_MS

    run(tmp_path, ("eu", "us"), body)
