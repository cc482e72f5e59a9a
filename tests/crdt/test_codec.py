"""Wire encodings: round trips, canonical bytes, pinned golden vectors, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given

from crdt import Add, Dot, LWWRegister, ORSet, Remove, VersionVector, Write
from crdt.codec import CodecError, decode, decode_as, encode
from tests.crdt.histories import histories, replay

GOLDEN = Path(__file__).parent.parent / "golden" / "crdt_v1.json"


def golden_values() -> dict[str, object]:
    eu1, eu2, us1 = Dot("eu-a1", 1), Dot("eu-a1", 2), Dot("us-b2", 1)
    members: ORSet[str] = ORSet()
    for op in (Add("homer", eu1), Add("bart", us1), Remove("bart", frozenset({us1}))):
        members = members.apply(op)
    return {
        "dot": eu1,
        "version_vector": VersionVector.of([eu1, eu2, Dot("us-b2", 3)]),
        "lww_register_empty": LWWRegister(),
        "lww_register": LWWRegister(Write("Homer", (1_700_000_000_000 << 16) | 3, eu2)),
        "or_set": members,
        "or_set_add": Add("lisa", eu2),
        "or_set_remove": Remove("lisa", frozenset({eu2, us1})),
    }


def test_golden_vectors_pin_todays_encoding() -> None:
    pinned = json.loads(GOLDEN.read_text())
    assert {name: encode(v).hex() for name, v in golden_values().items()} == pinned
    for name, value in golden_values().items():
        assert decode(bytes.fromhex(pinned[name])) == value


@given(histories)
def test_reachable_states_round_trip(history: list[Any]) -> None:
    for replica in replay(history):
        for value in (replica.members, replica.register, replica.seen):
            assert decode(encode(value)) == value


@given(histories)
def test_equal_states_encode_to_equal_bytes(history: list[Any]) -> None:
    a, b, _ = replay(history)
    assert encode(a.members.merge(b.members)) == encode(b.members.merge(a.members))


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        ([99, 1, "x"], "unknown tag 99"),
        ([1, 2, "eu", 1], "unknown version 2 for DOT"),
        ([1, 1, "eu", 0], "malformed DOT"),
        ([1, 1, "eu"], "malformed DOT"),
        ([2, 1, [["eu", 1, [2]]]], "cloud must lie beyond its gap"),
        ([2, 1, "nope"], "expected an array"),
        ([4, 1, [["x", []]], []], "at least one dot"),
        ("tagless", "expected \\[tag, version"),
    ],
)
def test_bad_wire_is_a_clear_error(wire: object, complaint: str) -> None:
    with pytest.raises(CodecError, match=complaint):
        decode(msgpack.packb(wire))


def test_bytes_that_are_not_msgpack_are_a_clear_error() -> None:
    with pytest.raises(CodecError, match="not msgpack"):
        decode(b"\xc1")
    with pytest.raises(CodecError, match="expected VersionVector"):
        decode_as(encode(Dot("eu", 1)), VersionVector)
