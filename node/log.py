"""The event log: append (idempotent by dot) and read, inside a KV transaction.

``events`` holds every event under a local sequence number in arrival order (the
node's change feed); ``dots`` maps each dot to its sequence (idempotence, per-origin
range reads); ``streams`` lists each entity's sequences (history, time travel).
``meta`` holds the replica's identity and the counters a commit advances together.
Every event is validated before it is put and after it is read back, except by the
rebuild (``stored_streams``), which trusts what this log validated when it appended.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from crdt import Dot, VersionVector
from crdt import codec as crdt_codec
from node import events as ev
from node.events import Event
from node.kv import ReadTxn, WriteTxn

SCHEMA_VERSION = 1
_U64 = struct.Struct(">Q")


class WrongRegion(RuntimeError):
    """The data directory was created for another region."""


# A big-endian u64, as keys hold sequence numbers and counters (they sort as numbers).
# The struct's own method, not a function around it: three calls an appended event.
u64: Callable[[int], bytes] = _U64.pack


SEQ_MAX = (1 << 64) - 1


def from_u64(b: bytes) -> int:
    return int(_U64.unpack(b)[0])


def dot_key(dot: Dot) -> bytes:
    return dot.origin.encode() + b"\0" + u64(dot.counter)


def stream_key(stream: str, seq: int) -> bytes:
    return stream.encode() + b"\0" + u64(seq)


@dataclass(frozen=True, slots=True)
class Identity:
    region: str
    replica_id: str  # "<region>~<incarnation>"


def open_identity(txn: WriteTxn, region: str, *, incarnation: str | None = None) -> Identity:
    """Read this data directory's identity, or create it (a new incarnation).

    ``incarnation`` is chosen by simulations (seeded runs); otherwise it is random.
    """
    stored = txn.get("meta", b"region")
    if stored is not None and stored.decode() != region:
        raise WrongRegion(
            f"this data directory belongs to region {stored.decode()!r}, not {region!r}: "
            "use its own region, or another directory"
        )
    if stored is None:
        incarnation = incarnation or secrets.token_hex(4)
        txn.put("meta", b"region", region.encode())
        txn.put("meta", b"replica_id", f"{region}~{incarnation}".encode())
        txn.put("meta", b"schema_version", u64(SCHEMA_VERSION))
    replica_id = txn.get("meta", b"replica_id")
    assert replica_id is not None
    return Identity(region, replica_id.decode())


def clear_unsynced_boot(txn: WriteTxn) -> None:
    """This run stopped cleanly, its commits all durable (a clean stop synced them):
    nothing of it can be undone, and the next run needs no new incarnation."""
    txn.delete("meta", UNSYNCED_BOOT_KEY)


def new_incarnation(
    txn: WriteTxn, identity: Identity, *, incarnation: str | None = None
) -> Identity:
    """Serve as a new incarnation of the same region from now on: a new replica id, its
    counter from 1. The old id stays an origin like any other, its events kept.
    ``incarnation`` is chosen by simulations (seeded runs); otherwise it is random."""
    replica_id = f"{identity.region}~{incarnation or secrets.token_hex(4)}"
    txn.put("meta", b"replica_id", replica_id.encode())
    txn.put("meta", b"counter", u64(0))
    return Identity(identity.region, replica_id)


# In meta of a copy made by ``replica backup``: the replica id it is a backup of. A node
# started on it serves as a new incarnation (``renew_if_backup``): its original went on
# writing after the copy, and peers hold those events under dots the copy would take again.
BACKUP_KEY = b"backup_of"


def renew_if_backup(
    txn: WriteTxn, identity: Identity, *, incarnation: str | None = None
) -> Identity:
    """A new incarnation if this directory is a backup (``BACKUP_KEY``), else ``identity``;
    the mark is cleared either way."""
    if txn.get("meta", BACKUP_KEY) is None:
        return identity
    txn.delete("meta", BACKUP_KEY)
    return new_incarnation(txn, identity, incarnation=incarnation)


# Linux's id of the running boot. A run that did not stop cleanly and is followed by one
# on another boot may have lost its last commits: without metasync an OS crash may undo
# the last one (LMDB syncs the data, not the page that points at it), and a disk put back
# to a snapshot (a virtual machine's, restored and booted) undoes all since. Peers may
# hold their events: a node that reused their dots would never converge with them.
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# In meta: the boot the running node runs on, cleared by a clean stop. (Its name is of
# the version that kept it for runs without metasync alone.)
UNSYNCED_BOOT_KEY = b"unsynced_boot"


def current_boot() -> bytes | None:
    """This boot's id, or None where the system does not tell it."""
    try:
        return BOOT_ID_PATH.read_bytes().strip() or None
    except OSError:
        return None


