"""The group-commit writer, through a Replica over both storage backends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from crdt import Dot
from crdt.clock import make_stamp
from node import commands, log
from node import writer as writer_module
from node.events import Event, InvalidEvent, Op
from node.kv import KV, MemoryKV, ReadTxn, StorageFailed
from node.lmdb_kv import LmdbKV
from node.rebuild import replay_views
from node.replica import Replica
from node.tokens import etag_of
from node.writer import Draft, Rejected

NOW_MS = 1_700_000_000_000
PEER = "us~bbbb"
GATE_WAIT_S = 10


def homer(n: int) -> dict[str, str | None]:
    return {"name": f"Homer {n}", "username": f"homer{n}", "email": f"homer{n}@x.us"}


def peer_event(counter: int, *, hlc: int | None = None, stream: str = "user/bart") -> Event:
    stamp = make_stamp(NOW_MS, counter) if hlc is None else hlc
    if counter == 1:
        return Event(Dot(PEER, 1), stamp, stream, Op.CREATE)
    return Event(Dot(PEER, counter), stamp, stream, Op.SET, "name", f"Bart {counter}")


async def in_one_batch(replica: Replica, writes: Sequence[Awaitable[Any]]) -> list[Any]:
    """Run ``writes`` concurrently while a gate request holds the writer, so they queue up.

    Every write task reaches the queue in the loop iteration after it is created; only
    then does the gate open, so the writer finds them all waiting (group commit).
    """
    gate = threading.Event()

    def held(txn: ReadTxn) -> list[Draft]:
        assert gate.wait(GATE_WAIT_S)
        return []

    holder = asyncio.ensure_future(replica.write(held, actor="gate"))
    tasks = [asyncio.ensure_future(w) for w in writes]
    await asyncio.sleep(0)
    gate.set()
    await holder
    return await asyncio.gather(*tasks, return_exceptions=True)


def own_counters(replica: Replica) -> list[int]:
    with replica.kv.read() as txn:
        me = replica.identity.replica_id
        return [e.dot.counter for e in log.origin_events(txn, me, 1, 1 << 62)]


def event_count(replica: Replica) -> int:
    with replica.kv.read() as txn:
        return len(list(txn.scan("events")))


def refuse(txn: ReadTxn) -> list[Draft]:
    raise Rejected(412, "precondition_failed", "no")


class WriterContract:
    def make_kv(self, path: Path) -> KV:
        raise NotImplementedError

    @pytest.fixture
    def replica(self, tmp_path: Path) -> Iterator[Replica]:
        replica = Replica(self.make_kv(tmp_path / "kv"), "eu", now_ms=lambda: NOW_MS)
        yield replica
        replica.close()

    def test_concurrent_writes_share_commits_and_are_all_acknowledged(
        self, replica: Replica
    ) -> None:
        requests = 200
        writes = [
            replica.write(commands.create("user", f"u{n}", homer(n)), actor="t")
            for n in range(requests)
        ]
        results = asyncio.run(in_one_batch(replica, writes))
        assert all(isinstance(r, list) and len(r) == 4 for r in results)  # create + 3 sets
        assert replica.writer.requests == requests + 1  # and the gate
        assert replica.writer.commits < replica.writer.requests
        assert replica.writer.commits <= 2  # the gate may go alone; the rest wait together
        assert event_count(replica) == 4 * requests
        assert replica.state.counter == 4 * requests

    def test_own_counters_have_no_gaps_when_requests_are_rejected(self, replica: Replica) -> None:
        writes = []
        for n in range(30):
            writes.append(replica.write(commands.create("user", f"u{n % 10}", homer(n)), actor="t"))
            if n % 4 == 0:
                writes.append(replica.write(refuse, actor="t"))
        results = asyncio.run(in_one_batch(replica, writes))
        rejected = [r for r in results if isinstance(r, Rejected)]
        assert len(rejected) == 20 + 8  # 20 creates of an id already there, and the refusals
        written = sum(len(r) for r in results if isinstance(r, list))
        assert written == 10 * 4
        # own dots are exactly 1..N, and the stored state says N without a gap
        assert own_counters(replica) == list(range(1, written + 1))
        assert replica.state.counter == replica.state.summary.contiguous(
            replica.identity.replica_id
        )
        with replica.kv.read() as txn:
            assert log.load_state(txn, replica.identity) == replica.state

    def test_a_rejected_request_writes_nothing(self, replica: Replica) -> None:
        asyncio.run(replica.write(commands.create("user", "homer", homer(1)), actor="t"))
        before = (event_count(replica), replica.state.copy())
        with pytest.raises(Rejected) as raised:
            asyncio.run(replica.write(commands.create("user", "homer", homer(1)), actor="t"))
        assert raised.value.status == 409
        with pytest.raises(Rejected, match="taken in this region"):
            asyncio.run(replica.write(commands.create("user", "marge", homer(1)), actor="t"))
        with pytest.raises(Rejected):
            asyncio.run(
                replica.write(commands.patch("user", "nobody", {"name": "x"}, None), actor="t")
            )
        assert (event_count(replica), replica.state) == before
        assert not replica.entity("user", "marge").exists

    def test_ingest_is_idempotent(self, replica: Replica) -> None:
        batch = [peer_event(1), peer_event(2), peer_event(3)]
        assert asyncio.run(replica.ingest(batch)) == batch
        assert asyncio.run(replica.ingest(batch)) == []
        assert asyncio.run(replica.ingest([peer_event(4), *batch])) == [peer_event(4)]
        assert event_count(replica) == 4
        assert replica.entity("user", "bart").value("name") == "Bart 4"
        assert replica.state.counter == 0  # a peer's events are not ours

    def test_a_batch_with_one_invalid_event_is_refused_whole(self, replica: Replica) -> None:
        invalid = Event(Dot(PEER, 2), make_stamp(NOW_MS), "user/bart", Op.SET, None, "x")
        with pytest.raises(InvalidEvent):
            asyncio.run(replica.ingest([peer_event(1), invalid, peer_event(3)]))
        assert event_count(replica) == 0
        assert PEER not in replica.summary.origins
        assert not replica.entity("user", "bart").exists

    def test_the_clock_advances_past_ingested_stamps(self, replica: Replica) -> None:
        ahead = make_stamp(NOW_MS + 5_000, 3)  # within the allowed drift
        asyncio.run(replica.ingest([peer_event(1, hlc=ahead)]))
        assert replica.clock.last > ahead
        assert replica.state.hlc >= ahead
        written = asyncio.run(
            replica.write(commands.create("group", "g", {"name": "G"}), actor="t")
        )
        assert all(e.hlc > ahead for e in written)

    def test_a_stamp_beyond_the_drift_is_ingested_but_not_followed(self, replica: Replica) -> None:
        far = make_stamp(NOW_MS + 3_600_000)
        assert asyncio.run(replica.ingest([peer_event(1, hlc=far)])) == [peer_event(1, hlc=far)]
        assert replica.clock.last < far
        assert replica.metrics.stamps_drifted == 1

    def test_each_decision_of_a_commit_sees_the_writes_before_it(self, replica: Replica) -> None:
        """Decisions read the entity states folded earlier in the same commit (not stored
        until its end), and an index read sees them stored; the views come out as a
        rebuild makes them."""
        asyncio.run(replica.write(commands.create("user", "homer", homer(1)), actor="t"))
        etag = etag_of(replica.entity("user", "homer").etag)
        moved = {"email": "homer@springfield.us"}
        writes = [
            replica.write(commands.patch("user", "homer", {"name": "H2"}, etag), actor="t"),
            replica.write(commands.patch("user", "homer", {"name": "H3"}, etag), actor="t"),
            replica.write(commands.patch("user", "homer", {"name": "H4"}, None), actor="t"),
            replica.write(commands.patch("user", "homer", moved, None), actor="t"),
            replica.write(commands.create("user", "marge", moved), actor="t"),
            replica.write(commands.create("user", "lisa", {"email": "homer1@x.us"}), actor="t"),
            replica.write(commands.create("user", "lisa", {}), actor="t"),
            replica.write(commands.delete("user", "lisa", None), actor="t"),
            replica.write(commands.patch("user", "lisa", {"name": "L"}, None), actor="t"),
        ]
        results = asyncio.run(in_one_batch(replica, writes))
        assert replica.writer.commits <= 3  # the create, the gate (maybe alone), then the rest
        statuses = [r.status if isinstance(r, Rejected) else len(r) for r in results]
        # the second If-Match saw the first patch's etag; marge the email homer took just
        # before; lisa the email homer left; a second create the first; the patch the delete
        assert statuses == [1, 412, 1, 1, 409, 2, 409, 1, 404]
        homer_now = replica.entity("user", "homer")
        assert (homer_now.value("name"), homer_now.value("email")) == ("H4", moved["email"])
        assert replica.look_up_views("email", "homer1@x.us") == []  # lisa's, then deleted
        before = (replica.digest(), replica.fingerprints())
        with replica.kv.read() as txn:
            stored = dict(txn.scan("views"))
        assert replica.kv.write(replay_views) == event_count(replica)
        with replica.kv.read() as txn:
            assert dict(txn.scan("views")) == stored
        assert (replica.digest(), replica.fingerprints()) == before

    def test_an_exception_in_one_request_does_not_fail_its_batch(self, replica: Replica) -> None:
        def broken(txn: ReadTxn) -> list[Draft]:
            raise RuntimeError("a bug in one decide")

        writes = [
            replica.write(commands.create("user", f"u{n}", homer(n)), actor="t") for n in range(5)
        ]
        writes.insert(2, replica.write(broken, actor="t"))
        writes.append(replica.ingest([peer_event(1)]))
        results = asyncio.run(in_one_batch(replica, writes))
        assert isinstance(results[2], RuntimeError)
        del results[2]
        assert all(isinstance(r, list) and r for r in results)
        assert own_counters(replica) == list(range(1, 5 * 4 + 1))
        assert event_count(replica) == 5 * 4 + 1


class TestMemoryWriter(WriterContract):
    def make_kv(self, path: Path) -> KV:
        return MemoryKV()


class TestLmdbWriter(WriterContract):
    def make_kv(self, path: Path) -> KV:
        return LmdbKV(path, map_bytes_initial=1 << 20)

    def test_counters_continue_after_reopening(self, tmp_path: Path) -> None:
        replica = Replica(LmdbKV(tmp_path), "eu", now_ms=lambda: NOW_MS)
        asyncio.run(replica.write(commands.create("user", "homer", homer(1)), actor="t"))
        identity, last = replica.identity, replica.clock.last
        replica.close()
        replica = Replica(LmdbKV(tmp_path), "eu", now_ms=lambda: NOW_MS)
        try:
            assert replica.identity == identity
            [event] = asyncio.run(replica.write(commands.delete("user", "homer", None), actor="t"))
            assert event.dot == Dot(identity.replica_id, 5)
            assert event.hlc > last  # the clock resumes past what it stamped
        finally:
            replica.close()

    def test_a_drifted_stamp_does_not_drag_the_clock_after_a_restart(self, tmp_path: Path) -> None:
        # Found writing these tests: log.append saved the far stamp as the state's hlc,
        # and the clock restarted from it, following it after all.
        replica = Replica(LmdbKV(tmp_path), "eu", now_ms=lambda: NOW_MS)
        far = make_stamp(NOW_MS + 3_600_000)
        asyncio.run(replica.ingest([peer_event(1, hlc=far)]))
        replica.close()
        replica = Replica(LmdbKV(tmp_path), "eu", now_ms=lambda: NOW_MS)
        try:
            assert replica.clock.last < far
            [event] = asyncio.run(replica.write(commands.delete("user", "bart", None), actor="t"))
            assert event.hlc < far
        finally:
            replica.close()


def test_a_full_write_queue_refuses_at_once_and_writes_nothing_of_it() -> None:
    """The queue holds ``queue_requests_max`` requests; one more is refused (503 over
    HTTP) without waiting, and those queued before it are all committed."""
    from node.kv import MemoryKV
    from node.writer import Overloaded

    async def body() -> None:
        replica = Replica(MemoryKV(), "eu", queue_requests_max=3)
        taken, gate = threading.Event(), threading.Event()

        def held(txn: ReadTxn) -> list[Draft]:
            taken.set()
            assert gate.wait(GATE_WAIT_S)
            return []

        try:
            holder = asyncio.ensure_future(replica.write(held, actor="gate"))
            assert await asyncio.to_thread(taken.wait, GATE_WAIT_S)  # the writer holds it
            queued = [
                asyncio.ensure_future(
                    replica.write(commands.create("user", f"u{n}", homer(n)), actor="t")
                )
                for n in range(3)
            ]
            await asyncio.sleep(0)
            assert replica.writer.queued == 3
            with pytest.raises(Overloaded):
                await replica.write(commands.create("user", "late", homer(9)), actor="t")
            gate.set()
            await holder
            assert all(len(events) == 4 for events in await asyncio.gather(*queued))
            assert replica.entity_ids("user", after="", limit=10) == (["u0", "u1", "u2"], None)
            assert event_count(replica) == 12
        finally:
            gate.set()
            replica.close()

    asyncio.run(body())


def test_a_commit_whose_publishing_fails_still_answers_and_the_writer_goes_on() -> None:
    """What runs after a commit (the replica's state, waiters, peers' pushes) failing
    used to end the writer thread: the batch's requests, and every write after, would
    wait for good. The commit is durable: its requests are answered, and writes go on."""
    from node.kv import MemoryKV

    async def body() -> None:
        replica = Replica(MemoryKV(), "eu")
        published = replica.writer.on_commit
        failures = [RuntimeError("a listener failed")]

        def failing_once(committed: Any) -> None:
            if failures:
                raise failures.pop()
            published(committed)

        replica.writer.on_commit = failing_once
        try:
            first = await asyncio.wait_for(
                replica.write(commands.create("user", "u0", homer(0)), actor="t"), GATE_WAIT_S
            )
            assert len(first) == 4
            second = await asyncio.wait_for(
                replica.write(commands.create("user", "u1", homer(1)), actor="t"), GATE_WAIT_S
            )
            assert len(second) == 4
            assert event_count(replica) == 8
        finally:
            replica.close()

    asyncio.run(body())


def test_an_inline_writer_commits_in_the_callers_thread_with_contiguous_dots() -> None:
    """Simulations run the writer without its thread; it must behave the same."""
    import threading

    from node import commands
    from node.kv import MemoryKV
    from node.replica import Replica
    from node.writer import Rejected

    async def body() -> None:
        replica = Replica(MemoryKV(), "eu", threaded_writer=False)
        replica.bind(asyncio.get_running_loop())
        seen_threads: set[int] = set()
        replica.listeners.append(lambda _: seen_threads.add(threading.get_ident()))
        try:
            await replica.write(commands.create("group", "g", {"name": "G"}), actor="t")
            with pytest.raises(Rejected, match="already exists"):
                await replica.write(commands.create("group", "g", {"name": "G"}), actor="t")
            await replica.write(commands.patch("group", "g", {"name": "H"}, None), actor="t")
            assert replica.writer.commits == 3
            assert seen_threads == {threading.get_ident()}
            assert replica.state.counter == 3  # create + name, then name: no gap
            assert replica.summary.contiguous(replica.identity.replica_id) == 3
        finally:
            replica.close()

    asyncio.run(body())


class RefusingKV(MemoryKV):
    """A store whose commits the storage refuses while ``refusing`` says so (a full disk,
    or ``fatal``: one LMDB gave up on): the writer's side of what the e2e tests make a
    real node meet (tests/e2e/test_storage_refused.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing: StorageFailed | None = None

    def write(self, work: Any) -> Any:
        if self.refusing is not None:
            raise self.refusing
        return super().write(work)


def test_a_refused_commit_refuses_its_requests_each_once_and_the_state_outlives_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch the storage refuses is refused whole, not retried request by request; the
    failing state stays through a commit that goes through until the refusals are quiet
    for a while (on a full disk the two alternate); a fatal refusal stops the node."""

    async def body() -> None:
        kv = RefusingKV()
        replica = Replica(kv, "eu")
        replica.bind(asyncio.get_running_loop())
        writer = replica.writer
        try:
            kv.refusing = StorageFailed("mdb_txn_commit: No space left on device", full=True)
            writes = [
                replica.write(commands.create("user", f"u{n}", homer(n)), actor="t")
                for n in range(3)
            ]
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
            assert all(outcome is kv.refusing for outcome in outcomes)
            failing = writer.storage_failing()
            assert failing is not None
            assert failing.full
            assert failing.requests == 3
            assert writer.storage_failures == failing.commits  # not 1 + one a request
            assert not replica.entity_ids("user", after="", limit=10)[0]

            kv.refusing = None
            await replica.write(commands.create("user", "ok", homer(1)), actor="t")
            assert writer.storage_failing() is failing  # a refusal a moment ago
            monkeypatch.setattr(writer_module, "STORAGE_FAILING_QUIET_S", 0.0)
            assert writer.storage_failing() is None

            # An idle node: no write comes, a probe tries the storage (server housekeeping).
            kv.refusing = StorageFailed("mdb_txn_commit: No space left on device", full=True)
            with pytest.raises(StorageFailed):
                await writer.probe_storage()
            assert writer.storage_quiet()
            kv.refusing = None
            await writer.probe_storage()
            assert not writer.storage_quiet()
            assert writer.storage_failing() is None

            kv.refusing = StorageFailed("mdb_txn_begin: MDB_PANIC", full=False, fatal=True)
            with pytest.raises(StorageFailed):
                await replica.write(commands.create("user", "late", homer(2)), actor="t")
            assert writer.fatal is kv.refusing
            await asyncio.wait_for(replica.storage_gave_up.wait(), GATE_WAIT_S)
        finally:
            kv.refusing = None
            replica.close()

    asyncio.run(body())


def test_a_commit_whose_loop_closed_meanwhile_stands_and_the_writer_drains_the_rest() -> None:
    """A node stopped right after it started: its loop closed while a write was still
    queued (a task cancelled at the stop). Answering it raised ``RuntimeError: Event loop
    is closed`` in the writer thread, which died with a traceback in the node's log after
    its "stopped" line, leaving the requests after it uncommitted. The commit stands, no
    one is left to answer, and the writer drains what follows."""
    replica = Replica(MemoryKV(), "eu")
    taken, gate = threading.Event(), threading.Event()
    died: list[BaseException | None] = []
    hook = threading.excepthook

    def held(txn: ReadTxn) -> list[Draft]:
        taken.set()
        assert gate.wait(GATE_WAIT_S)
        return []

    async def body() -> None:
        waiting = [asyncio.ensure_future(replica.write(held, actor="gate"))]
        assert await asyncio.to_thread(taken.wait, GATE_WAIT_S)  # the writer holds it
        waiting += [
            asyncio.ensure_future(
                replica.write(commands.create("user", f"u{n}", homer(n)), actor="t")
            )
            for n in range(2)
        ]
        await asyncio.sleep(0)
        assert replica.writer.queued == 2

    threading.excepthook = lambda args: died.append(args.exc_value)
    try:
        asyncio.run(body())  # cancels the waiting tasks and closes the loop
        gate.set()
        replica.writer.stop()
    finally:
        threading.excepthook = hook
        gate.set()
        assert died == []
        assert replica.entity_ids("user", after="", limit=10) == (["u0", "u1"], None)
        replica.close()


@pytest.mark.parametrize("previous_format", [False, True])
def test_field_writes_name_their_creates_unless_the_previous_format_is_asked_for(
    previous_format: bool,
) -> None:
    """A create's own writes name it, a PATCH's the creates live where it is written
    (event format 2). During a rolling upgrade (``previous_format``) a node writes what
    the version before reads: no create named, every event in format 1, which an old
    node applies instead of keeping aside (it showed a new user there with no field)."""
    import msgpack

    from node.events import encode

    async def body() -> None:
        replica = Replica(MemoryKV(), "eu", previous_format=previous_format)
        try:
            created = await replica.write(commands.create("user", "u0", homer(0)), actor="t")
            patched = await replica.write(
                commands.patch("user", "u0", {"name": "Homer J"}, None), actor="t"
            )
        finally:
            replica.close()
        create, *sets = created
        written = [*sets, *patched]
        if previous_format:
            assert all(not e.lives for e in written)
        else:
            assert all(e.lives == frozenset({create.dot}) for e in written)
        formats = {msgpack.unpackb(encode(e))[0] for e in [create, *written]}
        assert formats == ({1} if previous_format else {1, 2})

    asyncio.run(body())
