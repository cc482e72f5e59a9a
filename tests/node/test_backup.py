"""``replica backup``: a consistent copy of a data directory, its node running or not,
from which a node comes back as a new incarnation (no dot taken twice). The command runs
in a process of its own, as an operator runs it beside the node."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from node import commands, log
from node.kv import WriteTxn
from node.lmdb_kv import LmdbKV
from node.replica import Replica
from node.writer import Decide
from tests.node.cli_process import replica_cli


def person(i: int) -> Decide:
    return commands.create(
        "user", f"user{i}", {"name": f"User {i}", "username": f"user{i}", "email": f"u{i}@x.org"}
    )


def on_a_node(data: Path, work: Callable[[Replica], Awaitable[None]]) -> None:
    """``work`` on the replica of ``data``, open as a node holds it, closed after."""

    async def main() -> None:
        replica = Replica.open(data, "eu")
        try:
            replica.bind(asyncio.get_running_loop())
            await work(replica)
        finally:
            replica.close()

    asyncio.run(main())


def test_a_backup_of_a_running_node_starts_as_a_new_incarnation(tmp_path: Path) -> None:
    data, copy = tmp_path / "eu", tmp_path / "backup" / "eu"

    async def main() -> None:
        replica = Replica.open(data, "eu")  # the node, running: it holds the directory
        try:
            replica.bind(asyncio.get_running_loop())
            for i in range(50):
                await replica.write(person(i), actor="test")
            at_backup = replica.state
            done = await asyncio.to_thread(
                replica_cli, "backup", "--data", str(data), "--to", str(copy)
            )
            assert done.returncode == 0, done.stderr
            assert (
                f"backed up {replica.identity.replica_id} ({at_backup.seq} events)" in done.stdout
            )
            await replica.write(person(50), actor="test")  # after the copy: not in it
            original = replica.identity.replica_id
        finally:
            replica.close()

        restored = Replica.open(copy, "eu")
        try:
            assert restored.identity.replica_id != original
            assert restored.identity.replica_id.startswith("eu~")
            assert restored.state.counter == 0  # its own dots start afresh
            assert restored.state.seq == at_backup.seq
            assert restored.summary.origins[original].contiguous == at_backup.counter
            assert restored.entity("user", "user49").exists
            assert not restored.entity("user", "user50").exists
            renewed = restored.identity.replica_id
        finally:
            restored.close()
        again = Replica.open(copy, "eu")  # the mark is gone: no second renewal
        try:
            assert again.identity.replica_id == renewed
        finally:
            again.close()

    asyncio.run(main())


def test_new_incarnation_on_a_backup_renews_it_once(tmp_path: Path) -> None:
    data, copy = tmp_path / "eu", tmp_path / "copy"

    async def write(replica: Replica) -> None:
        await replica.write(person(1), actor="test")

    on_a_node(data, write)
    assert replica_cli("backup", "--data", str(data), "--to", str(copy)).returncode == 0
    kv = LmdbKV(copy)  # as if copied from a node that died running on another boot
    kv.write(lambda txn: txn.put("meta", log.UNSYNCED_BOOT_KEY, b"another-boot"))
    kv.close()
    done = replica_cli("new-incarnation", "--data", str(copy))
    assert done.returncode == 0, done.stderr
    renewed = done.stdout.split(" is now ")[1].split(":")[0]
    replica = Replica.open(copy, "eu")
    try:
        assert replica.identity.replica_id == renewed  # not renewed again at start
        with replica.kv.read() as txn:
            assert txn.get("meta", log.BACKUP_KEY) is None
    finally:
        replica.close()


def test_a_backup_of_a_running_node_restored_on_another_machine_renews_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy holds the mark of a run under way, on the boot it was taken on: started
    on another machine, it is a backup renewed already, not a run that died as well."""
    data, copy = tmp_path / "eu", tmp_path / "copy"

    async def backed_up(replica: Replica) -> None:
        await replica.write(person(1), actor="test")
        done = await asyncio.to_thread(
            replica_cli, "backup", "--data", str(data), "--to", str(copy)
        )
        assert done.returncode == 0, done.stderr

    on_a_node(data, backed_up)
    renewals: list[str] = []
    new_incarnation = log.new_incarnation

    def counted(txn: WriteTxn, identity: log.Identity, **options: Any) -> log.Identity:
        renewals.append(identity.replica_id)
        return new_incarnation(txn, identity, **options)

    monkeypatch.setattr(log, "new_incarnation", counted)
    monkeypatch.setattr(log, "current_boot", lambda: b"another-machine")
    replica = Replica.open(copy, "eu")
    replica.close()
    assert len(renewals) == 1


def test_a_backup_refuses_a_directory_that_is_not_empty_or_not_a_replicas(
    tmp_path: Path,
) -> None:
    data, copy = tmp_path / "eu", tmp_path / "copy"
    Replica.open(data, "eu").close()
    copy.mkdir()
    (copy / "notes.txt").write_text("mine")
    done = replica_cli("backup", "--data", str(data), "--to", str(copy))
    assert done.returncode == 2
    assert "not an empty directory" in done.stderr
    assert sorted(p.name for p in copy.iterdir()) == ["notes.txt"]

    done = replica_cli("backup", "--data", str(tmp_path / "nothing"), "--to", str(tmp_path / "b"))
    assert done.returncode == 2
    assert "not a replica data directory" in done.stderr
    assert not (tmp_path / "b").exists()