def renew_after_reboot(
    txn: WriteTxn,
    identity: Identity,
    *,
    boot: bytes | None,
    incarnation: str | None = None,
    renewed: bool = False,
) -> Identity:
    """The identity to serve as: a new incarnation if the last run did not stop cleanly
    and ran on another boot (its last commits may be undone), else ``identity``; and the
    boot this run goes on, recorded for the next (a clean stop clears it). ``renewed``:
    ``identity`` is a new incarnation already (a backup's), which takes no dot of the
    last run's either.

    A new incarnation takes no dot of the old one, which becomes one more origin here:
    its events that peers hold, those of an undone commit too, come back as any other's.
    (A power loss with metasync undoes nothing: that renewal costs an origin, no more.)
    """
    last = txn.get("meta", UNSYNCED_BOOT_KEY)
    serving = identity
    if last is not None and boot is not None and last != boot and not renewed:
        serving = new_incarnation(txn, identity, incarnation=incarnation)
    if boot is None:
        txn.delete("meta", UNSYNCED_BOOT_KEY)
    else:
        txn.put("meta", UNSYNCED_BOOT_KEY, boot)
    return serving


@dataclass
class LogState:
    """What commits advance together; the writer keeps a committed copy."""

    seq: int = 0  # the last local sequence number used
    counter: int = 0  # this replica's last dot counter
    hlc: int = 0  # the clock's last reading: stamps issued, and observed ones it followed
    summary: VersionVector = field(default_factory=VersionVector)
    # The origin of this replica's writes: a commit may renew it (``renew``).
    replica_id: str = ""

    def copy(self) -> LogState:
        return LogState(self.seq, self.counter, self.hlc, self.summary, self.replica_id)


def _number(txn: ReadTxn, key: bytes) -> int:
    raw = txn.get("meta", key)
    return 0 if raw is None else from_u64(raw)


def stored_counter(txn: ReadTxn) -> int:
    """This replica's last dot counter, as the last commit saved it."""
    return _number(txn, b"counter")


def last_seq(txn: ReadTxn) -> int:
    """The last local sequence number used: how many events the log holds."""
    return _number(txn, b"seq")


def stored_summary(txn: ReadTxn) -> VersionVector:
    """The summary of every event the log holds, as the last commit saved it."""
    raw = txn.get("meta", b"summary")
    return VersionVector() if raw is None else crdt_codec.decode_as(raw, VersionVector)


def load_state(txn: ReadTxn, identity: Identity) -> LogState:
    summary = stored_summary(txn)
    counter = _number(txn, b"counter")
    state = LogState(last_seq(txn), counter, _number(txn, b"hlc"), summary, identity.replica_id)
    assert state.counter >= summary.highest(identity.replica_id), "own counter behind its dots"
    return state


def renew(txn: WriteTxn, state: LogState, *, incarnation: str | None = None) -> str:
    """Serve as a new incarnation from this commit on (``new_incarnation``): this
    replica's own events turned up beyond its counter (its last commits were undone:
    a copy restored, a snapshot rolled back). Its next write must take none of their
    dots, nor of any others of them a peer not heard from yet may hold, and what no
    peer holds of them is lost for good: the old id's counters stop at a gap that
    never fills, and the new id's grow from 1 without one. Returns the old id.
    ``incarnation``: as ``new_incarnation``'s."""
    old = state.replica_id
    region = old.partition("~")[0]
    renewed = new_incarnation(txn, Identity(region, old), incarnation=incarnation)
    state.replica_id = renewed.replica_id
    state.counter = 0
    return old


