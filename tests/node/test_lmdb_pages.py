"""The walk of an LMDB file's pages (``node.lmdb_pages``) on real LMDB files: it counts
what LMDB counts of every table, and finds a file cut short exactly when the cut takes a
page the last commit needs, however short of LMDB's record of its last page it is."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import lmdb
import pytest

from node import lmdb_kv, lmdb_pages
from node.kv import WriteTxn
from node.lmdb_kv import (
    LOCK_FILE,
    PAGES_CHECKED,
    DataDirBusy,
    DataFileTruncated,
    DataFileUnreadable,
    LmdbKV,
    check_data_file,
    check_pages,
)
from node.replica import Replica

TABLES = ("events", "views", "idx_search", "meta")


def _workload(path: Path, seed: int, commits: int = 30) -> None:
    """Random puts and deletes across tables, values from empty to several pages (on
    overflow pages), some commits that fill a table and empty it again."""
    rng = random.Random(seed)
    kv = LmdbKV(path, map_bytes_initial=64 * 1024 * 1024)
    keys: dict[str, list[bytes]] = {table: [] for table in TABLES}
    try:
        for _ in range(commits):

            def work(txn: WriteTxn) -> None:
                for _ in range(rng.randint(1, 300)):
                    table = rng.choice(TABLES)
                    held = keys[table]
                    if held and rng.random() < 0.3:
                        txn.delete(table, held.pop(rng.randrange(len(held))))
                        continue
                    key = rng.randbytes(rng.randint(1, 40))
                    size = rng.choice((0, 10, 100, 1_000, 3_000, 20_000))
                    txn.put(table, key, rng.randbytes(size))
                    held.append(key)
                if rng.random() < 0.2:  # pages taken and given back in one write
                    for i in range(500):
                        txn.put("conflicts", b"tmp%05d" % i, b"x" * 300)
                    for i in range(500):
                        txn.delete("conflicts", b"tmp%05d" % i)

            kv.write(work)
    finally:
        kv.close()


def _walk(data: Path) -> tuple[lmdb_pages.Meta, lmdb_pages.Walk]:
    with data.open("rb") as f:
        meta = lmdb_pages.read_meta(f.fileno())
        assert meta is not None
        return meta, lmdb_pages.walk(f.fileno(), meta, pages_in_file=1 << 62)


@pytest.mark.parametrize("seed", range(6))
def test_a_walk_counts_every_table_as_lmdb_does(tmp_path: Path, seed: int) -> None:
    _workload(tmp_path, seed)
    meta, walked = _walk(tmp_path / "data.mdb")
    assert walked.missing is None
    assert 2 <= walked.highest <= meta.last_page
    env = lmdb.open(str(tmp_path), readonly=True, max_dbs=64, lock=False)
    try:
        with env.begin() as txn:
            named = {key for key, _ in txn.cursor()}
            assert set(walked.tables) == named
            overflow = 0
            for name, census in walked.tables.items():
                stat = txn.stat(env.open_db(name, txn=txn, create=False))
                counted = (census.branch_pages, census.leaf_pages, census.overflow_pages)
                assert counted == (
                    stat["branch_pages"],
                    stat["leaf_pages"],
                    stat["overflow_pages"],
                ), name
                assert census.entries == stat["entries"], name
                overflow += census.overflow_pages
    finally:
        env.close()
    assert overflow > 0  # the workload put values on overflow pages: they were walked


def test_a_cut_is_found_exactly_when_it_takes_a_needed_page(tmp_path: Path) -> None:
    _workload(tmp_path / "whole", seed=11, commits=60)
    data = tmp_path / "whole" / "data.mdb"
    meta, walked = _walk(data)
    pages = data.stat().st_size // meta.page_bytes
    assert walked.highest < pages
    cut = tmp_path / "cut"
    cut.mkdir()
    ends = {2, 3, walked.highest, walked.highest + 1, pages - 1, *range(2, pages, 7)}
    for end in sorted(ends):
        shutil.copyfile(data, cut / "data.mdb")
        os.truncate(cut / "data.mdb", end * meta.page_bytes)
        lacking = lmdb_pages.first_page_lacking(cut / "data.mdb")
        if end <= walked.highest:
            assert lacking is not None, end
            page, page_bytes = lacking
            assert end <= page <= walked.highest
            assert page_bytes == meta.page_bytes
        else:  # only pages no tree reaches are gone: the file is sound
            assert lacking is None, end


def test_a_cut_file_is_refused_at_open_and_a_sound_one_opens(tmp_path: Path) -> None:
    _workload(tmp_path, seed=3)
    data = tmp_path / "data.mdb"
    meta, walked = _walk(data)
    os.truncate(data, walked.highest * meta.page_bytes)
    with pytest.raises(DataFileTruncated, match=f"needs page {walked.highest:,}"):
        LmdbKV(tmp_path)
    with pytest.raises(DataFileTruncated, match="cut short"):
        check_data_file(tmp_path)


def test_a_running_node_s_file_is_not_walked_by_a_reader_without_its_lock(
    tmp_path: Path,
) -> None:
    """Its writes would move pages under the walk; the node checked them when it opened."""
    _workload(tmp_path, seed=4)
    kv = LmdbKV(tmp_path)
    try:
        meta, walked = _walk(tmp_path / "data.mdb")
        os.truncate(tmp_path / "data.mdb", walked.highest * meta.page_bytes)
        check_data_file(tmp_path)  # the lock is held: the walk is left to its holder
        with pytest.raises(DataFileTruncated):
            check_pages(tmp_path)
    finally:
        kv.close()
    with pytest.raises(DataFileTruncated):
        check_data_file(tmp_path)  # free now: walked


def _short_but_sound(path: Path) -> tuple[lmdb_pages.Meta, lmdb_pages.Walk]:
    """A replica's directory whose data file ends before LMDB's record of its last page
    (writes that took pages and gave them back), every page it needs there: walked."""
    Replica.open(path, "eu").close()  # as test_truncated_data_file's healthy short file
    kv = LmdbKV(path)
    try:

        def keep(txn: WriteTxn) -> None:
            for i in range(50):
                txn.put("idx_search", b"keep%04d" % i, b"x" * 100)
            txn.put("views", b"big", b"z" * 9_000)  # on overflow pages

        def grow_and_empty(txn: WriteTxn) -> None:
            for i in range(2_000):
                txn.put("idx_search", b"tmp%06d" % i, b"y" * 500)
            for i in range(2_000):
                txn.delete("idx_search", b"tmp%06d" % i)

        kv.write(keep)
        for _ in range(2):
            kv.write(grow_and_empty)
    finally:
        kv.close()
    data = path / "data.mdb"
    meta, walked = _walk(data)
    assert data.stat().st_size // meta.page_bytes <= meta.last_page  # short: walked
    assert lmdb_pages.first_page_lacking(data) is None  # and sound
    return meta, walked


def test_a_damaged_page_of_a_short_file_is_refused_as_unreadable(tmp_path: Path) -> None:
    meta, walked = _short_but_sound(tmp_path)
    data = tmp_path / "data.mdb"
    root = walked.tables[b"idx_search"].root
    with data.open("r+b") as f:
        f.seek(root * meta.page_bytes)
        f.write(bytes(meta.page_bytes))  # the table's one page zeroed
    with pytest.raises(lmdb_pages.Damaged, match=f"page {root} "):
        lmdb_pages.first_page_lacking(data)
    with pytest.raises(DataFileUnreadable, match="cannot be read"):
        LmdbKV(tmp_path)


def test_damage_anywhere_in_a_short_file_is_damage_or_a_cut_never_a_crash(
    tmp_path: Path,
) -> None:
    """Bytes changed at random in the pages a short file's trees reach: the walk says the
    file is damaged, or cut, or sound, and raises nothing else (a pointer, a size or a
    page number that runs off its page was a struct.error, a traceback from every
    command: found by a review)."""
    meta, walked = _short_but_sound(tmp_path / "whole")
    whole = (tmp_path / "whole" / "data.mdb").read_bytes()
    rng = random.Random(8)
    pages = sorted(walked.reached)
    data = tmp_path / "data.mdb"
    said = {"damaged": 0, "cut": 0, "sound": 0}
    for _ in range(300):
        harmed = bytearray(whole)
        page = rng.choice(pages)
        for _ in range(rng.randint(1, 4)):
            # Mostly the header and node pointers, where the page's shape is told.
            within = rng.randrange(64) if rng.random() < 0.7 else rng.randrange(meta.page_bytes)
            harmed[page * meta.page_bytes + within] = rng.randrange(256)
        data.write_bytes(harmed)
        try:
            lacking = lmdb_pages.first_page_lacking(data)
        except lmdb_pages.Damaged:
            said["damaged"] += 1
        else:
            said["cut" if lacking is not None else "sound"] += 1
    assert said["damaged"] > 0, said


def test_a_reader_without_the_lock_walks_unless_a_holder_checked_the_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that does not hold the directory's lock (a backup) takes it for the walk;
    while another process holds it, it leaves the pages to that holder once the holder
    says it checked them, and waits for it (at most CHECK_WAIT_S) while it has not."""
    _workload(tmp_path, seed=4)
    meta, walked = _walk(tmp_path / "data.mdb")
    lock_file = tmp_path / LOCK_FILE
    kv = LmdbKV(tmp_path)
    try:
        assert lock_file.read_bytes() == PAGES_CHECKED
        os.truncate(tmp_path / "data.mdb", walked.highest * meta.page_bytes)  # cut since
        check_data_file(tmp_path)  # held and checked: the holder's to answer for
        with pytest.raises(DataFileTruncated):
            check_pages(tmp_path)
        # A holder that has not said so: waited for, then the directory is refused as busy.
        lock_file.write_bytes(b"")
        monkeypatch.setattr(lmdb_kv, "CHECK_WAIT_S", 0.2)
        with pytest.raises(DataDirBusy, match="has not checked"):
            check_data_file(tmp_path)
    finally:
        kv.close()
    assert lock_file.read_bytes() == b""  # a holder's mark goes with it
    lock_file.write_bytes(PAGES_CHECKED)  # as a holder killed holding it leaves it
    with pytest.raises(DataFileTruncated):
        check_data_file(tmp_path)  # free: walked, whatever the file says
    assert lock_file.read_bytes() == b""


def test_a_file_of_another_layout_is_left_to_lmdb(tmp_path: Path) -> None:
    data = tmp_path / "data.mdb"
    data.write_bytes(b"not lmdb" * 2048)
    assert lmdb_pages.first_page_lacking(data) is None
