"""A data file cut short (before LMDB's two meta pages, empty included, or past them
through a page its last commit needs) or damaged is refused with a clear error by
everything that opens it: an empty file would pass for a new store, reading a lost page
through the map kills the process (SIGBUS), and a damaged page is an LMDB error, not a
traceback. A healthy file shorter than LMDB's record of its last page (pages a write took
and gave back) is not refused. Each check runs in a process of its own, so a regression
shows as that process's death by signal, not the test runner's."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from node import commands, lmdb_pages
from node.kv import WriteTxn
from node.lmdb_kv import LmdbKV
from node.replica import Replica
from tests.node.cli_process import replica_cli

PAGE_BYTES = 4096  # LMDB's page on this platform


def make_replica(data: Path) -> int:
    """A replica's data directory with some users in it; the data file's size."""

    async def write() -> None:
        replica = Replica.open(data, "eu")
        try:
            replica.bind(asyncio.get_running_loop())
            for i in range(300):
                decide = commands.create(
                    "user",
                    f"user{i}",
                    {"name": "N" * 200, "username": f"user{i}", "email": f"u{i}@example.org"},
                )
                await replica.write(decide, actor="test")
        finally:
            replica.close()

    asyncio.run(write())
    return (data / "data.mdb").stat().st_size


COMMANDS = {
    "node": ["node", "--region", "eu", "--listen", "127.0.0.1:0", "--data"],
    "rebuild-views": ["rebuild-views", "--data"],
    "new-incarnation": ["new-incarnation", "--data"],
    "backup": ["backup", "--to", "{tmp}/copy", "--data"],
}


def _zero_past_meta(path: Path, size: int) -> None:
    """Every page zeroed but LMDB's two meta pages: whatever a command reads is damaged.
    (Half the file zeroed missed every page some commands read, as pages moved.)"""
    with path.open("r+b") as f:
        f.seek(2 * PAGE_BYTES)
        f.write(bytes(size - 2 * PAGE_BYTES))


def _cut_at_last_needed_page(path: Path, size: int) -> None:
    """Cut where the highest page the last commit needs begins: far past the meta pages,
    the file still longer than most of what it holds."""
    with path.open("rb") as f:
        meta = lmdb_pages.read_meta(f.fileno())
        assert meta is not None
        walked = lmdb_pages.walk(f.fileno(), meta, pages_in_file=size // meta.page_bytes)
    assert walked.missing is None
    os.truncate(path, walked.highest * meta.page_bytes)


# What is done to the data file, and what the refusal says.
DAMAGE: dict[str, tuple[Callable[[Path, int], None], str]] = {
    "cut to one page": (lambda path, size: os.truncate(path, 4096), "cut short"),
    "cut in half": (lambda path, size: os.truncate(path, size // 2 // 4096 * 4096), "cut short"),
    "cut at its last needed page": (_cut_at_last_needed_page, "cut short"),
    "emptied": (lambda path, size: os.truncate(path, 0), "cut short"),
    "zeroed past its meta pages": (_zero_past_meta, "MDB_"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_damaged_data_file_is_refused_with_a_clear_error(
    tmp_path: Path, command: str, damage: str
) -> None:
    data = tmp_path / "eu"
    size = make_replica(data)
    harm, says = DAMAGE[damage]
    harm(data / "data.mdb", size)
    harmed = (data / "data.mdb").read_bytes()
    done = replica_cli(*(arg.format(tmp=tmp_path) for arg in COMMANDS[command]), str(data))
    assert done.returncode == 2, (done.returncode, done.stderr)  # not -SIGBUS, not a new store
    assert says in done.stderr
    assert "Traceback" not in done.stderr
    assert (data / "data.mdb").read_bytes() == harmed  # left as it was
    assert not (tmp_path / "copy" / "data.mdb").exists()


def test_a_healthy_file_shorter_than_lmdbs_last_page_opens(tmp_path: Path) -> None:
    """A write that takes pages and gives them back in one transaction leaves LMDB's
    record of its last page beyond the file's end, the file sound (a check on that record
    refused such a directory: found by a review, twice)."""
    data = tmp_path / "eu"
    Replica.open(data, "eu").close()
    kv = LmdbKV(data)
    try:
        # Rows that stay, then writes that fill the table and empty it again (in a table
        # the rebuild makes anew: its own rows mean nothing here).
        def keep(txn: WriteTxn) -> None:
            for i in range(50):
                txn.put("idx_search", b"keep%04d" % i, b"x" * 100)

        kv.write(keep)

        def grow_and_empty(txn: WriteTxn) -> None:
            for i in range(2000):
                txn.put("idx_search", b"tmp%06d" % i, b"y" * 500)
            for i in range(2000):
                txn.delete("idx_search", b"tmp%06d" % i)

        for _ in range(2):
            kv.write(grow_and_empty)
        env = kv.env
        last_page_end = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        kv.close()
    assert (data / "data.mdb").stat().st_size < last_page_end  # the case itself
    for command in (["rebuild-views", "--data"], ["backup", "--to", f"{tmp_path}/copy", "--data"]):
        done = replica_cli(*command, str(data))
        assert done.returncode == 0, (command, done.stderr)


def test_a_whole_data_file_opens(tmp_path: Path) -> None:
    data = tmp_path / "eu"
    make_replica(data)
    done = replica_cli("rebuild-views", "--data", str(data))
    assert done.returncode == 0, done.stderr
