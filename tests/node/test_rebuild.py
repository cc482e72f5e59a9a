"""Rebuilding views from the log of a real data directory gives back the same bytes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from crdt import Dot
from crdt.clock import make_stamp
from node import commands, log, rebuild, replay_workers, views
from node.events import Event, Op
from node.kv import KV, WriteTxn
from node.lmdb_kv import LmdbKV
from node.rebuild import rebuild_views, renew_incarnation, replay_views
from node.replay_workers import FoldingWorkers
from node.replica import Replica
from node.writer import Decide

NOW_MS = 1_700_000_000_000
VIEW_DBS = ("views", "members", "user_groups", "unique_email", "unique_username", "idx_search")
LEGACY_DBS = tuple(views.LEGACY_INDEX_DBS.values())
ALL_DBS = (*VIEW_DBS, *LEGACY_DBS, "conflicts", "events", "dots", "streams", "meta")


async def populate(replica: Replica) -> None:
    async def run(decide: Decide) -> None:
        await replica.write(decide, actor="test")

    for user in ("homer", "marge", "bart"):
        writes = {"name": f"{user.title()} Simpson", "username": user, "email": f"{user}@x.us"}
        await run(commands.create("user", user, {**writes, "profile.city": "Springfield"}))
    await run(commands.create("group", "family", {"name": "Family"}))
    await run(commands.create("group", "plant", {"name": "Power plant"}))
    for user in ("homer", "marge", "bart"):
        await run(commands.add_member("family", user))
    await run(commands.add_member("plant", "homer"))
    await run(commands.patch("user", "homer", {"name": "Homer J. Simpson"}, None))
    await run(commands.remove_member("family", "marge"))
    await run(commands.delete("user", "bart", None))  # and his memberships
    # a peer's user claiming homer's email: a conflict only a merge can make
    stamp = make_stamp(NOW_MS)
    await replica.ingest(
        [
            Event(Dot("us~bbbb", 1), stamp, "user/homer2", Op.CREATE),
            Event(Dot("us~bbbb", 2), stamp, "user/homer2", Op.SET, "email", "HOMER@x.us"),
        ]
    )


def dump(data_dir: Path) -> dict[str, list[tuple[bytes, bytes]]]:
    kv = LmdbKV(data_dir)
    try:
        with kv.read() as txn:
            return {db: list(txn.scan(db)) for db in ALL_DBS}
    finally:
        kv.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    replica = Replica.open(tmp_path, "eu", map_bytes_initial=1 << 20, now_ms=lambda: NOW_MS)
    try:
        asyncio.run(populate(replica))
        assert replica.conflicts() == [("email", "homer@x.us", ["homer", "homer2"])]
    finally:
        replica.close()
    return tmp_path


def test_rebuilt_views_are_byte_identical(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = dump(data_dir)
    assert rebuild_views(data_dir) == 0
    assert dump(data_dir) == before
    out = capsys.readouterr().out
    events = len(before["events"])
    assert re.fullmatch(
        rf"rebuilt views of eu~[0-9a-f]{{8}} from {events} events in \d+\.\d\d s\n", out
    )


def test_lost_views_come_back_from_the_log(data_dir: Path) -> None:
    before = dump(data_dir)
    lose_views(data_dir)
    assert rebuild_views(data_dir) == 0
    assert dump(data_dir) == before


def lose_views(data_dir: Path) -> None:
    def lose(txn: WriteTxn) -> None:
        for db in (*VIEW_DBS, "conflicts"):
            txn.clear(db)
            txn.put(db, b"ghost\0x", b"not a view")

    kv: KV = LmdbKV(data_dir)
    kv.write(lose)
    kv.close()


@pytest.mark.parametrize(("workers", "block_streams"), [(2, 1), (2, 2), (3, 256), (4, 2)])
def test_views_folded_by_worker_processes_are_byte_identical(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, workers: int, block_streams: int
) -> None:
    """Workers each fold every n-th block of entities from what was committed, and the
    rebuild stores the blocks in order: the views are those one process folds, whether
    a worker has many blocks, one, or none (4 workers, 3 blocks)."""
    before = dump(data_dir)
    lose_views(data_dir)
    monkeypatch.setattr(rebuild, "REPLAY_WORKERS_EVENTS_MIN", 1)  # this log is short
    monkeypatch.setattr(rebuild, "REPLAY_BLOCK_STREAMS", block_streams)
    assert rebuild_views(data_dir, workers=workers) == 0
    assert dump(data_dir) == before
    assert child_processes() == []


def test_a_failed_worker_leaves_the_views_as_they_were(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kv: KV = LmdbKV(data_dir)
    kv.write(lambda txn: txn.put("events", log.u64(5), b"\xc1 not msgpack"))
    kv.close()
    before = dump(data_dir)
    monkeypatch.setattr(rebuild, "REPLAY_WORKERS_EVENTS_MIN", 1)
    monkeypatch.setattr(rebuild, "REPLAY_BLOCK_STREAMS", 1)
    assert rebuild_views(data_dir, workers=2) == 1
    assert dump(data_dir) == before
    err = capsys.readouterr().err
    assert re.search(r"views left as they were: rebuild worker \d \(pid \d+\) failed: ", err)
    assert "msgpack.exceptions.FormatError" in err
    assert child_processes() == []


def child_processes() -> list[int]:
    """The pids of this process's children (Linux's /proc): workers left behind."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat.rpartition(")")[2].split()[1]) == os.getpid():
                children.append(int(entry.name))
    return children


