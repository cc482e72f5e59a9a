"""Replication end to end, on real ``replica node`` processes (``LocalCluster``): every
peer link through a fault proxy, partitions, kill -9, a lost disk, a hostile peer, and
mutual TLS. Every wait is bounded and fails with each node's ``/status``.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

from crdt import Dot, VersionVector
from crdt.clock import make_stamp
from node import events as ev
from node.events import Event, Op
from replication import protocol
from replication.auth import sign_request, verify_response
from replication.protocol import RawEvent, Sync, Tag
from replication.transport import SYNC_PATH
from tests.e2e.cluster_fixtures import (
    Ack,
    Client,
    Load,
    assert_acks_everywhere,
    assert_identical,
    assert_lww_everywhere,
    client_context,
    copy_then_write,
    histories,
    make_ca,
    make_cert,
    put_back,
    running,
    session,
    written_dot,
)

REGIONS = ("eu", "us", "ap")
LOAD_S = 2.0
WRITERS_PER_REGION = 2


def user(user_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": user_id,
        "name": user_id.title(),
        "username": user_id,
        "email": f"{user_id}@example.org",
        **extra,
    }


async def seed(c: Client, group: str, shared: list[str]) -> list[Ack]:
    """A group and shared users written in eu, known everywhere before the test goes on."""
    acks = []
    reply = await c.ok("eu", "POST", "/groups", {"id": group, "name": group})
    acks.append(Ack("eu", f"group/{group}", "create", None, None, written_dot(reply)))
    for user_id in shared:
        reply = await c.ok("eu", "POST", "/users", user(user_id))
        acks.append(Ack("eu", f"user/{user_id}", "create", None, None, written_dot(reply)))
    await c.wait_converged()
    return acks


async def assert_same_events(c: Client, streams: list[str]) -> dict[str, dict[str, Any]]:
    """Every region's audit trail of every entity holds the same events (by dot)."""
    trails = await histories(c, streams)
    first = trails[c.cluster.regions[0]]
    for region, per_stream in trails.items():
        for stream in streams:
            assert set(per_stream[stream]) == set(first[stream]), (region, stream)
    return first


# -- 1 ------------------------------------------------------------------------------------


