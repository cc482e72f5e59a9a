"""The machine's record of how far each replica's counter went this boot
(``node.counter_record``), and a replica's start against it, on real LMDB directories."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from node import commands
from node.counter_record import CounterRecord
from node.replica import Replica

BOOT = b"0b5e55ed-0000-4000-8000-000000000001"


def test_a_record_is_held_by_one_process_and_names_its_boot(tmp_path: Path) -> None:
    mine = CounterRecord(tmp_path, BOOT)
    assert mine.claim("eu~aaaa0001") == 0  # none yet
    mine.note("eu~aaaa0001", 7)
    mine.note("eu~aaaa0001", 12)
    other = CounterRecord(tmp_path, BOOT)
    assert other.claim("eu~aaaa0001") is None  # held: a process runs as that replica
    mine.release()
    assert other.claim("eu~aaaa0001") == 12
    other.release()
    assert CounterRecord(tmp_path, b"another-boot").claim("eu~aaaa0001") == 0
    (tmp_path / "eu~aaaa0001.counter").write_bytes(b"garbage")
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") == 0


def test_a_record_follows_a_renewed_id(tmp_path: Path) -> None:
    record = CounterRecord(tmp_path, BOOT)
    record.claim("eu~aaaa0001")
    record.note("eu~aaaa0001", 5)
    record.note("eu~bbbb0002", 1)  # a renewal while running: the new id's record
    record.release()
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") == 5
    assert CounterRecord(tmp_path, BOOT).claim("eu~bbbb0002") == 1


def _write_users(data: Path, run: Path, names: list[str]) -> str:
    """Open the replica in ``data`` (its record in ``run``), create users, close; its id."""

    async def write() -> str:
        replica = Replica.open(data, "eu", counter_record=CounterRecord(run, BOOT))
        try:
            replica.bind(asyncio.get_running_loop())
            for name in names:
                await replica.write(commands.create("user", name, {"name": name}), actor="t")
            return replica.identity.replica_id
        finally:
            replica.close()

    return asyncio.run(write())


def test_a_directory_put_back_to_an_earlier_copy_serves_as_a_new_incarnation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, run, copy = tmp_path / "eu", tmp_path / "run", tmp_path / "copy"
    first = _write_users(data, run, ["homer"])
    shutil.copytree(data, copy)
    assert _write_users(data, run, ["marge"]) == first  # a restart: the same id
    shutil.rmtree(data)
    shutil.copytree(copy, data)  # put back: the copy lacks marge's create
    renewed = _write_users(data, run, ["bart"])
    assert renewed != first
    assert renewed.startswith("eu~")
    assert "its counter reached 4 on this boot, and its log holds 2" in caplog.text  # 2 a user
    assert _write_users(data, run, ["lisa"]) == renewed  # and that id stays


def test_no_record_no_renewal(tmp_path: Path) -> None:
    """Without the machine's record (another machine, a run directory emptied) the
    start cannot tell: its peers tell it (``Writer.renew``)."""
    data, copy = tmp_path / "eu", tmp_path / "copy"
    first = _write_users(data, tmp_path / "run", ["homer"])
    shutil.copytree(data, copy)
    _write_users(data, tmp_path / "run", ["marge"])
    shutil.rmtree(data)
    shutil.copytree(copy, data)
    assert _write_users(data, tmp_path / "another run", ["bart"]) == first