@contextmanager
def holding(data_dir: Path, code: str) -> Iterator[subprocess.Popen[str]]:
    """A process running ``code`` on ``data_dir``, once it has printed "ready"; it ends
    when its standard input does."""
    with subprocess.Popen(
        [sys.executable, "-c", code, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "ready\n"
        try:
            yield holder
        finally:
            holder.communicate("", timeout=30)


def stale_readers(kv: LmdbKV) -> list[str]:
    """Rows of LMDB's reader table held by processes that are gone."""
    rows = kv.env.readers().splitlines()[1:]  # under a header: pid thread txnid
    return [
        row for row in rows if row.split() and not Path(f"/proc/{int(row.split()[0])}").exists()
    ]


def test_a_rebuild_run_again_in_a_grown_map_leaves_no_reader_behind(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A full map aborts the write, closing the workers, and runs it again: a worker
    killed in the middle of its read would leave its slot in the reader table, holding
    an old snapshot, so that no page freed since is used again until the node restarts."""
    before = dump(data_dir)
    lose_views(data_dir)
    tight = tmp_path_factory.mktemp("tight")  # a copy without free pages: a rebuild grows it
    kv = LmdbKV(data_dir)
    kv.env.copy(str(tight), compact=True)
    kv.close()
    monkeypatch.setattr(rebuild, "REPLAY_WORKERS_EVENTS_MIN", 1)
    monkeypatch.setattr(rebuild, "REPLAY_BLOCK_STREAMS", 1)
    kv = LmdbKV(tight, map_bytes_initial=4096)  # the file's own size
    try:
        grown_from = kv.map_bytes
        assert kv.write(lambda txn: replay_views(txn, data_dir=tight, workers=2)) > 0
        assert kv.map_bytes > grown_from
        assert stale_readers(kv) == []
    finally:
        kv.close()
    assert dump(tight) == before
    assert child_processes() == []


def test_workers_that_cannot_start_leave_the_fold_to_the_rebuilding_process(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = dump(data_dir)
    lose_views(data_dir)
    monkeypatch.setattr(rebuild, "REPLAY_WORKERS_EVENTS_MIN", 1)
    monkeypatch.setattr(sys, "executable", "")  # as in a process embedding Python
    with caplog.at_level("WARNING", logger="node.rebuild"):
        assert rebuild_views(data_dir, workers=2) == 0
    assert dump(data_dir) == before
    assert "folding the log in this process: cannot start a worker process" in caplog.text


def test_a_node_whose_worker_is_stuck_folds_its_views_again_itself(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening views folded by other rules, a node whose worker is stuck (stopped, say)
    gives up on it after WORKER_SILENCE_MAX_S, says which and in what state, and comes
    up with the views it folds itself; the stopped worker is killed, not left behind."""
    before = dump(data_dir)
    lose_views(data_dir)
    kv: KV = LmdbKV(data_dir)
    kv.write(lambda txn: txn.delete(views.FOLD_RULES_DB, views.FOLD_RULES_KEY))
    kv.close()
    folded = FoldingWorkers.folded

    def with_a_stopped_worker(self: FoldingWorkers) -> Iterator[views.Replayed]:
        os.kill(self._processes[0].pid, signal.SIGSTOP)  # still starting: it sends nothing
        return folded(self)

    monkeypatch.setattr(rebuild, "REPLAY_WORKERS_EVENTS_MIN", 1)
    monkeypatch.setattr(rebuild, "replay_workers", lambda: 2)
    monkeypatch.setattr(replay_workers, "WORKER_SILENCE_MAX_S", 1.0)
    monkeypatch.setattr(replay_workers, "WORKER_EXIT_WAIT_S", 0.5)
    monkeypatch.setattr(FoldingWorkers, "folded", with_a_stopped_worker)
    with caplog.at_level("WARNING", logger="node.replica"):
        Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS).close()
    assert re.search(r"rebuild worker 0 \(pid \d+\) sent nothing for 1 s \(state T\)", caplog.text)
    assert "folding the views again in this process" in caplog.text
    assert dump(data_dir) == before
    assert child_processes() == []


def test_a_failed_write_frees_the_reader_slots_of_dead_processes(data_dir: Path) -> None:
    """A process killed inside a read transaction (a rebuild's worker) leaves its slot in
    LMDB's reader table, and its old snapshot keeps every page freed since from reuse:
    the data file would grow with every write until the node restarts."""
    reader = (
        "import sys; from pathlib import Path; from node.lmdb_kv import snapshot\n"
        "with snapshot(Path(sys.argv[1])):\n"
        "    print('ready', flush=True); sys.stdin.read()\n"
    )
    kv = LmdbKV(data_dir)
    try:
        with holding(data_dir, reader) as holder:
            holder.kill()
        assert len(stale_readers(kv)) == 1

        def fails(txn: WriteTxn) -> None:
            raise RuntimeError("a worker failed")

        with pytest.raises(RuntimeError):
            kv.write(fails)
        assert stale_readers(kv) == []
    finally:
        kv.close()


def test_a_script_that_opens_a_replica_does_not_run_again_in_the_workers(
    data_dir: Path, tmp_path: Path
) -> None:
    """Workers are started by their module's name: the caller's own program, guarded
    by ``if __name__ == "__main__"`` or not, runs once. And they run this package, not
    a ``node`` in the directory the caller was started from."""
    lose_views(data_dir)
    kv: KV = LmdbKV(data_dir)
    kv.write(lambda txn: txn.delete(views.FOLD_RULES_DB, views.FOLD_RULES_KEY))
    kv.close()
    script = tmp_path / "tool.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from node import rebuild\n"
        "from node.replica import Replica\n"
        "print('top level ran', flush=True)\n"
        "rebuild.REPLAY_WORKERS_EVENTS_MIN = 1\n"
        "rebuild.REPLAY_BLOCK_STREAMS = 1\n"
        "rebuild.replay_workers = lambda: 2\n"
        "Replica.open(Path(sys.argv[1]), 'eu').close()\n"
        "print('opened', flush=True)\n"
    )
    trap = tmp_path / "elsewhere"
    trap.mkdir()
    (trap / "node.py").write_text("raise SystemExit('imported the node of the current directory')")
    done = subprocess.run(
        [sys.executable, str(script), str(data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=trap,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "top level ran\nopened\n"
    assert "in this process" not in done.stderr  # the workers folded


def test_more_workers_than_the_limit_are_refused(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rebuild_views(data_dir, workers=rebuild.REPLAY_WORKERS_MAX + 1) == 2
    assert f"--workers is at most {rebuild.REPLAY_WORKERS_MAX}" in capsys.readouterr().err


@pytest.mark.parametrize("block_streams", [1, 2, 5])
def test_the_parts_of_the_stored_streams_are_the_whole_in_blocks(
    data_dir: Path, block_streams: int
) -> None:
    kv = LmdbKV(data_dir)
    try:
        with kv.read() as txn:
            whole = list(log.stored_streams(txn, block_streams=block_streams))
            assert [n for n, _, _ in whole] == [i // block_streams for i in range(len(whole))]
            for parts in (2, 3, 7):
                shares = [
                    list(log.stored_streams(txn, part=p, parts=parts, block_streams=block_streams))
                    for p in range(parts)
                ]
                for part, share in enumerate(shares):
                    assert all(n % parts == part for n, _, _ in share)
                assert sorted(e for share in shares for e in share) == whole
    finally:
        kv.close()


def to_legacy_form(txn: WriteTxn) -> None:
    """Leave the unique indexes as an older version wrote them (value \0 id -> b""), with
    a stale entry of today's form, as a downgrade with ``rebuild-views`` would."""
    for field, db in views.INDEX_DBS.items():
        legacy = views.LEGACY_INDEX_DBS[field]
        for key, raw in list(txn.scan(db)):
            for holder in raw.decode().split("\0"):
                txn.put(legacy, key + b"\0" + holder.encode(), b"")
        txn.clear(db)
    txn.put("unique_email", b"bart@x.us", b"bart")


def to_partial_legacy_form(txn: WriteTxn) -> None:
    """As ``to_legacy_form``, after a move back without ``rebuild-views``: the older
    version indexed only the users written since (marge), and found no conflict."""
    to_legacy_form(txn)
    txn.clear("idx_email")
    txn.put("idx_email", b"marge@x.us\0marge", b"")
    txn.clear("idx_username")
    txn.clear("conflicts")


@pytest.mark.parametrize("left", [to_legacy_form, to_partial_legacy_form], ids=["whole", "partial"])
def test_unique_indexes_of_an_older_version_are_made_anew_at_open(
    data_dir: Path, left: Callable[[WriteTxn], None]
) -> None:
    before = dump(data_dir)
    kv: KV = LmdbKV(data_dir)
    kv.write(left)
    kv.close()
    replica = Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS)
    try:
        assert [u for u, _ in replica.look_up_views("email", "Homer@x.us")] == ["homer", "homer2"]
        assert [u for u, _ in replica.look_up_views("username", "marge")] == ["marge"]
        assert [u for u, _ in replica.look_up_views("username", "homer")] == ["homer"]
        assert replica.look_up_views("email", "bart@x.us") == []
        assert replica.conflicts() == [("email", "homer@x.us", ["homer", "homer2"])]
    finally:
        replica.close()
    after = dump(data_dir)
    for db in (*VIEW_DBS, *LEGACY_DBS, "conflicts"):
        assert after[db] == before[db], db


def test_a_rebuild_of_a_directory_of_an_older_version_empties_its_indexes(data_dir: Path) -> None:
    before = dump(data_dir)
    kv: KV = LmdbKV(data_dir)
    kv.write(to_legacy_form)
    kv.close()
    assert rebuild_views(data_dir) == 0
    assert dump(data_dir) == before


def test_views_folded_by_other_rules_are_folded_again_at_open(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Views an older version folded (say, before a create raised the floor) differ from
    what this version folds; left as they are, replicas would disagree. The node folds
    them again when it opens, and only then."""
    before = dump(data_dir)
    homer = next(v for k, v in before["views"] if k == b"user/homer")
    stale = next(v for k, v in before["views"] if k == b"user/marge")

    def as_an_older_version_left_it(txn: WriteTxn) -> None:
        txn.put("views", b"user/homer", stale)  # not what these rules fold
        txn.delete(views.FOLD_RULES_DB, views.FOLD_RULES_KEY)  # its rebuild empties the table

    kv: KV = LmdbKV(data_dir)
    kv.write(as_an_older_version_left_it)
    kv.close()
    with caplog.at_level("INFO", logger="node.replica"):
        Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS).close()
    assert dump(data_dir) == before
    assert "views folded again by this version's rules" in caplog.text

    kv = LmdbKV(data_dir)
    kv.write(lambda txn: txn.put("views", b"user/homer", stale))
    kv.close()
    Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS).close()  # folded by these rules
    assert dict(dump(data_dir)["views"])[b"user/homer"] == stale != homer


def test_an_empty_directory_is_refused_and_left_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rebuild_views(tmp_path) == 2
    assert list(tmp_path.iterdir()) == []
    assert "not a replica data directory" in capsys.readouterr().err
    assert rebuild_views(tmp_path / "missing") == 2
    assert not (tmp_path / "missing").exists()


def test_an_lmdb_environment_without_a_region_is_refused(tmp_path: Path) -> None:
    LmdbKV(tmp_path).close()  # every database is there, but no identity
    assert rebuild_views(tmp_path) == 2


def test_a_directory_a_running_node_holds_is_refused(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node = "import sys; from pathlib import Path; from node.lmdb_kv import LmdbKV\n"
    node += "kv = LmdbKV(Path(sys.argv[1])); print('ready', flush=True); sys.stdin.read()"
    with holding(data_dir, node):
        assert rebuild_views(data_dir) == 1
    assert "stop the node" in capsys.readouterr().err


def test_a_restored_directory_gets_a_new_incarnation_from_the_cli(data_dir: Path) -> None:
    """A data directory restored from a backup lacks its later commits, which peers may
    hold: `replica new-incarnation` gives it a new replica id, so that none of its next
    writes takes their dots. Its events stay; the old id is one more origin."""
    before = Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS)
    old_id, old_summary, seq = before.identity.replica_id, before.summary, before.state.seq
    before.close()
    replica = Path(sys.executable).with_name("replica")
    done = subprocess.run(
        [str(replica), "new-incarnation", "--data", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    after = Replica.open(data_dir, "eu", now_ms=lambda: NOW_MS)
    try:
        new_id = after.identity.replica_id
        assert f"{old_id} is now {new_id}" in done.stdout
        assert new_id.startswith("eu~")
        assert new_id != old_id
        assert (after.summary, after.state.seq) == (old_summary, seq)
        assert after.entity("user", "homer").value("name") == "Homer J. Simpson"
        written = asyncio.run(_patch(after))
        assert [e.dot for e in written] == [Dot(new_id, 1)]
    finally:
        after.close()
    assert renew_incarnation(data_dir / "missing") == 2


async def _patch(replica: Replica) -> list[Event]:
    replica.bind(asyncio.get_running_loop())
    return await replica.write(commands.patch("user", "homer", {"name": "H"}, None), actor="t")


def test_a_data_file_that_is_not_lmdb_is_refused_as_such(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    assert rebuild_views(tmp_path) == 2  # it raised lmdb.InvalidError: a traceback, exit 1
    assert renew_incarnation(tmp_path) == 2
    assert capsys.readouterr().err.count("cannot be read as an LMDB file") == 2


def test_a_replica_closes_once_however_often_it_is_closed(tmp_path: Path) -> None:
    replica = Replica(LmdbKV(tmp_path, metasync=False), "eu", boot=b"boot-1")
    replica.close()
    replica.close()  # the second closed the LMDB environment twice: lmdb.Error