def test_write_anywhere_read_everywhere(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(REGIONS, tmp_path) as cluster, session() as http:
            c = Client(cluster, http)
            tokens = {}
            for region, user_id in (("eu", "ann"), ("us", "bob"), ("ap", "cid")):
                reply = await c.ok(region, "POST", "/users", user(user_id))
                assert reply.status == 201
                tokens[user_id] = reply.token
            # Read-your-writes across regions: each user, with its writer's token, everywhere.
            for user_id, token in tokens.items():
                for region in REGIONS:
                    got = await c.ok(
                        region, "GET", f"/users/{user_id}", headers={"X-Consistency-Token": token}
                    )
                    assert got.body["name"] == user_id.title(), (region, got)
                    assert got.body["email"] == f"{user_id}@example.org"

            group = await c.ok("us", "POST", "/groups", {"id": "team", "name": "Team"})
            # A member written in a region other than the group's and the user's: the writer
            # first waits (token) for both to have reached it.
            added = {}
            for region, user_id in (("ap", "ann"), ("eu", "bob"), ("us", "cid")):
                await c.ok(
                    region, "GET", "/groups/team", headers={"X-Consistency-Token": group.token}
                )
                reply = await c.ok(region, "PUT", f"/groups/team/members/{user_id}")
                added[user_id] = reply.token
            for user_id, token in added.items():
                for region in REGIONS:
                    got = await c.ok(
                        region,
                        "GET",
                        f"/users/{user_id}/groups",
                        headers={"X-Consistency-Token": token},
                    )
                    assert got.body["groups"] == ["team"], (region, user_id, got)

            # A profile written in eu, read at once in ap with the write's token.
            patch = await c.ok("eu", "PATCH", "/users/cid", {"profile": {"city": "Lyon"}})
            got = await c.ok(
                "ap", "GET", "/users/cid", headers={"X-Consistency-Token": patch.token}
            )
            assert got.body["profile"] == {"city": "Lyon"}

            # The token really waits for replication: cut ap off, and it cannot be covered...
            cluster.partition(["ap"], ["eu", "us"])
            patch = await c.ok("eu", "PATCH", "/users/ann", {"profile": {"city": "Oslo"}})
            cut_off = await c.call(
                "ap",
                "GET",
                "/users/ann",
                headers={"X-Consistency-Token": patch.token, "X-Wait-Ms": "300"},
            )
            assert cut_off.status == 504, cut_off
            assert cut_off.body["error"] == "not_caught_up"
            # ... until the partition heals.
            cluster.heal()
            got = await c.ok(
                "ap",
                "GET",
                "/users/ann",
                headers={"X-Consistency-Token": patch.token, "X-Wait-Ms": "30000"},
            )
            assert got.body["profile"] == {"city": "Oslo"}

            await c.wait_converged()
            streams = ["user/ann", "user/bob", "user/cid", "group/team"]
            seen = await assert_identical(c, streams)
            assert seen["/groups/team/members?limit=1000"]["members"] == ["ann", "bob", "cid"]
            await assert_same_events(c, streams)

    asyncio.run(scenario())


# -- 2 ------------------------------------------------------------------------------------


def test_partition_healed_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    # ap reaches its peers with a POST per round trip, the others over streams, compressed
    # where both ends allow it (us allows none): a cluster mid-way through a change of
    # transport or compression converges all the same.
    http_only = {"ap": ["--peer-transport", "http"], "us": ["--peer-compression", "off"]}

    async def scenario() -> None:
        async with running(REGIONS, tmp_path, region_args=http_only) as cluster, session() as http:
            c = Client(cluster, http)
            shared = ["s0", "s1"]
            seeded = await seed(c, "crew", shared)
            cluster.partition(["eu"], ["us", "ap"])
            load = Load(c, "crew", shared)

            async def claims() -> None:
                # The same email claimed on both sides: each side accepts it (unique per
                # region only), the merge reports it.
                await asyncio.sleep(LOAD_S / 3)
                for region, user_id in (("eu", "claim-eu"), ("ap", "claim-ap")):
                    body = user(user_id, email="claimed@example.org")
                    reply = await c.ok(region, "POST", "/users", body)
                    load.acks.append(
                        Ack(region, f"user/{user_id}", "create", None, None, written_dot(reply))
                    )

            await asyncio.gather(load.run(REGIONS, WRITERS_PER_REGION, LOAD_S), claims())
            # Both sides stayed writable, every write was acknowledged.
            assert not load.errors, load.errors
            assert not load.refused, load.refused
            for region in REGIONS:
                assert load.acked(region) > 0, region
            # And the partition was real: eu has not seen ap's claim.
            assert (await c.call("eu", "GET", "/users/claim-ap")).status == 404
            assert (await c.call("us", "GET", "/users/claim-eu")).status == 404

            cluster.heal()
            await c.wait_converged()
            for region in REGIONS:
                peers = (await c.ok(region, "GET", "/status")).body["replication"]["peers"]
                kind = "http" if region == "ap" else "stream"
                assert {p["transport"] for p in peers} == {kind}, (region, peers)
                compressed = {p["name"] for p in peers if p["compressed"]}
                assert compressed == ({"ap"} if region == "eu" else set()), (region, peers)

            acks = seeded + load.acks
            await assert_acks_everywhere(c, acks)
            streams = sorted({a.stream for a in acks})
            seen = await assert_identical(c, streams)
            trails = await assert_same_events(c, streams)
            assert assert_lww_everywhere(acks, seen, trails) > len(shared)
            for user_id in shared:  # profile.color was written on both sides, concurrently
                origins = {
                    e["origin"].partition("~")[0] for e in trails[f"user/{user_id}"].values()
                }
                assert {"eu", "us", "ap"} <= origins, origins
            conflicts = seen["/conflicts"]["conflicts"]
            assert {
                "field": "email",
                "value": "claimed@example.org",
                "ids": ["claim-ap", "claim-eu"],
            } in conflicts, conflicts

    asyncio.run(scenario())


# -- 3 ------------------------------------------------------------------------------------


def test_kill_9_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(REGIONS, tmp_path) as cluster, session() as http:
            c = Client(cluster, http)
            shared = ["k0", "k1"]
            seeded = await seed(c, "kin", shared)
            us_id = (await c.ok("us", "GET", "/status")).body["replica_id"]
            load = Load(c, "kin", shared)
            crash: dict[str, Any] = {}

            async def crash_and_restart() -> None:
                await asyncio.sleep(LOAD_S * 0.3)
                # Cut off first, us goes on acknowledging writes only its own log holds...
                cluster.partition(["us"], ["eu", "ap"])
                await asyncio.sleep(LOAD_S * 0.15)
                cluster.kill("us")  # ... when it dies
                crash["code"] = cluster.nodes["us"].returncode
                crash["acked"] = [a for a in load.acks if a.region == "us"]
                cluster.heal()
                for region in ("eu", "ap"):
                    summary = (await c.ok(region, "GET", "/status")).body["summary"]
                    crash[region] = summary.get(us_id, {}).get("contiguous", 0)
                await asyncio.sleep(LOAD_S * 0.1)
                await cluster.restart("us")

            await asyncio.gather(
                load.run(REGIONS, WRITERS_PER_REGION, LOAD_S * 1.5), crash_and_restart()
            )
            assert crash["code"] == -9
            assert crash["acked"], "us acknowledged nothing before the kill"
            newest = max(int(a.dot.rpartition(":")[2]) for a in crash["acked"])
            for region in ("eu", "ap"):
                assert crash[region] < newest, "no write lived only in us's log: a weak test"
            assert load.errors.get("us", 0) > 0, "the writers to us never saw it down"
            assert set(load.errors) == {"us"}, load.errors
            status = (await c.ok("us", "GET", "/status")).body
            assert status["replica_id"] == us_id, "same data directory, same incarnation"
            assert status["serving"] is True

            await c.wait_converged()
            acks = seeded + load.acks
            await assert_acks_everywhere(c, acks)
            streams = sorted({a.stream for a in acks})
            seen = await assert_identical(c, streams)
            trails = await assert_same_events(c, streams)
            assert assert_lww_everywhere(acks, seen, trails) > len(shared)

    asyncio.run(scenario())


# -- 4 ------------------------------------------------------------------------------------


def test_wiped_node_comes_back_as_a_new_incarnation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(REGIONS, tmp_path) as cluster, session() as http:
            c = Client(cluster, http)
            acks = await seed(c, "wip", ["w0"])
            for region in REGIONS:
                reply = await c.ok(region, "POST", "/users", user(f"from-{region}"))
                acks.append(
                    Ack(region, f"user/from-{region}", "create", None, None, written_dot(reply))
                )
                reply = await c.ok(region, "PATCH", "/users/w0", {"profile": {"by": region}})
                acks.append(Ack(region, "user/w0", "set", "profile.by", region, written_dot(reply)))
            reply = await c.ok("ap", "PUT", "/groups/wip/members/from-ap")
            acks.append(Ack("ap", "group/wip", "add", "members", "from-ap", written_dot(reply)))
            await c.wait_converged()
            old_id = (await c.ok("ap", "GET", "/status")).body["replica_id"]

            cluster.kill("ap")
            await cluster.restart("ap", wipe=True)
            status = (await c.ok("ap", "GET", "/status")).body
            new_id = status["replica_id"]
            assert new_id != old_id, "a lost data directory is a new incarnation"
            assert new_id.startswith("ap~")
            assert status["serving"] is True, status

            await c.wait_converged()
            status = (await c.ok("ap", "GET", "/status")).body
            assert old_id in status["summary"], status["summary"]
            # The old incarnation's events, and everyone else's, are back in ap.
            await assert_acks_everywhere(c, acks)
            assert any(a.dot.startswith(old_id + ":") for a in acks)

            # The new incarnation writes under its own id, from counter 1, and replicates.
            reply = await c.ok("ap", "POST", "/users", user("reborn"))
            dot = written_dot(reply)
            assert dot.startswith(new_id + ":"), dot
            acks.append(Ack("ap", "user/reborn", "create", None, None, dot))
            for region in ("eu", "us"):
                got = await c.ok(
                    region, "GET", "/users/reborn", headers={"X-Consistency-Token": reply.token}
                )
                assert got.body["name"] == "Reborn"
            await c.wait_converged()
            await assert_acks_everywhere(c, acks)
            await assert_identical(c, sorted({a.stream for a in acks}))

    asyncio.run(scenario())


def test_a_node_restored_from_a_backup_takes_no_dot_twice(tmp_path: Path) -> None:
    """eu starts on a backup taken before its last write, which us holds. A client's
    write to it at once would take that write's dot: us would drop it as known, and the
    regions would never converge. Writes wait for every peer's first answer, which shows
    the undone write (each direction slowed so that the write comes first): eu then
    writes as a new incarnation."""

    run_dir = tmp_path / "eu-run"  # eu's machine's counter record, lost with the restore

    async def scenario() -> None:
        region_args = {"eu": ["--run-dir", str(run_dir)]}
        async with (
            running(["eu", "us"], tmp_path / "cluster", region_args=region_args) as cluster,
            session() as http,
        ):
            c = Client(cluster, http)
            await c.ok("eu", "POST", "/users", user("homer"))
            await c.wait_converged()
            undone = await copy_then_write(c, cluster, "eu", tmp_path / "backup", {"name": "W1"})
            put_back(cluster, "eu", tmp_path / "backup")
            # The record lost too (a run directory emptied): only us can tell eu (on the
            # same machine, the record renews it at start: test_restored_copy.py).
            shutil.rmtree(run_dir)
            for link in (("eu", "us"), ("us", "eu")):
                cluster.links[link].faults.delay_ms = 500
            await cluster.restart("eu")
            status = (await c.ok("eu", "GET", "/status")).body
            assert status["writes_held"] == "until every peer has answered: us", status
            metrics = (await c.ok("eu", "GET", "/metrics")).body
            assert 'replica_writes_held{region="eu"} 1' in metrics
            reply = await c.ok("eu", "PATCH", "/users/homer", {"name": "W2"})
            # us showed it the undone write: it writes as a new incarnation from then on
            renewed = (await c.ok("eu", "GET", "/status")).body["replica_id"]
            assert renewed != status["replica_id"]
            assert renewed.startswith("eu~")
            assert written_dot(reply) == f"{renewed}:1"
            assert written_dot(undone).startswith(status["replica_id"] + ":")
            metrics = (await c.ok("eu", "GET", "/metrics")).body
            assert 'replica_writes_held{region="eu"} 0' in metrics
            assert 'replica_undone_commits_found_total{region="eu"} 1' in metrics
            for link in (("eu", "us"), ("us", "eu")):
                cluster.links[link].faults.delay_ms = 0
            await c.wait_converged()
            for region in ("eu", "us"):
                got = await c.ok(region, "GET", "/users/homer")
                assert got.body["name"] == "W2", region
                assert (await c.ok(region, "GET", "/status")).body["writes_held"] is None

    asyncio.run(scenario())


def test_a_node_restored_from_its_backup_comes_back_as_a_new_incarnation(tmp_path: Path) -> None:
    """``replica backup`` of a running node; later writes reach us; eu restored from the
    backup serves as a new incarnation, gets its later writes back from us, and writes
    under its new id."""

    async def scenario() -> None:
        async with running(["eu", "us"], tmp_path / "cluster") as cluster, session() as http:
            c = Client(cluster, http)
            await c.ok("eu", "POST", "/users", user("homer"))
            eu = cluster.nodes["eu"]
            backup = tmp_path / "backup"
            command = ["backup", "--data", str(eu.data_dir), "--to", str(backup)]
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "node", *command],
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            later = await c.ok("eu", "PATCH", "/users/homer", {"name": "Later"})
            await c.wait_converged()
            old_id = (await c.ok("eu", "GET", "/status")).body["replica_id"]

            put_back(cluster, "eu", backup)
            await cluster.restart("eu")
            new_id = (await c.ok("eu", "GET", "/status")).body["replica_id"]
            assert new_id != old_id
            assert new_id.startswith("eu~")
            reply = await c.ok("eu", "PATCH", "/users/homer", {"profile": {"restored": "yes"}})
            assert written_dot(reply).startswith(new_id + ":")
            await c.wait_converged()
            for region in ("eu", "us"):
                got = (await c.ok(region, "GET", "/users/homer")).body
                assert got["name"] == "Later", region  # back from us
                assert got["profile"] == {"restored": "yes"}, region
            assert written_dot(later).startswith(old_id + ":")

    asyncio.run(scenario())


