"""Tagged, versioned msgpack encoding of every CRDT type.

Every encoded value is a msgpack array ``[tag, version, *payload]``. Encoding is
canonical (origins, dots and elements sorted), so equal states encode to equal
bytes and a digest of the bytes is a digest of the state. An unknown tag or
version, or a payload of the wrong shape, raises ``CodecError``: never a crash.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import IntEnum
from typing import Any, TypeVar

import msgpack

from crdt.dot import Dot
from crdt.lww_register import LWWRegister, Write
from crdt.or_set import Add, ORSet, Remove
from crdt.version_vector import OriginSeen, VersionVector

FORMAT_VERSION = 1


class Tag(IntEnum):
    DOT = 1
    VERSION_VECTOR = 2
    LWW_REGISTER = 3
    OR_SET = 4
    OR_SET_ADD = 5
    OR_SET_REMOVE = 6


class CodecError(ValueError):
    """Bytes that do not decode to a value of a known tag and version."""


_PACKERS = threading.local()


def pack(obj: object) -> bytes:
    """``msgpack.packb(obj)`` with a Packer kept per thread: ``packb`` makes a Packer, and
    its 256 KiB buffer, for every call (a third of what packing one event costs). For
    small values (events, views, tokens): the kept Packer keeps the largest buffer it
    grew, so a replication body (up to megabytes) is packed with ``packb``."""
    packer: msgpack.Packer | None = getattr(_PACKERS, "packer", None)
    if packer is None:
        packer = _PACKERS.packer = msgpack.Packer()
    return packer.pack(obj)  # type: ignore[no-any-return]


def _dot_payload(dot: Dot) -> list[Any]:
    return [dot.origin, dot.counter]


def _dots_payload(dots: frozenset[Dot]) -> list[Any]:
    return [_dot_payload(d) for d in sorted(dots)]


def _vv_payload(vv: VersionVector) -> list[Any]:
    return [
        [origin, seen.contiguous, sorted(seen.cloud)]
        for origin, seen in sorted(vv.origins.items())
        if seen.contiguous or seen.cloud
    ]


def _element_key(element: Any) -> bytes:
    return pack(element)


def to_wire(value: object) -> list[Any]:
    """The msgpack-ready array for ``value``, to embed in larger messages."""
    v = FORMAT_VERSION
    if isinstance(value, Dot):
        return [Tag.DOT, v, *_dot_payload(value)]
    if isinstance(value, VersionVector):
        return [Tag.VERSION_VECTOR, v, _vv_payload(value)]
    if isinstance(value, LWWRegister):
        w = value.winner
        return [Tag.LWW_REGISTER, v, None if w is None else [w.value, w.hlc, *_dot_payload(w.dot)]]
    if isinstance(value, ORSet):
        entries = list(value.entries.items())
        if len(entries) > 1:
            entries.sort(key=lambda item: _element_key(item[0]))
        return [
            Tag.OR_SET,
            v,
            [[element, _dots_payload(dots)] for element, dots in entries],
            _vv_payload(value.context),
        ]
    if isinstance(value, Add):
        return [Tag.OR_SET_ADD, v, value.element, *_dot_payload(value.dot)]
    if isinstance(value, Remove):
        return [Tag.OR_SET_REMOVE, v, value.element, _dots_payload(value.observed)]
    raise TypeError(f"no wire form for {type(value).__name__}")


def encode(value: object) -> bytes:
    return pack(to_wire(value))


def _dot(payload: Any) -> Dot:
    origin, counter = payload
    if not isinstance(origin, str) or not isinstance(counter, int):
        raise CodecError("dot must be [str, int]")
    return Dot(origin, counter)


def _dots(payload: Any) -> frozenset[Dot]:
    return frozenset(_dot(p) for p in _list(payload))


def _list(payload: Any) -> list[Any]:
    if not isinstance(payload, list):
        raise CodecError(f"expected an array, got {type(payload).__name__}")
    return payload


def _vv(payload: Any) -> VersionVector:
    origins = {}
    for origin, contiguous, cloud in _list(payload):
        if not isinstance(origin, str) or not isinstance(contiguous, int) or contiguous < 0:
            raise CodecError("version vector entry must be [str, int >= 0, [int...]]")
        counters = _list(cloud)
        if not all(isinstance(c, int) and c > contiguous + 1 for c in counters):
            raise CodecError("version vector cloud must lie beyond its gap")
        origins[origin] = OriginSeen(contiguous, frozenset(counters))
    return VersionVector(origins)


def _register(payload: Any) -> LWWRegister[Any]:
    if payload is None:
        return LWWRegister()
    value, hlc, origin, counter = _list(payload)
    if not isinstance(hlc, int) or hlc < 0:
        raise CodecError("register stamp must be an int >= 0")
    return LWWRegister(Write(value, hlc, _dot([origin, counter])))


def _or_set(entries: Any, context: Any) -> ORSet[Any]:
    decoded = {}
    for element, dots in _list(entries):
        decoded[element] = _dots(dots)
        if not decoded[element]:
            raise CodecError("an or-set entry needs at least one dot")
    return ORSet(decoded, _vv(context))


_DECODERS: dict[int, Callable[..., object]] = {
    Tag.DOT: lambda origin, counter: _dot([origin, counter]),
    Tag.VERSION_VECTOR: _vv,
    Tag.LWW_REGISTER: _register,
    Tag.OR_SET: _or_set,
    Tag.OR_SET_ADD: lambda element, origin, counter: Add(element, _dot([origin, counter])),
    Tag.OR_SET_REMOVE: lambda element, dots: Remove(element, _dots(dots)),
}

T = TypeVar("T")


def from_wire(wire: Any) -> object:
    if not isinstance(wire, list) or len(wire) < 2:
        raise CodecError("expected [tag, version, ...]")
    tag, version, *payload = wire
    decoder = _DECODERS.get(tag) if isinstance(tag, int) else None
    if decoder is None:
        raise CodecError(f"unknown tag {tag!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unknown version {version!r} for {Tag(tag).name}")
    try:
        return decoder(*payload)
    except CodecError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise CodecError(f"malformed {Tag(tag).name}: {exc}") from exc


def decode(data: bytes) -> object:
    try:
        wire = msgpack.unpackb(data, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"not msgpack: {exc}") from exc
    return from_wire(wire)


def decode_as(data: bytes, kind: type[T]) -> T:
    value = decode(data)
    if not isinstance(value, kind):
        raise CodecError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value