def save_state(txn: WriteTxn, state: LogState) -> None:
    txn.put("meta", b"seq", u64(state.seq))
    txn.put("meta", b"counter", u64(state.counter))
    txn.put("meta", b"hlc", u64(state.hlc))
    txn.put("meta", b"summary", crdt_codec.encode(state.summary))


def append(txn: WriteTxn, state: LogState, event: Event) -> int | None:
    """Validate and append ``event`` unless its dot is already here; return its new seq."""
    if event.dot in state.summary:
        return None
    state.seq += 1
    _put(txn, state.seq, event, ev.encode(ev.validate(event)))
    state.summary = state.summary.add(event.dot)
    # state.hlc is left to the writer's clock: a stamp beyond the allowed drift must not
    # be saved here, or the clock would restart from it and follow it after all.
    return state.seq


def append_all(
    txn: WriteTxn, state: LogState, events: Iterable[Event], *, validated: bool = False
) -> list[tuple[int, Event]]:
    """``append`` each event in turn (one whose dot is here, or earlier in ``events``, is
    passed over); return the appended ones with their seqs. The summary grows once for
    the batch, not once per event (each growth is a new vector), and each table takes
    the batch's rows in one call. ``validated``: the caller has validated every event
    (the writer does a whole ingested batch before putting any of it), so none is
    validated again."""
    summary = state.summary
    fresh = set[tuple[str, int]]()  # (origin, counter): hashed in C, where a Dot's is not
    appended: list[tuple[int, Event]] = []
    rows: list[tuple[bytes, bytes]] = []
    dots: list[tuple[bytes, bytes]] = []
    streams: list[tuple[bytes, bytes]] = []
    seq = state.seq
    for event in events:
        dot = event.dot
        pair = (dot.origin, dot.counter)
        if pair in fresh or dot in summary:
            continue
        seq += 1
        key = u64(seq)
        rows.append((key, ev.encode(event if validated else ev.validate(event))))
        dots.append((dot_key(dot), key))
        streams.append((stream_key(event.stream, seq), b""))
        fresh.add(pair)
        appended.append((seq, event))
    if appended:
        _put_rows(txn, rows, dots, streams)
        state.seq = seq
        state.summary = summary.add_all(event.dot for _, event in appended)
    return appended


def _put(txn: WriteTxn, seq: int, event: Event, data: bytes) -> None:
    """An event is a row of ``events`` under its seq, one of ``dots`` and one of
    ``streams`` (one event: three puts cost less than three calls of ``put_many``)."""
    key = u64(seq)
    txn.put("events", key, data)
    txn.put("dots", dot_key(event.dot), key)
    txn.put("streams", stream_key(event.stream, seq), b"")


def _put_rows(
    txn: WriteTxn,
    rows: list[tuple[bytes, bytes]],
    dots: list[tuple[bytes, bytes]],
    streams: list[tuple[bytes, bytes]],
) -> None:
    """A batch's rows of the three tables (see ``_put``), each table's in one call; the
    seqs ascend above every one in ``events``, so they are appended."""
    txn.put_many("events", rows, append=True)
    txn.put_many("dots", dots)
    txn.put_many("streams", streams)


def event_bytes_of(txn: ReadTxn, dot: Dot) -> bytes | None:
    """The stored bytes of the event of ``dot``, or None if it is not here."""
    seq = txn.get("dots", dot_key(dot))
    return None if seq is None else txn.get("events", seq)


def read_event(txn: ReadTxn, seq: int) -> Event:
    data = txn.get("events", u64(seq))
    if data is None:
        raise KeyError(seq)
    return ev.decode(data)