# -- 5 ------------------------------------------------------------------------------------

PEER = "zz~feedbeef"  # a replica id no node has


def peer_event(counter: int, stream: str, field: str | None, value: str | None) -> RawEvent:
    op = Op.CREATE if field is None else Op.SET
    event = Event(Dot(PEER, counter), make_stamp(int(time.time() * 1000)), stream, op, field, value)
    return RawEvent(event.dot, ev.encode(event))  # encode does not validate: bad ones too


def sync_body(*events: RawEvent) -> bytes:
    summary = VersionVector.of(e.dot for e in events)
    return protocol.encode(Sync(Tag.SYNC_REQUEST, PEER, summary, events))


def test_replication_endpoint_refuses_bad_peers_without_effect(tmp_path: Path) -> None:
    good = [
        peer_event(1, "user/mallory", None, None),
        peer_event(2, "user/mallory", "name", "Mallory"),
        peer_event(3, "user/mallory", "username", "mallory"),
    ]
    # Structurally fine msgpack, but no such entity kind: the event is invalid.
    bad = peer_event(4, "widget/mallory", "name", "Gadget")

    async def scenario() -> None:
        async with running(["eu"], tmp_path) as cluster, session() as http:
            c = Client(cluster, http)
            url = cluster.url("eu") + SYNC_PATH

            async def post(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, Any]:
                headers = {"Content-Type": "application/msgpack", **headers}
                async with http.post(url, data=body, headers=headers) as r:
                    return r.status, await r.read(), r.headers

            def signed(body: bytes, secret: str = cluster.secret, **kw: Any) -> dict[str, str]:
                return sign_request(secret, "POST", SYNC_PATH, body, PEER, **kw)

            async def seq() -> int:
                return int((await c.ok("eu", "GET", "/status")).body["seq"])

            await c.ok("eu", "POST", "/users", user("alice"))
            before = await seq()
            valid = sync_body(*good)
            stale_ms = int(time.time() * 1000) - 60_000
            refusals = [
                ("no signature", valid, {}, 401),
                ("wrong secret", valid, signed(valid, "not-the-cluster-secret"), 401),
                ("stale timestamp", valid, signed(valid, at_ms=stale_ms), 401),
                ("signed for another body", valid, signed(sync_body(*good[:1])), 401),
                ("not msgpack", b"\xc1\xc1garbage", signed(b"\xc1\xc1garbage"), 400),
                ("msgpack, not a sync", msgpack.packb({"a": 1}), None, 400),
                ("one invalid event", sync_body(*good, bad), None, 400),
            ]
            for what, body, headers, expected in refusals:
                status, text, _ = await post(body, signed(body) if headers is None else headers)
                assert status == expected, (what, status, text)
                assert await seq() == before, f"{what}: something was written"
            assert (await c.call("eu", "GET", "/users/mallory")).status == 404
            assert (await c.call("eu", "GET", "/users/mallory/history")).status == 404
            replication = (await c.ok("eu", "GET", "/status")).body["replication"]
            assert replication["batches_refused"] == 1, replication
            assert (await c.call("eu", "GET", "/users/alice")).status == 200

            # The control: the same batch without its invalid event is taken, and answered
            # with a signed response.
            status, answer, headers = await post(valid, signed(valid))
            assert status == 200, answer
            verify_response(cluster.secret, 200, answer, headers)
            response = protocol.decode(answer, expect=Tag.SYNC_RESPONSE)
            assert response.summary.contiguous(PEER) == 3
            assert await seq() == before + 3
            mallory = await c.ok("eu", "GET", "/users/mallory")
            assert mallory.body["name"] == "Mallory"

    asyncio.run(scenario())


