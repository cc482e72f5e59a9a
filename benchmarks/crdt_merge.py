"""CRDT merge of concurrent map-key updates from 3 replicas, in memory (issue 6, item 1).

Workload: a map of ``K = N / 3`` keys. Each of 3 replicas writes every key once, in its
own shuffled order, with a value of its own (``N`` updates in all, ``N = 100_000``): every
key ends up with 3 concurrent writes, so every key is a conflict to resolve, and each
replica's state is as large as its history (the state-based merge gets no free
compaction from keys written twice).

- **ours**: a dict ``key -> crdt.LWWRegister``; each replica stamps its writes
  (``crdt.Write``) with its own ``HybridLogicalClock`` (virtual time, a few ms of skew
  between replicas) and dots of its own origin.
- **Automerge** (``automerge==1.0.0rc1``): one ``Document`` per replica (distinct actor
  ids), each replica's updates in one transaction (its cheapest form: one change).
- **pycrdt** (Yjs): one ``Doc`` per replica (distinct client ids), a ``Map``, each
  replica's updates in one transaction; merging is ``get_update`` + ``apply_update``,
  pycrdt having no document-to-document merge.

Two figures, each timed the same way for all three (best of a few runs):

- **merge 3 replicas**: start from replica 0's state, merge replicas 1 and 2 into it.
  Ours: ``dict(r0)`` then ``LWWRegister.merge`` per key. Automerge: ``fork()`` of doc 0,
  then ``merge`` docs 1 and 2. pycrdt: a doc holding doc 0 (untimed), then the deltas of
  docs 1 and 2 (``get_update(state)`` / ``apply_update``).
- **replay all updates**: an empty replica receives every replica's updates. Ours: apply
  all ``N`` ``Write`` ops (``LWWRegister.apply``). Automerge: empty doc, ``merge`` all
  three. pycrdt: empty doc, ``apply_update`` of all three full updates.

Rates are ``N`` / time, so ratio > 1 means ours is faster. The merged results are checked
to agree in content: same key count everywhere, every merged value one of the three
values written to that key, and ours the same whichever way or order it is merged.
Winners differ between systems (each breaks ties its own way), which is correct.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Callable
from typing import Any

from benchmarks.common import Row, best_of, print_table, row
from crdt import Dot, HybridLogicalClock, LWWRegister, Write

NAME = "crdt_merge"
REPLICAS = ("eu~a1b2c3d4", "us~e5f6a7b8", "ap~c9d0e1f2")
EPOCH_MS = 1_700_000_000_000
SEED = 6

Map = dict[str, LWWRegister[str]]


class Workload:
    """The same updates for every system: per replica, (key, value) in its own order."""

    def __init__(self, updates: int) -> None:
        self.keys_count = updates // len(REPLICAS)
        self.updates = self.keys_count * len(REPLICAS)
        rng = random.Random(SEED)
        keys = [f"user/{i:06d}.name" for i in range(self.keys_count)]
        self.per_replica: list[list[tuple[str, str]]] = []
        for r, origin in enumerate(REPLICAS):
            order = keys[:]
            rng.shuffle(order)
            region = origin.partition("~")[0]
            self.per_replica.append([(k, f"{region}-{r}-{k[5:11]}-value") for k in order])
        self.candidates: dict[str, set[str]] = {k: set() for k in keys}
        for pairs in self.per_replica:
            for k, v in pairs:
                self.candidates[k].add(v)

    def check(self, system: str, merged: dict[str, str]) -> None:
        if len(merged) != self.keys_count:
            raise AssertionError(f"{system}: {len(merged)} keys merged, {self.keys_count} written")
        wrong = [k for k, v in merged.items() if v not in self.candidates.get(k, ())]
        if wrong:
            raise AssertionError(f"{system}: {len(wrong)} keys hold a value never written there")


# --------------------------------------------------------------------------- ours


def _reader(cell: list[int]) -> Callable[[], int]:
    """Virtual time: the clock reads ``cell[0]``, which the workload advances."""
    return lambda: cell[0]


def _ours_build(w: Workload) -> tuple[list[Map], list[list[tuple[str, Write[str]]]]]:
    """Each replica's state and its ops, as that replica made them (untimed)."""
    rng = random.Random(SEED + 1)
    states: list[Map] = []
    ops: list[list[tuple[str, Write[str]]]] = []
    empty: LWWRegister[str] = LWWRegister()
    for origin, pairs in zip(REPLICAS, w.per_replica, strict=True):
        now = [EPOCH_MS + rng.randrange(0, 5)]  # a few ms of skew between replicas
        clock = HybridLogicalClock(_reader(now))
        state: Map = {}
        mine: list[tuple[str, Write[str]]] = []
        for counter, (key, value) in enumerate(pairs, start=1):
            if counter % 64 == 0:
                now[0] += 1  # ~64 updates per ms: logical counters and physical time both move
            write = Write(value, clock.tick(), Dot(origin, counter))
            state[key] = state.get(key, empty).apply(write)
            mine.append((key, write))
        states.append(state)
        ops.append(mine)
    return states, ops


def ours_merge(states: list[Map]) -> Map:
    merged = dict(states[0])
    for other in states[1:]:
        for key, register in other.items():
            mine = merged.get(key)
            merged[key] = register if mine is None else mine.merge(register)
    return merged


def ours_replay(ops: list[list[tuple[str, Write[str]]]]) -> Map:
    empty: LWWRegister[str] = LWWRegister()
    merged: Map = {}
    for replica_ops in ops:
        for key, write in replica_ops:
            merged[key] = merged.get(key, empty).apply(write)
    return merged


