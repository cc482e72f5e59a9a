"""One contract for the storage interface, run against the in-memory and the LMDB backend."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import lmdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.kv import KV, MemoryKV, ReadTxn, WriteTxn
from node.lmdb_kv import LmdbKV

# Keys built from few bytes, so prefixes are shared and 0x00 / 0xff edges come up often.
key_bytes = st.sampled_from([0x00, 0x61, 0x62, 0xFF])
keys = st.lists(key_bytes, min_size=1, max_size=4).map(bytes)
prefixes = st.lists(key_bytes, max_size=3).map(bytes)

EDGE_KEYS = [b"a", b"a\x00", b"a\x00b", b"ab", b"a\xff", b"a\xff\xff", b"a\xff\xff\x01", b"b"]
EDGE_KEYS += [b"\x00", b"\xff", b"\xff\xff"]


def expected_scan(
    stored: set[bytes], prefix: bytes, start: bytes | None, reverse: bool
) -> list[bytes]:
    """The model: keys with the prefix in order, from start; or all of them backwards."""
    chosen = sorted(k for k in stored if k.startswith(prefix))
    if reverse:
        return chosen[::-1]
    return [k for k in chosen if start is None or k >= start]


def put_all(kv: KV, db: str, stored: set[bytes]) -> None:
    def work(txn: WriteTxn) -> None:
        txn.clear(db)
        for key in stored:
            txn.put(db, key, key[::-1] + b"!")

    kv.write(work)


def scanned(
    txn: ReadTxn, db: str, prefix: bytes, start: bytes | None, reverse: bool
) -> list[bytes]:
    found = list(txn.scan(db, prefix=prefix, start=start, reverse=reverse))
    assert all(value == key[::-1] + b"!" for key, value in found)
    return [key for key, _ in found]


class Boom(Exception):
    pass


class KVContract:
    """Every backend must pass these; subclasses say how to make one."""

    def make_kv(self, path: Path) -> KV:
        raise NotImplementedError

    @pytest.fixture
    def kv(self, tmp_path: Path) -> Iterator[KV]:
        kv = self.make_kv(tmp_path / "kv")
        yield kv
        kv.close()

    def test_put_get_delete(self, kv: KV) -> None:
        with kv.read() as txn:
            assert txn.get("views", b"homer") is None
        kv.write(lambda txn: txn.put("views", b"homer", b"simpson"))
        with kv.read() as txn:
            assert txn.get("views", b"homer") == b"simpson"
            assert txn.get("members", b"homer") is None  # databases are apart
        kv.write(lambda txn: txn.put("views", b"homer", b"j. simpson"))
        with kv.read() as txn:
            assert txn.get("views", b"homer") == b"j. simpson"
        kv.write(lambda txn: txn.delete("views", b"homer"))
        kv.write(lambda txn: txn.delete("views", b"never-there"))  # deleting nothing is fine
        with kv.read() as txn:
            assert txn.get("views", b"homer") is None

    def test_a_single_get_reads_the_last_commit(self, kv: KV) -> None:
        assert kv.get("views", b"homer") is None
        kv.write(lambda txn: txn.put("views", b"homer", b"simpson"))
        assert kv.get("views", b"homer") == b"simpson"
        assert kv.get("members", b"homer") is None  # databases are apart
        kv.write(lambda txn: txn.put("views", b"homer", b"j. simpson"))
        assert kv.get("views", b"homer") == b"j. simpson"
        kv.write(lambda txn: txn.delete("views", b"homer"))
        assert kv.get("views", b"homer") is None

    def test_the_empty_key_is_in_no_table(self, kv: KV) -> None:
        kv.write(lambda txn: txn.put("views", b"\0", b"not empty"))
        with kv.read() as txn:
            assert txn.get("views", b"") is None
        assert kv.get("views", b"") is None
        assert kv.getter("views")(b"") is None
        assert kv.write(lambda txn: txn.get("views", b"")) is None

    def test_a_getter_made_once_reads_the_last_commit_of_its_table(self, kv: KV) -> None:
        views, members = kv.getter("views"), kv.getter("members")
        assert views(b"homer") is None
        kv.write(lambda txn: txn.put("views", b"homer", b"simpson"))
        assert (views(b"homer"), members(b"homer")) == (b"simpson", None)
        kv.write(lambda txn: txn.put("views", b"homer", b"j. simpson"))
        assert views(b"homer") == b"j. simpson"
        kv.write(lambda txn: txn.delete("views", b"homer"))
        assert views(b"homer") is None

    def test_write_returns_what_its_function_returns_and_sees_its_own_puts(self, kv: KV) -> None:
        def work(txn: WriteTxn) -> bytes | None:
            txn.put("meta", b"k", b"v")
            return txn.get("meta", b"k")

        assert kv.write(work) == b"v"

    @pytest.mark.parametrize("reverse", [False, True])
    @pytest.mark.parametrize("prefix", [b"", b"a", b"a\x00", b"a\xff", b"a\xff\xff", b"\xff", b"c"])
    def test_scan_on_an_empty_database_finds_nothing(
        self, kv: KV, prefix: bytes, reverse: bool
    ) -> None:
        with kv.read() as txn:
            assert list(txn.scan("views", prefix=prefix, reverse=reverse)) == []

    @pytest.mark.parametrize("reverse", [False, True])
    @pytest.mark.parametrize(
        ("prefix", "start"),
        [
            (b"", None),
            (b"a", None),
            (b"a", b"a\x00b"),
            (b"a", b"\x00"),  # a start before the prefix starts at the prefix
            (b"a", b"c"),  # a start after the prefix finds nothing
            (b"a\x00", None),
            (b"a\xff", None),
            (b"a\xff\xff", None),
            (b"\xff", None),
            (b"\xff\xff", b"\xff\xff"),
            (b"ab", None),
            (b"c", None),
        ],
    )
    def test_scan_with_prefix_start_and_reverse_on_shared_prefixes(
        self, kv: KV, prefix: bytes, start: bytes | None, reverse: bool
    ) -> None:
        stored = set(EDGE_KEYS)
        put_all(kv, "views", stored)
        with kv.read() as txn:
            got = scanned(txn, "views", prefix, start, reverse)
        assert got == expected_scan(stored, prefix, start, reverse)

    # The fixture outlives examples (each clears the table first); both backends run this
    # one method, which is the point of a contract, so hypothesis sees two executors.
    @settings(
        max_examples=100,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        stored=st.sets(keys, max_size=12),
        prefix=prefixes,
        start=st.none() | keys,
        reverse=st.booleans(),
    )
    def test_scan_agrees_with_the_model(
        self, kv: KV, stored: set[bytes], prefix: bytes, start: bytes | None, reverse: bool
    ) -> None:
        put_all(kv, "idx_search", stored)
        with kv.read() as txn:
            got = scanned(txn, "idx_search", prefix, start, reverse)
        assert got == expected_scan(stored, prefix, start, reverse)

    def test_reverse_scan_finds_keys_with_long_runs_of_0xff_after_the_prefix(self, kv: KV) -> None:
        # Found writing this contract: MemoryKV stopped at prefix + 64 * 0xff, LMDB did not.
        stored = {b"a" + b"\xff" * 64 + b"\x01", b"a" + b"\xff" * 100, b"a", b"b"}
        put_all(kv, "views", stored)
        with kv.read() as txn:
            got = scanned(txn, "views", b"a", None, True)
        assert got == expected_scan(stored, b"a", None, True)

    def test_a_read_opened_before_a_write_sees_its_snapshot(self, kv: KV) -> None:
        kv.write(lambda txn: txn.put("views", b"a", b"1"))
        with kv.read() as before:

            def work(txn: WriteTxn) -> None:
                txn.put("views", b"a", b"2")
                txn.put("views", b"b", b"2")

            kv.write(work)
            assert before.get("views", b"a") == b"1"
            assert before.get("views", b"b") is None
            assert list(before.scan("views")) == [(b"a", b"1")]
        with kv.read() as after:
            assert list(after.scan("views")) == [(b"a", b"2"), (b"b", b"2")]

    def test_a_write_whose_function_raises_leaves_nothing(self, kv: KV) -> None:
        kv.write(lambda txn: txn.put("views", b"kept", b"1"))

        def work(txn: WriteTxn) -> None:
            txn.put("views", b"new", b"1")
            txn.put("views", b"kept", b"changed")
            txn.delete("views", b"kept")
            txn.clear("views")
            txn.put("members", b"new", b"1")
            raise Boom

        with pytest.raises(Boom):
            kv.write(work)
        with kv.read() as txn:
            assert list(txn.scan("views")) == [(b"kept", b"1")]
            assert list(txn.scan("members")) == []

    def test_put_many_puts_each_pair_and_appends_above_every_key(self, kv: KV) -> None:
        kv.write(lambda txn: txn.put_many("views", [(b"b", b"1"), (b"a", b"2"), (b"b", b"3")]))
        kv.write(lambda txn: txn.put_many("events", [(b"\x01", b"x"), (b"\x02", b"y")]))
        kv.write(lambda txn: txn.put_many("events", iter([(b"\x03", b"z")]), append=True))
        kv.write(lambda txn: txn.put_many("events", [], append=True))
        with kv.read() as txn:
            assert list(txn.scan("views")) == [(b"a", b"2"), (b"b", b"3")]  # the last put wins
            assert list(txn.scan("events")) == [(b"\x01", b"x"), (b"\x02", b"y"), (b"\x03", b"z")]

    @pytest.mark.parametrize(
        "rows",
        [
            [(b"\x04", b"new"), (b"\x02", b"below the last")],
            [(b"\x03", b"the highest key again")],
            [(b"\x05", b"new"), (b"\x05", b"the same key twice")],
        ],
    )
    def test_an_append_out_of_order_is_refused_and_writes_nothing(
        self, kv: KV, rows: list[tuple[bytes, bytes]]
    ) -> None:
        kv.write(lambda txn: txn.put_many("events", [(b"\x01", b"a"), (b"\x03", b"c")]))

        def work(txn: WriteTxn) -> None:
            txn.put("views", b"other", b"table")
            txn.put_many("events", rows, append=True)

        with pytest.raises(ValueError, match="append"):
            kv.write(work)
        with kv.read() as txn:
            assert list(txn.scan("events")) == [(b"\x01", b"a"), (b"\x03", b"c")]
            assert list(txn.scan("views")) == []

    def test_clear_empties_one_database_only(self, kv: KV) -> None:
        def work(txn: WriteTxn) -> None:
            for key in EDGE_KEYS:
                txn.put("views", key, b"x")
            txn.put("members", b"a", b"y")

        kv.write(work)
        kv.write(lambda txn: txn.clear("views"))
        with kv.read() as txn:
            assert list(txn.scan("views")) == []
            assert list(txn.scan("members")) == [(b"a", b"y")]
        kv.write(lambda txn: txn.put("views", b"again", b"z"))  # still usable after clear
        with kv.read() as txn:
            assert list(txn.scan("views")) == [(b"again", b"z")]


class TestMemoryKV(KVContract):
    def make_kv(self, path: Path) -> KV:
        return MemoryKV()


class TestLmdbKV(KVContract):
    def make_kv(self, path: Path) -> KV:
        return LmdbKV(path, map_bytes_initial=1 << 20)

    def test_the_map_grows_on_demand_within_one_write(self, tmp_path: Path) -> None:
        kv = LmdbKV(tmp_path, map_bytes_initial=64 * 1024)
        value = bytes(range(256)) * 40  # 10 KiB: 300 of them are about 3 MB
        try:

            def work(txn: WriteTxn) -> int:
                for n in range(300):
                    txn.put("events", n.to_bytes(8, "big"), value)
                return n

            assert kv.write(work) == 299
            assert kv.map_bytes > 3_000_000
            with kv.read() as txn:
                stored = list(txn.scan("events"))
            assert [k for k, _ in stored] == [n.to_bytes(8, "big") for n in range(300)]
            assert all(v == value for _, v in stored)
        finally:
            kv.close()

    def test_a_file_that_fills_its_map_opens_and_gains_the_tables_it_lacks(
        self, tmp_path: Path
    ) -> None:
        """A directory of an older version, without some of today's tables, whose file is
        larger than the map asked for: LMDB maps exactly the file, and creating the tables
        must grow it."""
        env = lmdb.open(str(tmp_path), map_size=1 << 22, max_dbs=2)
        views = env.open_db(b"views")
        with env.begin(write=True) as txn:
            for n in range(600):
                txn.put(b"%06d" % n, b"v" * 4000, db=views)  # a page or more each
        env.close()
        kv = LmdbKV(tmp_path, map_bytes_initial=1 << 16)
        try:
            assert kv.get("views", b"000599") == b"v" * 4000
            kv.write(lambda txn: txn.put("unique_email", b"homer@x.us", b"homer"))
            assert kv.get("unique_email", b"homer@x.us") == b"homer"
        finally:
            kv.close()

    def test_reads_on_another_thread_go_on_while_the_map_grows(self, tmp_path: Path) -> None:
        """Growing the map closes every open transaction of the environment: a node's
        reads (its event loop) must neither fail nor see a closed one while its writer
        grows the map."""
        kv = LmdbKV(tmp_path, map_bytes_initial=1 << 16, durable=False)
        kv.write(lambda txn: txn.put("views", b"homer", b"simpson"))
        get = kv.getter("views")
        failures: list[BaseException] = []
        reads = 0

        def fill(txn: WriteTxn) -> None:
            for _ in range(40):
                txn.put("events", os.urandom(16), b"x" * 2_000)

        def grow() -> None:
            try:
                while kv.map_bytes < 1 << 24:
                    kv.write(fill)
            except BaseException as e:  # the test fails on it below
                failures.append(e)

        writer = threading.Thread(target=grow)
        writer.start()
        try:
            while writer.is_alive():
                try:
                    assert get(b"homer") == b"simpson"
                    assert kv.get("views", b"homer") == b"simpson"
                    with kv.read() as txn:
                        assert txn.get("views", b"homer") == b"simpson"
                        assert [k for k, _ in txn.scan("views")] == [b"homer"]
                except BaseException as e:
                    failures.append(e)
                reads += 1
        finally:
            writer.join()
            kv.close()
        assert failures == []
        assert reads > 100

    def test_data_survives_close_and_reopen(self, tmp_path: Path) -> None:
        kv = LmdbKV(tmp_path, map_bytes_initial=1 << 20)
        kv.write(lambda txn: txn.put("meta", b"region", b"eu"))
        kv.close()
        reopened = LmdbKV(tmp_path, map_bytes_initial=1 << 20)
        try:
            with reopened.read() as txn:
                assert txn.get("meta", b"region") == b"eu"
        finally:
            reopened.close()