# -- 6 ------------------------------------------------------------------------------------


def test_mutual_tls_between_nodes(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    ca = make_ca(pki, "cluster-ca")
    certs = {name: make_cert(pki, name, ca, serial) for serial, name in enumerate(("eu", "us"), 1)}
    me = make_cert(pki, "operator", ca, 10)
    rogue_ca = make_ca(pki / "rogue", "rogue-ca")
    rogue = make_cert(pki / "rogue", "rogue", rogue_ca, 11)
    region_args = {
        region: ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-ca", str(ca.cert)]
        for region, cert in certs.items()
    }
    trusted = client_context(ca.cert, me)

    async def scenario() -> None:
        async with (
            running(
                ["eu", "us"],
                tmp_path / "cluster",
                scheme="https",
                client_ssl=trusted,
                region_args=region_args,
            ) as cluster,
            session(trusted) as http,
        ):
            c = Client(cluster, http)
            assert cluster.url("eu").startswith("https://")
            reply = await c.ok("eu", "POST", "/users", user("tess"))
            got = await c.ok(
                "us", "GET", "/users/tess", headers={"X-Consistency-Token": reply.token}
            )
            assert got.body["name"] == "Tess"
            reply = await c.ok("us", "PATCH", "/users/tess", {"profile": {"via": "tls"}})
            got = await c.ok(
                "eu", "GET", "/users/tess", headers={"X-Consistency-Token": reply.token}
            )
            assert got.body["profile"] == {"via": "tls"}
            await c.wait_converged()
            for region in ("eu", "us"):
                peers = (await c.ok(region, "GET", "/status")).body["replication"]["peers"]
                assert all(p["url"].startswith("https://") for p in peers), peers
                assert all(p["last_error"] is None for p in peers), peers
                assert all(p["transport"] == "stream" for p in peers), peers
                assert not any(p["compressed"] for p in peers), peers  # not over TLS
            before = (await c.ok("eu", "GET", "/status")).body["seq"]

            # A client without a certificate, or with one the cluster CA did not sign,
            # cannot reach the replication endpoint: the handshake is refused.
            body = sync_body(peer_event(1, "user/eve", None, None))
            headers = {
                "Content-Type": "application/msgpack",
                **sign_request(cluster.secret, "POST", SYNC_PATH, body, PEER),
            }
            for what, context in (
                ("no certificate", client_context(ca.cert, None)),
                ("a rogue certificate", client_context(ca.cert, rogue)),
            ):
                async with session(context) as stranger:
                    with pytest.raises((aiohttp.ClientError, ssl.SSLError)):
                        async with stranger.post(
                            cluster.url("eu") + SYNC_PATH, data=body, headers=headers
                        ) as r:
                            pytest.fail(f"{what}: answered {r.status}")
            # Nor over plain HTTP.
            async with session() as plain:
                with pytest.raises(aiohttp.ClientError):
                    async with plain.post(
                        cluster.url("eu").replace("https", "http") + SYNC_PATH,
                        data=body,
                        headers=headers,
                    ) as r:
                        pytest.fail(f"plain http: answered {r.status}")
            after = (await c.ok("eu", "GET", "/status")).body["seq"]
            assert after == before
            assert (await c.call("eu", "GET", "/users/eve")).status == 404
            # The nodes say where they listen: https.
            for region in ("eu", "us"):
                log = (tmp_path / "cluster" / f"{region}.log").read_text()
                assert f'"url": "{cluster.url(region)}"' in log, log[-2000:]
                assert "Logging error" not in log, log[-2000:]

    asyncio.run(scenario())
