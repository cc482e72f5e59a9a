"""Views folded from events: order-independent, rebuildable, and equal to a tiny model.

Histories are generated so that they are reachable: three origins write only what
their own knowledge allows (as the commands would), observe only dots they have
received, and learn from each other by random delivery (all of a peer's knowledge,
or one event of it, out of causal order). The model below is written from the
semantics in ARCHITECTURE.md with plain sets of dots, not with the CRDT types.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import Dot, HybridLogicalClock
from node import log, views
from node.events import Event, Op
from node.kv import MemoryKV, ReadTxn, WriteTxn
from node.log import LogState
from node.rebuild import replay_views

ORIGINS = ("eu~aaaa", "us~bbbb", "ap~cccc")
USERS = ("homer", "marge", "bart")
GROUPS = ("staff", "band")
STREAMS = tuple(f"user/{u}" for u in USERS) + tuple(f"group/{g}" for g in GROUPS)
# Few values, so that concurrent writers collide, also when only case differs.
USER_VALUES: dict[str, tuple[str | None, ...]] = {
    "name": ("Homer Simpson", "marge", "HOMER j"),
    "username": ("homer", "Homer", "marge"),
    "email": ("homer@x.us", "HOMER@x.us", "marge@x.us"),
    "profile.city": ("Springfield", None),
}
GROUP_VALUES: dict[str, tuple[str | None, ...]] = {"name": ("Staff", "Band")}
VIEW_DBS = (
    "views",
    "members",
    "user_groups",
    "unique_email",
    "unique_username",
    "idx_search",
    "conflicts",
)
START_MS = 1_700_000_000_000
VIEW_EXAMPLES = 500  # histories are cheap to fold; rare interleavings need many
T = TypeVar("T")

# -- the model: plain sets of dots ------------------------------------------------

Known = Mapping[Dot, Event]


def of(known: Known, stream: str, *ops: Op) -> list[Event]:
    return [e for e in known.values() if e.stream == stream and e.op in ops]


def live_creates(known: Known, stream: str) -> set[Dot]:
    """Existence is add-wins: the creates no delete observed."""
    deleted = {d for e in of(known, stream, Op.DELETE) for d in e.observed}
    return {e.dot for e in of(known, stream, Op.CREATE)} - deleted


def exists(known: Known, stream: str) -> bool:
    return bool(live_creates(known, stream))


def shows(known: Known, stream: str, write: Event) -> bool:
    """A write naming the creates it was written under shows if it names the greatest
    live one (of an id created in two regions at once, the later's life shows); one
    naming none (format 1) if it is ordered after that create."""
    alive = live_creates(known, stream)
    live = [e for e in of(known, stream, Op.CREATE) if e.dot in alive]
    if not live:  # an entity that does not exist is not served; its state keeps these
        return not write.lives
    top = max(live, key=key)
    return top.dot in write.lives if write.lives else key(write) > key(top)


def key(e: Event) -> tuple[int, str, int]:
    return (e.hlc, e.dot.origin, e.dot.counter)


def winner(known: Known, stream: str, name: str) -> Event | None:
    """The greatest (hlc, origin, counter) of the writes that show."""
    writes = [e for e in of(known, stream, Op.SET) if e.field == name]
    return max((e for e in writes if shows(known, stream, e)), key=key, default=None)


def live_adds(known: Known, group: str, user: str) -> set[Dot]:
    """Members are add-wins: the adds of ``user`` no remove of ``user`` observed."""
    stream = f"group/{group}"
    of_user = [e for e in of(known, stream, Op.ADD, Op.REMOVE) if e.value == user]
    removed = {d for e in of_user if e.op is Op.REMOVE for d in e.observed}
    return {e.dot for e in of_user if e.op is Op.ADD} - removed


def holders(known: Known, name: str) -> dict[str, list[str]]:
    """Casefolded value of a unique field -> the existing users holding it."""
    held: dict[str, list[str]] = {}
    for user in USERS:
        w = winner(known, f"user/{user}", name)
        if exists(known, f"user/{user}") and w is not None and w.value:
            held.setdefault(w.value.casefold(), []).append(user)
    return held


# -- reachable histories -----------------------------------------------------------


@dataclass
class Origin:
    """One replica's knowledge, and the writes the commands would let it make."""

    replica_id: str
    now_ms: list[int] = field(default_factory=lambda: [START_MS])
    counter: int = 0
    known: dict[Dot, Event] = field(default_factory=dict)
    # user delete -> the member add dots it removed (the memberships it saw)
    unjoined: list[tuple[str, str, frozenset[Dot]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = HybridLogicalClock(lambda: self.now_ms[0])

    def receive(self, event: Event) -> None:
        if event.dot not in self.known:
            self.clock.observe(event.hlc)
            self.known[event.dot] = event

    def _write(
        self,
        stream: str,
        op: Op,
        name: str | None = None,
        value: str | None = None,
        observed: Iterable[Dot] = (),
        lives: frozenset[Dot] = frozenset(),
    ) -> Event:
        self.counter += 1
        dot = Dot(self.replica_id, self.counter)
        stamp = self.clock.tick()
        event = Event(dot, stamp, stream, op, name, value, frozenset(observed), lives=lives)
        self.known[dot] = event
        return event

    def create(self, stream: str) -> list[Event]:
        if exists(self.known, stream):
            return []
        return [self._write(stream, Op.CREATE)]

    def set(self, stream: str, name: str, value: str | None, *, bound: bool = True) -> list[Event]:
        """A field write, under the creates live here (``bound``) or, as a node of the
        version before wrote it, under none."""
        if not exists(self.known, stream):
            return []
        w = winner(self.known, stream, name)
        lives = frozenset(live_creates(self.known, stream)) if bound else frozenset()
        observed = [] if w is None else [w.dot]
        return [self._write(stream, Op.SET, name, value, observed, lives)]

    def delete(self, stream: str) -> list[Event]:
        if not exists(self.known, stream):
            return []
        written = [self._write(stream, Op.DELETE, observed=live_creates(self.known, stream))]
        kind, _, user = stream.partition("/")
        if kind == "user":  # and the memberships seen, in groups seen to exist
            for group in GROUPS:
                dots = live_adds(self.known, group, user)
                if dots and exists(self.known, f"group/{group}"):
                    written.append(self._write(f"group/{group}", Op.REMOVE, "members", user, dots))
                    self.unjoined.append((group, user, frozenset(dots)))
        return written

    def add(self, group: str, user: str) -> list[Event]:
        if not exists(self.known, f"group/{group}") or not exists(self.known, f"user/{user}"):
            return []
        if live_adds(self.known, group, user):
            return []
        return [self._write(f"group/{group}", Op.ADD, "members", user)]

    def remove(self, group: str, user: str) -> list[Event]:
        dots = live_adds(self.known, group, user)
        if not exists(self.known, f"group/{group}") or not dots:
            return []
        return [self._write(f"group/{group}", Op.REMOVE, "members", user, dots)]


Step = tuple[str, int, int, int]
WRITES = ("create", "set", "set", "set", "delete", "add", "add", "remove", "remove")
KINDS = [*WRITES, "deliver", "deliver", "deliver_one", "tick"]
steps = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, len(ORIGINS) - 1),
    st.integers(0, len(ORIGINS) - 1),
    st.integers(0, 999),
)
histories = st.lists(steps, min_size=8, max_size=60)


@dataclass
class History:
    origins: list[Origin]
    events: list[Event]  # every event written, each once, in the order written

    @property
    def known(self) -> dict[Dot, Event]:
        return {e.dot: e for e in self.events}


def pick(options: list[T], k: int) -> T | None:
    return options[k % len(options)] if options else None


def replay(history: list[Step]) -> History:
    """Run the steps; each write picks, by ``k``, among the targets the commands allow."""
    origins = [Origin(r) for r in ORIGINS]
    written: list[Event] = []
    for kind, i, j, k in history:
        me, peer = origins[i], origins[j]
        alive = [s for s in STREAMS if exists(me.known, s)]
        absent = [s for s in STREAMS if s not in alive]
        pairs = [
            (g, u) for g in GROUPS for u in USERS if f"group/{g}" in alive and f"user/{u}" in alive
        ]
        wrote = len(written)
        if kind == "set" and (stream := pick(alive, k)):
            values = USER_VALUES if stream.startswith("user/") else GROUP_VALUES
            name = sorted(values)[(k // 7) % len(values)]
            value = values[name][(k // 31) % len(values[name])]
            written += me.set(stream, name, value, bound=k % 5 != 0)
        elif kind == "delete" and (stream := pick(alive, k)):
            written += me.delete(stream)
        elif kind == "add" and (pair := pick(pairs, k)):
            written += me.add(*pair)
        elif kind == "remove" and (pair := pick(pairs, k)):
            written += me.remove(*pair)
        elif kind == "deliver":
            for event in list(peer.known.values()):
                me.receive(event)
        elif kind == "deliver_one" and peer.known:
            me.receive(list(peer.known.values())[k % len(peer.known)])
        elif kind == "tick":
            me.now_ms[0] += k % 3  # clocks advance unevenly, sometimes not at all
        # a write with nothing to write on creates something instead
        if kind in WRITES and len(written) == wrote and (stream := pick(absent, k)):
            written += me.create(stream)
    return History(origins, written)


# -- folding -----------------------------------------------------------------------


def fold_events(events: Iterable[Event]) -> MemoryKV:
    """Append each event to a fresh log, folding the new ones: what the writer does."""
    kv, state = MemoryKV(), LogState()

    def work(txn: WriteTxn) -> None:
        views.mark_fold_rules(txn)  # as a node does on a new data directory
        for event in events:
            if log.append(txn, state, event) is not None:
                views.apply(txn, event)

    kv.write(work)
    return kv


def contents(kv: MemoryKV) -> dict[str, list[tuple[bytes, bytes]]]:
    with kv.read() as txn:
        return {db: list(txn.scan(db)) for db in VIEW_DBS}


def rebuilt(kv: MemoryKV) -> dict[str, list[tuple[bytes, bytes]]]:
    kv.write(replay_views)  # clears the views, then folds the log again in local order
    return contents(kv)


# -- properties --------------------------------------------------------------------


@settings(max_examples=VIEW_EXAMPLES)
@given(histories, st.data())
def test_any_permutation_with_duplicates_folds_to_identical_bytes(
    history: list[Step], data: st.DataObject
) -> None:
    events = replay(history).events
    duplicates = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
    scrambled = data.draw(st.permutations(events + duplicates))
    # views(e1 .. en) == views(permute(e1 .. en + duplicates)), byte for byte
    assert contents(fold_events(scrambled)) == contents(fold_events(events))


@settings(max_examples=VIEW_EXAMPLES)
@given(histories, st.data())
def test_incremental_views_equal_views_rebuilt_from_the_log(
    history: list[Step], data: st.DataObject
) -> None:
    events = replay(history).events
    kv = fold_events(data.draw(st.permutations(events)))
    # views(incremental) == views(clear; replay(log))
    incremental = contents(kv)
    assert rebuilt(kv) == incremental


@settings(max_examples=VIEW_EXAMPLES)
@given(histories)
def test_each_origin_folding_what_it_received_agrees_with_the_model(history: list[Step]) -> None:
    # Every origin's knowledge, in its own arrival order, is a state a replica can be in.
    for origin in replay(history).origins:
        check_against_model(fold_events(origin.known.values()), origin.known)


@settings(max_examples=VIEW_EXAMPLES)
@given(histories)
def test_views_of_every_event_agree_with_the_model(history: list[Step]) -> None:
    replayed = replay(history)
    kv = fold_events(replayed.events)
    check_against_model(kv, replayed.known)
    with kv.read() as txn:
        # a deleted user leaves every group the deleting replica saw them in
        for origin in replayed.origins:
            for group, user, dots in origin.unjoined:
                assert not dots & views.member_slice(txn, group, user).dots(user)


def check_against_model(kv: MemoryKV, known: Known) -> None:
    with kv.read() as txn:
        for stream in STREAMS:
            state = views.entity(txn, stream)
            assert state.exists == exists(known, stream), stream
            values = USER_VALUES if stream.startswith("user/") else GROUP_VALUES
            for name in values:
                w = winner(known, stream, name)
                assert state.value(name) == (None if w is None else w.value), (stream, name)
        for group in GROUPS:
            expected = sorted(u for u in USERS if live_adds(known, group, u))
            assert list(views.members(txn, group)) == expected
        for user in USERS:
            in_groups = [
                g
                for g in sorted(GROUPS)
                if exists(known, f"group/{g}") and live_adds(known, g, user)
            ]
            assert views.groups_of(txn, user) == in_groups
        check_indexes(txn, known)


def check_indexes(txn: ReadTxn, known: Known) -> None:
    expected_conflicts = []
    for name in ("email", "username"):
        held = holders(known, name)
        for value in USER_VALUES[name]:
            assert value is not None
            assert views.lookup(txn, name, value) == sorted(held.get(value.casefold(), []))
        expected_conflicts += [(name, v, sorted(us)) for v, us in held.items() if len(us) > 1]
    for stream in STREAMS:  # an id with creates that did not see each other
        creates = live_creates(known, stream)
        if len(creates) > 1:
            expected_conflicts.append(("id", stream, sorted(str(d) for d in creates)))
    assert list(views.conflicts(txn)) == sorted(expected_conflicts)
    for word in ("homer", "simp", "x", "marge"):
        expected = [
            u
            for u in USERS
            if exists(known, f"user/{u}")
            and any(t.startswith(word) for t in model_tokens(known, u))
        ]
        assert views.search(txn, word, limit=10) == (sorted(expected), None), word


def model_tokens(known: Known, user: str) -> set[str]:
    tokens = set()
    for name in ("name", "username", "email"):
        w = winner(known, f"user/{user}", name)
        if w is not None and w.value:
            tokens.add(w.value.casefold())
            tokens.update(re.findall(r"[a-z0-9]+", w.value.casefold()))
    return tokens


# -- examples ----------------------------------------------------------------------


def cluster() -> tuple[Origin, Origin, Origin]:
    eu, us, ap = (Origin(r) for r in ORIGINS)
    return eu, us, ap


def sync(receiver: Origin, sender: Origin) -> None:
    for event in list(sender.known.values()):
        receiver.receive(event)


def everything(*origins: Origin) -> list[Event]:
    return list({e.dot: e for o in origins for e in o.known.values()}.values())


def test_a_delete_loses_to_a_concurrent_create() -> None:
    eu, us, ap = cluster()
    eu.create("user/homer")
    sync(us, eu)
    us.delete("user/homer")  # observed eu's create only
    ap.create("user/homer")  # concurrent: ap never saw the delete
    for events in (everything(eu, us, ap), everything(eu, us, ap)[::-1]):
        with fold_events(events).read() as txn:
            assert views.entity(txn, "user/homer").exists
    with fold_events(everything(eu, us)).read() as txn:
        assert not views.entity(txn, "user/homer").exists


def test_a_field_write_after_a_delete_does_not_resurrect() -> None:
    eu, us, _ = cluster()
    eu.create("user/homer")
    eu.set("user/homer", "email", "homer@x.us")
    sync(us, eu)
    eu.delete("user/homer")
    us.set("user/homer", "name", "Homer")  # us has not seen the delete yet
    us.set("user/homer", "email", "chunkylover53@aol.com")
    for events in (everything(eu, us), everything(eu, us)[::-1]):
        with fold_events(events).read() as txn:
            state = views.entity(txn, "user/homer")
            assert not state.exists
            # Written under the create the delete removed: cleared with its life (the
            # history still lists it, from the log).
            assert state.value("name") is None
            assert views.lookup(txn, "email", "chunkylover53@aol.com") == []
            assert views.search(txn, "homer", limit=10) == ([], None)


@pytest.mark.parametrize("deleted_is_later", [True, False])
def test_an_id_created_in_two_regions_and_deleted_where_one_was_seen_keeps_the_other_life(
    deleted_is_later: bool,
) -> None:
    """One id created in eu and in us at once (a client's own id); eu edits its user and
    deletes it, having seen its own create alone. us's create outlives the delete (add
    wins), and shows what us's life wrote, nothing of eu's: not its name, and not an
    email or API key us never set (the rule before, a floor at the greatest create,
    showed eu's deleted life's writes in us's user when eu's create was the later)."""
    eu, us, _ = cluster()
    (eu if deleted_is_later else us).now_ms[0] += 5  # whose create is stamped later
    us.create("user/alice")
    us.set("user/alice", "name", "Alice of us")
    eu.create("user/alice")
    eu.set("user/alice", "name", "Alice of eu")
    eu.now_ms[0] += 10
    eu.set("user/alice", "email", "alice@eu.example")
    eu.set("user/alice", "api_key", "eu-secret-key-0001")
    eu.delete("user/alice")
    for events in (everything(eu, us), everything(eu, us)[::-1]):
        with fold_events(events).read() as txn:
            state = views.entity(txn, "user/alice")
            assert state.exists
            assert state.values() == {"name": "Alice of us"}
            assert views.lookup(txn, "email", "alice@eu.example") == []


def test_writes_that_name_no_create_are_kept_under_the_floor_rule() -> None:
    """Writes of format 1 (a node of the version before) name no create: the floor, the
    greatest create, clears those ordered before it, and a delete none."""
    eu, us, _ = cluster()
    eu.create("user/homer")
    eu.set("user/homer", "email", "homer@x.us", bound=False)
    sync(us, eu)
    eu.delete("user/homer")
    us.set("user/homer", "name", "Homer", bound=False)  # us has not seen the delete yet
    for events in (everything(eu, us), everything(eu, us)[::-1]):
        with fold_events(events).read() as txn:
            state = views.entity(txn, "user/homer")
            assert not state.exists
            assert state.value("name") == "Homer"  # kept, but not served
            assert views.search(txn, "homer", limit=10) == ([], None)


def test_one_email_claimed_in_two_regions_is_a_conflict_until_one_changes() -> None:
    eu, us, _ = cluster()
    eu.create("user/homer")
    eu.set("user/homer", "email", "homer@x.us")
    us.create("user/marge")
    us.set("user/marge", "email", "Homer@X.us")  # the same address, other case
    kv = fold_events(everything(eu, us))
    with kv.read() as txn:
        assert list(views.conflicts(txn)) == [("email", "homer@x.us", ["homer", "marge"])]
        assert views.lookup(txn, "email", "HOMER@x.us") == ["homer", "marge"]
    sync(us, eu)
    us.set("user/marge", "email", "marge@x.us")
    with fold_events(everything(eu, us)).read() as txn:
        assert list(views.conflicts(txn)) == []
        assert views.lookup(txn, "email", "homer@x.us") == ["homer"]


def test_a_conflict_disappears_when_a_holder_is_deleted() -> None:
    eu, us, _ = cluster()
    eu.create("user/homer")
    eu.set("user/homer", "username", "homer")
    us.create("user/marge")
    us.set("user/marge", "username", "HOMER")
    sync(us, eu)
    us.delete("user/marge")
    with fold_events(everything(eu, us)).read() as txn:
        assert list(views.conflicts(txn)) == []
        assert views.lookup(txn, "username", "homer") == ["homer"]


def test_search_by_prefix_words_any_case_with_pages() -> None:
    eu, _, _ = cluster()
    people = {
        "homer": ("Homer Jay Simpson", "homer", "hjs@plant.us"),
        "marge": ("Marge Simpson", "marge", "marge@home.us"),
        "bart": ("Bart Simpson", "elbarto", "bart@school.us"),
        "lisa": ("Lisa Simpson", "lisa", "lisa@school.us"),
        "ned": ("Ned Flanders", "ned", "ned@church.us"),
    }
    for user, (name, username, email) in people.items():
        eu.create(f"user/{user}")
        eu.set(f"user/{user}", "name", name)
        eu.set(f"user/{user}", "username", username)
        eu.set(f"user/{user}", "email", email)
    with fold_events(everything(eu)).read() as txn:

        def search(query: str, limit: int = 10) -> list[str]:
            found, _ = views.search(txn, query, limit=limit)
            return found

        assert search("simp") == ["bart", "homer", "lisa", "marge"]
        assert search("SIMPSON homer") == ["homer"]
        assert search("jay simp") == ["homer"]
        assert search("school") == ["bart", "lisa"]
        assert search("elbar") == ["bart"]
        assert search("bart@school.us") == ["bart"]
        assert search("flanders simpson") == []
        first, cursor = views.search(txn, "simpson", limit=2)
        assert (first, cursor) == (["bart", "homer"], b"simpson\0homer")
        second = views.search(txn, "simpson", after=cursor or b"", limit=2)
        assert second == (["lisa", "marge"], b"simpson\0marge")
        assert views.search(txn, "simpson", after=b"simpson\0marge", limit=2) == ([], None)
        assert search("") == search("@@ --") == []


def test_a_deleted_group_is_in_no_one_s_groups_even_with_a_concurrent_add() -> None:
    eu, us, _ = cluster()
    eu.create("user/homer")
    eu.create("user/marge")
    eu.create("group/staff")
    eu.add("staff", "homer")
    sync(us, eu)
    us.delete("group/staff")
    eu.add("staff", "marge")  # concurrent with the delete: the add wins, the group stays gone
    for events in (everything(eu, us), everything(eu, us)[::-1]):
        with fold_events(events).read() as txn:
            assert not views.entity(txn, "group/staff").exists
            assert views.groups_of(txn, "homer") == views.groups_of(txn, "marge") == []