def events_after(txn: ReadTxn, seq: int, *, limit: int) -> Iterator[tuple[int, Event]]:
    """The change feed: events with a local sequence above ``seq``, in order."""
    for seq_after, data in event_bytes_after(txn, seq, limit=limit):
        yield seq_after, ev.decode(data)


def event_bytes_after(txn: ReadTxn, seq: int, *, limit: int) -> Iterator[tuple[int, bytes]]:
    """``events_after`` as stored, not decoded."""
    for n, (key, data) in enumerate(txn.scan("events", start=u64(seq + 1))):
        if n >= limit:
            return
        yield from_u64(key), data


def stored_streams(
    txn: ReadTxn, *, part: int = 0, parts: int = 1, block_streams: int = 1
) -> Iterator[tuple[int, str, list[list[Any]]]]:
    """Every entity's events in local order, entity by entity, decoded as stored (not
    validated again, nor made ``Event``s; an event of an older format is upcast), each
    entity with the number of its block (of ``block_streams`` entities, in stream order).

    With ``parts``, the entities of one part of the blocks alone, of those numbered
    ``part`` modulo ``parts``: the others' events are not read."""
    stream, wires, streams, mine = b"", list[list[Any]](), -1, False
    block = 0
    for key, _ in txn.scan("streams"):  # stream \0 seq
        name = key[:-9]
        if name != stream:
            if mine:
                yield block, stream.decode(), wires
            stream, wires, streams = name, [], streams + 1
            block = streams // block_streams
            mine = block % parts == part
        if not mine:
            continue
        data = txn.get("events", key[-8:])
        if data is None:
            raise KeyError(from_u64(key[-8:]))
        wire = msgpack.unpackb(data)
        wires.append(wire if wire[0] in ev.READ_AS_IS else ev.to_wire(ev.decode(data)))
    if mine:
        yield block, stream.decode(), wires


def stream_event_bytes(txn: ReadTxn, stream: str) -> list[tuple[int, bytes]]:
    """The events of one stream, in order, as stored (seq, bytes)."""
    found = []
    get = txn.get
    for key, _ in txn.scan("streams", prefix=stream.encode() + b"\0"):
        data = get("events", key[-8:])
        if data is None:
            raise KeyError(from_u64(key[-8:]))
        found.append((from_u64(key[-8:]), data))
    return found


def stream_events(txn: ReadTxn, stream: str) -> Iterator[tuple[int, Event]]:
    for key, _ in txn.scan("streams", prefix=stream.encode() + b"\0"):
        seq = from_u64(key[-8:])
        yield seq, read_event(txn, seq)


def origin_event_bytes(
    txn: ReadTxn, origin: str, first: int, last: int
) -> Iterator[tuple[int, bytes]]:
    """This origin's events with counters in ``first..last`` that are here, as stored."""
    prefix = origin.encode() + b"\0"
    for key, seq in txn.scan("dots", prefix=prefix, start=prefix + u64(first)):
        counter = from_u64(key[-8:])
        if counter > last:
            return
        data = txn.get("events", seq)
        assert data is not None, f"dot {origin}:{counter} points at no event"
        yield counter, data


def origin_events(txn: ReadTxn, origin: str, first: int, last: int) -> Iterator[Event]:
    """This origin's events with counters in ``first..last`` that are here, in order."""
    for _, data in origin_event_bytes(txn, origin, first, last):
        yield ev.decode(data)


def quarantine(txn: WriteTxn, dot: Dot, data: bytes) -> bool:
    """Keep an event this node cannot read yet; it is applied once the node can. Whether
    it was not kept already."""
    key = dot_key(dot)
    if txn.get("quarantine", key) is not None:
        return False
    txn.put("quarantine", key, data)
    return True


def quarantined(txn: ReadTxn) -> Iterator[tuple[Dot, bytes]]:
    for key, data in txn.scan("quarantine"):
        yield Dot(key[:-9].decode(), from_u64(key[-8:])), data  # origin \0 u64 counter