def _values(m: Map) -> dict[str, str]:
    return {k: r.value for k, r in m.items() if r.value is not None}


# --------------------------------------------------------------------------- Automerge


def _automerge_build(w: Workload) -> list[Any]:
    from automerge import core

    docs = []
    for r, pairs in enumerate(w.per_replica):
        doc = core.Document(actor_id=bytes([r + 1]) * 16)
        with doc.transaction() as tx:
            for key, value in pairs:
                tx.put(core.ROOT, key, core.ScalarType.Str, value)
        docs.append(doc)
    return docs


def _automerge_values(doc: Any) -> dict[str, str]:
    from automerge import core

    out = {}
    for key in doc.keys(core.ROOT):
        got = doc.get(core.ROOT, key)
        out[key] = got[0][1]
    return out


# --------------------------------------------------------------------------- pycrdt


def _pycrdt_build(w: Workload) -> list[Any]:
    from pycrdt import Doc
    from pycrdt import Map as YMap

    docs = []
    for r, pairs in enumerate(w.per_replica):
        doc: Any = Doc(client_id=r + 1)
        ymap = doc.get("m", type=YMap)
        with doc.transaction():
            for key, value in pairs:
                ymap[key] = value
        docs.append(doc)
    return docs


def _pycrdt_values(doc: Any) -> dict[str, str]:
    from pycrdt import Map as YMap

    return dict(doc.get("m", type=YMap).items())


# --------------------------------------------------------------------------- run


def _timed(fn: Callable[[], Any], repeat: int, setup: Callable[[], Any] | None = None) -> float:
    return best_of(fn, repeat, setup=setup)


def run(quick: bool) -> list[Row]:
    updates = 15_000 if quick else 100_000
    repeat = 2 if quick else 5
    w = Workload(updates)

    states, ops = _ours_build(w)
    am_docs = _automerge_build(w)
    y_docs = _pycrdt_build(w)
    y_full = [d.get_update() for d in y_docs]
    # The fixtures (some 10^6 long-lived objects, mostly ours) would make every full
    # collection during a timed run rescan them: freeze them, as a long-running node's
    # old objects effectively are. Objects made while timing are still collected.
    gc.collect()
    gc.freeze()
    try:
        return _measure(w, states, ops, am_docs, y_docs, y_full, repeat)
    finally:
        gc.unfreeze()


def _measure(
    w: Workload,
    states: list[Map],
    ops: list[list[tuple[str, Write[str]]]],
    am_docs: list[Any],
    y_docs: list[Any],
    y_full: list[bytes],
    repeat: int,
) -> list[Row]:
    from automerge import core
    from pycrdt import Doc

    n = w.updates
    out: dict[str, Any] = {}

    # -- merge 3 replicas: replica 0 absorbs replicas 1 and 2
    def ours_m() -> None:
        out["ours_m"] = ours_merge(states)

    def am_m() -> None:
        doc = am_docs[0].fork()
        for other in am_docs[1:]:
            doc.merge(other)
        out["am_m"] = doc

    def y_setup() -> None:
        doc: Any = Doc()
        doc.apply_update(y_full[0])
        out["y_m"] = doc

    def y_m() -> None:
        doc = out["y_m"]
        for other in y_docs[1:]:
            doc.apply_update(other.get_update(doc.get_state()))

    t_ours_m = _timed(ours_m, repeat)
    t_am_m = _timed(am_m, repeat)
    t_y_m = _timed(y_m, repeat, setup=y_setup)

    # -- replay all updates into an empty replica
    def ours_r() -> None:
        out["ours_r"] = ours_replay(ops)

    def am_r() -> None:
        doc = core.Document()
        for other in am_docs:
            doc.merge(other)
        out["am_r"] = doc

    def y_r() -> None:
        doc: Any = Doc()
        for update in (d.get_update() for d in y_docs):
            doc.apply_update(update)
        out["y_r"] = doc

    t_ours_r = _timed(ours_r, repeat)
    t_am_r = _timed(am_r, repeat)
    t_y_r = _timed(y_r, repeat)

    # -- the merged results agree in content
    ours_values = _values(out["ours_m"])
    w.check("ours (merge)", ours_values)
    if _values(out["ours_r"]) != ours_values or _values(ours_merge(states[::-1])) != ours_values:
        raise AssertionError("ours: merge, reversed merge and replay disagree")
    w.check("automerge (merge)", _automerge_values(out["am_m"]))
    w.check("automerge (replay)", _automerge_values(out["am_r"]))
    w.check("pycrdt (merge)", _pycrdt_values(out["y_m"]))
    w.check("pycrdt (replay)", _pycrdt_values(out["y_r"]))

    def rate(seconds: float) -> float:
        return n / seconds

    return [
        row(NAME, f"merge 3 replicas, {n:,} updates, vs Automerge", rate(t_ours_m),
            "updates/s", rate(t_am_m), at_least=1.0),
        row(NAME, f"merge 3 replicas, {n:,} updates, vs pycrdt", rate(t_ours_m),
            "updates/s", rate(t_y_m), at_least=1.0),
        row(NAME, f"replay all {n:,} updates, vs Automerge", rate(t_ours_r),
            "updates/s", rate(t_am_r), at_least=1.0),
        row(NAME, f"replay all {n:,} updates, vs pycrdt", rate(t_ours_r),
            "updates/s", rate(t_y_r), at_least=1.0),
    ]  # fmt: skip


if __name__ == "__main__":
    import sys

    print_table(run(quick="--quick" in sys.argv))
