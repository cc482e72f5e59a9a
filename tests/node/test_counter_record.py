"""The machine's record of how far each replica's counter went this boot
(``node.counter_record``), and a replica's start against it, on real LMDB directories."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from node import commands
from node.counter_record import RETIRED, CounterRecord
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


def test_a_record_follows_a_renewed_id_and_retires_the_old_one(tmp_path: Path) -> None:
    record = CounterRecord(tmp_path, BOOT)
    record.claim("eu~aaaa0001")
    record.note("eu~aaaa0001", 5)
    record.note("eu~bbbb0002", 1)  # a renewal while running: the new id's record
    record.release()
    # A copy still running as the old id, put back later, renews too (found by a review).
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") == RETIRED
    assert CounterRecord(tmp_path, BOOT).claim("eu~bbbb0002") == 1


def test_a_record_removed_while_held_is_made_again(tmp_path: Path) -> None:
    """Its holder went on writing to a file no path led to: a copy started beside it
    found none, and ran as the same replica (found by a review)."""
    record = CounterRecord(tmp_path, BOOT)
    record.claim("eu~aaaa0001")
    record.note("eu~aaaa0001", 5)
    (tmp_path / "eu~aaaa0001.counter").unlink()
    record.note("eu~aaaa0001", 6)
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") is None  # held again
    record.release()
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") == 6


def test_a_record_removed_while_its_node_is_idle_is_made_again_by_keep(tmp_path: Path) -> None:
    """The node keeps it every second (``KEEP_INTERVAL_S``), written or not."""
    record = CounterRecord(tmp_path, BOOT)
    record.claim("eu~aaaa0001")
    record.note("eu~aaaa0001", 5)
    shutil.rmtree(tmp_path)  # the whole run directory emptied
    record.keep()
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") is None
    record.release()
    assert CounterRecord(tmp_path, BOOT).claim("eu~aaaa0001") == 5


def test_a_record_is_read_by_its_first_line_and_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "eu~aaaa0001.counter"
    path.write_bytes(BOOT.hex().encode() + b" " + b"7".zfill(20) + b"\n" + b"x" * 500)
    record = CounterRecord(tmp_path, BOOT)
    assert record.claim("eu~aaaa0001") == 7  # a longer file's tail said nothing of it
    record.note("eu~aaaa0001", 8)
    assert path.read_bytes() == BOOT.hex().encode() + b" " + b"8".zfill(20) + b"\n"
    record.release()


def test_records_are_kept_only_in_a_directory_of_this_user_s_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another user could plant a record in a shared directory, or make the node write
    through a link into a file of its choosing (found by a review)."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    own = tmp_path / "own"
    assert CounterRecord.of_this_machine(BOOT, [shared, own]).directory == own  # type: ignore[union-attr]
    link = tmp_path / "link"
    link.symlink_to(own)
    assert CounterRecord.of_this_machine(BOOT, [link]) is None
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (own / "eu~aaaa0001.counter").symlink_to(victim)
    record = CounterRecord(own, BOOT)
    for counter in range(1, 4):
        record.note("eu~aaaa0001", counter)
    assert victim.read_bytes() == b"keep me"
    assert caplog.text.count("cannot keep the counter record") == 1  # once, not per commit


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
    shutil.rmtree(data)
    shutil.copytree(copy, data)  # the same copy put back once more: its id is retired
    again = _write_users(data, run, ["maggie"])
    assert again not in (first, renewed)


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


def test_a_start_that_renews_holds_the_new_id_s_record_at_once(tmp_path: Path) -> None:
    """Before its first commit too: a copy of its directory started beside it in that
    gap ran as the same id (found by a review)."""
    data, run, copy = tmp_path / "eu", tmp_path / "run", tmp_path / "copy"
    first = _write_users(data, run, ["homer"])
    shutil.copytree(data, copy)
    _write_users(data, run, ["marge"])
    shutil.rmtree(data)
    shutil.copytree(copy, data)
    replica = Replica.open(data, "eu", counter_record=CounterRecord(run, BOOT))
    try:
        renewed = replica.identity.replica_id
        assert renewed != first
        assert CounterRecord(run, BOOT).claim(renewed) is None  # held, no commit yet
    finally:
        replica.close()
