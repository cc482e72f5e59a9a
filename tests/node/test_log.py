"""The log's contract over both storage backends: idempotent append, state, and reads."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import Dot, VersionVector
from node import log
from node.events import Event, InvalidEvent, Op
from node.kv import KV, MemoryKV, WriteTxn
from node.lmdb_kv import LmdbKV
from node.log import LogState

STAMP = 1_700_000_000_000 << 16
EU, US, US_LONGER = "eu~aaaa", "us~bbbb", "us~bbbbb"


def event(origin: str, counter: int, stream: str = "user/homer", value: str = "x") -> Event:
    return Event(Dot(origin, counter), STAMP + counter, stream, Op.SET, "name", value)


def append_all(kv: KV, state: LogState, events: list[Event]) -> list[int | None]:
    def work(txn: WriteTxn) -> list[int | None]:
        return [log.append(txn, state, e) for e in events]

    return kv.write(work)


class LogContract:
    def make_kv(self, path: Path) -> KV:
        raise NotImplementedError

    @pytest.fixture
    def kv(self, tmp_path: Path) -> Iterator[KV]:
        kv = self.make_kv(tmp_path / "kv")
        yield kv
        kv.close()

    def test_append_is_idempotent_by_dot(self, kv: KV) -> None:
        state = LogState()
        first = event(US, 1)
        same_dot_other_value = event(US, 1, value="changed")
        assert append_all(kv, state, [first, first, same_dot_other_value]) == [1, None, None]
        assert append_all(kv, state, [first]) == [None]  # and in a later transaction
        with kv.read() as txn:
            assert [e for _, e in log.events_after(txn, 0, limit=10)] == [first]
            assert len(list(txn.scan("dots"))) == len(list(txn.scan("streams"))) == 1
        assert state.seq == 1
        assert state.summary == VersionVector.of([first.dot])
        assert state.hlc == 0  # the writer's clock sets it, never a stamp it did not follow

    # One property, run for each backend's subclass: the differing executors are meant.
    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.differing_executors]
    )
    @given(
        st.lists(st.tuples(st.sampled_from([EU, US, US_LONGER]), st.integers(1, 6)), max_size=20),
        st.integers(0, 20),
    )
    def test_appending_a_batch_is_appending_each_in_turn(
        self, dots: list[tuple[str, int]], split: int
    ) -> None:
        # The ingest path appends a peer's batch at once: the same seqs, tables and summary
        # as one event at a time, the dots already here or earlier in the batch passed over.
        events = [event(o, c, value=f"v{i}") for i, (o, c) in enumerate(dots)]
        before, batch = events[:split], events[split:]
        with tempfile.TemporaryDirectory() as one_dir, tempfile.TemporaryDirectory() as all_dir:
            one_kv, all_kv = self.make_kv(Path(one_dir)), self.make_kv(Path(all_dir))
            try:
                one_state, all_state = LogState(), LogState()
                append_all(one_kv, one_state, before)
                append_all(all_kv, all_state, before)
                seqs = append_all(one_kv, one_state, batch)
                appended = all_kv.write(lambda txn: log.append_all(txn, all_state, batch))
                expected = [(s, e) for s, e in zip(seqs, batch, strict=True) if s is not None]
                assert appended == expected
                assert (all_state.seq, all_state.summary) == (one_state.seq, one_state.summary)
                with one_kv.read() as one, all_kv.read() as every:
                    for table in ("events", "dots", "streams"):
                        assert list(every.scan(table)) == list(one.scan(table))
            finally:
                one_kv.close()
                all_kv.close()

    def test_an_invalid_event_is_not_appended(self, kv: KV) -> None:
        state = LogState()
        bad = Event(Dot(US, 1), 0, "user/homer", Op.CREATE)  # a zero clock stamp
        with pytest.raises(InvalidEvent):
            append_all(kv, state, [event(US, 2), bad])
        with kv.read() as txn:
            assert list(txn.scan("events")) == []

    def test_state_is_saved_and_loaded(self, kv: KV) -> None:
        identity = kv.write(lambda txn: log.open_identity(txn, "eu"))
        me = identity.replica_id
        with kv.read() as txn:
            assert log.load_state(txn, identity) == LogState(replica_id=me)
        state = LogState(replica_id=me)
        append_all(kv, state, [event(me, 1), event(US, 2), event(me, 2), event(US, 5)])
        state.counter, state.hlc = 2, STAMP + 6
        kv.write(lambda txn: log.save_state(txn, state))
        with kv.read() as txn:
            loaded = log.load_state(txn, identity)
        assert loaded == state
        assert (loaded.seq, loaded.counter, loaded.hlc) == (4, 2, STAMP + 6)
        assert loaded.summary.contiguous(US) == 0
        assert loaded.summary.highest(US) == 5

    def test_events_after_pages_in_local_order(self, kv: KV) -> None:
        arrived = [event(US, 3), event(EU, 1), event(US, 1), event(EU, 2), event(US, 2)]
        arrived += [event(EU, 3, "group/staff"), event(US_LONGER, 1)]
        append_all(kv, LogState(), arrived)
        pages: list[list[tuple[int, Event]]] = []
        after = 0
        with kv.read() as txn:
            while page := list(log.events_after(txn, after, limit=3)):
                pages.append(page)
                after = page[-1][0]
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [pair for page in pages for pair in page] == list(enumerate(arrived, start=1))
        with kv.read() as txn:
            assert list(log.events_after(txn, len(arrived), limit=3)) == []
            assert list(log.events_after(txn, 0, limit=0)) == []

    def test_stream_events_lists_one_stream_in_local_order(self, kv: KV) -> None:
        arrived = [
            event(US, 1, "user/homer"),
            event(EU, 1, "user/homer2"),  # a stream whose name extends another's
            event(EU, 2, "group/homer"),
            event(US, 2, "user/homer"),
            event(EU, 3, "user/hom"),
        ]
        append_all(kv, LogState(), arrived)
        with kv.read() as txn:
            assert list(log.stream_events(txn, "user/homer")) == [(1, arrived[0]), (4, arrived[3])]
            assert list(log.stream_events(txn, "user/hom")) == [(5, arrived[4])]
            assert list(log.stream_events(txn, "user/marge")) == []

    def test_origin_events_reads_counter_ranges_of_what_is_here(self, kv: KV) -> None:
        here = [event(US, c) for c in (7, 1, 2, 9, 4, 5)] + [event(US_LONGER, 3), event(EU, 3)]
        append_all(kv, LogState(), here)
        with kv.read() as txn:

            def counters(origin: str, first: int, last: int) -> list[int]:
                return [e.dot.counter for e in log.origin_events(txn, origin, first, last)]

            assert counters(US, 1, 100) == [1, 2, 4, 5, 7, 9]
            assert counters(US, 2, 7) == [2, 4, 5, 7]
            assert counters(US, 3, 3) == []
            assert counters(US, 10, 20) == []
            assert counters(US_LONGER, 1, 9) == [3]
            assert counters("ap~cccc", 1, 9) == []

    def test_read_event_of_a_missing_seq_is_a_key_error(self, kv: KV) -> None:
        with kv.read() as txn, pytest.raises(KeyError):
            log.read_event(txn, 1)

    def test_open_identity_creates_an_incarnation_once(self, kv: KV) -> None:
        first = kv.write(lambda txn: log.open_identity(txn, "eu"))
        assert first.region == "eu"
        assert re.fullmatch(r"eu~[0-9a-f]{8}", first.replica_id)
        assert kv.write(lambda txn: log.open_identity(txn, "eu")) == first
        with kv.read() as txn:
            assert txn.get("meta", b"replica_id") == first.replica_id.encode()
            assert txn.get("meta", b"schema_version") == log.u64(log.SCHEMA_VERSION)

    def test_another_region_is_refused_naming_both(self, kv: KV) -> None:
        kv.write(lambda txn: log.open_identity(txn, "eu"))
        with pytest.raises(log.WrongRegion, match=r"region 'eu', not 'us'"):
            kv.write(lambda txn: log.open_identity(txn, "us"))
        with kv.read() as txn:
            assert txn.get("meta", b"region") == b"eu"


class TestMemoryLog(LogContract):
    def make_kv(self, path: Path) -> KV:
        return MemoryKV()

    def test_a_renewal_is_a_new_incarnation_from_its_commit_on(self, kv: KV) -> None:
        identity = kv.write(lambda txn: log.open_identity(txn, "eu"))
        me = identity.replica_id
        state = LogState(replica_id=me)
        append_all(kv, state, [event(me, 1), event(me, 3)])  # 2: lost with an undone commit
        state.counter = 1

        def renew(txn: WriteTxn) -> str:
            old = log.renew(txn, state)
            log.save_state(txn, state)
            return old

        assert kv.write(renew) == me
        assert state.replica_id != me
        assert state.replica_id.startswith("eu~")
        assert state.counter == 0
        renewed = kv.write(lambda txn: log.open_identity(txn, "eu"))
        assert renewed == log.Identity("eu", state.replica_id)
        with kv.read() as txn:
            assert log.load_state(txn, renewed) == state
        assert state.summary.highest(me) == 3  # the old id's events stay, as any origin's

    @pytest.mark.parametrize(
        ("last", "boot", "renewed", "renews", "mark"),
        [
            (None, b"B", False, False, b"B"),  # stopped cleanly: no mark left
            (b"A", b"A", False, False, b"A"),  # died running (kill -9), the same boot
            (b"A", b"B", False, True, b"B"),  # died running, another boot: maybe undone
            (b"A", b"B", True, False, b"B"),  # a backup's new incarnation already
            (b"A", None, False, False, None),  # no boot id on this system
        ],
    )
    def test_a_run_that_died_is_renewed_after_a_reboot(
        self,
        kv: KV,
        last: bytes | None,
        boot: bytes | None,
        renewed: bool,
        renews: bool,
        mark: bytes | None,
    ) -> None:
        identity = kv.write(lambda txn: log.open_identity(txn, "eu"))
        if last is not None:
            kv.write(lambda txn: txn.put("meta", log.UNSYNCED_BOOT_KEY, last))
        serving = kv.write(
            lambda txn: log.renew_after_reboot(txn, identity, boot=boot, renewed=renewed)
        )
        assert (serving != identity) == renews
        assert serving.region == "eu"
        with kv.read() as txn:
            assert txn.get("meta", log.UNSYNCED_BOOT_KEY) == mark
            assert txn.get("meta", b"replica_id") == serving.replica_id.encode()


class TestLmdbLog(LogContract):
    def make_kv(self, path: Path) -> KV:
        return LmdbKV(path, map_bytes_initial=1 << 20)

    def test_identity_and_state_survive_reopening(self, tmp_path: Path) -> None:
        kv = LmdbKV(tmp_path, map_bytes_initial=1 << 20)
        identity = kv.write(lambda txn: log.open_identity(txn, "eu"))
        state = LogState(replica_id=identity.replica_id)
        append_all(kv, state, [event(identity.replica_id, 1)])
        state.counter = 1
        kv.write(lambda txn: log.save_state(txn, state))
        kv.close()
        kv = LmdbKV(tmp_path, map_bytes_initial=1 << 20)
        try:
            assert kv.write(lambda txn: log.open_identity(txn, "eu")) == identity
            with kv.read() as txn:
                assert log.load_state(txn, identity) == state
        finally:
            kv.close()
