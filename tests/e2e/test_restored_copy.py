"""A data directory put back to an earlier copy on the same machine, without a reboot (a
file system snapshot rolled back, a directory restored), or a copy started beside its
running original: the node finds its counter below the machine's record of it, or the
record held by the original, and serves as a new incarnation before it writes. Its
peers cannot tell it in time when they are cut off: before the record, the restored
node gave a new write the dot of one a peer held, and the regions never converged."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from tests.e2e.cluster_fixtures import (
    Client,
    copy_then_write,
    put_back,
    running,
    session,
    written_dot,
)
from tests.e2e.helpers import Nodes
from tests.e2e.test_replication import user


def test_a_directory_put_back_to_a_copy_renews_before_its_peers_can_tell(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"  # the machine's, shared by its nodes as /run is

    async def scenario() -> None:
        args = ["--run-dir", str(run_dir)]
        async with (
            running(["eu", "us"], tmp_path / "cluster", node_args=args) as cluster,
            session() as http,
        ):
            c = Client(cluster, http)
            await c.ok("eu", "POST", "/users", user("homer"))
            await c.wait_converged()
            copy = tmp_path / "copy"
            later = await copy_then_write(c, cluster, "eu", copy, {"name": "Later"})
            old_id = written_dot(later).partition(":")[0]

            cluster.partition(["eu"], ["us"])  # for longer than a start waits for its peers
            put_back(cluster, "eu", copy)
            await cluster.restart("eu")
            status = (await c.ok("eu", "GET", "/status")).body
            assert status["replica_id"] != old_id
            restored = await c.ok("eu", "PATCH", "/users/homer", {"profile": {"city": "Oslo"}})
            assert written_dot(restored).startswith(status["replica_id"] + ":")
            assert written_dot(later).startswith(old_id + ":")

            cluster.heal()
            await c.wait_converged()
            for region in ("eu", "us"):
                got = (await c.ok(region, "GET", "/users/homer")).body
                assert got["name"] == "Later", region  # back from us, under its own dot
                assert got["profile"] == {"city": "Oslo"}, region

    asyncio.run(scenario())
    assert "put back to an earlier copy" in (tmp_path / "cluster" / "eu.log").read_text()


def test_a_copy_started_beside_its_running_original_renews(nodes: Nodes, tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    original = nodes.start("eu", "a", "--run-dir", run_dir)
    assert original.call("POST", "/users", user("homer")).status == 201
    assert original.terminate() == 0
    shutil.copytree(nodes.data_dir("a"), nodes.data_dir("b"))
    original = nodes.start("eu", "a", "--run-dir", run_dir)
    copy = nodes.start("eu", "b", "--run-dir", run_dir)
    ids = {node.call("GET", "/status").json()["replica_id"] for node in (original, copy)}
    assert len(ids) == 2  # the copy took a new id: the two write under dots of their own
    assert "another process on this machine runs as" in copy.stderr()
    assert original.ready_line.split()[1] in ids
    # The original, restarted alone on its directory, keeps its id.
    assert copy.terminate() == 0
    assert original.terminate() == 0
    again = nodes.start("eu", "a", "--run-dir", run_dir)
    assert again.call("GET", "/status").json()["replica_id"] == original.ready_line.split()[1]
