"""Consistency tokens and entity tags.

A consistency token names, per origin, a counter: "everything this origin wrote up
to here". A write's token covers the events it wrote; a read's covers everything the
node had seen contiguously. A node has caught up with a token when its summary
covers it. Tokens are opaque to clients: url-safe base64 of a small msgpack array.
"""

from __future__ import annotations

import base64
import binascii

import msgpack

from crdt import VersionVector
from crdt.codec import pack

TOKEN_VERSION = 1
# About 19 characters an origin (each region's incarnations are origins of their own):
# 400 of them fit. Below the 8,190 bytes aiohttp (and most proxies) take in a header
# line, so that a node accepts back every token it can send.
TOKEN_CHARS_MAX = 8_000


class BadToken(ValueError):
    pass


Token = dict[str, int]


def token_of(summary: VersionVector) -> Token:
    return {origin: seen.contiguous for origin, seen in summary.origins.items() if seen.contiguous}


def encode_token(token: Token) -> str:
    wire = [TOKEN_VERSION, sorted([origin, counter] for origin, counter in token.items())]
    return base64.urlsafe_b64encode(pack(wire)).rstrip(b"=").decode()


def decode_token(text: str) -> Token:
    if len(text) > TOKEN_CHARS_MAX:
        raise BadToken("consistency token too long")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        version, pairs = msgpack.unpackb(raw)
        if version != TOKEN_VERSION:
            raise BadToken(f"unknown token version {version!r}")
        token = dict(pairs)
    except (binascii.Error, ValueError, TypeError, msgpack.ExtraData) as exc:
        raise BadToken("not a consistency token") from exc
    # Exactly strings and counters: not a float (an infinite one has no int), nor a bool.
    if any(type(o) is not str or type(c) is not int or c < 0 for o, c in token.items()):
        raise BadToken("not a consistency token")
    return token


def covers(summary: VersionVector, token: Token) -> bool:
    return all(summary.contiguous(origin) >= counter for origin, counter in token.items())


def etag_of(tag: int) -> str:
    return f'"{tag:016x}"'
